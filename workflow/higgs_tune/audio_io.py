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
    """Mean over channels, then resample to ``target_rate`` with soxr at "HQ" quality.

    The same computation as ``librosa.resample(res_type="soxr_hq")`` (and so as ``librosa.load(path,
    sr=target_rate)``, which upstream ``HiggsAudioTokenizer.encode`` uses for paths): ``soxr.resample``,
    then zero-padded or trimmed to ``ceil(n * target_rate / sample_rate)`` samples. Calling soxr
    directly skips librosa's first-call imports (scipy.signal, numba: about 1.5 s per process).

    Args:
        samples: float32 ``(channels, n)`` or ``(n,)``.
        sample_rate, target_rate: Hz.

    Returns:
        float32 ``(ceil(n * target_rate / sample_rate),)``.

    Raises:
        ValueError: the samples contain NaN or inf.
    """
    mono = samples.mean(axis=0) if samples.ndim == 2 else samples
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise ValueError("audio contains NaN or inf samples")
    if sample_rate != target_rate:
        import soxr

        n_out = int(np.ceil(mono.shape[0] * float(target_rate) / sample_rate))
        out = soxr.resample(mono, sample_rate, target_rate, quality="HQ")[:n_out]
        mono = np.pad(out, (0, n_out - out.shape[0])) if out.shape[0] < n_out else out
    return np.ascontiguousarray(mono, dtype=np.float32)
