"""The trainable model's precision and memory set-up: fp32 trainable tensors, activation
checkpointing, autocast for a low-precision base."""

from __future__ import annotations

import contextlib
import functools

import torch

def trainable_to_fp32(model: torch.nn.Module) -> int:
    """Cast every trainable tensor (LoRA and ``modules_to_save`` copies) to fp32; return how many.

    peft keeps ``modules_to_save`` copies in the base dtype: with a bf16 base, AdamW's update of a
    bf16 weight at lr 1e-4..1e-5 mostly rounds away (bf16 has 8 bits of mantissa).
    """
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each decoder layer's activations in the backward pass (``torch.utils.checkpoint``,
    non-reentrant); return the number of layers wrapped.

    Upstream ``HiggsAudioModel._forward_core`` has no activation checkpointing, and it dispatches on
    the layer's class, so the layer's bound ``forward`` is wrapped in place. Active only while
    gradients are enabled and the KV cache is off (training); generation is unchanged.
    """
    import torch.utils.checkpoint as tuc

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = 0
    for layer in base.layers:
        inner = layer.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled() and not kwargs.get("use_cache"):
                return tuc.checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = forward
        n += 1
    return n


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast for a low-precision base (fp32 trainable weights meet bf16 activations);
    a no-op context for an fp32 base."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class UnsupportedDtype(ValueError):
    """Training refused for ``model.dtype``: float16 without loss scaling."""


def refuse_float16(dtype: str) -> None:
    """Raise :class:`UnsupportedDtype` for ``model.dtype: float16``.

    The trainer has no loss scaling: fp16 activation gradients of the frozen base under/overflow
    (fp16 spans ~6e-8..65504), so the LoRA updates would be silently wrong. bfloat16 has fp32's range.
    """
    if dtype == "float16":
        raise UnsupportedDtype("model.dtype float16 cannot be trained: the trainer has no loss scaling, and fp16 "
                               "gradients under/overflow; set model.dtype to bfloat16 (GPUs since Ampere) or float32")
