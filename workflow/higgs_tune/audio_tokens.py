"""The tokenize stage: every clip of the kept manifests -> Higgs audio codes in a content-addressed cache.

(Named ``audio_tokens``, what it makes, not ``tokenize``: that name is the standard library's, which
``linecache`` and torch import.)

``python -m higgs_tune.audio_tokens encode --config-json JSON --train results/X/manifest/train.jsonl --val
results/X/manifest/val.jsonl --index results/X/tokens/index.parquet --stats results/X/tokens/stats.json
--threads 2`` (what ``workflow/rules/tokenize.smk`` runs; by hand, ``--configfile config/demo.yaml``
instead of ``--config-json``) reads the manifests (ChatML JSONL whose ``misc.audio_sha256`` maps each
``audio_url`` to the sha256 of its decoded audio, :func:`higgs_tune.audio_io.audio_sha256`), encodes
each distinct clip once and writes ``--index``, one row per clip:

============== ======= ==============================================================================
column         dtype   meaning
============== ======= ==============================================================================
audio_sha256   str     content hash of the decoded audio (the manifest's ``misc.audio_sha256`` value)
codes_path     str     the ``.npy`` entry, ``(n_codebooks, n_frames)`` int16; relative to the workflow
                       root when ``cache_dir`` is relative, else absolute (``data.CodesIndex`` reads it)
n_frames       int64   T, codec frames (25 per second)
n_codebooks    int64   8 (:data:`higgs_tune.labels.NUM_CODEBOOKS`)
sample_rate    int64   the tokenizer's input rate, 24000 Hz
frame_rate     float64 codec frames per second, ``sample_rate / hop_length`` = 25.0
duration_s     float64 duration of the source clip in seconds (before resampling)
cache_key      str     :func:`cache_key` of the clip
tokenizer_id   str     :func:`higgs_tune.codec.audio_tokenizer_identity`
audio_url      str     one path the clip was read from (the first seen)
============== ======= ==============================================================================

and ``--stats`` (JSON: counts, encode throughput, mode; see :func:`encode_all`). The config sections
it reads are ``audio_tokenizer`` and ``cache_dir``.

Shards (``audio_tokenizer.shards: N > 1``): ``... --shard K`` (K = 0..N-1, one job each, in parallel)
encodes only the clips :func:`shard_clips` gives shard K (the distinct clips dealt out longest first
to the shard with the least audio) into the same cache and writes that shard's index rows and stats;
``python -m higgs_tune.audio_tokens gather --train T --val V --shard-index I0 .. --shard-stats S0 ..
--index I --stats S`` joins them into the index one job writes (same rows, order and codes) and stats
totalled over the shards (:func:`gather_shards`). A killed shard leaves whole entries; rerunning it encodes what it lacks.

``python -m higgs_tune.audio_tokens decode --configfile ... [--index index.parquet] --sha256 HASH --out x.wav``
(or ``--codes file.npy``) turns cached codes back into a 24 kHz WAV with the tokenizer's decoder, for listening.

Cache: ``{cache_dir}/codes/<key[:2]>/<key>.npy`` with ``key = cache_key(audio_sha256, tokenizer_id,
sample_rate)``, so a clip shared by two samples, two manifests or two experiments is encoded once.
Entries are written atomically (:func:`higgs_tune.fileio.atomic_file`) as soon as each clip is
encoded, and validated when read (shape, dtype, code range); a corrupt entry is re-encoded. A run
killed at any point (even SIGKILL) leaves only whole entries (abandoned temp files are swept by the
next run); the next run encodes what is missing. The index is written last, also atomically. A rerun
with everything cached builds no model: it logs ``0 to encode, N cached`` and rewrites the index.

Encoding is :class:`higgs_tune.codec.HiggsCodec` (``audio_tokenizer.fast_encode`` picks
:mod:`higgs_tune.codec_fast` or upstream's ``encode``: the same codes). Parallelism is this stage's:
on CPU (``num_workers > 0``) each worker process decodes, resamples (24 kHz, soxr) and encodes whole
clips with ``threads // num_workers`` torch threads: processes scale better than intra-op threads
and degrade gracefully when other jobs share the cores (figures: ``bench/README.md``, tokenize).
Single-threaded workers are forked on Linux (:func:`_start_method`), inheriting this process's
imports. On CUDA (or with an injected codec) workers decode and resample ahead and this process
encodes, in equal-length batches of up to ``batch_seconds`` of audio.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import audio_io
from .codec import Codec, audio_tokenizer_identity, build_codec, tokenizer_geometry
from .fileio import atomic_file, clean_stale_temps, fsync_dir, read_json, read_jsonl, tmp_owner, write_json
from .labels import CODEBOOK_SIZE, NUM_CODEBOOKS

log = logging.getLogger("higgs_tune.audio_tokens")

#: Bumped when the entry format or the encoding procedure changes; part of every cache key.
CACHE_FORMAT = "higgs-tune-codes-v1"
#: dtype of cache entries: codes are 0..CODEBOOK_SIZE - 1 (1023); int16 halves the size of int32 and is exact.
ENTRY_DTYPE = np.int16
#: Index columns, in order (see the module docstring).
INDEX_COLUMNS = ["audio_sha256", "codes_path", "n_frames", "n_codebooks", "sample_rate", "frame_rate", "duration_s",
                 "cache_key", "tokenizer_id", "audio_url"]


# ============================================================================================ cache
def cache_key(audio_sha: str, tokenizer_id: str, rate: int) -> str:
    """Content address of one clip's codes: sha256 hex (64 chars).

    Args:
        audio_sha: sha256 of the decoded audio (:func:`audio_io.audio_sha256`).
        tokenizer_id: :func:`higgs_tune.codec.audio_tokenizer_identity` of the tokenizer config.
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


def read_entry(path: str | Path, n_codebooks: int = NUM_CODEBOOKS,
               codebook_size: int = CODEBOOK_SIZE) -> np.ndarray:
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
    """Write ``codes`` ``(K, T)`` as ``.npy`` (int16) atomically (:func:`higgs_tune.fileio.atomic_file`:
    temp file ``.<key>.<host>-<pid>.<rand>.tmp`` in the same folder, fsync, ``os.replace``). A reader
    sees the old state or the whole new file, never a part.

    Raises:
        ValueError: codes do not fit int16.
    """
    path = Path(path)
    codes = np.asarray(codes)
    if codes.size and (codes.min() < np.iinfo(ENTRY_DTYPE).min or codes.max() > np.iinfo(ENTRY_DTYPE).max):
        raise ValueError(f"codes out of int16 range: {codes.min()}..{codes.max()}")
    with atomic_file(path, prefix=f".{path.stem}.{tmp_owner()}.") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, codes.astype(ENTRY_DTYPE, copy=False), allow_pickle=False)
    fsync_dir(path.parent)


# ========================================================================================== clips
@dataclass
class Clip:
    """One distinct clip: content hash, a path to read it from, its cache key and entry path, and its
    duration in seconds as the manifest gives it (``None``: not given)."""

    sha: str
    path: str
    key: str = ""
    entry: Path | None = None
    duration: float | None = None


def clips_from_manifests(manifests: Iterable[str | Path]) -> tuple[list[Clip], int]:
    """Distinct clips (by ``misc.audio_sha256``) of ChatML JSONL manifests, in order of first use.

    Relative ``audio_url`` values are taken relative to the manifest's folder.

    Returns:
        ``(clips, n_rows)``.

    Raises:
        FileNotFoundError: a manifest is missing.
        ValueError: a row's audio has no ``misc.audio_sha256`` entry (naming row id and url).
    """
    from .data import audio_items, sample_id

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
                    dur = item.get("duration")  # the manifest stage measures it
                    seen[sha] = Clip(sha=sha, path=str(path),
                                     duration=float(dur) if isinstance(dur, (int, float)) else None)
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


def _fast(at_cfg: dict[str, Any]) -> bool:
    """The ``audio_tokenizer.fast_encode`` switch (default true; see :mod:`higgs_tune.codec_fast`)."""
    return bool(at_cfg["fast_encode"])


def _tune_process(at_cfg: dict[str, Any]) -> None:
    """Process-wide encode speed-ups (:func:`higgs_tune.codec_fast.tune_malloc`), when ``fast_encode``."""
    if _fast(at_cfg):
        from .codec_fast import tune_malloc

        tune_malloc()


# ======================================================================================== the stage
def default_threads() -> int:
    """Torch intra-op threads for the encoder: ``$HIGGS_TUNE_THREADS``, else the CPUs this process may use."""
    env = os.environ.get("HIGGS_TUNE_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def shard_assignment(clips: Sequence[Clip], n_shards: int) -> list[int]:
    """The shard (``0 .. n_shards - 1``) of each clip, position by position.

    ``clips`` are the distinct clips in the order one job indexes them (:func:`clips_from_manifests`:
    first use, by ``audio_sha256``), so a clip shared by train and val, or by two rows, is one clip
    in one shard. Balanced by audio: longest clip first, each goes to the shard with the least audio
    so far (then the fewest clips, then the lowest number), so the shards' audio differs by at most
    the longest clip; clips without a duration count as 0 s (all without: clip ``i`` in shard
    ``i % n_shards``). Depends on nothing but the manifests.

    Raises:
        ValueError: ``n_shards < 1``.
    """
    import heapq

    if n_shards < 1:
        raise ValueError(f"{n_shards} shards: need at least 1 (audio_tokenizer.shards)")
    heap = [(0.0, 0, k) for k in range(n_shards)]  # (seconds, clips, shard)
    out = [0] * len(clips)
    for i in sorted(range(len(clips)), key=lambda i: (-(clips[i].duration or 0.0), i)):
        seconds, count, k = heapq.heappop(heap)
        out[i] = k
        heapq.heappush(heap, (seconds + (clips[i].duration or 0.0), count + 1, k))
    return out


def shard_clips(clips: Sequence[Clip], n_shards: int, shard: int) -> list[Clip]:
    """The clips :func:`shard_assignment` gives shard ``shard`` of ``n_shards``, in the order of ``clips``.

    Raises:
        ValueError: ``n_shards < 1`` or ``shard`` not in ``[0, n_shards)``.
    """
    if n_shards < 1 or not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} of {n_shards}: need n_shards >= 1 and 0 <= shard < n_shards "
                         "(audio_tokenizer.shards)")
    return [c for c, k in zip(clips, shard_assignment(clips, n_shards)) if k == shard]


def encode_all(cfg: dict[str, Any], manifests: Sequence[str | Path], index: str | Path,
               stats: str | Path | None = None, *, codec: Codec | None = None, threads: int | None = None,
               progress: bool | None = None, shard: int | None = None) -> dict[str, Any]:
    """Encode every clip of ``manifests`` (or of one shard of them) that the cache lacks; write the
    index (and the stats).

    Args:
        cfg: config with the ``audio_tokenizer`` section and ``cache_dir`` (the folder of the cache).
        manifests: ChatML JSONL files (the kept train and val manifests).
        index: parquet file to write, one row per distinct clip (columns: the module docstring).
        stats: JSON file to write the returned stats to; ``None``: not written.
        codec: a :class:`~higgs_tune.codec.Codec` to use instead of building one from the config (tests,
            benchmarks); it must be the tokenizer the config identifies. Built only when something must
            be encoded.
        threads: torch thread budget: each of the ``num_workers`` CPU encode workers gets
            ``threads // num_workers`` (``None``: :func:`default_threads`); the in-process encoder gets
            ``torch.set_num_threads(threads)`` (``None``: leave torch's setting).
        progress: tqdm bar with clips/s and audio-s/s on stderr (``False``: none; ``None``/``True``:
            refreshed every second on a terminal, every 30 s otherwise).
        shard: encode only shard ``shard`` of ``cfg["audio_tokenizer"]["shards"]`` (:func:`shard_clips`);
            ``index`` then holds that shard's rows, in the one-job order, and :func:`gather_shards`
            joins the shards' indexes. ``None``: every clip.

    Returns:
        stats: ``n_rows``, ``n_clips`` (distinct), ``n_encoded``, ``n_cached``, ``n_corrupt`` (invalid
        entries found and re-encoded), ``audio_s_encoded`` (source seconds), ``encode_wall_s``,
        ``clips_per_s`` and ``audio_s_per_s`` (over ``encode_wall_s``), ``mode`` (``workers``,
        ``main`` or ``none``: see ``_encode_missing``), ``wall_s`` (seconds), ``tokenizer_id``, ``index``;
        with ``shard``, also ``shard``, ``shards`` and ``n_clips_total`` (``n_clips``: the shard's).

    Raises:
        FileNotFoundError: a manifest or an audio file is missing.
        ValueError: a row lacks its hash, a clip's decoded audio no longer matches its hash, or
            ``shard`` is outside ``[0, shards)``.
        audio_io.AudioDecodeError: an audio file does not decode.
    """
    t0 = time.perf_counter()
    at_cfg = cfg["audio_tokenizer"]
    index = Path(index)
    clips, n_rows = clips_from_manifests(manifests)
    n_total = len(clips)
    if shard is not None:
        clips = shard_clips(clips, int(at_cfg["shards"]), shard)
    tok_id = audio_tokenizer_identity(at_cfg)
    geo = tokenizer_geometry(at_cfg) if codec is None else _codec_geometry(codec)
    rate = geo["sample_rate"]

    frames: dict[str, int] = {}
    durations: dict[str, float] = {}
    todo, n_corrupt = _look_up_cache(clips, cfg["cache_dir"], tok_id, geo, frames)
    n_cached = len(clips) - len(todo)
    log.info("tokenize%s: %d rows, %d distinct clips: %d to encode, %d cached%s",
             f" shard {shard} of {at_cfg['shards']} ({len(clips)} of {n_total} clips)" if shard is not None else "",
             n_rows, len(clips), len(todo), n_cached, f" ({n_corrupt} corrupt entries dropped)" if n_corrupt else "")

    enc = {"n_encoded": 0, "audio_s_encoded": 0.0, "encode_wall_s": 0.0, "mode": "none"}
    if todo:
        enc = _encode_missing(todo, at_cfg, codec, threads, rate, frames, durations, progress)

    out: dict[str, Any] = {
        "n_rows": n_rows, "n_clips": len(clips), "n_cached": n_cached, "n_corrupt": n_corrupt, **enc,
        "tokenizer_id": tok_id, "index": str(index),
    }
    if shard is not None:
        out.update(shard=shard, shards=int(at_cfg["shards"]), n_clips_total=n_total)
    w = out["encode_wall_s"]
    out["clips_per_s"] = out["n_encoded"] / w if w else 0.0
    out["audio_s_per_s"] = out["audio_s_encoded"] / w if w else 0.0
    write_index_file(index, _index_rows(clips, frames, durations, geo, tok_id))
    out["wall_s"] = time.perf_counter() - t0
    if stats is not None:
        write_json(stats, out)
    if out["n_encoded"]:
        log.info("tokenize: encoded %d clips (%.1f s of audio) in %.1f s: %.2f clips/s, %.1f audio-s/s",
                 out["n_encoded"], out["audio_s_encoded"], w, out["clips_per_s"], out["audio_s_per_s"])
    log.info("tokenize: index %s (%d clips)", index, len(clips))
    return out


def _codec_geometry(codec: Codec) -> dict[str, int]:
    """:func:`~higgs_tune.codec.tokenizer_geometry`'s dict, read off an injected codec."""
    return {"sample_rate": int(codec.sample_rate), "hop_length": int(round(codec.sample_rate / codec.frame_rate)),
            "n_codebooks": int(codec.num_codebooks), "codebook_size": int(codec.codebook_size)}


def _look_up_cache(clips: list[Clip], cache_dir: str | Path, tok_id: str, geo: dict[str, int],
                   frames: dict[str, int]) -> tuple[list[Clip], int]:
    """Set each clip's ``key`` and ``entry``; record the frame count of each valid entry in ``frames``.

    Returns:
        ``(todo, n_corrupt)``: the clips without a valid entry (corrupt entries are deleted, counted
        and logged), in input order.
    """
    todo: list[Clip] = []
    n_corrupt = 0
    for clip in clips:
        clip.key = cache_key(clip.sha, tok_id, geo["sample_rate"])
        clip.entry = entry_path(cache_dir, clip.key)
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
    return todo, n_corrupt


def _index_rows(clips: list[Clip], frames: dict[str, int], durations: dict[str, float], geo: dict[str, int],
                tok_id: str) -> list[dict[str, Any]]:
    """One index row per clip (:data:`INDEX_COLUMNS`); a cached clip's duration is read off its file header."""
    rate = geo["sample_rate"]
    frame_rate = rate / geo["hop_length"]
    return [{
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
    num_workers = int(at_cfg["num_workers"])
    device = str(getattr(codec, "device", at_cfg["device"]))
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
            batch_s = float(at_cfg["batch_seconds"]) if on_cuda else 0.0  # CPU: one clip per call
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
        _tune_process(at_cfg)
        logging.getLogger("higgs_tune").setLevel(logging.ERROR)  # the parent logs once
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
    """Write the index rows (dicts keyed by :data:`INDEX_COLUMNS`) as parquet atomically
    (:func:`higgs_tune.fileio.atomic_file`)."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows, columns=INDEX_COLUMNS).astype(
        {"n_frames": "int64", "n_codebooks": "int64", "sample_rate": "int64", "frame_rate": "float64",
         "duration_s": "float64"})
    with atomic_file(path) as tmp:
        df.to_parquet(tmp, index=False)


# ========================================================================================== shards
#: stats.json keys of the gather that are sums of the shards' (counts, seconds of audio, encoder seconds)
SUMMED_STATS = ("n_clips", "n_encoded", "n_cached", "n_corrupt", "audio_s_encoded", "encode_wall_s")


def gather_shards(manifests: Sequence[str | Path], shard_indexes: Sequence[str | Path],
                  shard_stats: Sequence[str | Path], index: str | Path, stats: str | Path | None = None
                  ) -> dict[str, Any]:
    """Join the indexes of the shard jobs (``encode_all(..., shard=k)``, k = 0..N-1) into the index one
    job writes: the same rows, in the same order (:func:`clips_from_manifests`), the same columns and
    dtypes. Opens no audio and no codes.

    Args:
        manifests: the manifests the shards were encoded from (they fix the row order).
        shard_indexes: shard k's index parquet at position k (N = ``len(shard_indexes)``).
        shard_stats: shard k's stats JSON at position k.
        index: parquet file to write.
        stats: JSON file to write the returned stats to; ``None``: not written.

    Returns:
        stats: ``n_rows`` (the manifests' rows); the sums over shards of ``n_clips``, ``n_encoded``,
        ``n_cached``, ``n_corrupt``, ``audio_s_encoded`` and ``encode_wall_s`` (encoder seconds summed
        over the shard jobs, not elapsed time); ``clips_per_s`` / ``audio_s_per_s`` over that sum (per
        shard job, i.e. per GPU); ``mode`` (the shards' modes, distinct, joined by ``+``);
        ``tokenizer_id``, ``index``, ``wall_s`` (this gather's seconds); ``shards`` (N) and
        ``shard_wall_s`` / ``shard_n_encoded`` (lists, shard k at position k).

    Raises:
        ValueError: the lists' lengths differ, or a shard's index does not hold exactly the clips
            :func:`shard_assignment` gives it from these manifests, or the shards used different tokenizers
            (each names the shard file to delete and rerun).
        FileNotFoundError: a file is missing.
    """
    import pandas as pd

    t0 = time.perf_counter()
    n = len(shard_indexes)
    if n < 1 or len(shard_stats) != n:
        raise ValueError(f"gather: {n} shard indexes and {len(shard_stats)} shard stats; give one of each per shard")
    clips, n_rows = clips_from_manifests(manifests)
    where = shard_assignment(clips, n)
    parts, shard_out = [], []
    for k, (ipath, spath) in enumerate(zip(shard_indexes, shard_stats)):
        df = pd.read_parquet(ipath)
        want = [c.sha for c, s in zip(clips, where) if s == k]
        if list(df.audio_sha256) != want:
            raise ValueError(f"{ipath}: holds {len(df)} clips, not the {len(want)} clips shard {k} of {n} has in "
                             f"{', '.join(map(str, manifests))} (written from other manifests or another shard "
                             "count): delete it and rerun its tokenize_shard job")
        st = read_json(spath)
        if st.get("shard") != k or st.get("shards") != n:
            raise ValueError(f"{spath}: stats of shard {st.get('shard')} of {st.get('shards')}, expected {k} of {n}: "
                             "delete it and rerun its tokenize_shard job")
        parts.append(df)
        shard_out.append(st)
    tok_ids = sorted({st["tokenizer_id"] for st in shard_out})
    if len(tok_ids) > 1:
        raise ValueError(f"gather: the shards used different tokenizers {tok_ids}: rerun every tokenize_shard job")
    by_sha = pd.concat(parts, ignore_index=True).set_index("audio_sha256", drop=False)
    joined = by_sha.loc[[c.sha for c in clips], INDEX_COLUMNS]
    write_index_file(index, joined.to_dict("records"))
    out: dict[str, Any] = {"n_rows": n_rows, **{k: sum(st[k] for st in shard_out) for k in SUMMED_STATS}}
    w = out["encode_wall_s"]
    out.update(
        clips_per_s=out["n_encoded"] / w if w else 0.0, audio_s_per_s=out["audio_s_encoded"] / w if w else 0.0,
        mode="+".join(dict.fromkeys(st["mode"] for st in shard_out)), tokenizer_id=tok_ids[0], index=str(index),
        shards=n, shard_wall_s=[st["wall_s"] for st in shard_out],
        shard_n_encoded=[st["n_encoded"] for st in shard_out])
    out["wall_s"] = time.perf_counter() - t0
    if stats is not None:
        write_json(stats, out)
    log.info("tokenize: gathered %d shards into %s (%d clips, %d encoded by the shards)", n, index, len(clips),
             out["n_encoded"])
    return out


# ========================================================================================== decode
def decode_to_wav(cfg: dict[str, Any], out: str | Path, *, sha256: str | None = None, codes: str | Path | None = None,
                  index: str | Path | None = None, codec: Codec | None = None) -> dict[str, Any]:
    """Decode cached codes to a float32 WAV at the tokenizer rate (24 kHz), for listening.

    Args:
        cfg: config with the ``audio_tokenizer`` section (the tokenizer to decode with) and ``cache_dir``
            (where ``sha256`` is looked up when ``index`` does not list it).
        out: WAV path to write.
        sha256: audio hash: looked up in ``index`` when given and present, else in the cache by
            :func:`cache_key`.
        codes: a ``.npy`` codes file ``(K, T)`` instead of ``sha256``.
        index: a tokenize index (parquet) to look ``sha256`` up in.
        codec: a :class:`~higgs_tune.codec.Codec` to decode with instead of building one from the config.

    Returns:
        ``{"out", "sample_rate" (Hz), "n_frames", "duration_s"}``.

    Raises:
        ValueError: neither or both of ``sha256`` / ``codes``.
        KeyError: ``sha256`` is neither in the index nor in the cache.
        FileNotFoundError: the ``codes`` file is missing.
        CorruptEntryError: the codes file is invalid.
    """
    import soundfile as sf

    if (sha256 is None) == (codes is None):
        raise ValueError("give exactly one of sha256 / codes")
    at_cfg = cfg["audio_tokenizer"]
    geo = tokenizer_geometry(at_cfg)
    if codes is None:
        codes = _find_codes(sha256, index, cfg["cache_dir"], audio_tokenizer_identity(at_cfg), geo["sample_rate"])
    arr = read_entry(codes, geo["n_codebooks"], geo["codebook_size"])
    codec = codec or build_codec(at_cfg)
    wav = codec.decode(arr)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), wav, int(codec.sample_rate), subtype="FLOAT")
    return {"out": str(out), "sample_rate": int(codec.sample_rate), "n_frames": int(arr.shape[1]),
            "duration_s": len(wav) / codec.sample_rate}


def _find_codes(sha256: str, index: str | Path | None, cache_dir: str | Path, tok_id: str, rate: int) -> Path:
    """The codes file of audio ``sha256``: its ``codes_path`` in ``index`` (if given and listed), else its
    cache entry. Raises ``KeyError`` when neither has it."""
    if index is not None and Path(index).is_file():
        import pandas as pd

        df = pd.read_parquet(index)
        hit = df[df.audio_sha256 == sha256]
        if len(hit):
            return Path(hit.iloc[0].codes_path)
    entry = entry_path(cache_dir, cache_key(sha256, tok_id, rate))
    if not entry.is_file():
        where = f"{index} or {cache_dir}" if index is not None else str(cache_dir)
        raise KeyError(f"audio {sha256[:12]}… has no codes in {where}")
    return entry


# ============================================================================================= CLI
def build_parser():
    """``encode`` (the tokenize / tokenize_shard rules), ``gather`` (tokenize_gather) and ``decode``
    (by hand: codes back to a WAV) sub-commands, in the stage convention (:mod:`higgs_tune.stage_cli`)."""
    from .stage_cli import stage_subcommands

    parser, add = stage_subcommands("python -m higgs_tune.audio_tokens",
                                    "the tokenize stage: audio -> Higgs audio codes (cache + index), and back")
    enc = add("encode", "encode the kept manifests' audio into the code cache + index",
              inputs={"train": "train manifest (ChatML JSONL with misc.audio_sha256)",
                      "val": "val manifest (ChatML JSONL with misc.audio_sha256)"},
              outputs={"index": "index.parquet to write (one row per distinct clip)",
                       "stats": "stats.json to write (counts, throughput)"})
    enc.add_argument("--threads", type=int, default=None,
                     help="torch threads for the encoder (default $HIGGS_TUNE_THREADS, else all usable CPUs)")
    enc.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    enc.add_argument("--shard", type=int, default=None,
                     help="encode only shard K (0-based) of audio_tokenizer.shards; --index gets that shard's rows")
    add("gather", "join the shard jobs' indexes into the one-job index.parquet + stats.json", config=False,
        inputs={"train": "train manifest the shards were encoded from",
                "val": "val manifest the shards were encoded from",
                "shard_index": {"nargs": "+", "help": "shard k's index parquet at position k"},
                "shard_stats": {"nargs": "+", "help": "shard k's stats JSON at position k"}},
        outputs={"index": "index.parquet to write", "stats": "stats.json to write (totals over the shards)"})
    dec = add("decode", "decode cached audio codes to a WAV with the tokenizer's decoder",
              inputs={"index": {"required": False,
                                "help": "tokens index.parquet to look --sha256 up in (default: only the cache, by "
                                        "its key)"}},
              outputs={"out": "WAV to write"})
    g = dec.add_mutually_exclusive_group(required=True)
    g.add_argument("--sha256", help="audio hash (misc.audio_sha256 value) to look up")
    g.add_argument("--codes", help="a .npy codes file (K, T)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m higgs_tune.audio_tokens encode (--config-json J | --configfile F) --train T --val V
    --index I --stats S [--shard K] [--threads N] [--no-progress]``, ``... gather --train T --val V
    --shard-index I0 I1.. --shard-stats S0 S1.. --index I --stats S`` or ``... decode (--config-json J |
    --configfile F) [--index I] (--sha256 H | --codes X.npy) --out X.wav``."""
    from .config import config_from_args

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "decode":
        try:
            res = decode_to_wav(config_from_args(args), args.out, sha256=args.sha256, codes=args.codes,
                                index=args.index)
        except (KeyError, FileNotFoundError, CorruptEntryError) as exc:
            raise SystemExit(f"decode: {exc.args[0] if isinstance(exc, KeyError) else exc}") from exc
        log.info("wrote %s: %d frames, %.2f s at %d Hz", res["out"], res["n_frames"], res["duration_s"],
                 res["sample_rate"])
        return 0
    if args.command == "gather":
        try:
            stats = gather_shards([args.train, args.val], args.shard_index, args.shard_stats, args.index, args.stats)
        except ValueError as exc:
            raise SystemExit(f"gather: {exc}") from exc
        print(json.dumps({k: stats[k] for k in ("shards", "n_clips", "n_encoded", "n_cached", "n_corrupt", "index")}))
        return 0
    cfg = config_from_args(args)
    _tune_process(cfg["audio_tokenizer"])
    stats = encode_all(cfg, [args.train, args.val], args.index, args.stats, shard=args.shard,
                       threads=args.threads or default_threads(), progress=False if args.no_progress else None)
    print(json.dumps({k: stats[k] for k in ("n_clips", "n_encoded", "n_cached", "n_corrupt", "index")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
