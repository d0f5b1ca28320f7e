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

from ..data import CodesIndex, ManifestSamples, build_dataset_sample, make_collator, sample_id
from ..config import config_from_args
from ..stage_cli import stage_parser
from .checks import BatchResult, check_batch, torch_threads
from .expect import Expect, build_sample, check_collator, config_only, model_config_of
from .leak_probe import leak_probe, packing_probe, probe_pick
from .rules import Failure
from .summary import build_summary, format_report, sample_table, write_outputs


class SampleColumns:
    """The per-sample columns of the checked samples, stored as columns (a few numbers a sample).

    ``cols[i]`` is sample ``i``'s ``{column: value}`` (``{}`` for a sample that was not checked),
    built when asked; iterating gives them in order.
    """

    def __init__(self):
        self.columns: list[str] = []
        self._values: dict[str, list] = {}
        self._checked: list[bool] = []

    def add_unchecked(self) -> None:
        self._checked.append(False)
        for c in self.columns:
            self._values[c].append(None)

    def add_batch(self, rows: dict[str, list], positions: list[int]) -> None:
        """Fill the samples at ``positions`` (already added as unchecked) from a batch's ``rows``; a
        batch without columns (``label_ids`` None: every sample failed ``collate``) leaves them unchecked."""
        if not rows:
            return
        if not self.columns:
            self.columns = list(rows)
            self._values = {c: [None] * len(self._checked) for c in self.columns}
        for c in self.columns:
            col, vals = self._values[c], rows[c]
            for pos, i in enumerate(positions):
                col[i] = vals[pos]
        for i in positions:
            self._checked[i] = True

    def __len__(self) -> int:
        return len(self._checked)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {c: self._values[c][i] for c in self.columns} if self._checked[i] else {}

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class _Pass:
    """What one streaming pass over the kept rows keeps: ids, splits, per-sample columns, the facts the
    probe picks by, the failures by kind (in the order the summary lists them) and the batch sums."""

    def __init__(self, K: int):
        self.ids: list[str] = []
        self.split: list[str] = []
        self.per_sample = SampleColumns()
        self.facts: list[tuple[str, int, int] | None] = []  # leak_probe.probe_pick
        self.f_build: list[Failure] = []
        self.f_collate: list[Failure] = []
        self.f_batches: list[Failure] = []
        self.total = BatchResult.empty(K)
        self.any_audio_out = False
        self.n_checked = 0
        self.build_s = self.checks_s = 0.0

    def add_result(self, r: BatchResult, positions: list[int]) -> None:
        self.f_batches += r.failures
        self.per_sample.add_batch(r.rows, positions)
        t = self.total
        t.role_text += r.role_text
        t.role_audio += r.role_audio
        t.cov_valid += r.cov_valid
        t.cov_cols += r.cov_cols
        t.text_targets += r.text_targets
        t.audio_targets += r.audio_targets


def _stream_checks(sets: list[tuple[str, ManifestSamples]], tok, codes_of: Callable, collator, expect: Expect,
                   batch_size: int) -> _Pass:
    """Build the samples of every row, one at a time, and check them ``batch_size`` built samples at a time.

    Rows are read from the manifests as the pass goes; a sample and its codes are held until its batch
    is checked, then dropped: memory holds one batch plus a few numbers per row (:class:`_Pass`).
    The batches are those of ``run_tensor_checks`` over the built samples (same results).
    """
    p = _Pass(expect.K)
    pending: list[tuple[int, Any, Any]] = []  # (position, sample, meta) of the batch being filled

    def flush() -> None:
        t0 = time.perf_counter()
        r, f = check_batch([s for _, s, _ in pending], [m for _, _, m in pending], collator, expect)
        p.f_collate += f
        if r is not None:
            p.add_result(r, [i for i, _, _ in pending])
        pending.clear()
        p.checks_s += time.perf_counter() - t0

    for sp, rows in sets:
        for row in rows.rows():
            i = len(p.ids)
            p.ids.append(sample_id(row))
            p.split.append(sp)
            p.per_sample.add_unchecked()
            t0 = time.perf_counter()
            s, m, f = build_sample(row, sp, tok, codes_of, expect)
            p.build_s += time.perf_counter() - t0
            if f is not None:
                p.f_build.append(f)
                p.facts.append(None)
                continue
            p.facts.append((sp, int(s.input_ids.numel()) + int(m.out_T.sum()), int(m.out_T.numel())))
            p.any_audio_out = p.any_audio_out or bool(m.out_T.numel())
            p.n_checked += 1
            pending.append((i, s, m))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    return p


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

    dev, _ = device_and_dtype(cfg["model"]["device"], "float32")
    model = build_model(cfg["model"], dtype=torch.float32, device=dev)
    if acfg["probe_with_lora"] and cfg.get("lora"):
        model = apply_lora(model, cfg["lora"])
    return model, dev


def _threshold_checks(acfg: dict[str, Any], ids: list[str], per_sample: SampleColumns, total: BatchResult,
                      any_audio_out: bool) -> tuple[list[float], list[Failure]]:
    """``masked_fraction`` per sample and ``codebook_coverage`` over all target audio (``total``: the
    checked batches' sums; ``any_audio_out``: some built sample has an audio-out segment).

    Returns:
        ``(coverage, failures)``: per codebook, labeled / columns of assistant-target segments.
    """
    failures = []
    max_masked = float(acfg["max_masked_fraction"])
    for sid, row in zip(ids, per_sample):
        if row and row["masked_fraction"] > max_masked:
            failures.append(Failure("masked_fraction", sid, f"masked fraction {row['masked_fraction']:.4f} > "
                                    f"{max_masked:g}"))
    cov_valid, cov_cols = total.cov_valid, total.cov_cols
    coverage = [float(v) / cov_cols if cov_cols else 0.0 for v in cov_valid.tolist()]
    min_cov = float(acfg["min_audio_label_coverage"])
    low = [k for k, c in enumerate(coverage) if c < min_cov]
    if low and any_audio_out:
        failures.append(Failure("codebook_coverage", "*", f"codebooks {low} have label coverage "
                                f"{[round(coverage[k], 4) for k in low]} < {min_cov:g} over {cov_cols} target columns"))
    return coverage, failures


def _run_probe(acfg: dict[str, Any], model, device, collator, loss_wiring, p: _Pass, sets: list, tok,
               codes_of: Callable, expect: Expect) -> tuple[dict[str, Any], list[Failure]]:
    """The leak probe on a batch of clean samples (:func:`~higgs_tune.audit.leak_probe.probe_pick`), built
    again from their rows (``sets``: the pass's manifests, in order); ``({"enabled": False}, [])``
    when ``audit.leak_probe`` is off or nothing was built."""
    info: dict[str, Any] = {"enabled": bool(acfg["leak_probe"])}
    if not info["enabled"] or all(f is None for f in p.facts):
        return info, []
    clean = [bool(r) and r.get("text_labels_ok", False) and r.get("audio_labels_ok", False) for r in p.per_sample]
    pick = probe_pick(p.facts, clean, int(acfg["leak_probe_samples"]))
    ids = [p.ids[i] for i in pick]
    samples = [build_dataset_sample(_row_at(sets, i), tok, codes_of) for i in pick]
    try:
        out = leak_probe(model, collator(samples), ids, expect,
                         wiring=loss_wiring, tol=float(acfg["leak_tolerance"]), device=device)
    except Exception as exc:  # noqa: BLE001 - the gate reports, never crashes
        info.update(passed=False, error=str(exc))
        return info, [Failure("probe_model_forward", "*", f"leak probe raised {type(exc).__name__}: {exc}")]
    failures = out.pop("failures")
    info.update(out)
    # packed rows (train.packing) on the same samples: same targets and losses, no sample sees another
    try:
        packed = packing_probe(model, samples, ids, collator, tol=float(acfg["leak_tolerance"]), device=device)
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


def _row_at(sets: list[tuple[str, ManifestSamples]], i: int) -> dict:
    """Row ``i`` of the manifests of ``sets`` taken one after another."""
    for _, rows in sets:
        if i < len(rows):
            return rows.row(i)
        i -= len(rows)
    raise IndexError(i)


def run_audit(cfg: dict[str, Any], *, train_manifest: str | Path, val_manifest: str | Path,
              tokens_index: str | Path, summary_path: str | Path | None = None,
              samples_path: str | Path | None = None, collator=None, loss_wiring: Callable | None = None,
              model=None, text_tokenizer=None) -> dict[str, Any]:
    """Run the whole gate on an experiment's kept manifests and cached codes.

    One streaming pass: rows are read as it goes, each sample is built when its batch of
    ``audit.batch_size`` is due and dropped once the batch is checked; what stays per sample is its
    ``samples.parquet`` row and the probe's pick facts (memory: one batch of samples and codes, plus a
    few numbers a row). The probe's samples are built again from their rows.

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
        model: the model under audit (default ``model.build_model(cfg["model"], torch.float32, <the audit device>)``, LoRA-wrapped with
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

    index = CodesIndex(tokens_index)
    model, device = _model_under_audit(cfg, acfg, model)
    model_config = model_config_of(model) if model is not None else config_only(cfg["model"])
    tok = text_tokenizer or load_text_tokenizer(cfg["model"]["text_tokenizer"])
    expect = Expect.from_model(model_config, tok)
    collator = collator if collator is not None else make_collator(model_config)
    collator_info, f_coll = check_collator(collator, model_config)

    # one pass over the rows, read as it goes: each sample built, checked in its batch, then dropped
    sets = [(sp, ManifestSamples(path, tok, index)) for sp, path in (("train", train_manifest), ("val", val_manifest))]
    with torch_threads(int(acfg["num_threads"])):
        seen = _stream_checks(sets, tok, index.get, collator, expect, int(acfg["batch_size"]))
    ids, split, per_sample, n_checked = seen.ids, seen.split, seen.per_sample, seen.n_checked
    failures: list[Failure] = []
    if not ids:
        failures.append(Failure("samples_present", "*", "no kept samples in the train/val manifests"))
    failures += seen.f_build + f_coll + seen.f_collate + seen.f_batches
    coverage, f_thr = _threshold_checks(acfg, ids, per_sample, seen.total, seen.any_audio_out)
    failures += f_thr

    t0 = time.perf_counter()
    probe_info, f_probe = _run_probe(acfg, model, device, collator, loss_wiring, seen, sets, tok, index.get, expect)
    t_probe = time.perf_counter() - t0 if probe_info["enabled"] else 0.0
    failures += f_probe

    table = sample_table(ids, split, per_sample, per_sample.columns, failures)
    t_checks = seen.checks_s
    timing = {"build_samples_s": seen.build_s, "tensor_checks_s": t_checks,
              "tensor_checks_samples_per_s": n_checked / t_checks if t_checks > 0 else None,
              "leak_probe_s": t_probe, "total_s": time.perf_counter() - t_all}
    summary = build_summary(
        failures=failures, acfg=acfg, K=expect.K, split=split, per_sample=per_sample, table=table, results=[seen.total],
        n_checked=n_checked, coverage=coverage, collator_info=collator_info, model_config=model_config,
        probe_info=probe_info, timing=timing,
        inputs={"train_manifest": str(train_manifest), "val_manifest": str(val_manifest),
                "tokens_index": str(tokens_index)})
    write_outputs(summary, table, summary_path, samples_path)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line: config options (``config.add_config_args``) and the five paths the rule renders."""
    return stage_parser(
        "python -m higgs_tune.audit",
        "The label audit gate: build the exact training tensors from the kept manifests and cached "
        "codes and check every label rule and the leak probe; exit 1 (after writing both outputs) "
        "when any rule fails.",
        inputs={"train": {"type": Path, "help": "kept train manifest (JSONL)"},
                "val": {"type": Path, "help": "kept val manifest (JSONL)"},
                "index": {"type": Path, "help": "tokens index (parquet) of the cached codes"}},
        outputs={"summary": {"type": Path, "help": "summary.json (the gate)"},
                 "samples": {"type": Path, "help": "samples.parquet (one row per sample)"}})


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
