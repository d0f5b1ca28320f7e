"""Shared fixtures: the real LJSpeech clips, the real Llama-3.2 text tokenizer, the demo config's
random-init Higgs audio tokenizer and model (built once per test session)."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LJ = ROOT / "data" / "ljspeech32"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def lj_dir() -> Path:
    """Folder with metadata.csv and wavs/ of 32 real LJSpeech clips (22.05 kHz mono)."""
    return LJ


@pytest.fixture(scope="session")
def lj_clips() -> list[Path]:
    return sorted((LJ / "wavs").glob("*.wav"))


@pytest.fixture(scope="session")
def demo_config() -> dict:
    """config/demo.yaml, validated, defaults filled (do not mutate: use ``tmp_config``)."""
    from higgs_tune.config import load_config

    return load_config([ROOT / "config" / "demo.yaml"])


@pytest.fixture
def tmp_config(demo_config, tmp_path) -> dict:
    """A deep copy of the demo config writing results and cache under ``tmp_path``."""
    cfg = copy.deepcopy(demo_config)
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["cache_dir"] = str(tmp_path / "cache")
    cfg["data"]["manifest"] = str(ROOT / cfg["data"]["manifest"])
    cfg["data"]["data_root"] = str(ROOT / cfg["data"]["data_root"])
    return cfg


@pytest.fixture(scope="session")
def text_tokenizer():
    from higgs_tune.model import load_text_tokenizer

    return load_text_tokenizer()


@pytest.fixture(scope="session")
def audio_tokenizer(demo_config):
    from higgs_tune.codec import build_audio_tokenizer

    return build_audio_tokenizer(demo_config["audio_tokenizer"])


@pytest.fixture
def tiny_model(demo_config):
    """A fresh random-init tiny Higgs model (function scope: tests may train it)."""
    from higgs_tune.model import build_model

    return build_model(demo_config["model"])
