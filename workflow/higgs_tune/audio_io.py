"""Audio decoding and content hashing shared by the manifest and tokenize stages."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import soundfile as sf


class AudioDecodeError(ValueError):
    """The file exists but does not decode to audio (corrupt, truncated, not audio, zero length)."""


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode ``path`` with libsndfile.

    Returns:
        ``(samples, sample_rate)``: float32 ``(channels, n_samples)`` in [-1, 1], rate in Hz.

    Raises:
        FileNotFoundError: no such file.
        AudioDecodeError: libsndfile cannot decode it, or it holds no samples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(str(path))
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioDecodeError(f"{path}: {exc}") from exc
    if data.shape[0] == 0:
        raise AudioDecodeError(f"{path}: zero samples")
    return np.ascontiguousarray(data.T), int(sr)


def audio_sha256(samples: np.ndarray, sample_rate: int) -> str:
    """sha256 hex of decoded audio: float32 samples ``(channels, n)`` plus rate and shape.

    Hashing decoded samples (not file bytes) makes the same recording in two containers, or with
    different metadata, one cache entry.
    """
    h = hashlib.sha256()
    h.update(f"{sample_rate}:{samples.shape[0]}:{samples.shape[1]}:".encode())
    h.update(np.ascontiguousarray(samples, dtype=np.float32).tobytes())
    return h.hexdigest()


def to_mono_resampled(samples: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """Mean over channels, then resample to ``target_rate`` (soxr via librosa). float32 ``(n,)``."""
    import librosa

    mono = samples.mean(axis=0) if samples.ndim == 2 else samples
    if sample_rate != target_rate:
        mono = librosa.resample(mono, orig_sr=sample_rate, target_sr=target_rate, res_type="soxr_hq")
    return np.ascontiguousarray(mono, dtype=np.float32)
