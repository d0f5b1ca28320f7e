"""Benchmark the tokenize stage against a naive per-file loop, on the same clips, in one run.

    .venv/bin/python bench/bench_tokenize.py [--configfile config/demo.yaml] [--clips 32] [--threads N]
                                             [--equal-length SECONDS] [--skip-main] [--rounds 3] [--shards 2]
    .venv/bin/python bench/bench_tokenize.py --ablation 8      # where the speed comes from
    .venv/bin/python bench/bench_tokenize.py --clips 1 --rounds 1 --skip-main   # smallest run

(The file is not named ``tokenize.py``: a script's folder is first on ``sys.path``, and a
``tokenize.py`` there shadows the standard library's, which ``linecache`` and torch import.)

(a)  the stage: ``encode_all`` with the config's ``num_workers``. On CPU each worker process decodes,
     resamples and encodes whole clips with ``threads // num_workers`` torch threads.
(a2) the stage's in-process path: decode/resample workers ahead, encoding in this process with
     ``threads`` torch threads (the CUDA path; on CPU clip by clip).
(b)  naive: what a user's script does: build the upstream ``HiggsAudioTokenizer``, then one file at a
     time ``librosa.load(path, sr=24000)``, ``tokenizer.encode``, ``np.save``; torch's default threads.
     (``HiggsAudioTokenizer.encode`` is also the codec's reference path, ``fast_encode: false``.)
     Timed like (a), model build included (also printed without it).
(c)  rerun of (a): every clip is a cache hit.
(d)  sharded (``audio_tokenizer.shards: N``, ``--shards``, default 2; 0 skips): the N shard jobs at once,
     each a fresh process with ``threads // N`` torch threads and ``num_workers // N`` workers (at
     least 1 if the config has any), then the gather (``audio_tokens.gather_shards``) in this process.
     Timed two ways: elapsed from starting the N processes to the gathered index (Python start and
     imports included), and like (a) (the slowest shard's own wall, imports excluded, + the gather);
     the ratio (a) / (d) uses the latter. On one machine the shards share its cores, so (d) shows the
     cost of sharding (a tokenizer build per shard, the split work); on a cluster each shard has a GPU.

(a), (b) and (c) each run in a fresh Python process, as a user's script or a Snakemake rule does;
its imports (torch, boson-multimodal, librosa, the stage) are done before its timer starts. (Run
repeatedly in one process, the naive loop got faster each time, 91 -> 88 -> 83 s, likely because
glibc raises its ``mmap`` threshold as large blocks are freed, so later runs page-fault less: one
run would contaminate the next.)

(b) then (a) are timed ``--rounds`` times (default 3), alternately, (a) with a fresh cache each
time; each round's ratio and the medians are printed: this machine's speed drifts by +-10 %
between minutes, so one round's ratio is a noisy sample.

Last, a lower bound on (a)'s wall time here (:func:`lower_bound`): the convolution FLOPs at this
machine's single-thread fp32 GEMM rate, plus the Snake activations' ``sin`` alone, over the cores,
plus one worker's start-up; so the largest speed-up over (b) that fp32 direct convolution allows.

All timings are wall-clock seconds of the same clips; (a) and (a2) include manifest reading, cache
lookups, worker start-up and model builds in the workers, and the index write. Codes of (a), (a2)
and (b) are checked to be identical. The machine's load average is printed with each run: on a
shared machine, other processes change every number here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def loadavg() -> str:
    try:
        return "load %.2f" % os.getloadavg()[0]
    except OSError:
        return "load ?"


def write_manifests(folder: Path, clips: list[Path]) -> list[str]:
    """``folder/manifest/train.jsonl`` (one TTS row per clip, with its audio hash) and an empty
    ``val.jsonl``; returns the two paths."""
    from higgs_tune import audio_io
    from higgs_tune.fileio import write_jsonl

    rows = []
    for i, p in enumerate(clips):
        url = str(p.resolve())
        sha = audio_io.audio_sha256(*audio_io.load_audio(p))
        rows.append({"messages": [{"role": "user", "content": f"clip {i}"},
                                  {"role": "assistant", "content": {"type": "audio", "audio_url": url}}],
                     "misc": {"id": f"b{i}", "audio_sha256": {url: sha}}})
    train, val = folder / "manifest" / "train.jsonl", folder / "manifest" / "val.jsonl"
    write_jsonl(train, rows)
    write_jsonl(val, [])
    return [str(train), str(val)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", default=str(ROOT / "config" / "demo.yaml"))
    ap.add_argument("--clips", type=int, default=32, help="first N LJSpeech clips of data/ljspeech32 (1 to 32)")
    ap.add_argument("--threads", type=int, default=None, help="torch thread budget of (a)/(a2) (default: all CPUs)")
    ap.add_argument("--equal-length", type=float, default=None,
                    help="crop every clip to this many seconds (all lengths equal: the batching case)")
    ap.add_argument("--skip-main", action="store_true", help="skip (a2)")
    ap.add_argument("--rounds", type=int, default=3, help="time (b) then (a) this many times, alternately (>= 1)")
    ap.add_argument("--shards", type=int, default=2,
                    help="(d): run the stage as this many shard processes at once + the gather (0 or 1: skip)")
    ap.add_argument("--workdir", default=None, help="where caches/results go (default: a temp folder)")
    ap.add_argument("--child", nargs=2, metavar=("RUN", "SPEC"), help=argparse.SUPPRESS)  # one timed run
    ap.add_argument("--ablation", type=int, default=0, metavar="N",
                    help="instead: one process, one torch thread, first N clips: upstream encode vs the stage's "
                         "codec, before and after tune_malloc (where the speed comes from)")
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    if args.ablation:
        return ablation(args)

    import numpy as np
    import soundfile as sf
    import torch

    from higgs_tune import codec as C
    from higgs_tune import codec_fast as CF
    from higgs_tune import audio_tokens as T
    from higgs_tune.config import load_config

    base = load_config([args.configfile])
    at = base["audio_tokenizer"]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-tokenize-"))
    clips = sorted((ROOT / "data" / "ljspeech32" / "wavs").glob("*.wav"))[:args.clips]
    if args.equal_length:
        crop_dir = work / "crops"
        crop_dir.mkdir(parents=True, exist_ok=True)
        cropped = []
        for p in clips:
            data, sr = sf.read(p, dtype="int16")
            n = int(args.equal_length * sr)
            if len(data) >= n:
                sf.write(crop_dir / p.name, data[:n], sr, subtype="PCM_16")
                cropped.append(crop_dir / p.name)
        clips = cropped
    audio_s = sum(sf.info(p).duration for p in clips)
    threads = args.threads or T.default_threads()
    default_threads = torch.get_num_threads()
    print(f"# {len(clips)} clips, {audio_s:.1f} s of audio; CPUs usable {T.default_threads()}, "
          f"num_workers {at['num_workers']}, thread budget {threads}, torch default threads {default_threads}; "
          f"device {at['device']}; work dir {work}", flush=True)

    def stage_for(name: str) -> dict:
        """An experiment with its own (empty) cache: ``{"cfg", "manifests", "index", "stats"}``."""
        cfg = copy.deepcopy(base)
        cfg["experiment"] = name
        cfg["cache_dir"] = str(work / f"cache-{name}")
        exp = work / "results" / name
        return {"cfg": cfg, "manifests": write_manifests(exp, clips), "index": str(exp / "tokens" / "index.parquet"),
                "stats": str(exp / "tokens" / "stats.json")}

    results: dict[str, float] = {}
    codes: dict[str, list[np.ndarray]] = {}

    def timed(run: str, spec: dict) -> dict:
        """One timed run in a fresh process (see the module docstring); returns its JSON report."""
        label = {"naive": "(b) naive  ", "stage": "(a) stage  ", "rerun": "(c) rerun  "}[run]
        print(f"{label} ... {loadavg()}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", run, json.dumps(spec)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"{run} run failed (exit {proc.returncode})")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{label} {out['wall']:7.1f} s  {out.get('note', '')}  {loadavg()}", flush=True)
        return out

    def entries(stage: dict) -> list[np.ndarray]:
        import pandas as pd

        df = pd.read_parquet(stage["index"]).set_index("audio_url")
        return [T.read_entry(df.loc[str(p.resolve()), "codes_path"]).astype(np.int64) for p in clips]

    naive_dir = work / "naive"
    rounds: list[tuple[float, float, float]] = []  # (b) wall, its build, (a) wall
    for r in range(max(1, args.rounds)):
        nb = timed("naive", {"at": at, "clips": [str(p) for p in clips], "out": str(naive_dir)})
        codes["b"] = [np.load(naive_dir / f"{i}.npy").astype(np.int64) for i in range(len(clips))]
        stage_a = stage_for(f"a-round{r + 1}")  # (a2) uses "a2"
        sa = timed("stage", {**stage_a, "threads": threads})
        codes["a"] = entries(stage_a)
        if not all(np.array_equal(x, y) for x, y in zip(codes["a"], codes["b"])):
            print(f"round {r + 1}: codes (a) != codes (b)")
            return 1
        rounds.append((nb["wall"], nb["build"], sa["wall"]))
    med = statistics.median
    results["b"] = med(b for b, _, _ in rounds)
    results["b0"] = med(b - build for b, build, _ in rounds)
    results["a"] = med(a for _, _, a in rounds)
    ratios = [b / a for b, _, a in rounds]
    if len(rounds) > 1:
        print(f"(b)/(a) per round: {', '.join(f'{x:.2f}x' for x in ratios)}; median {med(ratios):.2f}x "
              f"(the table below: median wall times)")

    # (c) rerun: all cached
    sc = timed("rerun", {**stage_a, "threads": threads})
    results["c"] = sc["wall"]

    # (d) sharded: N shard processes at once, then the gather
    if args.shards > 1:
        n = args.shards
        stage_d = stage_for(f"d-{n}shards")
        at_d = stage_d["cfg"]["audio_tokenizer"]
        at_d.update(shards=n, num_workers=max(1, at["num_workers"] // n) if at["num_workers"] else 0)
        shard_dir = Path(stage_d["index"]).parent / "shards"
        specs = [{**stage_d, "index": str(shard_dir / f"{k}-of-{n}.parquet"),
                  "stats": str(shard_dir / f"{k}-of-{n}.json"), "threads": max(1, threads // n), "shard": k}
                 for k in range(n)]
        print(f"(d) {n} shards ... {n} processes x {specs[0]['threads']} threads, num_workers {at_d['num_workers']} "
              f"each; {loadavg()}", flush=True)
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, __file__, "--child", "shard", json.dumps(spec)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for spec in specs]
        done = [p.communicate() for p in procs]
        for k, (p, (out, err)) in enumerate(zip(procs, done)):
            if p.returncode:
                sys.stderr.write(err)
                raise SystemExit(f"shard {k} failed (exit {p.returncode})")
        t1 = time.perf_counter()
        T.gather_shards(stage_d["manifests"], [sp["index"] for sp in specs], [sp["stats"] for sp in specs],
                        stage_d["index"], stage_d["stats"])
        gather_s = time.perf_counter() - t1
        results["d_elapsed"] = time.perf_counter() - t0
        shard_walls = [json.loads(out.strip().splitlines()[-1])["wall"] for out, _ in done]
        results["d"] = max(shard_walls) + gather_s
        codes["d"] = entries(stage_d)
        print(f"(d) {n} shards {results['d']:7.1f} s  (shards {', '.join(f'{w:.1f}' for w in shard_walls)} s + gather "
              f"{gather_s:.2f} s; elapsed with start-up {results['d_elapsed']:.1f} s); (a)/(d) "
              f"{results['a'] / results['d']:.2f}x  {loadavg()}", flush=True)

    # (a2) in-process encoder, decode workers ahead
    if not args.skip_main:
        stage_m = stage_for("a2")
        codec = C.build_codec(at)  # injected: forces the in-process path (build not timed)
        if at["fast_encode"]:
            CF.tune_malloc()  # as the stage's CLI process does
        print(f"(a2) in-proc ... {loadavg()}", flush=True)
        t0 = time.perf_counter()
        sm = T.encode_all(stage_m["cfg"], stage_m["manifests"], stage_m["index"], stage_m["stats"], codec=codec,
                          threads=threads, progress=False)
        results["a2"] = time.perf_counter() - t0
        codes["a2"] = entries(stage_m)
        print(f"(a2) in-proc {results['a2']:7.1f} s  mode={sm['mode']} {loadavg()}", flush=True)

    for k in ("a", "a2", "d"):
        if k in codes:
            same = all(np.array_equal(x, y) for x, y in zip(codes[k], codes["b"]))
            print(f"codes ({k}) == codes (b): {same}")
            if not same:
                return 1

    print("\n| run | wall s | clips/s | audio-s/s | vs (b) |")
    print("|---|---:|---:|---:|---:|")
    names = {"b": "(b) naive loop", "b0": "(b) naive loop, build not timed", "a": "(a) stage (worker encode)",
             "a2": "(a2) stage, in-process encode", "c": "(c) rerun, all cached",
             "d": f"(d) {args.shards} shards at once + gather", "d_elapsed": f"(d) {args.shards} shards, with start-up"}
    for k in ("b", "b0", "a", "a2", "c", "d", "d_elapsed"):
        if k in results:
            w = results[k]
            print(f"| {names[k]} | {w:.2f} | {len(clips) / w:.2f} | {audio_s / w:.1f} | {results['b'] / w:.2f}x |")

    cores = min(threads, T.default_threads())
    per_worker = max(1, threads // max(1, at["num_workers"]))
    lb = lower_bound(at, clips[0], fork=T._start_method("workers", per_worker) == "fork")
    per_core = lb["conv_gflop"] / lb["gemm_gflops"] + lb["sin_s"]  # seconds of one core per audio second
    bound = lb["startup_s"] + audio_s * per_core / cores
    print(f"\nLower bound for (a) on this machine (fp32 direct convolution): {lb['conv_gflop']:.1f} GFLOP of "
          f"convolutions per audio second at the single-thread GEMM rate ({lb['gemm_gflops']:.0f} GFLOP/s) + "
          f"{lb['sin_s']:.3f} s of Snake sin = {per_core:.3f} core-s per audio second; x {audio_s:.1f} s / {cores} cores"
          f" + {lb['startup_s']:.1f} s worker start-up = {bound:.1f} s, i.e. at most {results['b'] / bound:.2f}x (b) "
          f"with every other cost (decoding, memory traffic, Python, contention) free; (a) is at "
          f"{bound / results['a']:.0%} of that bound.")
    return 0


def child(run: str, spec_json: str) -> int:
    """One timed run, in this fresh process: imports first (not timed), then ``run``; prints a JSON line.

    * ``naive``: build the upstream tokenizer, then per file ``librosa.load`` + ``encode`` + ``np.save``
      into ``spec["out"]``; reports ``wall`` and ``build`` seconds.
    * ``stage`` / ``rerun`` / ``shard``: ``audio_tokens.encode_all`` of ``spec``'s config, manifests, index and
      stats with ``spec["threads"]`` (``shard``: only shard ``spec["shard"]``); ``rerun`` asserts that
      nothing was encoded.
    """
    import boson_multimodal.audio_processing.higgs_audio_tokenizer  # noqa: F401
    import librosa
    import numpy as np
    import torch

    from higgs_tune import audio_tokens as T
    from higgs_tune.codec import build_audio_tokenizer

    spec = json.loads(spec_json)
    if run == "naive":
        out = Path(spec["out"])
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tok = build_audio_tokenizer(spec["at"], device="cpu")
        build = time.perf_counter() - t0
        for i, p in enumerate(spec["clips"]):
            wv, _ = librosa.load(p, sr=tok.sampling_rate)
            np.save(out / f"{i}.npy", tok.encode(wv, tok.sampling_rate).numpy().astype(np.int16))
        wall = time.perf_counter() - t0
        report = {"wall": wall, "build": build, "note": f"(tokenizer build {build:.1f} s, torch threads "
                                                        f"{torch.get_num_threads()})"}
    else:
        t0 = time.perf_counter()
        stats = T.encode_all(spec["cfg"], spec["manifests"], spec["index"], spec["stats"], threads=spec["threads"],
                             progress=False, shard=spec.get("shard"))
        wall = time.perf_counter() - t0
        if run == "rerun" and stats["n_encoded"]:
            raise SystemExit(f"rerun encoded {stats['n_encoded']} clips")
        report = {"wall": wall, "note": f"mode={stats['mode']}, {stats['n_encoded']} encoded, "
                                        f"{stats['n_cached']} cached"}
    print(json.dumps(report))
    return 0


def lower_bound(at: dict, clip: Path, fork: bool = True) -> dict[str, float]:
    """What no fp32 direct-convolution implementation of the stage can avoid, per core, measured here.

    * ``conv_gflop``: convolution GFLOP per audio second, ``2 * C_in * C_out / groups * kernel *
      output_length`` per ``Conv1d`` call (forward hooks) while the codec encodes ``clip``.
    * ``gemm_gflops``: best of 50 single-thread 1024 x 1024 fp32 ``torch.mm`` (no convolution here
      runs faster than this).
    * ``sin_s``: seconds per audio second of the sine alone on each Snake's real ``alpha * x``
      (one thread): the one transcendental op, evaluated as the stage does (``codec_fast._sin_``).
    * ``startup_s``: what each encode worker does before its first clip: with ``fork`` (imports
      inherited) build the codec, timed here; else also start Python and import, timed as a
      fresh process.
    """
    import torch

    from higgs_tune import audio_io
    from higgs_tune import codec as C
    from higgs_tune import codec_fast as CF

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    codec = C.build_codec({**at, "fast_encode": True})
    wave = audio_io.to_mono_resampled(*audio_io.load_audio(clip), codec.sample_rate)
    seconds = len(wave) / codec.sample_rate
    flops, sin_s = [0], [0.0]

    def conv_hook(m, _inp, out):
        flops[0] += 2 * m.in_channels * m.out_channels // m.groups * m.kernel_size[0] * out.shape[-1] * out.shape[0]

    def snake_hook(m, inp):  # sin of cache-resident tiles of alpha * x: compute only
        for tile in (m.alpha * inp[0]).reshape(-1).split(1 << 16):
            src = tile.clone()
            t0 = time.perf_counter()
            CF._sin_(src)
            sin_s[0] += time.perf_counter() - t0

    for m in codec.tok.encoder.modules():  # module-by-module forwards, so that hooks see every layer
        if type(m).__name__ in ("ResidualUnit", "EncoderBlock") and "forward" in vars(m):
            del m.forward
    handles = [m.register_forward_hook(conv_hook) for m in codec.tok.modules() if isinstance(m, torch.nn.Conv1d)]
    handles += [m.register_forward_pre_hook(snake_hook) for m in codec.tok.modules() if type(m).__name__ == "Snake1d"]
    with torch.inference_mode():
        codec.encode([wave])
    for h in handles:
        h.remove()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(50):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    if fork:  # the worker inherits the imports and builds the codec
        t0 = time.perf_counter()
        C.build_codec(at)
        startup = time.perf_counter() - t0
    else:  # a fresh process: Python, imports, build
        code = ("import json, sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(1); "
                "from higgs_tune import codec as C, codec_fast as CF; CF.tune_malloc(); "
                "C.build_codec(json.loads(sys.argv[2]))")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, str(ROOT / "workflow"), json.dumps(at)], check=True,
                       capture_output=True)
        startup = time.perf_counter() - t0
    torch.set_num_threads(saved)
    return {"conv_gflop": flops[0] / seconds / 1e9, "gemm_gflops": 2 * 1024 ** 3 / best / 1e9,
            "sin_s": sin_s[0] / seconds, "startup_s": startup}


def ablation(args) -> int:
    """Single process, one torch thread, decoded waves in memory: encoder time only."""
    import numpy as np
    import soundfile as sf
    import torch

    from higgs_tune import audio_io
    from higgs_tune import codec as C
    from higgs_tune import codec_fast as CF
    from higgs_tune.config import load_config

    torch.set_num_threads(1)
    at = load_config([args.configfile])["audio_tokenizer"]
    clips = sorted((ROOT / "data" / "ljspeech32" / "wavs").glob("*.wav"))[:args.ablation]
    waves = [audio_io.to_mono_resampled(*audio_io.load_audio(p), 24000) for p in clips]
    audio_s = sum(sf.info(p).duration for p in clips)
    reference = C.build_codec({**at, "fast_encode": False})  # upstream HiggsAudioTokenizer.encode
    codec = C.build_codec({**at, "fast_encode": True})
    n_rerun = sum(codec.fast.acoustic_frames(len(w)) != C.HiggsCodec.expected_frames(len(w)) for w in waves)
    print(f"# ablation: {len(clips)} clips, {audio_s:.1f} s, 1 torch thread, {n_rerun} clips hit upstream's "
          f"acoustic re-run; {loadavg()}")

    def run(name, fn):
        t0 = time.perf_counter()
        out = [fn(w) for w in waves]
        dt = time.perf_counter() - t0
        print(f"| {name} | {dt:.2f} | {audio_s / dt:.1f} |", flush=True)
        return out, dt

    print("| variant | wall s | audio-s/s |\n|---|---:|---:|")
    ref, t_up = run("fast_encode: false (upstream HiggsAudioTokenizer.encode)", lambda w: reference.encode([w])[0])
    ours, t_c = run("fast_encode: true (codec_fast, before tune_malloc)", lambda w: codec.encode([w])[0])
    print(f"| tune_malloc() -> {CF.tune_malloc()} | | |")
    ours2, t_ct = run("fast_encode: true + tune_malloc", lambda w: codec.encode([w])[0])
    _, t_upt = run("upstream encode + tune_malloc", lambda w: reference.encode([w])[0])
    same = all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(ref, ours, ours2))
    print(f"codes identical: {same}; codec {t_up / t_c:.2f}x, +malloc {t_up / t_ct:.2f}x over upstream "
          f"(malloc alone on upstream: {t_up / t_upt:.2f}x); {loadavg()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
