"""Run the label audit gate on an experiment's kept manifests and cached codes (:func:`run_audit`), and
its command line (:func:`main`, ``python -m higgs_tune.audit``)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..data import CodesIndex, make_collator, read_jsonl, sample_id
from ..config import add_config_args, config_from_args
from .checks import BatchResult, run_tensor_checks, torch_threads
from .expect import Expect, SampleMeta, build_samples, check_collator, config_only, model_config_of
from .leak_probe import leak_probe, packing_probe, probe_indices
from .rules import Failure
from .summary import build_summary, format_report, sample_table, write_outputs


def _read_split_rows(train_manifest: Path, val_manifest: Path) -> tuple[list[dict], list[str]]:
    """The kept rows of both manifests and ``"train"``/``"val"`` per row."""
    rows, split = [], []
    for sp, p in (("train", train_manifest), ("val", val_manifest)):
        r = read_jsonl(p)
        rows += r
        split += [sp] * len(r)
    return rows, split


def _model_under_audit(cfg: dict[str, Any], acfg: dict[str, Any], model) -> tuple[Any, Any]:
    """``(model, device)``: the given model on its own device, else (probe on) ``model.build_model`` in
    float32, LoRA-wrapped with ``model.apply_lora`` when ``audit.probe_with_lora``; ``(None, "cpu")``
    when no model is given and the probe is off."""
    if model is not None:
        device = "cpu"
        with contextlib.suppress(StopIteration, AttributeError):
            device = next(model.parameters()).device
        return model, device
    if not acfg["leak_probe"]:
        return None, "cpu"
    from ..model import apply_lora, build_model, device_and_dtype

    dev, _ = device_and_dtype(cfg["model"].get("device"), "float32")
    model = build_model(cfg["model"], dtype=torch.float32, device=dev)
    if acfg["probe_with_lora"] and cfg.get("lora"):
        model = apply_lora(model, cfg["lora"])
    return model, dev


def _per_sample(results: list[BatchResult], n: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-sample rows (``{}`` for a sample that was not checked) and the column names, from the batch results."""
    per_sample: list[dict[str, Any]] = [{} for _ in range(n)]
    columns: list[str] = []
    for r in results:
        cols = [c for c in r.rows if c != "_index"]
        columns = columns or cols
        for pos, i in enumerate(r.rows["_index"]):
            per_sample[i] = {c: r.rows[c][pos] for c in cols}
    return per_sample, columns


def _threshold_checks(acfg: dict[str, Any], ids: list[str], per_sample: list[dict[str, Any]],
                      results: list[BatchResult], metas: list[SampleMeta | None],
                      K: int) -> tuple[list[float], list[Failure]]:
    """``masked_fraction`` per sample and ``codebook_coverage`` over all target audio.

    Returns:
        ``(coverage, failures)``: per codebook, labeled / columns of assistant-target segments.
    """
    failures = []
    max_masked = float(acfg["max_masked_fraction"])
    for sid, row in zip(ids, per_sample):
        if row and row["masked_fraction"] > max_masked:
            failures.append(Failure("masked_fraction", sid, f"masked fraction {row['masked_fraction']:.4f} > "
                                    f"{max_masked:g}"))
    cov_valid = sum((r.cov_valid for r in results), torch.zeros(K, dtype=torch.long))
    cov_cols = sum(r.cov_cols for r in results)
    coverage = [float(v) / cov_cols if cov_cols else 0.0 for v in cov_valid.tolist()]
    min_cov = float(acfg["min_audio_label_coverage"])
    low = [k for k, c in enumerate(coverage) if c < min_cov]
    if low and any(m is not None and m.out_T.numel() for m in metas):
        failures.append(Failure("codebook_coverage", "*", f"codebooks {low} have label coverage "
                                f"{[round(coverage[k], 4) for k in low]} < {min_cov:g} over {cov_cols} target columns"))
    return coverage, failures


def _run_probe(acfg: dict[str, Any], model, device, collator, loss_wiring, samples: list,
               metas: list[SampleMeta | None], ids: list[str], per_sample: list[dict[str, Any]],
               expect: Expect) -> tuple[dict[str, Any], list[Failure]]:
    """The leak probe on a batch of clean samples (:func:`~higgs_tune.audit.leak_probe.probe_indices`);
    ``({"enabled": False}, [])`` when ``audit.leak_probe`` is off or nothing was built."""
    info: dict[str, Any] = {"enabled": bool(acfg["leak_probe"])}
    if not info["enabled"] or all(s is None for s in samples):
        return info, []
    clean = [bool(p) and p.get("text_labels_ok", False) and p.get("audio_labels_ok", False) for p in per_sample]
    pick = probe_indices(samples, metas, clean, int(acfg["leak_probe_samples"]))
    try:
        out = leak_probe(model, collator([samples[i] for i in pick]), [ids[i] for i in pick], expect,
                         wiring=loss_wiring, tol=float(acfg["leak_tolerance"]), device=device)
    except Exception as exc:  # noqa: BLE001 - the gate reports, never crashes
        info.update(passed=False, error=str(exc))
        return info, [Failure("probe_model_forward", "*", f"leak probe raised {type(exc).__name__}: {exc}")]
    failures = out.pop("failures")
    info.update(out)
    # packed rows (train.packing) on the same samples: same targets and losses, no sample sees another
    try:
        packed = packing_probe(model, [samples[i] for i in pick], [ids[i] for i in pick], collator,
                               tol=float(acfg["leak_tolerance"]), device=device)
    except Exception as exc:  # noqa: BLE001 - the gate reports, never crashes
        packed = {"checks": [], "evaluated": [],
                  "failures": [Failure("probe_packed_equivalence", "*", f"packing probe raised {type(exc).__name__}: {exc}")]}
    packed_failures = packed.pop("failures")
    failures += packed_failures
    info["checks"] = info.get("checks", []) + packed["checks"]
    info["evaluated"] = sorted(set(info.get("evaluated", [])) | set(packed["evaluated"]))
    info["passed"] = info.get("passed", True) and not packed_failures
    if "note" in packed:
        info["packing_note"] = packed["note"]
    return info, failures


def run_audit(cfg: dict[str, Any], *, train_manifest: str | Path, val_manifest: str | Path,
              tokens_index: str | Path, summary_path: str | Path | None = None,
              samples_path: str | Path | None = None, collator=None, loss_wiring: Callable | None = None,
              model=None, text_tokenizer=None) -> dict[str, Any]:
    """Run the whole gate on an experiment's kept manifests and cached codes.

    Args:
        cfg: config with validated ``audit`` and ``model`` sections (schema defaults filled: the
            ``audit:`` defaults live only in ``workflow/schemas/config.schema.yaml``) and, for
            ``audit.probe_with_lora``, ``lora``.
        train_manifest / val_manifest: kept ChatML JSONL manifests (``results/X/manifest/*.jsonl``).
        tokens_index: the tokenize stage's parquet index (``audio_sha256``, ``codes_path``).
        summary_path / samples_path: where to write ``summary.json`` / ``samples.parquet``
            (atomically; ``None``: not written).
        collator: the collator under audit (default ``data.make_collator(model config)``).
        loss_wiring: the loss under audit (default ``loss.higgs_loss``).
        model: the model under audit (default ``model.build_model(cfg["model"])``, LoRA-wrapped with
            ``model.apply_lora`` when ``audit.probe_with_lora``); only its config is used when the
            leak probe is off (then the config alone is loaded when no model is given).
        text_tokenizer: default ``model.load_text_tokenizer(cfg["model"]["text_tokenizer"])``.

    Returns:
        The summary dict (see :func:`~higgs_tune.audit.summary.build_summary`); ``summary["passed"]``
        is the gate.

    Raises:
        FileNotFoundError: when a manifest or the tokens index is missing (upstream stages not run).
        KeyError: when ``cfg["audit"]`` lacks a schema key (the config was not validated).
    """
    t_all = time.perf_counter()
    acfg = cfg["audit"]
    for p in (train_manifest, val_manifest, tokens_index):
        if not Path(p).exists():
            raise FileNotFoundError(f"{p} is missing: run the manifest and tokenize stages first")
    from ..model import load_text_tokenizer

    rows, split = _read_split_rows(Path(train_manifest), Path(val_manifest))
    ids = [sample_id(r) for r in rows]
    index = CodesIndex(tokens_index)
    model, device = _model_under_audit(cfg, acfg, model)
    model_config = model_config_of(model) if model is not None else config_only(cfg["model"])
    tok = text_tokenizer or load_text_tokenizer(cfg["model"].get("text_tokenizer"))
    expect = Expect.from_model(model_config, tok)
    collator = collator if collator is not None else make_collator(model_config)

    failures: list[Failure] = []
    if not rows:
        failures.append(Failure("samples_present", "*", "no kept samples in the train/val manifests"))
    t0 = time.perf_counter()
    samples, metas, f_build = build_samples(rows, split, tok, index.get, expect)
    t_build = time.perf_counter() - t0
    collator_info, f_coll = check_collator(collator, model_config)
    failures += f_build + f_coll

    t0 = time.perf_counter()
    with torch_threads(int(acfg["num_threads"])):
        results, f_collate, n_checked = run_tensor_checks(samples, metas, collator, expect, int(acfg["batch_size"]))
    t_checks = time.perf_counter() - t0
    results = [r for r in results if r is not None]
    failures += f_collate
    for r in results:
        failures += r.failures
    per_sample, columns = _per_sample(results, len(rows))
    coverage, f_thr = _threshold_checks(acfg, ids, per_sample, results, metas, expect.K)
    failures += f_thr

    t0 = time.perf_counter()
    probe_info, f_probe = _run_probe(acfg, model, device, collator, loss_wiring, samples, metas, ids, per_sample,
                                     expect)
    t_probe = time.perf_counter() - t0 if probe_info["enabled"] else 0.0
    failures += f_probe

    table = sample_table(ids, split, per_sample, columns, failures)
    timing = {"build_samples_s": t_build, "tensor_checks_s": t_checks,
              "tensor_checks_samples_per_s": n_checked / t_checks if t_checks > 0 else None,
              "leak_probe_s": t_probe, "total_s": time.perf_counter() - t_all}
    summary = build_summary(
        failures=failures, acfg=acfg, K=expect.K, split=split, per_sample=per_sample, table=table, results=results,
        n_checked=n_checked, coverage=coverage, collator_info=collator_info, model_config=model_config,
        probe_info=probe_info, timing=timing,
        inputs={"train_manifest": str(train_manifest), "val_manifest": str(val_manifest),
                "tokens_index": str(tokens_index)})
    write_outputs(summary, table, summary_path, samples_path)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line: config options (``config.add_config_args``) and the five paths the rule renders."""
    parser = argparse.ArgumentParser(
        prog="python -m higgs_tune.audit",
        description="The label audit gate: build the exact training tensors from the kept manifests and cached "
                    "codes and check every label rule and the leak probe; exit 1 (after writing both outputs) "
                    "when any rule fails.")
    add_config_args(parser)
    parser.add_argument("--train", required=True, type=Path, help="kept train manifest (JSONL)")
    parser.add_argument("--val", required=True, type=Path, help="kept val manifest (JSONL)")
    parser.add_argument("--index", required=True, type=Path, help="tokens index (parquet) of the cached codes")
    parser.add_argument("--summary", required=True, type=Path, help="output: summary.json (the gate)")
    parser.add_argument("--samples", required=True, type=Path, help="output: samples.parquet (one row per sample)")
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m higgs_tune.audit``: run the gate, write both outputs, print the report.

    Returns:
        0 when the gate passed; 1 when it failed (the report and ``audit gate FAILED: ...`` on stderr).
    """
    args = build_parser().parse_args(None if argv is None else list(argv))
    cfg = config_from_args(args)
    summary = run_audit(cfg, train_manifest=args.train, val_manifest=args.val, tokens_index=args.index,
                        summary_path=args.summary, samples_path=args.samples)
    text = format_report(summary, args.summary)
    if summary["passed"]:
        print(text)
        return 0
    print(text, file=sys.stderr)
    print(f"audit gate FAILED: training must not start; see {args.summary}", file=sys.stderr)
    return 1
