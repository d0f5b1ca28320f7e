"""Throughput of the label audit's tensor checks (collate + all per-sample rules; leak probe excluded).

    .venv/bin/python bench/bench_audit.py [--configfile config/demo.yaml ...] [--repeat 10] [--runs 5]
                                          [--batch-size 32] [--threads 1]
                                          [--train T.jsonl --val V.jsonl --index index.parquet]
    .venv/bin/python bench/bench_audit.py --quick     # smallest setting: one pass, one timing run

By default the demo data: the 40 ChatML rows of ``data/demo/manifest.jsonl`` (32 TTS + 8 voice
cloning, real transcripts, the real Llama-3.2 tokenizer) with random codes in [0, 1024) of each
clip's real length (25 frames/s; code values do not change the checks' cost). With ``--train``,
``--val`` and ``--index`` (e.g. ``results/demo/manifest/{train,val}.jsonl`` and
``results/demo/tokens/index.parquet`` after the tokenize stage) the kept rows and their cached codes
instead. Tokenization happens once per sample (as in the audit) and is timed separately. Prints
samples/s; the target is >= 1,000 samples/s on CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/bench_audit.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", action="append", default=None,
                    help="repeatable, later files override (default config/demo.yaml)")
    ap.add_argument("--manifest", type=Path, default=ROOT / "data" / "demo" / "manifest.jsonl",
                    help="ChatML rows timed with random codes (default: the demo manifest)")
    ap.add_argument("--train", type=Path, default=None, help="kept train manifest (with --val and --index)")
    ap.add_argument("--val", type=Path, default=None, help="kept val manifest")
    ap.add_argument("--index", type=Path, default=None, help="tokens index (parquet) of the cached codes")
    ap.add_argument("--repeat", type=int, default=10, help="passes over the samples per timing run")
    ap.add_argument("--runs", type=int, default=5, help="timing runs (the median is reported)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: audit.batch_size")
    ap.add_argument("--threads", type=int, default=None, help="default: audit.num_threads")
    ap.add_argument("--quick", action="store_true", help="smallest setting: --repeat 1 --runs 1")
    args = ap.parse_args(argv)
    cached = (args.train, args.val, args.index)
    if any(cached) and not all(cached):
        ap.error("--train, --val and --index go together")
    if args.quick:
        args.repeat, args.runs = 1, 1
    return args


def random_codes(rows: list[dict], root: Path) -> dict:
    """Fill ``misc.audio_sha256`` (url -> hash of the url) and return ``sha -> long (8, T)`` random codes."""
    import numpy as np
    import soundfile as sf
    import torch

    from higgs_tune import data as D

    rng = np.random.default_rng(0)
    codes: dict[str, torch.Tensor] = {}
    for r in rows:
        r.setdefault("misc", {})["audio_sha256"] = {}
        for _, _, c in D.audio_items(r):
            url = c["audio_url"]
            sha = hashlib.sha256(url.encode()).hexdigest()
            r["misc"]["audio_sha256"][url] = sha
            if sha not in codes:
                n = max(1, round(sf.info(str(root / url)).duration * 25))
                codes[sha] = torch.from_numpy(rng.integers(0, 1024, size=(8, n), dtype=np.int64))
    return codes


def load_samples(args) -> tuple[list[dict], object, str]:
    """``(rows, codes_of, source)``: the kept rows and their cached codes, or the demo rows and random codes."""
    from higgs_tune import data as D

    if args.index is not None:
        rows = D.read_jsonl(args.train) + D.read_jsonl(args.val)
        return rows, D.CodesIndex(args.index, root=ROOT).get, f"cached codes ({args.index})"
    rows = D.read_jsonl(args.manifest)
    return rows, random_codes(rows, args.manifest.parent).__getitem__, "random codes of the real clip lengths"


def main(argv=None) -> int:
    args = parse_args(argv)
    from higgs_tune import audit as A
    from higgs_tune import data as D
    from higgs_tune.config import load_config
    from higgs_tune.model import load_text_tokenizer

    cfg = load_config(args.configfile or [str(ROOT / "config" / "demo.yaml")])
    acfg = cfg["audit"]
    bs = args.batch_size or int(acfg["batch_size"])
    threads = args.threads if args.threads is not None else int(acfg["num_threads"])
    tok = load_text_tokenizer(cfg["model"].get("text_tokenizer"))
    model_config = A.config_only(cfg["model"])
    expect = A.Expect.from_model(model_config, tok)
    rows, codes_of, source = load_samples(args)
    A.build_samples(rows[:1], ["train"], tok, codes_of, expect)  # warm-up (imports, tokenizer caches)
    t0 = time.perf_counter()
    samples, metas, fails = A.build_samples(rows, ["train"] * len(rows), tok, codes_of, expect)
    t_build = time.perf_counter() - t0
    if fails:
        print(f"warning: {len(fails)} samples failed to build, e.g. {fails[0].message}")
    collator = D.make_collator(model_config)
    samples, metas = samples * args.repeat, metas * args.repeat
    with A.torch_threads(threads):
        A.run_tensor_checks(samples[:bs], metas[:bs], collator, expect, bs)  # warm-up
        rates, n_fail = [], 0
        for _ in range(args.runs):
            t0 = time.perf_counter()
            results, f, n = A.run_tensor_checks(samples, metas, collator, expect, bs)
            rates.append(n / (time.perf_counter() - t0))
            n_fail = len(f) + sum(len(r.failures) for r in results if r is not None)
    n_unique = len(rows)
    print(f"data: {n_unique} samples, {source}; batch size {bs}, torch threads {threads or 'default'}")
    print(f"tokenization (once per sample, cached): {n_unique / t_build:,.0f} samples/s")
    print(f"tensor checks (collate + rules, leak probe excluded): median {statistics.median(rates):,.0f} samples/s "
          f"(min {min(rates):,.0f}, max {max(rates):,.0f}; {len(samples)} samples x {args.runs} runs); "
          f"{n_fail} rule failures")
    print(f"target >= 1,000 samples/s: {'MET' if statistics.median(rates) >= 1000 else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
