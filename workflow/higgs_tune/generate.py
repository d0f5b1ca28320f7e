"""Free-running audio generation from a manifest row, as the upstream serve engine does it.

The prompt is the row without its last turn (the assistant audio to be learned): system, user
text and, for voice cloning, the reference turns with their cached codes. As in boson-multimodal
0.1.1 ``HiggsAudioServeEngine._prepare_inputs`` the prompt ends with
``<|start_header_id|>assistant<|end_header_id|>\\n\\n<|audio_out_bos|>`` (audio generation is forced),
goes through the same collator as training, and ``HiggsAudioModel.generate`` samples one frame of
8 codebooks per step under the delay pattern. ``revert_delay_pattern`` then realigns the codebooks
and the stream BOS (first column) and last column (EOS, 1025, when the model ended the stream) are
dropped, as the serve engine does, leaving ``(8, T)`` codes in ``[0, 1024)`` for the audio decoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import data as D
from .labels import ASSISTANT_AUDIO_PREFIX, AUDIO_STREAM_EOS_ID

def split_row(row: dict) -> tuple[dict, str, dict, dict | None]:
    """A kept manifest row -> ``(prompt_row, target_text, target_audio, reference_audio)``.

    ``target_text`` is the last user text before the final assistant audio (what should be said);
    ``reference_audio`` is the last assistant audio *before* it (voice cloning), else ``None``.

    Raises:
        ValueError: naming the row, when its last turn is not an assistant audio.
    """
    msgs = row["messages"]
    last = msgs[-1] if msgs else {}
    target = last.get("content") if last.get("role") == "assistant" else None
    if isinstance(target, list):
        target = next((c for c in target if isinstance(c, dict) and c.get("type") == "audio"), None)
    if not (isinstance(target, dict) and target.get("type") == "audio"):
        raise ValueError(f"sample {D.sample_id(row)}: the last turn is not an assistant audio: nothing to generate")
    prompt = {**row, "messages": msgs[:-1]}
    text, reference = "", None
    for _, role, content in D.iter_contents(prompt):
        if role == "user":
            if isinstance(content, str):
                text = content
            elif isinstance(content, dict) and content.get("type") == "text":
                text = content.get("text", "")
        elif role == "assistant" and isinstance(content, dict) and content.get("type") == "audio":
            reference = content
    return prompt, text, target, reference


@dataclass
class Generated:
    """``codes``: int64 ``(8, T)`` in ``[0, codebook_size)``; ``ended``: the model closed the stream
    (EOS 1025) before ``max_frames``."""

    codes: np.ndarray
    ended: bool


@torch.no_grad()
def generate_codes(model, text_tokenizer, row: dict, codes_of: Callable[[str], torch.Tensor], *,
                   max_frames: int, temperature: float, top_p: float, top_k: int | None = None,
                   seed: int, ras_win_len: int | None = 7, device: torch.device | str) -> Generated:
    """Sample the audio answer to ``row``'s prompt (see the module docstring).

    Args:
        model: a ``HiggsAudioModel`` (LoRA layers may be injected; eval mode).
        codes_of: ``sha256 -> (8, T)`` cached codes, for the reference audio of a cloning prompt.
        max_frames: at most this many audio frames (25 per second).
        temperature, top_p, top_k: sampling (``temperature == 0``: greedy; ``eval.generate.temperature``,
            ``eval.generate.top_p``); ``seed`` makes it repeatable.
        ras_win_len: upstream's repetition-aware sampling window (``None``: off), as the serve engine.
    """
    prompt, _, _, _ = split_row(row)
    sample = D.build_dataset_sample(prompt, text_tokenizer, codes_of)
    suffix = text_tokenizer.encode(ASSISTANT_AUDIO_PREFIX, add_special_tokens=False)
    input_ids = torch.cat([sample.input_ids, torch.tensor(suffix, dtype=torch.long)])
    sample = dataclasses.replace(sample, input_ids=input_ids, label_ids=None)
    batch = D.make_collator(model.config)([sample])
    names = ("input_ids", "attention_mask", "audio_features", "audio_feature_attention_mask", "audio_in_ids",
             "audio_in_ids_start", "audio_out_ids", "audio_out_ids_start")
    inputs = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n in names for v in [getattr(batch, n)]}
    model.set_audio_special_tokens(text_tokenizer)
    num_codebooks = int(model.config.audio_num_codebooks)
    out = model.generate(
        **inputs, max_new_tokens=int(max_frames) + num_codebooks, use_cache=True, tokenizer=text_tokenizer,
        stop_strings=["<|end_of_text|>", "<|eot_id|>"], do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None, top_p=top_p if temperature > 0 else None,
        top_k=top_k, ras_win_len=ras_win_len, ras_win_max_num_repeat=2, seed=seed)
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

    streams = out[1]
    if not streams:
        return Generated(np.zeros((num_codebooks, 0), np.int64), False)
    stream = streams[0].cpu()  # (8, L) with the delay pattern, BOS first
    ended = bool((stream[:, -1] == AUDIO_STREAM_EOS_ID).any())  # the stream was closed, not cut at max_frames
    size = int(model.config.audio_codebook_size)
    codes = revert_delay_pattern(stream).clip(0, size - 1)[:, 1:-1] if stream.shape[1] > num_codebooks else \
        torch.zeros((num_codebooks, 0), dtype=torch.long)
    return Generated(codes.numpy().astype(np.int64), ended)


__all__ = ["ASSISTANT_AUDIO_PREFIX", "Generated", "generate_codes", "split_row"]
