"""Local folders in the exact layouts of the three hub checkpoints the cluster config names, built
from tiny random models (nothing touches a hub):

* ``bosonai/higgs-audio-v2-generation-3B-base`` -> ``model/``: ``config.json`` (``model_type:
  higgs_audio``, ``architectures: [HiggsAudioModel]``, bf16), sharded ``model-0000N-of-0000M.safetensors``
  with ``model.safetensors.index.json``, ``generation_config.json``, and the text tokenizer files
  ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` (Llama-3.2 vocabulary, the
  Higgs special tokens at ids 128011-128019);
* ``bosonai/higgs-audio-v2-tokenizer`` -> ``audio_tokenizer/``: ``config.json`` (the
  ``HiggsAudioTokenizer`` keyword arguments, as upstream ``load_higgs_audio_tokenizer`` reads them) and
  ``model.pth`` (``torch.save`` of the tokenizer's ``state_dict``, semantic teacher included, codebooks
  initialised);
* ``bosonai/hubert_base`` -> ``hubert_base/``: a ``HubertModel`` folder (``config.json`` +
  ``model.safetensors``) that ``AutoModel.from_pretrained(path, trust_remote_code=True)`` loads.

:func:`hub_cache` also lays the semantic teacher out as a Hugging Face hub *cache* entry for
``bosonai/hubert_base``: upstream's ``HiggsAudioTokenizer.__init__`` loads that hard-coded id, so code
that cannot be handed a folder (the serve engine) finds it offline with ``HF_HUB_CACHE`` pointing there.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

#: The demo's tiny backbone (config/demo.yaml model.arch).
TINY_MODEL_ARCH = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}


@dataclass(frozen=True)
class PretrainedLayout:
    model: Path  #: the generation model + text tokenizer folder
    audio_tokenizer: Path  #: config.json + model.pth
    hubert: Path  #: the semantic teacher folder


def build_audio_tokenizer(out: Path, hubert_out: Path, arch: dict, seed: int = 0) -> tuple[Path, Path]:
    """``bosonai/higgs-audio-v2-tokenizer``'s layout (``config.json`` = ``arch``, ``model.pth``) and
    ``bosonai/hubert_base``'s (its semantic teacher, a HubertModel with 768-d hidden states as the real
    one), from the demo's random-init tokenizer (:func:`higgs_tune.codec.build_audio_tokenizer` with
    ``source: random_init``, ``arch``, ``seed``): loading them must give that tokenizer's codes."""
    from higgs_tune.codec import build_audio_tokenizer as build

    tok = build({"source": "random_init", "seed": seed, "arch": arch}, device="cpu")
    tok.semantic_model.save_pretrained(hubert_out, safe_serialization=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(tok.state_dict(), out / "model.pth")
    (out / "config.json").write_text(json.dumps(arch, indent=2) + "\n")
    return out, hubert_out


def build_model(out: Path, arch: dict = TINY_MODEL_ARCH, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                max_shard_size: str = "8MB") -> Path:
    """``bosonai/higgs-audio-v2-generation-3B-base``'s layout from a random tiny Higgs Audio v2."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from higgs_tune.model import load_text_tokenizer, tiny_higgs_config

    torch.manual_seed(seed)
    model = HiggsAudioModel(tiny_higgs_config(arch)).to(dtype)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    load_text_tokenizer("llama3.2-bundled").save_pretrained(out)
    return out


def build_pretrained_layout(root: Path, audio_tokenizer_arch: dict, model_arch: dict = TINY_MODEL_ARCH,
                            seed: int = 0) -> PretrainedLayout:
    """All three folders under ``root`` (``model/``, ``audio_tokenizer/``, ``hubert_base/``)."""
    root = Path(root)
    audio_tokenizer, hubert = build_audio_tokenizer(root / "audio_tokenizer", root / "hubert_base",
                                                    audio_tokenizer_arch, seed)
    return PretrainedLayout(model=build_model(root / "model", model_arch, seed), audio_tokenizer=audio_tokenizer,
                            hubert=hubert)


def hub_cache(cache: Path, hubert: Path, repo_id: str = "bosonai/hubert_base", commit: str = "0" * 40) -> Path:
    """A Hugging Face hub cache (``HF_HUB_CACHE``) holding ``repo_id`` at ``main`` = the files of ``hubert``."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in hubert.iterdir():
        shutil.copy2(f, snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return Path(cache)
