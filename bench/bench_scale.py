"""Scale bench: how the stages' cost grows with the number of rows (synthetic rows over short distinct clips).

    .venv/bin/python bench/bench_scale.py                       # 1k / 10k rows; manifest also at 20k
    .venv/bin/python bench/bench_scale.py --sizes 1000,10000 --manifest-sizes 1000,20000,100000
    .venv/bin/python bench/bench_scale.py --sizes 200 --manifest-sizes 200 --tokenize-rows 16   # quick look

Writes ``max(sizes)`` short WAVs (16 kHz mono, 0.30-0.50 s, each a distinct tone plus seeded noise) and an
LJSpeech ``metadata.csv`` of the first N of them per size under ``--work`` (a temporary folder unless
given), then runs each stage as the workflow does, one fresh process per stage and size:

* manifest (``python -m higgs_tune.manifest``) at every size of ``--sizes`` and ``--manifest-sizes``
  (the split included);
* tokenize (``python -m higgs_tune.audio_tokens encode``, the demo's random-init tokenizer) on the first
  ``--tokenize-rows`` rows only: on CPU it encodes ~5 clips/s, so 10k clips would take over half an
  hour. ``--shards N`` also runs the sharded tokenize (``audio_tokenizer.shards``, through Snakemake)
  where the schema has that key; otherwise it says it is not in this checkout. For the audit and the
  trainer the codes index is SYNTHESIZED (random codes of each clip's frame count, 25 frames/s),
  which they cannot tell from the tokenizer's: the output says so;
* audit (``python -m higgs_tune.audit``: builds, collates and checks every sample, then the leak probe);
* trainer start-up (``python -m higgs_tune.train`` with ``max_steps: 1``, batch 1, on the demo's
  tiny model, ``val_samples: 16``): its peak RSS is the set-up's (the one step on one sample adds
  little), its wall time includes the one step;
* ``snakemake -n`` of the whole workflow on that corpus: for a new run (nothing built: the full plan)
  and after the stages above (manifest to train built by hand: Snakemake re-plans over them).

Printed per stage and size: wall seconds, seconds per row, the peak RSS of the stage's largest process
(``wait4``'s ``ru_maxrss``, the command forked from a lean launcher), and between consecutive sizes
(and from the smallest) the growth of seconds per row and of peak RSS as ratios (1.0: linear time,
flat memory). Each stage's fixed start-up (imports, model build) is in its wall time, so its seconds
per row fall with size; ``marginal s/row`` is (wall - wall at the smallest size) / (rows - smallest
rows), the cost of one more row. On a shared machine, other processes change every number here: its
load average is printed with each run. Figures: bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PY = sys.executable
SR, FRAME_RATE, K = 16000, 25, 8
WORDS = ("the", "quiet", "river", "carried", "seven", "lanterns", "past", "a", "sleeping", "village", "while",
         "old", "bells", "rang", "twice", "under", "copper", "skies", "and", "nobody", "noticed")


def loadavg() -> str:
    try:
        return "load %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "load ?"


#: a lean launcher between this process and each measured command: Linux carries a process's peak RSS
#: across fork and exec (ru_maxrss would report this bench's own memory), so the command is forked from
#: a small process and its own ``wait4`` peak written to argv[1]
_LAUNCH = ("import os, subprocess, sys\n"
           "p = subprocess.Popen(sys.argv[2:])\n"
           "_, status, usage = os.wait4(p.pid, 0)\n"
           "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
           "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_measured(cmd: list[str], log: Path, env: dict | None = None, cwd: Path = ROOT) -> tuple[float, float]:
    """Run ``cmd`` to completion: ``(wall seconds, peak RSS MB of its largest process)``.

    Raises:
        RuntimeError: the command failed (the tail of its log in the message).
    """
    rss = log.with_suffix(".maxrss")
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.run([PY, "-S", "-c", _LAUNCH, str(rss), *cmd], cwd=cwd, stdout=out,
                              stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; {log}:\n{log.read_text()[-3000:]}")
    return wall, int(rss.read_text()) / 1024.0


# ------------------------------------------------------------------------------------- the corpus
def write_clips(wav_dir: Path, n: int) -> None:
    """Clips ``0 .. n-1`` (those missing): 0.30-0.50 s of a distinct tone + seeded noise, int16 WAV."""
    import wave

    import numpy as np

    wav_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = wav_dir / f"S{i:06d}.wav"
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        t = np.arange(int(SR * (0.30 + 0.01 * (i % 21)))) / SR
        x = 0.3 * np.sin(2 * np.pi * (110.0 + 0.731 * i) * t) + 0.02 * rng.standard_normal(t.size)
        with wave.open(str(path), "wb") as w:  # the stdlib writer: no fsync per file (soundfile's is 3 ms)
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SR)
            w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def write_metadata(corpus: Path, n: int) -> Path:
    """An LJSpeech ``metadata.csv`` of clips ``0 .. n-1`` (distinct transcripts) next to ``wavs/``."""
    import random

    path = corpus / f"metadata-{n}.csv"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rnd = random.Random(i)
            f.write(f"S{i:06d}|Line {i}: {' '.join(rnd.choice(WORDS) for _ in range(rnd.randint(6, 12)))}.\n")
    return path


def stage_config(work: Path, n: int, overlay: dict | None = None, name: str = "results") -> tuple[dict, Path]:
    """The validated demo config over the corpus of ``n`` rows, results (``work/name``) and cache under
    ``work``; ``overlay`` merged last. Returns ``(config, the overlay file Snakemake is given)``."""
    import yaml

    from higgs_tune.config import deep_merge, load_config

    over = {"experiment": f"scale{n}", "results_dir": str(work / name), "cache_dir": str(work / f"cache-{name}-{n}"),
            "data": {"manifest": str(work / "corpus" / f"metadata-{n}.csv"), "min_duration_s": 0.2}}
    over = deep_merge(over, overlay or {})
    path = work / f"overlay-{name}-{n}.yaml"
    path.write_text(yaml.safe_dump(over))
    return load_config([ROOT / "config" / "demo.yaml", path]), path


def out_dir(cfg: dict) -> Path:
    return Path(cfg["results_dir"]) / cfg["experiment"]


# ---------------------------------------------------------------------------------------- stages
def run_manifest(cfg: dict, work: Path) -> tuple[float, float]:
    o = out_dir(cfg) / "manifest"
    o.mkdir(parents=True, exist_ok=True)
    return run_measured([PY, "-m", "higgs_tune.manifest", "--config-json", json.dumps(cfg),
                         "--manifest", cfg["data"]["manifest"], "--train", str(o / "train.jsonl"),
                         "--val", str(o / "val.jsonl"), "--quarantine", str(o / "quarantine.jsonl"),
                         "--fixes", str(o / "fixes.json")], work / f"manifest-{cfg['experiment']}.log", ENV)


def run_tokenize(cfg: dict, work: Path, n_rows: int) -> tuple[float, float, int]:
    """The real tokenize stage on the first ``n_rows`` kept rows: ``(wall, peak MB, clips)``."""
    from higgs_tune.fileio import read_jsonl, write_jsonl

    o, t = out_dir(cfg) / "manifest", work / f"tokenize-{cfg['experiment']}"
    t.mkdir(parents=True, exist_ok=True)
    rows = (read_jsonl(o / "train.jsonl") + read_jsonl(o / "val.jsonl"))[:n_rows]
    write_jsonl(t / "train.jsonl", rows)
    write_jsonl(t / "val.jsonl", [])
    wall, mb = run_measured([PY, "-m", "higgs_tune.audio_tokens", "encode", "--config-json", json.dumps(cfg),
                             "--train", str(t / "train.jsonl"), "--val", str(t / "val.jsonl"),
                             "--index", str(t / "index.parquet"), "--stats", str(t / "stats.json"),
                             "--threads", str(os.cpu_count() or 1), "--no-progress"], t / "tokenize.log", ENV)
    return wall, mb, len(rows)


def has_shards_key() -> bool:
    """Whether this checkout's schema has ``audio_tokenizer.shards`` (the sharded tokenize)."""
    import yaml

    from higgs_tune.config import SCHEMA

    with open(SCHEMA, encoding="utf-8") as f:
        props = yaml.safe_load(f)["properties"]["audio_tokenizer"].get("properties", {})
    return "shards" in props


def run_sharded_tokenize(work: Path, n_rows: int, shards: int) -> tuple[float, float]:
    """The sharded tokenize through Snakemake (its shard jobs and the gather) on a corpus of ``n_rows``."""
    write_metadata(work / "corpus", n_rows)
    cfg, overlay = stage_config(work, n_rows, {"audio_tokenizer": {"shards": shards}}, name=f"sharded-{shards}")
    target = out_dir(cfg) / "tokens" / "index.parquet"
    return run_measured([PY, "-m", "snakemake", str(target), "--cores", str(os.cpu_count() or 1), "--configfile",
                         str(ROOT / "config" / "demo.yaml"), str(overlay)], work / f"sharded-{shards}.log", ENV)


def synthesize_codes(cfg: dict) -> int:
    """Write random codes (int16 ``(K, T)``, T = round(duration x 25)) for every clip of the kept
    manifests and the tokens index the audit and the trainer read; returns the clips written."""
    import numpy as np
    import pandas as pd

    from higgs_tune.data import audio_items
    from higgs_tune.fileio import read_jsonl

    o = out_dir(cfg)
    code_dir = o / "synth-codes"
    code_dir.mkdir(parents=True, exist_ok=True)
    recs, seen = [], set()
    for name in ("train", "val"):
        for row in read_jsonl(o / "manifest" / f"{name}.jsonl"):
            for _, _, c in audio_items(row):
                url = c["audio_url"]
                sha = row["misc"]["audio_sha256"][url]
                if sha in seen:
                    continue
                seen.add(sha)
                dur = row["misc"]["audio_info"][url]["duration_s"]
                T = max(1, round(dur * FRAME_RATE))
                rng = np.random.default_rng(int(sha[:8], 16))
                path = code_dir / f"{sha}.npy"
                np.save(path, rng.integers(0, 1024, size=(K, T)).astype(np.int16))
                recs.append({"audio_sha256": sha, "codes_path": str(path), "n_frames": T, "n_codebooks": K,
                             "sample_rate": 24000, "frame_rate": float(FRAME_RATE), "duration_s": dur,
                             "audio_url": url})
    (o / "tokens").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(recs).to_parquet(o / "tokens" / "index.parquet", index=False)
    return len(recs)


def run_audit(cfg: dict, work: Path) -> tuple[float, float]:
    o = out_dir(cfg)
    return run_measured([PY, "-m", "higgs_tune.audit", "--config-json", json.dumps(cfg),
                         "--train", str(o / "manifest" / "train.jsonl"), "--val", str(o / "manifest" / "val.jsonl"),
                         "--index", str(o / "tokens" / "index.parquet"), "--summary", str(o / "audit" / "summary.json"),
                         "--samples", str(o / "audit" / "samples.parquet")], work / f"audit-{cfg['experiment']}.log",
                        ENV)


def run_train_startup(cfg: dict, work: Path) -> tuple[float, float]:
    """One optimizer step (batch 1, tiny model, 16 val rows): the trainer's set-up, measured."""
    o = out_dir(cfg)
    t = copy.deepcopy(cfg)
    t["train"].update(max_steps=1, epochs=None, batch_size=1, grad_accum_steps=1, warmup_steps=0, eval_interval=1,
                      predictions_interval=1, save_interval=1, log_interval=1, val_samples=16, processes=1)
    d = o / "train"
    paths = {"audit": o / "audit" / "summary.json", "train": o / "manifest" / "train.jsonl",
             "val": o / "manifest" / "val.jsonl", "index": o / "tokens" / "index.parquet",
             "metrics": d / "metrics.jsonl", "val-metrics": d / "val_metrics.jsonl",
             "predictions": d / "predictions.jsonl", "adapter": d / "adapter", "checkpoint": d / "checkpoint",
             "state": d / "state.json", "tensorboard": d / "tensorboard",
             "resume-dir": work / f"resume-{cfg['experiment']}"}
    shutil.rmtree(paths["resume-dir"], ignore_errors=True)
    args = [a for k, v in paths.items() for a in (f"--{k}", str(v))]
    return run_measured([PY, "-m", "higgs_tune.train", "--config-json", json.dumps(t), *args],
                        work / f"train-{cfg['experiment']}.log", ENV)


def run_dry_run(overlay: Path, work: Path, n: int) -> tuple[float, float]:
    """``snakemake -n`` of the default target with the demo config and ``overlay``."""
    return run_measured([PY, "-m", "snakemake", "-n", "--configfile", str(ROOT / "config" / "demo.yaml"), str(overlay)],
                        work / f"snakemake-n-{overlay.stem}.log", ENV)


# ---------------------------------------------------------------------------------------- report
def report(stage: str, rows: list[tuple[int, float, float]]) -> list[str]:
    """Lines for one stage: per size wall, s/row, marginal s/row, peak MB; growth ratios between sizes."""
    lines = [f"{stage}:", f"  {'rows':>8} {'wall s':>9} {'s/row':>10} {'marginal s/row':>15} {'peak MB':>9}"]
    n0, w0 = rows[0][0], rows[0][1]
    for n, wall, mb in rows:
        marg = f"{(wall - w0) / (n - n0):.6f}" if n > n0 else "-"
        lines.append(f"  {n:>8} {wall:>9.2f} {wall / n:>10.6f} {marg:>15} {mb:>9.1f}")
    pairs = list(zip(rows, rows[1:])) + [(rows[0], r) for r in rows[2:]]  # consecutive, then from the smallest
    for (na, wa, ma), (nb, wb, mb) in pairs:
        lines.append(f"  {na} -> {nb} rows ({nb / na:.3g}x): s/row x{(wb / nb) / (wa / na):.3f}, "
                     f"peak RSS x{mb / ma:.3f}")
    return lines


ENV = {**os.environ, "PYTHONPATH": str(ROOT / "workflow") + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_scale.py",
        description="Scale bench: seconds per row and peak memory of manifest, tokenize, audit, trainer start-up "
                    "and snakemake -n as the row count grows (synthetic rows over short distinct clips), with the "
                    "growth between sizes as ratios.")
    parser.add_argument("--sizes", default="1000,10000",
                        help="row counts for every stage but tokenize (comma-separated; default 1000,10000)")
    parser.add_argument("--manifest-sizes", default="20000",
                        help="extra row counts for the manifest stage alone (default 20000; e.g. 20000,100000)")
    parser.add_argument("--tokenize-rows", type=int, default=32,
                        help="clips the real tokenize stage encodes (default 32; 0: skip)")
    parser.add_argument("--shards", type=int, default=0,
                        help="also run the sharded tokenize with this many shards (needs audio_tokenizer.shards)")
    parser.add_argument("--skip-train", action="store_true", help="no trainer start-up measurement")
    parser.add_argument("--skip-snakemake", action="store_true", help="no snakemake -n measurement")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    sizes = sorted({int(x) for x in args.sizes.split(",") if x})
    m_sizes = sorted(set(sizes) | {int(x) for x in args.manifest_sizes.split(",") if x})
    work = args.work or Path(tempfile.mkdtemp(prefix="higgs-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench_scale: work {work}; {os.cpu_count()} cores, {loadavg()}", flush=True)
    t0 = time.perf_counter()
    write_clips(work / "corpus" / "wavs", max(m_sizes))
    print(f"wrote {max(m_sizes)} clips in {time.perf_counter() - t0:.0f} s (not timed below)", flush=True)

    results: dict[str, list] = {k: [] for k in ("manifest", "audit", "train start-up", "snakemake -n (new run)",
                                                "snakemake -n (after the above)")}
    out: list[str] = []
    for n in m_sizes:
        write_metadata(work / "corpus", n)
        cfg, overlay = stage_config(work, n)
        wall, mb = run_manifest(cfg, work)
        results["manifest"].append((n, wall, mb))
        print(f"manifest {n} rows: {wall:.1f} s, {mb:.0f} MB ({loadavg()})", flush=True)
        if n not in sizes:
            continue
        if n == sizes[0] and args.tokenize_rows:
            tw, tmb, nt = run_tokenize(cfg, work, args.tokenize_rows)
            out.append(f"tokenize (real, random-init tokenizer, not sharded): {nt} clips {tw:.1f} s = "
                       f"{tw / nt:.3f} s/clip, peak {tmb:.0f} MB")
            print(out[-1], flush=True)
            if args.shards:
                if has_shards_key():
                    sw, smb = run_sharded_tokenize(work, nt, args.shards)
                    out.append(f"tokenize (sharded, {args.shards} shards via snakemake): {nt} clips {sw:.1f} s, "
                               f"peak {smb:.0f} MB")
                else:
                    out.append("tokenize (sharded): not measured: audio_tokenizer.shards is not in this checkout's "
                               "schema")
                print(out[-1], flush=True)
        n_codes = synthesize_codes(cfg)
        print(f"codes index SYNTHESIZED for {n_codes} clips (random codes, 25 frames/s): the audit and the trainer "
              f"read it as the tokenizer's", flush=True)
        wall, mb = run_audit(cfg, work)
        results["audit"].append((n, wall, mb))
        print(f"audit {n} rows: {wall:.1f} s, {mb:.0f} MB ({loadavg()})", flush=True)
        if not args.skip_train:
            wall, mb = run_train_startup(cfg, work)
            results["train start-up"].append((n, wall, mb))
            print(f"train start-up {n} rows: {wall:.1f} s, {mb:.0f} MB ({loadavg()})", flush=True)
        if not args.skip_snakemake:
            _, fresh = stage_config(work, n, name="dryrun")
            for key, ov in (("snakemake -n (new run)", fresh), ("snakemake -n (after the above)", overlay)):
                wall, mb = run_dry_run(ov, work, n)
                results[key].append((n, wall, mb))
                print(f"{key} {n} rows: {wall:.1f} s, {mb:.0f} MB ({loadavg()})", flush=True)

    print("\n=== bench_scale results (wall s, peak RSS of the largest process) ===")
    for stage, rows in results.items():
        if rows:
            print("\n".join(report(stage, rows)))
    print("\n".join(out))
    print("audit / train start-up / snakemake -n ran on a SYNTHESIZED codes index (random codes of each clip's "
          "length); the manifest on real WAV files.")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
