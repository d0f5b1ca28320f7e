"""``torchaudio.functional.resample``, the one torchaudio function boson-multimodal calls.

The algorithm is torchaudio's band-limited sinc interpolation with a Hann window (torchaudio
0.10–2.11, ``torchaudio/functional/functional.py``, BSD-2-Clause), re-implemented here so that the
audio tokenizer's semantic features match an install that has the real torchaudio.
"""

import math

import torch
import torch.nn.functional as F


def _sinc_kernel(orig: int, new: int, width_zeros: int, rolloff: float, dtype, device):
    """Polyphase windowed-sinc kernel, shape ``(new, 1, 2*width + orig)``, and ``width``."""
    base = min(orig, new) * rolloff
    width = math.ceil(width_zeros * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64, device=device)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64, device=device)[:, None, None] / new + idx
    t = (t * base).clamp(-width_zeros, width_zeros)
    window = torch.cos(t * math.pi / width_zeros / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    return kernel.to(dtype), width


def resample(
    waveform: torch.Tensor,
    orig_freq: int,
    new_freq: int,
    lowpass_filter_width: int = 6,
    rolloff: float = 0.99,
    resampling_method: str = "sinc_interp_hann",
    beta: float | None = None,
) -> torch.Tensor:
    """Resample along the last dimension (torchaudio semantics and defaults).

    Args:
        waveform: float tensor ``(..., time)``.
        orig_freq, new_freq: sample rates in Hz (integers).
        lowpass_filter_width: zero crossings of the windowed sinc on each side.
        rolloff: cut-off as a fraction of the lower Nyquist rate.
        resampling_method: only ``"sinc_interp_hann"`` (torchaudio's default).

    Returns:
        Tensor ``(..., ceil(time * new_freq / orig_freq))`` with ``waveform``'s dtype.

    Raises:
        NotImplementedError: for other resampling methods.
        ValueError: for non-positive rates.
    """
    if resampling_method not in ("sinc_interp_hann", "sinc_interpolation"):
        raise NotImplementedError(f"torchaudio shim: resampling_method={resampling_method!r} is not supported")
    orig_freq, new_freq = int(orig_freq), int(new_freq)
    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_freq} -> {new_freq}")
    if orig_freq == new_freq:
        return waveform
    gcd = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // gcd, new_freq // gcd
    kernel, width = _sinc_kernel(orig, new, lowpass_filter_width, rolloff, waveform.dtype, waveform.device)
    shape = waveform.shape
    x = waveform.reshape(-1, shape[-1])
    n, length = x.shape
    x = F.pad(x, (width, width + orig))
    y = F.conv1d(x[:, None], kernel, stride=orig).transpose(1, 2).reshape(n, -1)
    target = math.ceil(new * length / orig)
    return y[..., :target].reshape(*shape[:-1], -1)


def __getattr__(name: str):
    raise AttributeError(
        f"torchaudio.functional.{name} is not available in higgs-tune's torchaudio shim (only resample is)."
    )
