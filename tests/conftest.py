"""Shared fixtures: the real LJSpeech clips, the real Llama-3.2 text tokenizer, the demo config's
random-init Higgs audio tokenizer and model (built once per test session)."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LJ = ROOT / "data" / "ljspeech32"

#: the files that take minutes, longest first (`make test` runs two pytest-xdist workers, a file on one
#: worker: starting the long ones first lets both workers finish together). Balance only: a file not
#: listed runs after these, in the usual order.
LONG_FIRST = ("test_slurm.py", "test_preemption.py", "test_dvc.py", "test_workflow.py", "test_compare.py",
              "test_distributed.py", "test_tokenize.py", "test_multinode.py", "test_pretrained.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: a file's own order kept


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
    if cfg["data"].get("data_root"):
        cfg["data"]["data_root"] = str(ROOT / cfg["data"]["data_root"])
    return cfg


@pytest.fixture(scope="session")
def text_tokenizer():
    from higgs_tune.model import load_text_tokenizer

    return load_text_tokenizer()


@pytest.fixture(scope="session")
def audio_tokenizer(demo_config):
    from higgs_tune.codec import build_audio_tokenizer

    return build_audio_tokenizer(demo_config["audio_tokenizer"], device="cpu")


@pytest.fixture
def tiny_model(demo_config):
    """A fresh random-init tiny Higgs model (function scope: tests may train it)."""
    import torch

    from higgs_tune.model import build_model

    return build_model(demo_config["model"], torch.float32, "cpu")


# ------------------------------------------------------------------- the demo's codes, encoded once
def run_stage(module: str, args: list[str], log: Path) -> None:
    """``python -m <module> <args>`` as a rule runs it (this checkout's package, offline), output to ``log``;
    fails the test with the log's tail when it exits non-zero."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "HF_HUB_OFFLINE": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        res = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=fh,
                             stderr=subprocess.STDOUT, timeout=900)
    assert res.returncode == 0, log.read_text()[-3000:]


def encode_demo(out: Path, cfg: dict) -> dict[str, Path]:
    """The real manifest and tokenize stages on ``cfg``'s manifest, run as their rules run them, into
    ``out`` (codes into ``cfg["cache_dir"]``): their outputs by rule key (``train``, ``val``, ``index``...)."""
    m = {k: out / "manifest" / f"{k}.{ext}" for k, ext in
         (("train", "jsonl"), ("val", "jsonl"), ("quarantine", "jsonl"), ("fixes", "json"))}
    run_stage("higgs_tune.manifest", ["--config-json", json.dumps({k: cfg[k] for k in ("data", "cache_dir")}),
                                      "--manifest", cfg["data"]["manifest"],
                                      *[a for k, p in m.items() for a in (f"--{k}", str(p))]], out / "manifest.log")
    t = {"index": out / "tokens" / "index.parquet", "stats": out / "tokens" / "stats.json"}
    run_stage("higgs_tune.audio_tokens",
              ["encode", "--config-json", json.dumps({k: cfg[k] for k in ("audio_tokenizer", "cache_dir")}),
               "--train", str(m["train"]), "--val", str(m["val"]), "--index", str(t["index"]),
               "--stats", str(t["stats"]), "--threads", "2", "--no-progress"], out / "tokenize.log")
    return {**m, **t}


@pytest.fixture(scope="session")
def demo_code_cache(tmp_path_factory, demo_config, worker_id):
    """``seed(cache_dir) -> str``: makes ``cache_dir`` a code cache holding the codes of every clip of the
    demo manifest under the demo's audio tokenizer, copied from one built once per test run (by the real
    manifest and tokenize stages) and shared by the pytest-xdist workers (under a lock: the first builds).

    For tests whose subject is not encoding (the Slurm chain, the sweep, the demo's batches): their
    tokenize job still runs and reads the cache, as a user's rerun does; ``tests/test_tokenize.py``
    starts from empty caches. A failed build fails every test asking for it at once, with its reason."""
    base = tmp_path_factory.getbasetemp()  # under xdist: <this run's base>/popen-gwN
    shared = (base.parent if worker_id != "master" else base) / "demo-code-cache"
    shared.mkdir(exist_ok=True)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (shared / "failed").exists():
            pytest.fail("building the shared demo code cache failed:\n" + (shared / "failed").read_text())
        if not (shared / "ready").exists():
            cfg = copy.deepcopy(demo_config)
            cfg["cache_dir"] = str(shared / "cache")
            cfg["data"]["manifest"] = str(ROOT / cfg["data"]["manifest"])
            try:
                encode_demo(shared / "stages", cfg)
            except BaseException as exc:
                (shared / "failed").write_text(str(exc)[-3000:])
                raise
            (shared / "ready").write_text("")

    def seed(cache_dir: Path) -> str:
        shutil.copytree(shared / "cache", cache_dir, dirs_exist_ok=True)
        return str(cache_dir)

    return seed


# ----------------------------------------------------------------------- training inputs, staged
SHORT = ["LJ001-0002", "LJ001-0024", "LJ001-0030"]  # 1.9 s, 1.8 s, 2.6 s


@pytest.fixture(scope="session")
def short_codes(audio_tokenizer, lj_dir):
    """Real codes (8, T) of three short LJSpeech clips from the demo's random-init Higgs tokenizer."""
    from higgs_tune import audio_io

    out = {}
    for cid in SHORT:
        wv, sr = audio_io.load_audio(lj_dir / "wavs" / f"{cid}.wav")
        out[cid] = (audio_io.audio_sha256(wv, sr), audio_tokenizer.encode(
            audio_io.to_mono_resampled(wv, sr, 24000), sr=24000).long())
    return out


@pytest.fixture(scope="session")
def transcripts(lj_dir):
    return dict(line.rstrip("\n").split("|", 1) for line in open(lj_dir / "metadata.csv", encoding="utf-8"))


def tts_row(cid: str, text: str, sha: str, lj_dir, sample_id: str | None = None) -> dict:
    url = str(lj_dir / "wavs" / f"{cid}.wav")
    return {"messages": [{"role": "system", "content": "Generate audio following instruction."},
                         {"role": "user", "content": text},
                         {"role": "assistant", "content": {"type": "audio", "audio_url": url}}],
            "misc": {"id": sample_id or f"tts-{cid}", "audio_sha256": {url: sha}}}


def train_io(root: Path):
    """The train rule's paths, laid out under ``root`` as the rules lay them out under results/{exp}."""
    from higgs_tune.train import TrainIO

    t = root / "train"
    return TrainIO(audit=root / "audit" / "summary.json", train=root / "manifest" / "train.jsonl",
                   val=root / "manifest" / "val.jsonl", index=root / "tokens" / "index.parquet",
                   metrics=t / "metrics.jsonl", val_metrics=t / "val_metrics.jsonl", predictions=t / "predictions.jsonl",
                   adapter=t / "adapter", checkpoint=t / "checkpoint", state=t / "state.json",
                   tensorboard=t / "tensorboard", steps=t / "steps", resume_dir=root / "resume")


def stage_train_inputs(root: Path, short_codes, transcripts, lj_dir, n_train: int = 2, audit_passed: bool | None = None):
    """Write the manifest, tokens and (optionally) audit outputs training reads, under ``root``.

    Train rows cycle over the short clips with distinct ids and transcripts (``n_train`` of them);
    the val row is the last short clip. Returns the :class:`~higgs_tune.train.TrainIO`.
    """
    import numpy as np
    import pandas as pd

    from higgs_tune import data as D

    io = train_io(root)
    index, code_dir = [], root / "codes"
    code_dir.mkdir(parents=True, exist_ok=True)
    for cid in SHORT:
        sha, codes = short_codes[cid]
        np.save(code_dir / f"{sha}.npy", codes.numpy())
        index.append({"audio_sha256": sha, "codes_path": str(code_dir / f"{sha}.npy"), "n_frames": codes.shape[1],
                      "sample_rate": 24000, "duration_s": codes.shape[1] / 25})
    texts = list(transcripts.values())
    rows = [tts_row(SHORT[i % 2], transcripts[SHORT[i % 2]] if i < 2 else texts[i], short_codes[SHORT[i % 2]][0],
                    lj_dir, sample_id=f"tts-{SHORT[i % 2]}" if i < 2 else f"tts-{i}") for i in range(n_train)]
    D.write_jsonl(io.train, rows)
    D.write_jsonl(io.val, [tts_row(SHORT[2], transcripts[SHORT[2]], short_codes[SHORT[2]][0], lj_dir)])
    io.index.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(index).to_parquet(io.index)
    io.audit.parent.mkdir(parents=True, exist_ok=True)
    if audit_passed is not None:
        io.audit.write_text(json.dumps({"passed": audit_passed}))
    return io


@pytest.fixture
def real_batch_factory(short_codes, transcripts, text_tokenizer, lj_dir):
    """``make(model)`` -> a collated batch of two real short clips for that model's config."""
    from higgs_tune import data as D

    def make(model):
        rows = [tts_row(c, transcripts[c], short_codes[c][0], lj_dir) for c in SHORT[:2]]
        by_sha = {sha: codes for sha, codes in short_codes.values()}
        return D.make_collator(model.config)([D.build_dataset_sample(r, text_tokenizer, by_sha.__getitem__)
                                              for r in rows])

    return make


def run_bench(name: str, *args: str, timeout: int = 120):
    """Run ``bench/<name>.py ARGS`` as README says (the venv's python, from the repo root)."""
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
