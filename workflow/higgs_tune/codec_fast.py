"""CPU speed machinery for the Higgs audio encoder: upstream's codes, computed faster.

What each part gains is measured by ``bench/bench_tokenize.py`` (``--ablation``); the figures are in
``bench/README.md`` ("Tokenize"), not here.

:class:`FastEncoder` is what :class:`higgs_tune.codec.HiggsCodec` encodes with when the config's
``audio_tokenizer.fast_encode`` is true (the default); with ``fast_encode: false`` the codec calls
upstream ``HiggsAudioTokenizer.encode`` (boson-multimodal 0.1.1) instead, the reference path. The two
give identical codes (``tests/test_tokenize.py`` on real LJSpeech clips, short, cropped and the longest
ones; ``bench/bench_tokenize.py`` on all 32). Nothing here changes what is computed, only how:

* **One acoustic pass, batch-safe** (:meth:`FastEncoder.encode_equal_length`): upstream
  ``_xcodec_encode`` runs the DAC acoustic encoder once, and when its frame count differs from the
  semantic branch's (about 53 % of lengths) runs it a second time on the clip zero-padded by
  ``160 * semantic_downsample_factor`` samples per side, keeping only the second result. Frame counts
  are a function of the length alone, so :meth:`FastEncoder.acoustic_frames` predicts the mismatch
  from the convolution arithmetic and the encoder runs once, on the input upstream would have kept
  (the acoustic encoder is most of the encode time). Upstream's re-run also hard-codes batch 1
  (``F.pad(x[:, 0, :], ...).unsqueeze(0)``); this one pads per clip, so a batch of equal-length clips
  is one call. (Only equal lengths: the encoders are non-causal, zero-padding a clip changes its codes.)
* **Weight norm folded** into the encoder's convolution weights once (:func:`fold_weight_norm`:
  ``remove_weight_norm``, the same ``_weight_norm`` op, so identical weights) instead of recomputed
  on every call.
* **Cache-sized time tiles** for the large activations (the first two encoder blocks: 64-128
  channels at 3-24 kHz, tens of MB): each ``ResidualUnit`` as one pass (:func:`residual_unit_tiled`),
  each block's Snake + strided convolution as another (:func:`downsample_tiled`), the remaining
  Snakes in tiles, in place where their input is not read again (:func:`snake_tiled`). Upstream's
  whole-clip layers run at memory speed there, the tiles at compute speed.
* **NumPy's SIMD sine** for the Snakes on CPU (:func:`_sin_`: faster than ATen's, within one ULP of it).
* **oneDNN for the wide 1x1 convolutions** rather than MKL (:func:`_pointwise_convs_on_onednn`).
* :func:`tune_malloc` stops glibc from ``mmap``/``munmap``-ing each large activation (on CPU);
  a process-wide setting, called by the tokenize stage's encoding processes when ``fast_encode`` is on.

Numerics: the fp32 activations agree with upstream's to rounding (relative 1e-6; the convolutions
sum the same products in another order, the sine differs by at most one ULP), as upstream's own do
between one and two torch threads; the codes (nearest codebook entries) are identical. Every patch
applies to float32 CPU tensors only; other devices and dtypes run upstream's module forwards.
"""

from __future__ import annotations

import logging
import types

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("higgs_tune.codec_fast")


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
    ``bench/bench_tokenize.py``.

    Args:
        x: float32 ``(B, C, n)`` contiguous CPU tensor.
        unit: a ``ResidualUnit`` (``block = [Snake1d, Conv1d k=7, Snake1d, Conv1d k=1]``) whose
            weight norm is folded (plain ``weight``/``bias``).
        tile: output samples per tile.

    Returns:
        a new ``(B, C, n)`` tensor.
    """
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
    b = torch.mul(alpha, x)
    _sin_(b).pow_(2).mul_(recip)
    return b.add_(x)  # q + x == x + q in IEEE arithmetic


def _sin_(t):
    """``t.sin_()``; for a contiguous float32 CPU tensor outside autograd, NumPy's ``np.sin`` in place.

    NumPy >= 1.22 evaluates float32 ``sin`` with its own AVX-512/AVX2 kernels (documented max error
    1.49 ULP), 1.8x the throughput of ATen's SLEEF ``sin_u10`` on this machine (one thread, 96k
    elements, measured: 0.70 vs 1.25 ns per element); the sine is the costliest op of the Snake
    activation (with ATen's, 7 % of CPU encode time, profiled). The two agree to one ULP (relative
    1.2e-7, on ~5 % of elements); codes are unchanged (tests, ``bench/bench_tokenize.py``).

    Args:
        t: float tensor, any shape; modified in place.

    Returns:
        ``t``.
    """
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
    ``bench/bench_tokenize.py``). Below ``min_channels`` (the tiled first blocks use ``addmm_``) MKL is as
    fast. Other devices, dtypes and shapes keep ``Conv1d.forward``.
    """
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


def fold_weight_norm(module) -> int:
    """Fold every weight-normed layer of ``module`` into a plain ``weight`` (``remove_weight_norm``),
    in place; returns how many were folded.

    ``remove_weight_norm`` computes ``weight = g * v / ||v||`` with the same ``torch._weight_norm`` op the
    hook runs before every forward, so the folded weights equal the ones each call would recompute.
    """
    n = 0
    for m in module.modules():
        if hasattr(m, "weight_g"):
            torch.nn.utils.remove_weight_norm(m)
            n += 1
    return n


def accelerate_encoders(tokenizer) -> dict[str, int]:
    """Apply every module patch of this file to a ``HiggsAudioTokenizer``'s encoders, in place.

    Folds the DAC encoder's weight norm (:func:`fold_weight_norm`), tiles its Snakes
    (:func:`_tile_snakes`), residual units and block tails (:func:`_tile_encoder`), and runs the wide
    1x1 convolutions of both encoders on oneDNN (:func:`_pointwise_convs_on_onednn`).

    Returns:
        how many modules each step changed: ``weight_norm``, ``snakes``, ``tiled``, ``onednn``
        (v2 geometry: 37, 36, 20, 13).
    """
    return {
        "weight_norm": fold_weight_norm(tokenizer.encoder),
        "snakes": _tile_snakes(tokenizer.encoder),
        "tiled": _tile_encoder(tokenizer.encoder),
        "onednn": _pointwise_convs_on_onednn(tokenizer.encoder, tokenizer.encoder_semantic),
    }


class FastEncoder:
    """Upstream ``HiggsAudioTokenizer._xcodec_encode`` for a batch of equal-length clips, one acoustic
    pass per clip (see the module docstring).

    Takes ownership of ``tokenizer``: patches its encoders (:func:`accelerate_encoders`); its
    ``encode`` (upstream's) stays usable and gives the same codes. Codebooks must be initialised
    (:class:`higgs_tune.codec.HiggsCodec` sees to that before building this).

    Args:
        tokenizer: an eval-mode ``HiggsAudioTokenizer`` (boson-multimodal 0.1.1).
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.device = next(tokenizer.parameters()).device
        self._pad = 160 * int(tokenizer.semantic_downsample_factor)  # upstream's re-run padding, samples
        self.patched = accelerate_encoders(tokenizer)
        self._convs = [m for m in tokenizer.encoder.modules() if isinstance(m, torch.nn.Conv1d)]
        self._predict = self._check_length_model()

    # ------------------------------------------------------------------------------------ lengths
    def acoustic_frames(self, n_samples: int) -> int:
        """Frames the DAC acoustic encoder outputs for ``n_samples`` input samples: PyTorch's
        ``Conv1d`` output-length formula applied through the encoder's convolutions in order."""
        length = int(n_samples)
        for conv in self._convs:
            length = _conv_out(length, conv)
        return length

    def _check_length_model(self) -> bool:
        """Whether :meth:`acoustic_frames` matches the encoder on two lengths (one per upstream
        branch); if not (an unknown layout), encoding falls back to upstream's run-then-check."""
        try:
            with torch.inference_mode():
                for n in (2000, 2480):
                    got = self.tok.encoder(torch.zeros(1, 1, n, device=self.device)).shape[2]
                    if got != self.acoustic_frames(n):
                        raise RuntimeError(f"predicted {self.acoustic_frames(n)} frames for {n} samples, got {got}")
        except Exception as exc:
            log.warning("acoustic frame prediction disabled (%s); encoding as upstream does", exc)
            return False
        return True

    # ----------------------------------------------------------------------------------- encoding
    def encode_equal_length(self, x: np.ndarray) -> np.ndarray:
        """Encode a batch of equal-length clips.

        Args:
            x: float32 ``(B, n)`` at the tokenizer's sample rate (24 kHz), ``n >= 632`` samples.

        Returns:
            int64 ``(B, K, T)`` codes in ``[0, codebook_size)``; each ``[b]`` equals upstream
            ``encode(x[b])``.
        """
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            e_sem = self._semantic(xt)
            e_ac = self._acoustic(xt, e_sem.shape[2])
            return self._quantize(e_ac, e_sem).to(torch.int64).cpu().numpy()

    def _semantic(self, xt):
        """``(B, n)`` -> semantic branch ``(B, 768, Ts)``: HuBERT hidden states (16 kHz, layer mean) through
        ``encoder_semantic``, as upstream."""
        tok = self.tok
        return tok.encoder_semantic(tok.get_regress_target(xt.unsqueeze(1)).transpose(1, 2))

    def _acoustic(self, xt, t_sem: int):
        """``(B, n)`` -> DAC acoustic encoding ``(B, D, Ta)``, on the input upstream keeps: the clip itself
        when its frame count equals the semantic branch's ``t_sem``, else the clip zero-padded by
        ``160 * semantic_downsample_factor`` samples per side."""
        padded = lambda: F.pad(xt, (self._pad, self._pad)).unsqueeze(1)  # noqa: E731
        if self._predict:
            return self.tok.encoder(padded() if self.acoustic_frames(xt.shape[1]) != t_sem else xt.unsqueeze(1))
        e_ac = self.tok.encoder(xt.unsqueeze(1))
        return e_ac if e_ac.shape[2] == t_sem else self.tok.encoder(padded())

    def _quantize(self, e_ac, e_sem):
        """Both branches, cut to the shorter length, through ``fc_prior`` and the quantizer: ``(B, K, T)``
        codes, as upstream's tail of ``_xcodec_encode``."""
        tok = self.tok
        t = min(e_ac.shape[2], e_sem.shape[2])
        e = tok.fc_prior(torch.cat([e_ac[:, :, :t], e_sem[:, :, :t]], dim=1).transpose(1, 2))
        if tok.quantizer_type == "RVQ":
            return tok.quantizer.encode(e.transpose(1, 2), tok.frame_rate, None).permute(1, 0, 2)
        _, codes = tok.quantizer(e)
        return codes.permute(0, 2, 1)
