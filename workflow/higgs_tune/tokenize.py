"""The tokenize stage: every clip of the kept manifests -> Higgs audio codes in a content-addressed cache.

``python -m higgs_tune.tokenize --configfile config/demo.yaml`` reads ``Paths.train_manifest`` and
``Paths.val_manifest`` (ChatML JSONL whose ``misc.audio_sha256`` maps each ``audio_url`` to the sha256
of its decoded audio, :func:`higgs_tune.audio_io.audio_sha256`), encodes each distinct clip once and
writes ``Paths.tokens_index`` (``results/{exp}/tokens/index.parquet``), one row per clip:

============== ======= ==============================================================================
column         dtype   meaning
============== ======= ==============================================================================
audio_sha256   str     content hash of the decoded audio (the manifest's ``misc.audio_sha256`` value)
codes_path     str     the ``.npy`` entry, ``(n_codebooks, n_frames)`` int16; relative to the workflow
                       root when ``cache_dir`` is relative, else absolute (``data.CodesIndex`` reads it)
n_frames       int64   T, codec frames (25 per second)
n_codebooks    int64   8
sample_rate    int64   the tokenizer's input rate, 24000 Hz
frame_rate     float64 codec frames per second, ``sample_rate / hop_length`` = 25.0
duration_s     float64 duration of the source clip in seconds (before resampling)
cache_key      str     :func:`cache_key` of the clip
tokenizer_id   str     :func:`higgs_tune.model.audio_tokenizer_identity`
audio_url      str     one path the clip was read from (the first seen)
============== ======= ==============================================================================

``python -m higgs_tune.tokenize decode --configfile ... --sha256 HASH --out x.wav`` (or ``--codes
file.npy``) turns cached codes back into a 24 kHz WAV with the tokenizer's decoder, for listening.

Cache: ``{cache_dir}/codes/<key[:2]>/<key>.npy`` with ``key = cache_key(audio_sha256, tokenizer_id,
sample_rate)``, so a clip shared by two samples, two manifests or two experiments is encoded once.
Entries are written atomically (temp file in the same folder, fsync, ``os.replace``) as soon as each
clip is encoded, and validated when read (shape, dtype, code range); a corrupt entry is re-encoded.
A run killed at any point (even SIGKILL) leaves only whole entries (abandoned temp files are swept
by the next run); the next run encodes what is missing. The index is written last, also atomically.
A rerun with everything cached builds no model: it logs ``0 to encode, N cached`` and rewrites the index.

Encoding (:class:`HiggsCodec`): upstream ``HiggsAudioTokenizer._xcodec_encode``, made batch-safe and
without its redundant work and memory traffic. Its codes equal upstream ``encode``'s (the tests
check this on real clips, ``bench/tokenize.py`` on all 32 LJSpeech clips); its fp32 activations
agree with upstream's to rounding (relative 1e-6), as upstream's own do between one and two
torch threads:

* Batches hold clips of *identical* sample length only. The DAC acoustic encoder and the HuBERT
  semantic teacher are non-causal convolutional/attention stacks, so zero-padding a short clip to a
  longer one would change its codes; equal-length clips are independent in a batch. Batching is
  used on CUDA (up to ``batch_seconds`` of audio per call); on CPU it is slower (a batch of four 4 s
  clips took 1.3x the time of four single calls: the activations fall out of cache), so CPU
  encodes clip by clip.
* Upstream runs the acoustic encoder once, and when its frame count differs from the semantic
  branch's (about 53 % of lengths) runs it a second time on the clip zero-padded by
  ``160 * semantic_downsample_factor`` samples per side, keeping only the second result. The frame
  counts are a function of the length alone, so this stage predicts the mismatch from the
  convolution arithmetic and runs the acoustic encoder once, on the input upstream would have kept
  (the acoustic encoder is ~90 % of the encode time). Upstream's re-run also hard-codes batch 1
  (``F.pad(x[:, 0, :], ...).unsqueeze(0)``); this one pads per clip.
* Weight norm is folded into the encoder's convolution weights once (``remove_weight_norm``: the
  same ``_weight_norm`` op, so identical weights) instead of being recomputed on every call.
* Large activations (the first two encoder blocks: 64-128 channels at 3-24 kHz, tens of MB) are
  processed in cache-sized time tiles: each ``ResidualUnit`` as one pass (:func:`residual_unit_tiled`:
  Snake, 7-tap convolution, Snake, 1x1 convolution and residual add per tile), each block's
  Snake + strided convolution as another (:func:`downsample_tiled`); the remaining Snakes in
  tiles, in place where their input is not read again (:func:`snake_tiled`). Upstream's
  whole-clip layers run at memory speed there (the 7-tap convolution at 59-79 GFLOP/s, the
  strided one at 42, vs ~100 on tiles, one thread, measured here). The Snakes' sine is NumPy's
  SIMD ``sin`` on CPU (:func:`_sin_`: 1.8x ATen's, within one ULP of it), and the wide 1x1
  convolutions run on oneDNN rather than MKL (:func:`_pointwise_convs_on_onednn`, 1.5x).
* :func:`tune_malloc` stops glibc from ``mmap``/``munmap``-ing each large activation (1.5x on CPU).
* Parallelism. CPU (``num_workers > 0``): each worker process decodes, resamples (24 kHz, soxr) and
  encodes whole clips with ``threads // num_workers`` torch threads; on 2 cores two 1-thread
  processes were 2.0x one 1-thread process where one 2-thread process was 1.8x, and, unlike
  intra-op threads, degrade gracefully when other jobs share the cores. Single-threaded workers
  are forked on Linux (:func:`_start_method`), inheriting this process's imports. CUDA (or an
  injected codec): workers decode and resample ahead; this process encodes.

Frame count: for a clip of ``n`` samples at 24 kHz (n >= 632), ``T = ceil((n - 118) / 960)``; that is
``T`` is ``ceil(duration_s * 25)`` or one less (derived from the convolution arithmetic of the v2
architecture, ``ratios = [8, 5, 4, 2, 3]`` and HuBERT's feature extractor, exhaustively for every
``n`` up to 30 s; checked against the model in the tests). Clips shorter than one hop (960 samples,
40 ms) are right-padded with zeros to 960 samples (upstream raises on fewer than 632) and give T = 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from . import audio_io

log = logging.getLogger("higgs_tune.tokenize")

#: Bumped when the entry format or the encoding procedure changes; part of every cache key.
CACHE_FORMAT = "higgs-tune-codes-v1"
#: Higgs Audio v2 geometry (``bosonai/higgs-audio-v2-tokenizer`` config.json: ``sample_rate``,
#: ``ratios``, ``n_q``, ``bins``); used when the config does not spell the architecture out.
DEFAULT_GEOMETRY = {"sample_rate": 24000, "hop_length": 960, "n_codebooks": 8, "codebook_size": 1024}
#: dtype of cache entries: codes are 0..1023, int16 halves the size of int32 and is exact.
ENTRY_DTYPE = np.int16
_TMP_SUFFIX = ".tmp"
_STALE_TMP_S = 6 * 3600.0  # a temp file older than this is abandoned whoever wrote it


# ============================================================================================ cache
def cache_key(audio_sha: str, tokenizer_id: str, rate: int) -> str:
    """Content address of one clip's codes: sha256 hex (64 chars).

    Args:
        audio_sha: sha256 of the decoded audio (:func:`audio_io.audio_sha256`).
        tokenizer_id: :func:`higgs_tune.model.audio_tokenizer_identity` of the tokenizer config.
        rate: the sample rate (Hz) the audio is resampled to before encoding.

    The key also covers :data:`CACHE_FORMAT`, so a change of encoding procedure never reuses entries.
    """
    blob = f"{CACHE_FORMAT}\n{audio_sha}\n{tokenizer_id}\n{int(rate)}"
    return hashlib.sha256(blob.encode()).hexdigest()


def entry_path(cache_dir: str | Path, key: str) -> Path:
    """``{cache_dir}/codes/<key[:2]>/<key>.npy`` (256 shard folders keep directories small)."""
    return Path(cache_dir) / "codes" / key[:2] / f"{key}.npy"


class CorruptEntryError(ValueError):
    """A cache entry exists but is not a valid codes array (truncated, wrong shape/dtype/range)."""


def read_entry(path: str | Path, n_codebooks: int = 8, codebook_size: int = 1024) -> np.ndarray:
    """Load and validate one cache entry.

    Returns:
        the codes, integer ``(n_codebooks, T)`` with ``T >= 1`` and values in ``[0, codebook_size)``
        (stored dtype, int16 for entries this module writes).

    Raises:
        FileNotFoundError: no entry.
        CorruptEntryError: the file does not hold such an array.
    """
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated header/data: ValueError, EOFError, OSError, UnpicklingError
        raise CorruptEntryError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
        raise CorruptEntryError(f"{path}: dtype {getattr(arr, 'dtype', type(arr))}, expected integers")
    if arr.ndim != 2 or arr.shape[0] != n_codebooks or arr.shape[1] < 1:
        raise CorruptEntryError(f"{path}: shape {arr.shape}, expected ({n_codebooks}, T>=1)")
    if int(arr.min()) < 0 or int(arr.max()) >= codebook_size:
        raise CorruptEntryError(f"{path}: codes outside [0, {codebook_size})")
    return arr


def write_entry(path: str | Path, codes: np.ndarray) -> None:
    """Write ``codes`` ``(K, T)`` as ``.npy`` (int16) atomically: temp file in the same folder, fsync,
    ``os.replace``. A reader sees the old state or the whole new file, never a part.

    Raises:
        ValueError: codes do not fit int16.
    """
    path = Path(path)
    codes = np.asarray(codes)
    if codes.size and (codes.min() < np.iinfo(ENTRY_DTYPE).min or codes.max() > np.iinfo(ENTRY_DTYPE).max):
        raise ValueError(f"codes out of int16 range: {codes.min()}..{codes.max()}")
    with atomic_file(path, prefix=f".{path.stem}.{_tmp_owner()}.") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, codes.astype(ENTRY_DTYPE, copy=False), allow_pickle=False)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: Path, prefix: str | None = None):
    """Yield a temp path beside ``path``; on success fsync it and ``os.replace`` it onto ``path``,
    on any failure (or kill before the replace) ``path`` is untouched and the temp file is removed
    (a SIGKILL can leave a temp file, which the next run deletes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _tmp_owner() -> str:
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale_temps(folder: str | Path) -> int:
    """Remove abandoned temp files (``.<key>.<host>-<pid>.<rand>.tmp``) in ``folder``.

    A temp file is abandoned when its writer ran on this host and that pid is gone (a killed run), or
    when it is older than 6 hours (any host: shared file systems). Returns how many were removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    host, removed, now = socket.gethostname().replace(".", "_"), 0, time.time()
    for p in folder.glob(f".*{_TMP_SUFFIX}"):
        parts = p.name.split(".")
        owner = parts[2] if len(parts) >= 4 else ""
        o_host, _, o_pid = owner.rpartition("-")
        dead = o_host == host and o_pid.isdigit() and not _pid_alive(int(o_pid))
        try:
            old = now - p.stat().st_mtime > _STALE_TMP_S
        except OSError:
            continue
        if dead or old:
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process on this host (a zombie, e.g. an unreaped killed writer, is not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: state field after the parenthesised command name
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


# ============================================================================================ codec
class Codec(Protocol):
    """What the stage needs from an audio codec.

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


def _conv_out(length: int, conv) -> int:
    """PyTorch's Conv1d output length."""
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return (length + 2 * p - d * (k - 1) - 1) // s + 1


def snake_tiled(x, alpha, recip, out, tile: int):
    """DAC's Snake activation ``x + 1 / (alpha + 1e-9) * sin(alpha * x) ** 2`` in time tiles.

    The formula and op order are ``dac.nn.layers.snake`` (descript-audio-codec 1.0.0; Ziyin et al.
    2020, "Neural networks fail to learn periodic functions and how to fix it"). Upstream evaluates it
    as five passes over a ``(B, C, n)`` tensor (64 channels x 24000 samples/s in the first encoder
    block: tens of MB each, memory-bound); here the same element-wise ops, in the same order, run on
    ``(B, C, tile)`` slices that stay in cache. The sine is :func:`_sin_` (NumPy's), which differs
    from ATen's by at most one unit in the last place on ~5 % of elements; every other op is
    bit-identical to upstream's (``tile`` is a multiple of 64 samples, so ATen's vectorized loops
    leave the same elements to their scalar tails; the last tile gets its own contiguous buffer).

    Args:
        x: float ``(B, C, n)``, contiguous.
        alpha: ``(1, C, 1)``, the module's parameter; ``recip``: ``(alpha + 1e-9).reciprocal()``.
        out: ``(B, C, n)`` result tensor; may be ``x`` itself (in place).
        tile: samples per slice, a positive multiple of 64.

    Returns:
        ``out``.
    """
    import torch

    B, C, n = x.shape
    buf = torch.empty(B, C, min(tile, n), dtype=x.dtype, device=x.device)
    for t0 in range(0, n, tile):
        m = min(tile, n - t0)
        xs = x[..., t0:t0 + m]
        b = buf if m == buf.shape[2] else torch.empty(B, C, m, dtype=x.dtype, device=x.device)
        torch.mul(alpha, xs, out=b)
        _sin_(b).pow_(2).mul_(recip)
        torch.add(xs, b, out=out[..., t0:t0 + m])
    return out


def _tile_snakes(encoder, tile_elements: int = 1 << 17) -> int:
    """Make every ``Snake1d`` of a DAC ``encoder`` use :func:`snake_tiled` (its forward is replaced).

    A Snake whose input is read again later (the first layer of a ``ResidualUnit``: its input is
    the residual) writes a new tensor; every other one overwrites its input, which no one else
    holds. Returns the number of Snakes changed.
    """
    import types

    import torch

    residual_inputs = {id(m.block[0]) for m in encoder.modules() if type(m).__name__ == "ResidualUnit"}
    n = 0
    for m in encoder.modules():
        if type(m).__name__ != "Snake1d":
            continue
        channels = m.alpha.shape[1]
        tile = max(64, tile_elements // channels // 64 * 64)
        in_place = id(m) not in residual_inputs

        def forward(self, x, _tile=tile, _in_place=in_place):
            if x.dim() != 3 or not x.is_contiguous():
                return self._upstream_forward(x)
            recip = (self.alpha + 1e-9).reciprocal()
            return snake_tiled(x, self.alpha, recip, x if _in_place else torch.empty_like(x), _tile)

        m._upstream_forward = m.forward
        m.forward = types.MethodType(forward, m)
        n += 1
    return n


def residual_unit_tiled(x, unit, tile: int):
    """A DAC ``ResidualUnit``, ``x + conv_1x1(snake(conv_7(snake(x))))``, evaluated in time tiles.

    Upstream evaluates each layer over the whole clip: at 64 channels x 24000 samples/s the
    activations are tens of MB, so every Snake pass, the 1x1 convolution and the residual add run
    at memory speed, and the 7-tap convolution runs at 59-79 GFLOP/s instead of the ~105 it reaches
    on cache-sized inputs (measured here, one thread). Here each output tile ``[t0, t1)`` reads
    ``x[t0 - p, t1 + p)`` (``p = 3 * dilation``, the convolution's zero padding; ``snake(0) = 0``,
    so padding after the Snake equals padding before it) and everything it computes stays in
    cache; the 1x1 convolution and the residual add are one GEMM accumulating into the output.

    Numerics: the Snake ops per element are upstream's (``dac.nn.layers.snake``); the
    convolutions are the same fp32 products summed in another order (other GEMM shapes), so
    activations agree with upstream's to fp32 rounding, not bit for bit, as upstream's own do
    between one and two torch threads (which change the 1x1 convolution's algorithm). The codes
    (nearest codebook entries) are checked equal to upstream ``encode`` in the tests and by
    ``bench/tokenize.py``.

    Args:
        x: float32 ``(B, C, n)`` contiguous CPU tensor.
        unit: a ``ResidualUnit`` (``block = [Snake1d, Conv1d k=7, Snake1d, Conv1d k=1]``) whose
            weight norm is folded (plain ``weight``/``bias``).
        tile: output samples per tile.

    Returns:
        a new ``(B, C, n)`` tensor.
    """
    import torch
    import torch.nn.functional as F

    s1, c7, s2, c1 = unit.block
    d, p = c7.dilation[0], c7.padding[0]
    a1, a2 = s1.alpha[0], s2.alpha[0]  # (C, 1)
    r1, r2 = (a1 + 1e-9).reciprocal(), (a2 + 1e-9).reciprocal()
    w1, b1 = c1.weight[:, :, 0], c1.bias[:, None]
    n = x.shape[2]
    out = torch.empty_like(x)
    for x2, o2 in zip(x, out):  # (C, n) each
        for t0 in range(0, n, tile):
            t1 = min(n, t0 + tile)
            lo, hi = max(0, t0 - p), min(n, t1 + p)
            h = _snake(x2[:, lo:hi], a1, r1)
            if lo > t0 - p or hi < t1 + p:
                h = F.pad(h, (lo - (t0 - p), (t1 + p) - hi))
            h = F.conv1d(h[None], c7.weight, c7.bias, dilation=d)[0]  # (C, t1 - t0)
            h = _snake(h, a2, r2)
            o = o2[:, t0:t1]
            torch.add(x2[:, t0:t1], b1, out=o)
            o.addmm_(w1, h)
    return out


def _snake(x, alpha, recip):
    """New tensor ``x + recip * sin(alpha * x) ** 2``, upstream's ops per element (see :func:`snake_tiled`)."""
    import torch

    b = torch.mul(alpha, x)
    _sin_(b).pow_(2).mul_(recip)
    return b.add_(x)  # q + x == x + q in IEEE arithmetic


def _sin_(t):
    """``t.sin_()``; for a contiguous float32 CPU tensor outside autograd, NumPy's ``np.sin`` in place.

    NumPy >= 1.22 evaluates float32 ``sin`` with its own AVX-512/AVX2 kernels (documented max error
    1.49 ULP), 1.8x the throughput of ATen's SLEEF ``sin_u10`` on this machine (one thread, 96k
    elements, measured: 0.70 vs 1.25 ns per element); the sine is the costliest op of the Snake
    activation (with ATen's, 7 % of CPU encode time, profiled). The two agree to one ULP (relative
    1.2e-7, on ~5 % of elements); codes are unchanged (tests, ``bench/tokenize.py``).

    Args:
        t: float tensor, any shape; modified in place.

    Returns:
        ``t``.
    """
    import torch

    if t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad:
        a = t.numpy()
        np.sin(a, out=a)
        return t
    return t.sin_()


def downsample_tiled(x, snake, conv, tile: int):
    """A DAC ``EncoderBlock``'s tail, ``conv(snake(x))`` with a strided convolution, in output tiles.

    The strided convolution (kernel ``2 * stride``) over a whole first-block activation runs at
    ~42 GFLOP/s here; on tiles of ``tile`` output samples (their inputs in cache) at ~83. Each
    output tile ``[u0, u1)`` reads the padded input ``[u0 * stride, (u1 - 1) * stride + kernel)``;
    the Snake is applied to that slice (its overlap with the next tile is recomputed) and zero
    padding is added after it (``snake(0) = 0``). Numerics as :func:`residual_unit_tiled`.

    Args:
        x: float32 ``(B, C, n)`` contiguous CPU tensor; ``snake``: the ``Snake1d``; ``conv``: the
            ``Conv1d`` with folded weight norm.
        tile: output samples per tile.

    Returns:
        a new ``(B, C_out, T)`` tensor, ``T`` as ``conv(x)``'s.
    """
    import torch
    import torch.nn.functional as F

    k, st, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    alpha = snake.alpha[0]
    recip = (alpha + 1e-9).reciprocal()
    n = x.shape[2]
    n_out = _conv_out(n, conv)
    out = torch.empty(x.shape[0], conv.out_channels, n_out, dtype=x.dtype, device=x.device)
    for x2, o2 in zip(x, out):
        for u0 in range(0, n_out, tile):
            u1 = min(n_out, u0 + tile)
            a, b = u0 * st - p, (u1 - 1) * st + k - p  # input range the tile reads
            lo, hi = max(0, a), min(n, b)
            h = _snake(x2[:, lo:hi], alpha, recip)
            if lo > a or hi < b:
                h = F.pad(h, (lo - a, b - hi))
            o2[:, u0:u1] = F.conv1d(h[None], conv.weight, conv.bias, stride=st)[0]
    return out


def _tile_encoder(encoder, tile_elements: int = 96_000, min_elements: int = 1 << 21) -> int:
    """Make the DAC ``encoder``'s ``ResidualUnit`` s use :func:`residual_unit_tiled` and its
    ``EncoderBlock`` s' tails use :func:`downsample_tiled`, for CPU inputs of at least
    ``min_elements`` (``C * n``: 8 MiB; smaller ones fit in cache and upstream's forward is as fast),
    with tiles of ``tile_elements // C`` samples (375 KiB per intermediate) in the residual units and
    of ``2 * tile_elements // C`` input samples in the downsampling (its intermediates are smaller;
    measured 3 % faster end to end than ``tile_elements``). Returns the number of modules changed."""
    import types

    def big(x):
        return x.dim() == 3 and x.device.type == "cpu" and x.is_contiguous() and x.shape[1] * x.shape[2] >= min_elements

    def unit_forward(self, x):
        if not big(x):
            return self._upstream_forward(x)
        return residual_unit_tiled(x, self, max(64, tile_elements // x.shape[1]))

    def block_forward(self, x):
        *units, snake, conv = self.block
        for unit in units:
            x = unit(x)
        if not big(x):
            return conv(snake(x))
        return downsample_tiled(x, snake, conv, max(16, 2 * tile_elements // x.shape[1] // conv.stride[0]))

    n = 0
    for m in encoder.modules():
        kind = type(m).__name__
        if kind == "ResidualUnit" or (kind == "EncoderBlock" and len(m.block) == 5):
            m._upstream_forward = m.forward
            m.forward = types.MethodType(unit_forward if kind == "ResidualUnit" else block_forward, m)
            n += 1
    return n


def _pointwise_convs_on_onednn(*modules, min_channels: int = 256) -> int:
    """Make the 1x1 ``Conv1d`` s of ``modules`` with at least ``min_channels`` input channels run on
    oneDNN (``torch.mkldnn_convolution``) for float32 CPU inputs; returns how many were changed.

    PyTorch sends a 1x1 convolution to ``_slow_conv2d_forward`` (an MKL GEMM), which here runs at
    58-72 GFLOP/s on the encoder's 256-1024-channel shapes; oneDNN's direct convolution runs the
    same products at 89-97 (one thread, measured): 4 % of CPU encode time. Same products, another
    summation order: outputs agree to fp32 rounding (relative ~1e-6), codes are unchanged (tests,
    ``bench/tokenize.py``). Below ``min_channels`` (the tiled first blocks use ``addmm_``) MKL is as
    fast. Other devices, dtypes and shapes keep ``Conv1d.forward``.
    """
    import types

    import torch

    if not torch.backends.mkldnn.is_available():
        return 0

    def forward(self, x):
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 3:
            return torch.nn.Conv1d.forward(self, x)
        return torch.mkldnn_convolution(x.unsqueeze(2), self.weight.unsqueeze(2), self.bias,
                                        [0, 0], [1, 1], [1, 1], 1).squeeze(2)

    n = 0
    for module in modules:
        for m in module.modules():
            if (isinstance(m, torch.nn.Conv1d) and m.kernel_size == (1,) and m.stride == (1,)
                    and m.padding == (0,) and m.dilation == (1,) and m.groups == 1
                    and m.padding_mode == "zeros" and m.in_channels >= min_channels):
                m.forward = types.MethodType(forward, m)
                n += 1
    return n


class HiggsCodec:
    """:class:`Codec` over a ``HiggsAudioTokenizer`` (boson-multimodal 0.1.1).

    Takes ownership of ``tokenizer``: folds the encoder's weight norm into its weights, replaces the
    forward of its Snake activations, residual units, encoder blocks and wide 1x1 convolutions
    (:func:`snake_tiled`, :func:`_tile_encoder`, :func:`_pointwise_convs_on_onednn`) and, when
    ``init_seed`` is given, initialises un-initialised codebooks (:func:`init_codebooks`).

    Args:
        tokenizer: an eval-mode ``HiggsAudioTokenizer``.
        init_seed: seed for :func:`init_codebooks`; ``None`` refuses un-initialised codebooks.
        max_batch_seconds: audio per encoder call (equal-length clips only; config ``batch_seconds``).
        max_batch_size: clips per encoder call.

    Raises:
        ValueError: un-initialised codebooks and ``init_seed is None``.
    """

    def __init__(self, tokenizer, *, init_seed: int | None = None, max_batch_seconds: float = 60.0,
                 max_batch_size: int = 64):
        import torch

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
        self._pad = 160 * int(tokenizer.semantic_downsample_factor)  # upstream's re-run padding
        from .model import _vq_layers, init_codebooks

        if any(not bool(layer._codebook.inited.item()) for layer in _vq_layers(tokenizer)):
            if init_seed is None:
                raise ValueError("audio tokenizer has un-initialised (k-means pending) codebooks: its codes would "
                                 "depend on the first clip encoded; pass init_seed or load a trained checkpoint")
            n = init_codebooks(tokenizer, init_seed)
            log.warning("audio tokenizer: %d un-initialised codebooks drawn deterministically (seed %d)", n, init_seed)
        for m in tokenizer.encoder.modules():
            if hasattr(m, "weight_g"):
                torch.nn.utils.remove_weight_norm(m)
        _tile_snakes(tokenizer.encoder)
        _tile_encoder(tokenizer.encoder)
        _pointwise_convs_on_onednn(tokenizer.encoder, tokenizer.encoder_semantic)
        self._convs = [m for m in tokenizer.encoder.modules() if isinstance(m, torch.nn.Conv1d)]
        self._predict = self._check_length_model()

    # ------------------------------------------------------------------------------------ lengths
    def acoustic_frames(self, n_samples: int) -> int:
        """Frames the DAC acoustic encoder outputs for ``n_samples`` input samples (conv arithmetic)."""
        length = int(n_samples)
        for conv in self._convs:
            length = _conv_out(length, conv)
        return length

    def _check_length_model(self) -> bool:
        import torch

        try:
            with torch.inference_mode():
                for n in (2000, 2480):
                    got = self.tok.encoder(torch.zeros(1, 1, n, device=self.device)).shape[2]
                    if got != self.acoustic_frames(n):
                        raise RuntimeError(f"predicted {self.acoustic_frames(n)} frames for {n} samples, got {got}")
        except Exception as exc:  # unknown encoder layout: fall back to upstream's run-then-check
            log.warning("acoustic frame prediction disabled (%s); encoding as upstream does", exc)
            return False
        return True

    @staticmethod
    def expected_frames(n_samples: int) -> int:
        """T for ``n_samples`` at 24 kHz with the v2 geometry: ``ceil((n - 118) / 960)``, 1 below 960."""
        return 1 if n_samples < 960 else math.ceil((n_samples - 118) / 960)

    # ----------------------------------------------------------------------------------- encoding
    def encode(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Encode mono float32 waves at :attr:`sample_rate`; equal lengths share encoder calls.

        Returns:
            one int64 ``(num_codebooks, T)`` array per wave, in input order.

        Raises:
            ValueError: a wave is not 1-D or not finite.
        """
        out: list[np.ndarray | None] = [None] * len(waves)
        groups: dict[int, list[int]] = {}
        prepared = []
        for i, w in enumerate(waves):
            w = np.asarray(w, dtype=np.float32)
            if w.ndim != 1:
                raise ValueError(f"wave {i}: expected a mono (n,) array, got shape {w.shape}")
            if not np.isfinite(w).all():
                raise ValueError(f"wave {i}: contains NaN/inf")
            if w.shape[0] < self.hop_length:
                w = np.pad(w, (0, self.hop_length - w.shape[0]))
            prepared.append(w)
            groups.setdefault(w.shape[0], []).append(i)
        for length, idxs in groups.items():
            per = max(1, min(self.max_batch_size, int(self.max_batch_seconds * self.sample_rate // length)))
            for j in range(0, len(idxs), per):
                chunk = idxs[j:j + per]
                codes = self.encode_equal_length(np.stack([prepared[i] for i in chunk]))
                for i, c in zip(chunk, codes):
                    out[i] = c
        return out  # type: ignore[return-value]

    def encode_equal_length(self, x: np.ndarray) -> np.ndarray:
        """Encode a batch of equal-length clips: float32 ``(B, n)``, n >= 632 -> int64 ``(B, K, T)``.

        Same computation as upstream ``_xcodec_encode`` per clip (see the module docstring).
        """
        import torch
        import torch.nn.functional as F

        tok = self.tok
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            x3 = xt.unsqueeze(1)  # (B, 1, n)
            e_sem = tok.encoder_semantic(tok.get_regress_target(x3).transpose(1, 2))  # (B, 768, Ts)
            t_sem = e_sem.shape[2]
            if self._predict and self.acoustic_frames(xt.shape[1]) != t_sem:
                e_ac = tok.encoder(F.pad(xt, (self._pad, self._pad)).unsqueeze(1))
            else:
                e_ac = tok.encoder(x3)
                if e_ac.shape[2] != t_sem:
                    e_ac = tok.encoder(F.pad(xt, (self._pad, self._pad)).unsqueeze(1))
            t = min(e_ac.shape[2], t_sem)
            e = torch.cat([e_ac[:, :, :t], e_sem[:, :, :t]], dim=1)
            e = tok.fc_prior(e.transpose(1, 2))
            if tok.quantizer_type == "RVQ":
                codes = tok.quantizer.encode(e.transpose(1, 2), tok.frame_rate, None).permute(1, 0, 2)
            else:
                _, codes = tok.quantizer(e)
                codes = codes.permute(0, 2, 1)
            return codes.to(torch.int64).cpu().numpy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``(num_codebooks, T)`` ints -> float32 ``(T * hop_length,)`` waveform at :attr:`sample_rate`.

        Raises:
            ValueError: wrong shape or codes outside ``[0, codebook_size)``.
        """
        import torch

        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise ValueError(f"codes shape {codes.shape}, expected ({self.num_codebooks}, T)")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes outside [0, {self.codebook_size})")
        with torch.inference_mode():
            wav = self.tok.decode(torch.as_tensor(codes.astype(np.int64))[None])
        return np.ascontiguousarray(np.asarray(wav).reshape(-1), dtype=np.float32)


def build_codec(at_cfg: dict[str, Any]) -> HiggsCodec:
    """The ``audio_tokenizer`` config section -> :class:`HiggsCodec` (``model.build_audio_tokenizer``).

    ``random_init`` codebooks are drawn from ``seed`` (:func:`init_codebooks`); a pretrained tokenizer
    with un-initialised codebooks raises ``ValueError``. Equal-length batches of up to
    ``batch_seconds`` of audio on CUDA; one clip per encoder call on CPU.
    """
    from .model import build_audio_tokenizer

    device = at_cfg.get("device", "cpu")
    tok = build_audio_tokenizer(at_cfg, device=device)
    seed = at_cfg.get("seed", 0) if at_cfg["source"] == "random_init" else None
    on_cuda = str(device).startswith("cuda")  # CPU: one clip per encoder call (batching is slower there)
    return HiggsCodec(tok, init_seed=seed, max_batch_seconds=at_cfg.get("batch_seconds", 60.0),
                      max_batch_size=64 if on_cuda else 1)


def tokenizer_geometry(at_cfg: dict[str, Any]) -> dict[str, int]:
    """``sample_rate``, ``hop_length``, ``n_codebooks``, ``codebook_size`` of the configured tokenizer,
    without building it: from ``arch`` (random_init), the local ``config.json`` (pretrained folder), or
    :data:`DEFAULT_GEOMETRY` (hub id: the v2 tokenizer's values)."""
    arch = at_cfg.get("arch")
    if not arch and at_cfg.get("path") and (Path(at_cfg["path"]) / "config.json").is_file():
        arch = json.loads((Path(at_cfg["path"]) / "config.json").read_text())
    if not arch:
        return dict(DEFAULT_GEOMETRY)
    bins = arch.get("bins", 1024)
    return {
        "sample_rate": int(arch.get("sample_rate", 24000)),
        "hop_length": int(np.prod(arch.get("ratios", [8, 5, 4, 2, 3]))),
        "n_codebooks": int(arch.get("n_q", 8)),
        "codebook_size": int(bins) if isinstance(bins, int) else int(np.prod(bins)),
    }


# ========================================================================================== clips
@dataclass
class Clip:
    """One distinct clip: content hash, a path to read it from, its cache key and entry path."""

    sha: str
    path: str
    key: str = ""
    entry: Path | None = None


def clips_from_manifests(manifests: Iterable[str | Path]) -> tuple[list[Clip], int]:
    """Distinct clips (by ``misc.audio_sha256``) of ChatML JSONL manifests, in order of first use.

    Relative ``audio_url`` values are taken relative to the manifest's folder.

    Returns:
        ``(clips, n_rows)``.

    Raises:
        FileNotFoundError: a manifest is missing.
        ValueError: a row's audio has no ``misc.audio_sha256`` entry (naming row id and url).
    """
    from .data import audio_items, read_jsonl, sample_id

    seen: dict[str, Clip] = {}
    n_rows = 0
    for manifest in manifests:
        manifest = Path(manifest)
        for row in read_jsonl(manifest):
            n_rows += 1
            hashes = (row.get("misc") or {}).get("audio_sha256") or {}
            for _, _, item in audio_items(row):
                url = item.get("audio_url")
                if url not in hashes:
                    raise ValueError(f"{manifest}: sample {sample_id(row)}: audio {url!r} has no misc.audio_sha256 "
                                     "entry (rerun the manifest stage)")
                sha = hashes[url]
                if sha not in seen:
                    path = Path(url) if os.path.isabs(url) else manifest.parent / url
                    seen[sha] = Clip(sha=sha, path=str(path))
    return list(seen.values()), n_rows


def _load_clip(path: str, target_rate: int) -> tuple[str, np.ndarray, int, int]:
    """Worker: decode ``path`` -> ``(audio_sha256, mono float32 wave at target_rate, source rate, source n)``."""
    samples, sr = audio_io.load_audio(path)
    sha = audio_io.audio_sha256(samples, sr)
    try:
        wave = audio_io.to_mono_resampled(samples, sr, target_rate)
    except Exception as exc:  # e.g. ValueError on NaN/inf samples
        raise audio_io.AudioDecodeError(f"{path}: cannot resample to {target_rate} Hz: {exc}") from exc
    return sha, wave, sr, samples.shape[1]


def _source_length(path: str) -> tuple[int, int]:
    """(rate, frames) from the file header, for ordering work so equal lengths are adjacent."""
    try:
        import soundfile as sf

        info = sf.info(path)
        return int(info.samplerate), int(info.frames)
    except Exception:
        return (1 << 30, 1 << 62)  # unknown: last, alone


def _source_duration(path: str, fallback: float) -> float:
    try:
        import soundfile as sf

        return float(sf.info(path).duration)
    except Exception:
        return fallback


# ======================================================================================== the stage
def tune_malloc() -> bool:
    """Make glibc keep freed memory instead of returning it to the OS (this process, from now on).

    The DAC encoder's activations are tens of MB per tensor (64 channels x 24000 samples/s x 4 B);
    glibc serves such blocks with a fresh ``mmap`` each time and ``munmap``s them on free, so every
    layer of every clip page-faults its memory in again: about a third of CPU encode time was kernel
    time (1.4 M minor faults per 16 s of audio). ``mallopt(M_MMAP_MAX, 0)`` (heap only) and
    ``M_TRIM_THRESHOLD`` = 2 GiB (no trimming) reuse the pages instead: measured 1.5x faster on CPU,
    identical results. The cost is that the heap stays at its peak size. Call it only in a process
    that exists to encode (the CLI, the encode workers). Returns ``False`` where glibc is not present.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # <malloc.h>
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
        libc.mallopt(m_top_pad, 64 << 20)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def default_threads() -> int:
    """Torch intra-op threads for the encoder: ``$HIGGS_TUNE_THREADS``, else the CPUs this process may use."""
    env = os.environ.get("HIGGS_TUNE_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def encode_all(cfg: dict[str, Any], *, manifests: Sequence[str | Path] | None = None, codec: Codec | None = None,
               threads: int | None = None, progress: bool | None = None, write_index: bool = True) -> dict[str, Any]:
    """Encode every clip of the kept manifests that the cache lacks; write ``Paths.tokens_index``.

    Args:
        cfg: validated config (``audio_tokenizer``, ``cache_dir``, ``results_dir``, ``experiment``).
        manifests: ChatML JSONL files; default ``Paths.train_manifest`` and ``Paths.val_manifest``.
        codec: a :class:`Codec` to use instead of building one from the config (tests, benchmarks);
            it must be the tokenizer the config identifies. Built only when something must be encoded.
        threads: torch thread budget: each of the ``num_workers`` CPU encode workers gets
            ``threads // num_workers`` (``None``: :func:`default_threads`); the in-process encoder gets
            ``torch.set_num_threads(threads)`` (``None``: leave torch's setting).
        progress: tqdm bar with clips/s and audio-s/s on stderr (``False``: none; ``None``/``True``:
            refreshed every second on a terminal, every 30 s otherwise).
        write_index: write ``Paths.tokens_index`` and ``stats.json`` beside it.

    Returns:
        stats: ``n_rows``, ``n_clips`` (distinct), ``n_encoded``, ``n_cached``, ``n_corrupt`` (invalid
        entries found and re-encoded), ``audio_s_encoded`` (source seconds), ``encode_wall_s``,
        ``clips_per_s`` and ``audio_s_per_s`` (over ``encode_wall_s``), ``mode`` (``workers``,
        ``main`` or ``none``: see ``_encode_missing``), ``wall_s``, ``tokenizer_id``, ``index``.
        Also written to ``stats.json`` beside the index.

    Raises:
        FileNotFoundError: a manifest or an audio file is missing.
        ValueError: a row lacks its hash, or a clip's decoded audio no longer matches its hash.
        audio_io.AudioDecodeError: an audio file does not decode.
    """
    from .config import Paths
    from .model import audio_tokenizer_identity

    t0 = time.perf_counter()
    paths = Paths(cfg)
    at_cfg = cfg["audio_tokenizer"]
    manifests = list(manifests) if manifests is not None else [paths.train_manifest, paths.val_manifest]
    clips, n_rows = clips_from_manifests(manifests)
    tok_id = audio_tokenizer_identity(at_cfg)
    geo = tokenizer_geometry(at_cfg)
    if codec is not None:
        geo = {"sample_rate": int(codec.sample_rate), "hop_length": int(round(codec.sample_rate / codec.frame_rate)),
               "n_codebooks": int(codec.num_codebooks), "codebook_size": int(codec.codebook_size)}
    rate = geo["sample_rate"]

    frames: dict[str, int] = {}
    durations: dict[str, float] = {}
    todo: list[Clip] = []
    n_corrupt = 0
    for clip in clips:
        clip.key = cache_key(clip.sha, tok_id, rate)
        clip.entry = entry_path(paths.cache, clip.key)
        try:
            frames[clip.sha] = read_entry(clip.entry, geo["n_codebooks"], geo["codebook_size"]).shape[1]
        except FileNotFoundError:
            todo.append(clip)
        except CorruptEntryError as exc:
            log.warning("corrupt cache entry, re-encoding: %s", exc)
            n_corrupt += 1
            with contextlib.suppress(OSError):
                os.unlink(clip.entry)
            todo.append(clip)
    n_cached = len(clips) - len(todo)
    log.info("tokenize: %d rows, %d distinct clips: %d to encode, %d cached%s", n_rows, len(clips), len(todo),
             n_cached, f" ({n_corrupt} corrupt entries dropped)" if n_corrupt else "")

    enc = {"n_encoded": 0, "audio_s_encoded": 0.0, "encode_wall_s": 0.0, "mode": "none"}
    if todo:
        enc = _encode_missing(todo, at_cfg, codec, threads, rate, frames, durations, progress)

    stats: dict[str, Any] = {
        "n_rows": n_rows, "n_clips": len(clips), "n_cached": n_cached, "n_corrupt": n_corrupt, **enc,
        "tokenizer_id": tok_id, "index": str(paths.tokens_index),
    }
    w = stats["encode_wall_s"]
    stats["clips_per_s"] = stats["n_encoded"] / w if w else 0.0
    stats["audio_s_per_s"] = stats["audio_s_encoded"] / w if w else 0.0
    if write_index:
        frame_rate = rate / geo["hop_length"]
        rows = [{
            "audio_sha256": c.sha,
            "codes_path": str(c.entry),
            "n_frames": int(frames[c.sha]),
            "n_codebooks": geo["n_codebooks"],
            "sample_rate": rate,
            "frame_rate": frame_rate,
            "duration_s": durations.get(c.sha) or _source_duration(c.path, frames[c.sha] / frame_rate),
            "cache_key": c.key,
            "tokenizer_id": tok_id,
            "audio_url": c.path,
        } for c in clips]
        write_index_file(paths.tokens_index, rows)
        stats["wall_s"] = time.perf_counter() - t0
        _write_json_atomic(paths.tokens_index.parent / "stats.json", stats)
    stats["wall_s"] = time.perf_counter() - t0
    if stats["n_encoded"]:
        log.info("tokenize: encoded %d clips (%.1f s of audio) in %.1f s: %.2f clips/s, %.1f audio-s/s",
                 stats["n_encoded"], stats["audio_s_encoded"], w, stats["clips_per_s"], stats["audio_s_per_s"])
    log.info("tokenize: index %s (%d clips)", paths.tokens_index if write_index else "not written", len(clips))
    return stats


def _encode_missing(todo: list[Clip], at_cfg: dict[str, Any], codec: Codec | None, threads: int | None, rate: int,
                    frames: dict[str, int], durations: dict[str, float], progress: bool | None) -> dict[str, Any]:
    """Encode ``todo`` and write their entries; fill ``frames``/``durations``. Two modes:

    * ``workers`` (CPU, ``num_workers > 0``, no injected codec): each worker process decodes,
      resamples and encodes whole clips with ``threads // num_workers`` torch threads and writes the
      entry itself. On CPU this beats one process with all threads (no barrier between threads, and
      graceful under CPU contention) and batching (larger activations fall out of cache).
    * ``main``: workers (if any) decode and resample ahead; this process encodes, in equal-length
      batches of up to ``batch_seconds`` of audio on CUDA, clip by clip on CPU.
    """
    from tqdm import tqdm

    for folder in {c.entry.parent for c in todo}:
        clean_stale_temps(folder)
    num_workers = int(at_cfg.get("num_workers", 0))
    device = str(getattr(codec, "device", at_cfg.get("device", "cpu")))
    on_cuda = device.startswith("cuda")
    mode = "workers" if (codec is None and num_workers > 0 and not on_cuda) else "main"
    # longest first: better load balance at the end; equal source lengths end up adjacent (batching)
    order = sorted(todo, key=lambda c: _source_length(c.path), reverse=True)
    tty = sys.stderr.isatty()  # a log file (Snakemake's log:) gets a progress line every 30 s instead
    bar = tqdm(total=len(order), unit="clip", desc="tokenize", disable=progress is False,
               mininterval=1.0 if tty else 30.0, dynamic_ncols=tty)
    t_start = time.perf_counter()
    done = {"n": 0, "audio_s": 0.0}

    def finished(clip: Clip, n_frames: int, duration: float) -> None:
        frames[clip.sha], durations[clip.sha] = int(n_frames), float(duration)
        done["n"] += 1
        done["audio_s"] += duration
        bar.update(1)
        el = max(time.perf_counter() - t_start, 1e-9)
        bar.set_postfix_str(f"{done['n'] / el:.2f} clips/s, {done['audio_s'] / el:.1f} audio-s/s", refresh=False)

    pool = None
    per = max(1, (threads or default_threads()) // num_workers) if num_workers > 0 else 0
    try:
        if num_workers > 0:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            method = _start_method(mode, per)
            if method == "fork":  # imported once here, inherited by the workers
                import boson_multimodal.audio_processing.higgs_audio_tokenizer  # noqa: F401
            pool = ProcessPoolExecutor(num_workers, mp_context=mp.get_context(method))
        if mode == "workers":
            log.info("encoding %d clips in %d worker processes x %d torch threads", len(order), num_workers, per)
            _run_workers(pool, order, at_cfg, per, rate, num_workers, finished)
        else:
            if threads is not None:
                import torch

                torch.set_num_threads(int(threads))
            if codec is None:
                codec = build_codec(at_cfg)
            batch_s = float(at_cfg.get("batch_seconds", 60.0)) if on_cuda else 0.0  # CPU: one clip per call
            log.info("encoding %d clips in this process (%s), %s", len(order), device,
                     f"equal-length batches <= {batch_s:g} s" if batch_s else "clip by clip")
            _run_main(pool, order, codec, rate, batch_s, num_workers, finished)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return {"n_encoded": done["n"], "audio_s_encoded": done["audio_s"],
            "encode_wall_s": time.perf_counter() - t_start, "mode": mode}


def _start_method(mode: str, threads_per_worker: int) -> str:
    """``fork`` for single-threaded CPU encode workers on Linux, else ``spawn``.

    A forked worker inherits the parent's imports (a spawned one first imports torch and
    boson-multimodal: ~3 s). Forking a process that has used OpenMP is safe only while the child
    never enters a parallel region (GNU libgomp's pool does not survive ``fork``): with one torch thread,
    ATen's ``parallel_for``, oneDNN and MKL all run inline. Workers that decode for an in-process
    (possibly CUDA) encoder, or that use several threads, are spawned.
    """
    if mode == "workers" and threads_per_worker == 1 and sys.platform.startswith("linux"):
        return "fork"
    return "spawn"


def _check_hash(clip: Clip, sha: str) -> None:
    if sha != clip.sha:
        raise ValueError(f"{clip.path}: decoded audio hash {sha[:12]}… differs from the manifest's "
                         f"{clip.sha[:12]}…: the file changed since the manifest stage; rerun it")


def _run_main(pool, order: list[Clip], codec: Codec, rate: int, batch_s: float, num_workers: int, finished) -> None:
    """Decode ahead in ``pool`` (bounded window, in order), encode here, write entries per batch."""
    window = max(4, 4 * max(num_workers, 1))
    pending: deque = deque()
    it = iter(order)

    def submit_more():
        while len(pending) < window:
            clip = next(it, None)
            if clip is None:
                return
            pending.append((clip, pool.submit(_load_clip, clip.path, rate) if pool else None))

    batch: list[tuple[Clip, np.ndarray, float]] = []

    def flush():
        codes = codec.encode([w for _, w, _ in batch])
        for (clip, _, dur), c in zip(batch, codes):
            write_entry(clip.entry, c)
            finished(clip, c.shape[1], dur)
        batch.clear()

    submit_more()
    while pending:
        clip, fut = pending.popleft()
        sha, wave, sr, n = fut.result() if fut is not None else _load_clip(clip.path, rate)
        submit_more()
        _check_hash(clip, sha)
        if batch and (len(wave) != len(batch[0][1]) or (len(batch) + 1) * len(wave) > batch_s * rate):
            flush()
        batch.append((clip, wave, n / sr))
    if batch:
        flush()


_WORKER: dict[str, Any] = {}


def _worker_encode(clip: Clip, at_cfg: dict[str, Any], threads: int, rate: int) -> tuple[int, float]:
    """Worker process: decode, check the hash, encode, write the entry. Returns ``(n_frames, duration_s)``.

    The codec is built on the worker's first task (``build_codec`` is deterministic: same weights in
    every worker) and kept for the next ones. (Building it once in the parent before forking was
    measured slower: 38-42 s vs 33-38 s for the 32 demo clips, alternating runs.)
    """
    if "codec" not in _WORKER:
        import torch

        torch.set_num_threads(threads)
        tune_malloc()
        log.setLevel(logging.ERROR)  # the parent logs once
        _WORKER["codec"] = build_codec(at_cfg)
    sha, wave, sr, n = _load_clip(clip.path, rate)
    _check_hash(clip, sha)
    codes = _WORKER["codec"].encode([wave])[0]
    write_entry(clip.entry, codes)
    return int(codes.shape[1]), n / sr


def _run_workers(pool, order: list[Clip], at_cfg: dict[str, Any], threads: int, rate: int, num_workers: int,
                 finished) -> None:
    from concurrent.futures import FIRST_COMPLETED, wait

    window = 2 * num_workers
    it = iter(order)
    pending: dict = {}
    while True:
        while len(pending) < window:
            clip = next(it, None)
            if clip is None:
                break
            pending[pool.submit(_worker_encode, clip, at_cfg, threads, rate)] = clip
        if not pending:
            return
        ready, _ = wait(pending, return_when=FIRST_COMPLETED)
        for fut in ready:
            clip = pending.pop(fut)
            n_frames, duration = fut.result()  # re-raises the worker's error
            finished(clip, n_frames, duration)


def write_index_file(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write the index rows as parquet atomically (temp file beside it, fsync, ``os.replace``)."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["audio_sha256", "codes_path", "n_frames", "n_codebooks", "sample_rate", "frame_rate", "duration_s",
               "cache_key", "tokenizer_id", "audio_url"]
    df = pd.DataFrame(rows, columns=columns).astype(
        {"n_frames": "int64", "n_codebooks": "int64", "sample_rate": "int64", "frame_rate": "float64",
         "duration_s": "float64"})
    with atomic_file(path) as tmp:
        df.to_parquet(tmp, index=False)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ========================================================================================== decode
def decode_to_wav(cfg: dict[str, Any], out: str | Path, *, sha256: str | None = None, codes: str | Path | None = None,
                  codec: Codec | None = None) -> dict[str, Any]:
    """Decode cached codes to a float32 WAV at the tokenizer rate (for listening).

    Args:
        cfg: validated config (the tokenizer to decode with; the index/cache to look ``sha256`` up in).
        out: WAV path to write.
        sha256: audio hash: looked up in ``Paths.tokens_index``, else in the cache by :func:`cache_key`.
        codes: a ``.npy`` codes file ``(K, T)`` instead of ``sha256``.

    Returns:
        ``{"out", "sample_rate", "n_frames", "duration_s"}``.

    Raises:
        ValueError: neither or both of ``sha256`` / ``codes``.
        KeyError: ``sha256`` is neither in the index nor in the cache.
        CorruptEntryError: the codes file is invalid.
    """
    import soundfile as sf

    from .config import Paths
    from .model import audio_tokenizer_identity

    if (sha256 is None) == (codes is None):
        raise ValueError("give exactly one of sha256 / codes")
    at_cfg = cfg["audio_tokenizer"]
    geo = tokenizer_geometry(at_cfg)
    if codes is None:
        paths = Paths(cfg)
        codes = None
        if paths.tokens_index.is_file():
            import pandas as pd

            df = pd.read_parquet(paths.tokens_index)
            hit = df[df.audio_sha256 == sha256]
            if len(hit):
                codes = hit.iloc[0].codes_path
        if codes is None:
            codes = entry_path(paths.cache, cache_key(sha256, audio_tokenizer_identity(at_cfg), geo["sample_rate"]))
            if not Path(codes).is_file():
                raise KeyError(f"audio {sha256[:12]}… has no codes in {paths.tokens_index} or {paths.cache}")
    arr = read_entry(codes, geo["n_codebooks"], geo["codebook_size"])
    codec = codec or build_codec(at_cfg)
    wav = codec.decode(arr)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), wav, int(codec.sample_rate), subtype="FLOAT")
    return {"out": str(out), "sample_rate": int(codec.sample_rate), "n_frames": int(arr.shape[1]),
            "duration_s": len(wav) / codec.sample_rate}


# ============================================================================================= CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m higgs_tune.tokenize [--configfile F] [--threads N] [--no-progress]`` or
    ``python -m higgs_tune.tokenize decode --configfile F (--sha256 H | --codes X.npy) --out X.wav``."""
    from .config import add_config_args, config_from_args

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "decode":
        p = argparse.ArgumentParser(prog="python -m higgs_tune.tokenize decode",
                                    description="decode cached audio codes to a WAV with the tokenizer's decoder")
        add_config_args(p)
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--sha256", help="audio hash (misc.audio_sha256 value) to look up")
        g.add_argument("--codes", help="a .npy codes file (K, T)")
        p.add_argument("--out", required=True, help="WAV to write")
        args = p.parse_args(argv[1:])
        try:
            res = decode_to_wav(config_from_args(args), args.out, sha256=args.sha256, codes=args.codes)
        except (KeyError, FileNotFoundError, CorruptEntryError) as exc:
            raise SystemExit(f"decode: {exc.args[0] if isinstance(exc, KeyError) else exc}") from exc
        log.info("wrote %s: %d frames, %.2f s at %d Hz", res["out"], res["n_frames"], res["duration_s"],
                 res["sample_rate"])
        return 0
    p = argparse.ArgumentParser(prog="python -m higgs_tune.tokenize",
                                description="encode the kept manifests' audio into the code cache + index")
    add_config_args(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the encoder (default $HIGGS_TUNE_THREADS, else all usable CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    tune_malloc()
    stats = encode_all(cfg, threads=args.threads or default_threads(), progress=False if args.no_progress else None)
    print(json.dumps({k: stats[k] for k in ("n_clips", "n_encoded", "n_cached", "n_corrupt", "index")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
