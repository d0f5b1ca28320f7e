"""Throughput of the label audit's tensor checks (collate + all per-sample rules; leak probe excluded).

    PYTHONPATH=workflow python bench/audit.py [--configfile config/demo.yaml ...] [--repeat 10] [--batch-size 32]

Uses the demo data: the 40 ChatML rows of ``data/demo/manifest.jsonl`` (32 TTS + 8 voice cloning,
real transcripts, the real Llama-3.2 tokenizer) with, for each clip, the cached codes of
``results/<experiment>/tokens/index.parquet`` when the tokenize stage has run, else random codes in
[0, 1023] of the clip's real length (25 frames/s; code values do not change the checks' cost).
Tokenization happens once per sample (as in the audit) and is timed separately. Prints samples/s;
the target is >= 1,000 samples/s on CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from higgs_tune import audit as A  # noqa: E402
from higgs_tune import data as D  # noqa: E402
from higgs_tune.config import Paths, load_config  # noqa: E402
from higgs_tune.model import load_text_tokenizer  # noqa: E402


def demo_samples(cfg: dict, manifest: Path) -> tuple[list[dict], dict]:
    """Rows with misc.audio_sha256 and a ``sha -> (8, T)`` codes lookup (cached codes when present)."""
    rows = D.read_jsonl(manifest)
    index = None
    paths = Paths(cfg)
    if Path(paths.tokens_index).exists():
        kept = {D.sample_id(r): r for p in (paths.train_manifest, paths.val_manifest) if Path(p).exists()
                for r in D.read_jsonl(p)}
        if kept:
            rows, index = list(kept.values()), D.CodesIndex(paths.tokens_index)
    if index is not None:
        return rows, {"get": index.get, "source": f"cached codes ({paths.tokens_index})"}
    rng = np.random.default_rng(0)
    codes: dict[str, torch.Tensor] = {}
    for r in rows:
        r.setdefault("misc", {})["audio_sha256"] = {}
        for _, _, c in D.audio_items(r):
            url = c["audio_url"]
            sha = hashlib.sha256(url.encode()).hexdigest()
            r["misc"]["audio_sha256"][url] = sha
            if sha not in codes:
                n = max(1, round(sf.info(str(manifest.parent / url)).duration * 25))
                codes[sha] = torch.from_numpy(rng.integers(0, 1024, size=(8, n), dtype=np.int64))
    return rows, {"get": codes.__getitem__, "source": "random codes of the real clip lengths"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configfile", action="append", default=None,
                    help="repeatable, later files override (default config/demo.yaml)")
    ap.add_argument("--manifest", default=str(ROOT / "data" / "demo" / "manifest.jsonl"))
    ap.add_argument("--repeat", type=int, default=10, help="passes over the samples per timing run")
    ap.add_argument("--runs", type=int, default=5, help="timing runs (the median is reported)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: audit.batch_size")
    ap.add_argument("--threads", type=int, default=None, help="default: audit.num_threads")
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # results/ and relative codes paths resolve from the workflow root, as in the pipeline

    cfg = load_config(args.configfile or [str(ROOT / "config" / "demo.yaml")])
    acfg = {**A.DEFAULTS, **(cfg.get("audit") or {})}
    bs = args.batch_size or int(acfg["batch_size"])
    threads = args.threads if args.threads is not None else int(acfg["num_threads"])
    tok = load_text_tokenizer(cfg["model"].get("text_tokenizer"))
    model_config = A._config_only(cfg["model"])
    expect = A.Expect.from_model(model_config, tok)
    rows, codes = demo_samples(cfg, Path(args.manifest))
    A.build_samples(rows[:1], ["train"], tok, codes["get"], expect)  # warm-up (imports, tokenizer caches)
    t0 = time.perf_counter()
    samples, metas, fails = A.build_samples(rows, ["train"] * len(rows), tok, codes["get"], expect)
    t_build = time.perf_counter() - t0
    if fails:
        print(f"warning: {len(fails)} samples failed to build, e.g. {fails[0].message}")
    collator = D.make_collator(model_config)
    samples, metas = samples * args.repeat, metas * args.repeat
    with A._threads(threads or None):
        A.run_tensor_checks(samples[:bs], metas[:bs], collator, expect, bs)  # warm-up
        rates, n_fail = [], 0
        for _ in range(args.runs):
            t0 = time.perf_counter()
            results, f, n = A.run_tensor_checks(samples, metas, collator, expect, bs)
            rates.append(n / (time.perf_counter() - t0))
            n_fail = len(f) + sum(len(r.failures) for r in results if r is not None)
    n_unique = len(rows)
    print(f"demo data: {n_unique} samples, {codes['source']}; batch size {bs}, torch threads {threads or 'default'}")
    print(f"tokenization (once per sample, cached): {n_unique / t_build:,.0f} samples/s")
    print(f"tensor checks (collate + rules, leak probe excluded): median {statistics.median(rates):,.0f} samples/s "
          f"(min {min(rates):,.0f}, max {max(rates):,.0f}; {len(samples)} samples x {args.runs} runs); "
          f"{n_fail} rule failures")
    print(f"target >= 1,000 samples/s: {'MET' if statistics.median(rates) >= 1000 else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
