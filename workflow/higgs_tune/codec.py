"""The Higgs audio tokenizer, in one place: build or load it, encode waves to codes, decode codes to waves.

The tokenizer is boson-multimodal 0.1.1's ``HiggsAudioTokenizer`` (``bosonai/higgs-audio-v2-tokenizer``):
a DAC acoustic encoder and a HuBERT semantic branch, fused and residual-vector-quantized into
``n_q = 8`` codebooks of ``bins = 1024`` codes at 25 frames per second of 24 kHz audio.

* :func:`build_audio_tokenizer`: ``source: random_init`` (the local demo: the real architecture from
  ``arch``, weights and codebooks drawn from ``seed``, a tiny random HuBERT as the semantic teacher;
  nothing touches a hub) or ``source: pretrained`` (``path``: hub id or folder with ``config.json`` +
  ``model.pth``). Upstream's ``__init__`` always loads its semantic teacher from a hub through
  ``transformers.AutoModel``; :func:`inject_semantic_model` hands it a model instead.
* :func:`audio_tokenizer_identity`: a short id of what determines the weights (part of the
  tokenize stage's cache keys). :func:`tokenizer_geometry`: sample rate, hop, codebooks, without
  building anything.
* :class:`HiggsCodec`: encode / decode. With ``audio_tokenizer.fast_encode: true`` (the default) it
  encodes with :class:`higgs_tune.codec_fast.FastEncoder` (batch-safe, one acoustic pass, CPU-tuned
  layers); with ``false`` it calls upstream ``HiggsAudioTokenizer.encode`` per clip, the reference
  path. Both give identical codes (``tests/test_tokenize.py``), so the switch is not part of the
  tokenizer identity and cached codes are shared between the two.

Frame count: for a clip of ``n`` samples at 24 kHz (n >= 632), ``T = ceil((n - 118) / 960)``; that is
``T`` is ``ceil(duration_s * 25)`` or one less (derived from the convolution arithmetic of the v2
architecture, ``ratios = [8, 5, 4, 2, 3]`` and HuBERT's feature extractor, exhaustively for every
``n`` up to 30 s; checked against the model in the tests). Clips shorter than one hop (960 samples,
40 ms) are right-padded with zeros to 960 samples (upstream raises on fewer than 632) and give T = 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from .codec_fast import FastEncoder
from .labels import CODEBOOK_SIZE, NUM_CODEBOOKS

log = logging.getLogger("higgs_tune.codec")

#: Input rate of the v2 tokenizer, Hz (``bosonai/higgs-audio-v2-tokenizer`` config.json ``sample_rate``).
SAMPLE_RATE = 24000
#: Samples per frame, ``prod(ratios)`` = 8 * 5 * 4 * 2 * 3 of the same config.json: 25 frames/s.
HOP_LENGTH = 960
#: Higgs Audio v2 geometry, used when the config does not spell the architecture out (a hub id).
DEFAULT_GEOMETRY = {"sample_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH, "n_codebooks": NUM_CODEBOOKS,
                    "codebook_size": CODEBOOK_SIZE}


class Codec(Protocol):
    """What the tokenize and evaluate stages need from an audio codec.

    ``encode(waves)``: mono float32 ``(n,)`` arrays at ``sample_rate`` -> list of int64
    ``(num_codebooks, T)`` arrays in ``[0, codebook_size)``, one per wave, in order.
    ``decode(codes)``: ``(num_codebooks, T)`` ints -> float32 ``(n,)`` waveform at ``sample_rate``.
    """

    sample_rate: int
    frame_rate: float
    num_codebooks: int
    codebook_size: int

    def encode(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]: ...

    def decode(self, codes: np.ndarray) -> np.ndarray: ...


def tokenizer_geometry(at_cfg: dict[str, Any]) -> dict[str, int]:
    """``sample_rate`` (Hz), ``hop_length`` (samples per frame), ``n_codebooks``, ``codebook_size`` of
    the configured tokenizer, without building it: from ``arch`` (random_init), the local
    ``config.json`` (pretrained folder; an ``arch`` left in the config, e.g. merged in from
    config/demo.yaml, is ignored: the folder's weights have the folder's geometry), or
    :data:`DEFAULT_GEOMETRY` (hub id: the v2 tokenizer's values). Missing keys take the v2 values."""
    arch = at_cfg.get("arch")
    if at_cfg.get("source") == "pretrained":
        config = Path(at_cfg.get("path") or "") / "config.json"
        arch = json.loads(config.read_text()) if at_cfg.get("path") and config.is_file() else None
    if not arch:
        return dict(DEFAULT_GEOMETRY)
    bins = arch.get("bins", CODEBOOK_SIZE)
    return {
        "sample_rate": int(arch.get("sample_rate", SAMPLE_RATE)),
        "hop_length": int(np.prod(arch.get("ratios", [8, 5, 4, 2, 3]))),
        "n_codebooks": int(arch.get("n_q", NUM_CODEBOOKS)),
        "codebook_size": int(bins) if isinstance(bins, int) else int(np.prod(bins)),
    }


# ============================================================================================ build
class _InjectedAutoModel:
    """Stands in for ``transformers.AutoModel`` inside the tokenizer's ``__init__``."""

    def __init__(self, model: torch.nn.Module):
        self._model = model

    def from_pretrained(self, *args, **kwargs):  # noqa: D401 - mimics AutoModel
        return self._model


@contextlib.contextmanager
def inject_semantic_model(model: torch.nn.Module):
    """Make ``HiggsAudioTokenizer(...)`` use ``model`` as its semantic teacher (no hub call).

    Upstream's ``__init__`` calls ``AutoModel.from_pretrained(<hard-coded hub id>)``; inside this
    context the module's ``AutoModel`` returns ``model`` instead (restored on exit).
    """
    from boson_multimodal.audio_processing import higgs_audio_tokenizer as hat

    saved = hat.AutoModel
    hat.AutoModel = _InjectedAutoModel(model)
    try:
        yield
    finally:
        hat.AutoModel = saved


def tiny_semantic_model(seed: int, num_layers: int = 1) -> torch.nn.Module:
    """Random-init HuBERT (eval mode) with the real teacher's 768-d hidden states (the tokenizer
    hard-codes 768); seeded with ``torch.manual_seed(seed)``."""
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


def build_audio_tokenizer(cfg: dict[str, Any], *, device: str):
    """Return a ``HiggsAudioTokenizer`` in eval mode on ``device``, upstream's modules untouched.

    Args:
        cfg: the ``audio_tokenizer`` config section. ``source: random_init`` builds from
            ``arch`` (HiggsAudioTokenizer kwargs) and ``seed`` (weights, semantic teacher and
            codebooks: :func:`init_codebooks`); ``source: pretrained`` loads ``path`` (hub id or
            folder with ``config.json`` + ``model.pth``, upstream's ``load_higgs_audio_tokenizer``
            layout), with the semantic teacher from ``semantic_model`` (hub id or folder) instead of
            the hard-coded hub id; ``model.pth`` may carry the teacher's weights too (they then win).
        device: torch device name.

    Raises:
        KeyError: a required config key is missing (the schema requires them).
        FileNotFoundError: a pretrained folder lacks ``config.json`` / ``model.pth`` (FileNotFoundError
            is an OSError); OSError: a hub download fails or the semantic model cannot be loaded.
        ValueError: ``model.pth`` leaves tokenizer parameters unset (:func:`load_tokenizer_weights`).
    """
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import HiggsAudioTokenizer

    if cfg["source"] == "random_init":
        semantic = tiny_semantic_model(cfg["seed"])
        torch.manual_seed(cfg["seed"])
        with inject_semantic_model(semantic):
            model = HiggsAudioTokenizer(**cfg["arch"], device=device)
        init_codebooks(model, cfg["seed"])
        return model.to(device).eval()
    folder = pretrained_folder(cfg["path"])
    arch = json.loads((folder / "config.json").read_text())
    semantic = load_semantic_model(cfg["semantic_model"])
    with inject_semantic_model(semantic):
        model = HiggsAudioTokenizer(**arch, device=device)
    load_tokenizer_weights(model, folder / "model.pth")
    return model.to(device).eval()


def pretrained_folder(path: str) -> Path:
    """The local folder of a pretrained audio tokenizer: ``path`` itself when it exists, else the hub
    snapshot of the id ``path`` (downloaded, or from the cache with ``HF_HUB_OFFLINE=1``).

    Raises:
        FileNotFoundError: the folder lacks ``config.json`` or ``model.pth`` (the layout of
            ``bosonai/higgs-audio-v2-tokenizer``), naming the folder.
        OSError: ``path`` is neither a folder nor a hub id that can be fetched.
    """
    if os.path.exists(path):
        folder = Path(path)
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path))
    missing = [f for f in ("config.json", "model.pth") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"audio tokenizer {folder}: no {' or '.join(missing)}; audio_tokenizer.path must be "
                                f"a folder laid out like bosonai/higgs-audio-v2-tokenizer (config.json + model.pth)")
    return folder


def load_semantic_model(name_or_path: str) -> torch.nn.Module:
    """The tokenizer's semantic teacher (``audio_tokenizer.semantic_model``: a HuBERT folder or hub id,
    ``bosonai/hubert_base`` upstream), loaded as upstream does (``AutoModel``, ``trust_remote_code``), eval mode.

    Raises:
        OSError: naming ``name_or_path`` and the config key, when it cannot be loaded (a missing
            folder, or a hub id absent from the cache with ``HF_HUB_OFFLINE=1``).
    """
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(name_or_path, trust_remote_code=True).eval()
    except OSError as exc:
        raise OSError(f"audio_tokenizer.semantic_model {name_or_path!r} cannot be loaded ({exc}); point it at a "
                      f"local copy of bosonai/hubert_base") from exc


def load_tokenizer_weights(model: torch.nn.Module, weights: Path) -> None:
    """Load ``model.pth`` into a constructed ``HiggsAudioTokenizer`` as upstream's
    ``load_higgs_audio_tokenizer`` does (``strict=False``), but refuse a file that leaves any
    trained parameter unset: only the semantic teacher's (``semantic_model.*``, already loaded from
    ``audio_tokenizer.semantic_model``) may be missing. Keys the module does not have are logged and ignored.

    Raises:
        ValueError: naming ``weights`` and the first missing parameters (wrong file, or a
            ``config.json`` that does not describe these weights).
    """
    state = torch.load(weights, map_location="cpu")
    result = model.load_state_dict(state, strict=False)
    params = {n for n, _ in model.named_parameters()}
    missing = [k for k in result.missing_keys if k in params and not k.startswith("semantic_model.")]
    if missing:
        raise ValueError(f"{weights}: {len(missing)} tokenizer parameters missing ({', '.join(missing[:5])}...): "
                         f"is config.json beside it the one these weights were trained with?")
    if result.unexpected_keys:
        log.info("%s: %d keys the tokenizer does not use, ignored (as upstream): %s", weights,
                 len(result.unexpected_keys), ", ".join(result.unexpected_keys[:5]))


def vq_layers(tokenizer) -> list:
    """The residual VQ layers of ``tokenizer`` (``quantizer.vq.layers``); ``[]`` for a non-RVQ quantizer."""
    if getattr(tokenizer, "quantizer_type", "RVQ") != "RVQ":
        return []
    return list(tokenizer.quantizer.vq.layers)


def init_codebooks(tokenizer, seed: int) -> int:
    """Initialise every un-initialised RVQ codebook of ``tokenizer`` deterministically; return how many.

    A freshly constructed ``HiggsAudioTokenizer`` has ``kmeans_init=True`` codebooks: zeros with
    ``inited == 0`` (``quantization/core_vq.py``). Its ``forward`` then runs k-means on the *first*
    batch it sees and overwrites them, so upstream codes of a random-init tokenizer depend on which
    clip was encoded first -- useless for a content-addressed cache. This draws each codebook as
    ``uniform_init`` does (``kaiming_uniform_``) from a generator seeded with ``seed * 1009`` + layer
    index, and marks it initialised. Pretrained checkpoints carry initialised codebooks and are not touched.
    """
    n = 0
    for i, layer in enumerate(vq_layers(tokenizer)):
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


def audio_tokenizer_identity(cfg: dict[str, Any]) -> str:
    """Short stable id (16 hex chars of a sha256) of what determines the audio tokenizer's weights.

    ``random_init``: the architecture, the seed and the torch version (the init's RNG stream).
    ``pretrained``: when ``path`` is a folder, the bytes of its ``config.json`` and ``model.pth`` and
    the semantic teacher's (``semantic_model``: the bytes of a folder's ``config.json`` and weight
    files, else its hub id); when ``path`` is a hub id, the ids (and ``revision``). Not
    ``fast_encode``, ``device`` or the batching keys: they do not change the codes.

    Raises:
        FileNotFoundError: a pretrained folder without ``config.json`` or ``model.pth``.
    """
    # not fileio.canonical_json: this id keys every cached code (audio_tokens.cache_key), and a new
    # form would re-encode every user's cache for codes that are the same
    if cfg["source"] == "random_init":
        blob = json.dumps({"arch": cfg["arch"], "seed": cfg["seed"], "torch": torch.__version__}, sort_keys=True)
    elif os.path.isdir(cfg["path"]):
        folder = Path(cfg["path"])
        h = hashlib.sha256()
        for f in (folder / "config.json", folder / "model.pth"):
            if not f.is_file():
                raise FileNotFoundError(f"audio tokenizer {folder}: no {f.name} (expected config.json + model.pth)")
            _hash_file(h, f)
        semantic = cfg["semantic_model"]
        if os.path.isdir(semantic):
            for f in sorted(Path(semantic).iterdir()):
                if f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".pt", ".pth"):
                    h.update(f.name.encode() + b"\0")
                    _hash_file(h, f)
        else:
            h.update(semantic.encode())
        blob = h.hexdigest()
    else:
        blob = json.dumps({"hub": cfg["path"], "revision": cfg.get("revision"),
                           "semantic_model": cfg["semantic_model"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


# ============================================================================================ codec
class HiggsCodec:
    """:class:`Codec` over a ``HiggsAudioTokenizer`` (boson-multimodal 0.1.1).

    Takes ownership of ``tokenizer``: when ``init_seed`` is given, initialises un-initialised codebooks
    (:func:`init_codebooks`); with ``fast`` it patches the encoders' forwards
    (:class:`higgs_tune.codec_fast.FastEncoder`), so do not share the tokenizer with code that needs
    upstream's modules as they were.

    Args:
        tokenizer: an eval-mode ``HiggsAudioTokenizer``.
        init_seed: seed for :func:`init_codebooks`; ``None`` refuses un-initialised codebooks.
        fast: encode with :class:`~higgs_tune.codec_fast.FastEncoder` (config ``fast_encode``);
            ``False``: upstream ``HiggsAudioTokenizer.encode``, one clip at a time (the reference).
        max_batch_seconds: audio per encoder call (equal-length clips only; config ``batch_seconds``).
        max_batch_size: clips per encoder call.

    Raises:
        ValueError: un-initialised codebooks and ``init_seed is None``.
    """

    def __init__(self, tokenizer, *, init_seed: int | None = None, fast: bool, max_batch_seconds: float,
                 max_batch_size: int = 64):
        self.tok = tokenizer.eval()
        self.device = next(tokenizer.parameters()).device
        self.sample_rate = int(tokenizer.sample_rate)
        self.hop_length = int(tokenizer.hop_length)
        self.frame_rate = self.sample_rate / self.hop_length
        self.num_codebooks = int(tokenizer.n_q)
        q = tokenizer.quantizer
        self.codebook_size = int(q.bins) if tokenizer.quantizer_type == "RVQ" else int(np.prod(q.levels))
        self.max_batch_seconds = float(max_batch_seconds)
        self.max_batch_size = int(max_batch_size)
        _ensure_codebooks(tokenizer, init_seed)
        self.fast: FastEncoder | None = FastEncoder(tokenizer) if fast else None

    @staticmethod
    def expected_frames(n_samples: int) -> int:
        """T for ``n_samples`` at 24 kHz with the v2 geometry: ``ceil((n - 118) / 960)``, 1 below 960
        (see the module docstring)."""
        return 1 if n_samples < HOP_LENGTH else math.ceil((n_samples - 118) / HOP_LENGTH)

    # ----------------------------------------------------------------------------------- encoding
    def encode(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Encode mono float32 waves at :attr:`sample_rate`; on the fast path equal lengths share
        encoder calls (at most ``max_batch_size`` clips, ``max_batch_seconds`` of audio).

        Returns:
            one int64 ``(num_codebooks, T)`` array per wave, in input order, codes in ``[0, codebook_size)``.

        Raises:
            ValueError: a wave is not 1-D or not finite.
        """
        prepared = [self._prepare(i, w) for i, w in enumerate(waves)]
        if self.fast is None:
            return [self._encode_reference(w) for w in prepared]
        out: list[np.ndarray | None] = [None] * len(prepared)
        for chunk in self._equal_length_batches([w.shape[0] for w in prepared]):
            codes = self.fast.encode_equal_length(np.stack([prepared[i] for i in chunk]))
            for i, c in zip(chunk, codes):
                out[i] = c
        return out  # type: ignore[return-value]

    def encode_equal_length(self, x: np.ndarray) -> np.ndarray:
        """Encode a batch of equal-length clips: float32 ``(B, n)``, n >= 632 samples -> int64 ``(B, K, T)``.

        One call on the fast path (upstream ``_xcodec_encode`` per clip, :mod:`higgs_tune.codec_fast`);
        clip by clip with upstream ``encode`` on the reference path.
        """
        if self.fast is not None:
            return self.fast.encode_equal_length(x)
        return np.stack([self._encode_reference(np.asarray(w, dtype=np.float32)) for w in x])

    def _prepare(self, i: int, wave: np.ndarray) -> np.ndarray:
        """Wave ``i`` as float32 ``(n,)``, right-padded with zeros to one hop when shorter."""
        w = np.asarray(wave, dtype=np.float32)
        if w.ndim != 1:
            raise ValueError(f"wave {i}: expected a mono (n,) array, got shape {w.shape}")
        if not np.isfinite(w).all():
            raise ValueError(f"wave {i}: contains NaN/inf")
        if w.shape[0] < self.hop_length:
            w = np.pad(w, (0, self.hop_length - w.shape[0]))
        return w

    def _equal_length_batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped by equal length (in order of first appearance), each group split into
        batches of at most ``max_batch_size`` clips and ``max_batch_seconds`` of audio (at least 1)."""
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        batches = []
        for n, idxs in groups.items():
            per = max(1, min(self.max_batch_size, int(self.max_batch_seconds * self.sample_rate // n)))
            batches += [idxs[j:j + per] for j in range(0, len(idxs), per)]
        return batches

    def _encode_reference(self, wave: np.ndarray) -> np.ndarray:
        """Upstream ``HiggsAudioTokenizer.encode(wave, sample_rate)``: int64 ``(K, T)``."""
        return self.tok.encode(wave, self.sample_rate).to(torch.int64).cpu().numpy()

    # ----------------------------------------------------------------------------------- decoding
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``(num_codebooks, T)`` ints -> float32 ``(T * hop_length,)`` waveform at :attr:`sample_rate`
        (upstream ``HiggsAudioTokenizer.decode``).

        Raises:
            ValueError: wrong shape or codes outside ``[0, codebook_size)``.
        """
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise ValueError(f"codes shape {codes.shape}, expected ({self.num_codebooks}, T)")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes outside [0, {self.codebook_size})")
        with torch.inference_mode():
            wav = self.tok.decode(torch.as_tensor(codes.astype(np.int64))[None])
        return np.ascontiguousarray(np.asarray(wav).reshape(-1), dtype=np.float32)


def _ensure_codebooks(tokenizer, init_seed: int | None) -> None:
    """Refuse (``init_seed is None``) or draw (:func:`init_codebooks`) k-means-pending codebooks, whose
    codes would depend on the first clip encoded.

    Raises:
        ValueError: un-initialised codebooks and ``init_seed is None``.
    """
    if all(bool(layer._codebook.inited.item()) for layer in vq_layers(tokenizer)):
        return
    if init_seed is None:
        raise ValueError("audio tokenizer has un-initialised (k-means pending) codebooks: its codes would "
                         "depend on the first clip encoded; pass init_seed or load a trained checkpoint")
    n = init_codebooks(tokenizer, init_seed)
    log.warning("audio tokenizer: %d un-initialised codebooks drawn deterministically (seed %d)", n, init_seed)


def build_codec(at_cfg: dict[str, Any]) -> HiggsCodec:
    """The ``audio_tokenizer`` config section -> :class:`HiggsCodec` (:func:`build_audio_tokenizer`).

    ``random_init`` codebooks are drawn from ``seed`` (:func:`init_codebooks`); a pretrained tokenizer
    with un-initialised codebooks raises ``ValueError``. ``fast_encode`` (default true) picks the
    encoder. Equal-length batches of up to ``batch_seconds`` of audio on CUDA; one clip per encoder
    call on CPU (a batch of four 4 s clips took 1.3x the time of four single calls there: the
    activations fall out of cache).
    """
    device = at_cfg["device"]
    tok = build_audio_tokenizer(at_cfg, device=device)
    seed = at_cfg["seed"] if at_cfg["source"] == "random_init" else None
    on_cuda = str(device).startswith("cuda")
    return HiggsCodec(tok, init_seed=seed, fast=bool(at_cfg["fast_encode"]),
                      max_batch_seconds=at_cfg["batch_seconds"], max_batch_size=64 if on_cuda else 1)
