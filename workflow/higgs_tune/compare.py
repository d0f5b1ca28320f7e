"""Compare stage: one self-contained HTML comparing the runs of a sweep.

Overlays the runs' train/val loss curves, per-codebook loss and accuracy curves and held-out eval
scores (seaborn, embedded as base64 PNGs), lists each run's lineage (the md5 ``dvc.lock`` records of
the data manifest, kept manifests, token index, audit summary, adapter folder, metrics
(:func:`higgs_tune.fileio.dvc_md5`); the sha256 of every config section; the code revisions) and a
table of the config keys that differ between the runs (only those).

    python -m higgs_tune.compare --config-json CONFIG --html compare.html
        --input demo-lr1e-3:metrics=PATH --input ...

(as ``workflow/rules/compare.smk`` renders it: ``--config-json`` holds ``sweep`` (name, base
experiment, each run's overlay), ``experiments`` (each run's resolved config) and ``code`` (stage ->
code signature); one ``--input EXPERIMENT:ROLE=PATH`` per input of each run; the comparison
reads nothing else). Shares its helpers and templates with the report (:mod:`higgs_tune.figures`).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import yaml

from higgs_tune.config import config_from_args
from higgs_tune.fileio import SHORT_HASH, canonical_sha256, git_revision, read_jsonl, write_text
from higgs_tune.figures import (Inputs, eval_groups, eval_scalars, fmt, melt_lists, melt_scalars, package_versions,
                                per_codebook, png_uri, render, require)
from higgs_tune.outputs import BY_ROLE, COMPARE_ROLES, DATA_MANIFEST_LABEL, DATA_MANIFEST_ROLE
from higgs_tune.stage_cli import add_input_roles, input_roles, stage_parser
from higgs_tune.sweep import MISSING, config_diff

#: what the lineage lists of each run, in order: ``(role, label)`` (higgs_tune.outputs: the data manifest and
#: :data:`~higgs_tune.outputs.COMPARE_ROLES`; ``adapter`` is a folder)
LINEAGE_ROLES = ((DATA_MANIFEST_ROLE, DATA_MANIFEST_LABEL), *((r, BY_ROLE[r].label) for r in COMPARE_ROLES))
#: config keys that are not a run's settings (the name is the run's column; all runs share results_dir)
NOT_SETTINGS = ("experiment", "results_dir")
#: eval scores drawn as bars, when present
EVAL_BARS = ("loss", "text_loss", "audio_loss", "text_acc", "generation.wer", "generation.sim")


def section_sha256(value: Any) -> str:
    """sha256 of a config section as canonical JSON (:func:`higgs_tune.fileio.canonical_sha256`; all 64 digits)."""
    return canonical_sha256(value)


class Run:
    """One run of the sweep: its name, experiment, config, inputs (each with its DVC md5) and loaded data."""

    def __init__(self, run: str, experiment: str, cfg: dict, paths: dict[str, str]):
        self.run, self.experiment, self.cfg, self.paths = run, experiment, cfg, paths
        self.inputs = Inputs(cfg)
        metrics_path = require(paths, "metrics")
        eval_path = require(paths, "eval_metrics")
        for role, _ in LINEAGE_ROLES:
            if paths.get(role):
                self.inputs.add(role, Path(paths[role]))
        self.metrics = pd.DataFrame(read_jsonl(metrics_path))
        if self.metrics.empty or "step" not in self.metrics:
            raise ValueError(f"{metrics_path} holds no step rows (run {run})")
        present = {r: Path(f["path"]) for r, f in self.inputs.files.items() if f["md5"] and Path(f["path"]).is_file()}
        self.val = pd.DataFrame(read_jsonl(present["val_metrics"])) if "val_metrics" in present else pd.DataFrame()
        self.eval = json.loads(eval_path.read_text())
        self.state = json.loads(present["train_state"].read_text()) if "train_state" in present else {}
        audit = json.loads(present["audit_summary"].read_text()) if "audit_summary" in present else {}
        self.audit_passed = audit.get("passed")


def _long(runs: list[Run], build) -> pd.DataFrame:
    """``build(df) -> step, series, value`` over every run's train and val rows, with ``run`` and
    ``split`` columns."""
    parts = []
    for r in runs:
        for split, df in (("train", r.metrics), ("val", r.val)):
            if df.empty or "step" not in df:
                continue
            part = build(df)
            if not part.empty:
                parts.append(part.assign(run=r.run, split=split))
    if not parts:
        return pd.DataFrame(columns=["step", "series", "value", "run", "split"])
    out = pd.concat(parts, ignore_index=True)
    out["value"] = out["value"].astype(float)
    return out


def overlay(df: pd.DataFrame, runs: list[str], title: str, ylabel: str, col_wrap: int | None = None,
            log: bool = False, ylim=None):
    """One panel per ``series``, one colour per run; train solid, val dashed with markers."""
    series = list(dict.fromkeys(df["series"]))
    splits = [s for s in ("train", "val") if s in set(df["split"])]
    g = sns.relplot(data=df, x="step", y="value", hue="run", hue_order=runs, style="split", style_order=splits,
                    dashes={"train": "", "val": (4, 2)}, markers={"train": ".", "val": "o"},
                    col="series", col_order=series, col_wrap=col_wrap, kind="line", height=2.6 if col_wrap else 3.2,
                    aspect=1.25, facet_kws={"sharey": True}, errorbar=None, markersize=5)
    values = df["value"]
    if log and len(values) and (values > 0).all() and values.max() / values.min() > 20:
        g.set(yscale="log")
    if ylim:
        g.set(ylim=ylim)
    g.set_axis_labels("optimizer step", ylabel)
    g.set_titles("{col_name}")
    for ax in g.axes.flat:
        ax.grid(alpha=0.3)
    g.figure.suptitle(title, y=1.03)
    return g.figure


def curve_figures(runs: list[Run]) -> list[dict]:
    """The overlaid training curves (loss; per-codebook loss; per-codebook and text accuracy) as
    ``[{"title", "uri" (data: PNG), "caption" (every run's sources)}]``; a curve no run logged is left out."""
    names = [r.run for r in runs]
    caption = " ".join(r.inputs.caption("metrics", "val_metrics") for r in runs)
    figs = []
    loss = _long(runs, lambda d: melt_scalars(d, ["loss", "text_loss", "audio_loss"]))
    if not loss.empty:
        figs.append(("Train (solid) and val (dashed) loss", overlay(loss, names, "Loss", "cross-entropy", log=True)))
    cb_loss = _long(runs, lambda d: melt_lists(d, "codebook_losses", "cb"))
    if not cb_loss.empty:
        figs.append(("Per-codebook audio loss", overlay(cb_loss, names, "Per-codebook loss", "cross-entropy",
                                                        col_wrap=4, log=True)))
    cb_acc = _long(runs, lambda d: pd.concat([melt_lists(d, "codebook_acc", "cb"), melt_scalars(d, ["text_acc"])]))
    if not cb_acc.empty:
        figs.append(("Per-codebook (and text) teacher-forced top-1 accuracy",
                     overlay(cb_acc, names, "Teacher-forced top-1 accuracy", "accuracy", col_wrap=5,
                             ylim=(-0.02, 1.02))))
    return [{"title": t, "uri": png_uri(f), "caption": caption} for t, f in figs]


def eval_figures(runs: list[Run]) -> list[dict]:
    """Bars of the held-out scores per run (:data:`EVAL_BARS` present in some run; the per-codebook
    lists, one panel each) as ``[{"title", "uri", "caption"}]``."""
    names = [r.run for r in runs]
    caption = " ".join(r.inputs.caption("eval_metrics") for r in runs)
    out = []
    scal = {r.run: eval_scalars(r.eval) for r in runs}
    rows = [{"metric": k, "run": r, "value": float(scal[r][k])} for k in EVAL_BARS for r in names
            if isinstance(scal[r].get(k), (int, float)) and not isinstance(scal[r].get(k), bool)]
    if rows:
        df = pd.DataFrame(rows)
        g = sns.catplot(data=df, x="run", y="value", hue="run", order=names, hue_order=names, col="metric",
                        col_order=list(dict.fromkeys(df["metric"])), kind="bar", sharey=False, height=2.8,
                        aspect=0.9, legend=False)
        for ax in g.axes.flat:
            for c in ax.containers:
                ax.bar_label(c, fmt="%.3g", fontsize=8)
            ax.tick_params(axis="x", rotation=30)
            ax.grid(alpha=0.3, axis="y")
        g.set_titles("{col_name}")
        g.set_axis_labels("", "")
        g.figure.suptitle("Held-out eval scores", y=1.04)
        out.append({"title": "Held-out eval scores per run", "uri": png_uri(g.figure), "caption": caption})
    cb = [{"metric": k, "codebook": f"cb{i}", "run": r.run, "value": float(v)}
          for r in runs for k, vals in per_codebook(r.eval).items() for i, v in enumerate(vals)]
    if cb:
        df = pd.DataFrame(cb)
        g = sns.catplot(data=df, x="codebook", y="value", hue="run", hue_order=names, col="metric", kind="bar",
                        sharey=False, height=3.0, aspect=1.6, col_wrap=2)
        g.set_titles("{col_name}")
        g.set_axis_labels("", "")
        for ax in g.axes.flat:
            ax.grid(alpha=0.3, axis="y")
        g.figure.suptitle("Held-out per-codebook scores", y=1.03)
        out.append({"title": "Held-out per-codebook eval scores per run", "uri": png_uri(g.figure),
                    "caption": caption})
    return out


def _row(label: str, values: list[str | None], full: list[str | None] | None = None) -> dict:
    shown = ["" if v is None else v for v in values]
    return {"label": label, "values": shown, "full": full or shown, "differs": len(set(shown)) > 1}


def lineage(runs: list[Run], code: dict[str, str]) -> list[dict]:
    """Rows ``{"label", "values" (short, per run), "full", "differs"}``: the DVC md5 of each input
    (:data:`LINEAGE_ROLES`; the adapter folder's ``<md5>.dir``, as ``dvc.lock`` records it), the sha256
    of every config section; the audit verdict; the git revision training ran at; the code signature
    of each stage. Shortened hashes show :data:`~higgs_tune.fileio.SHORT_HASH` digits."""
    rows = []
    for role, label in LINEAGE_ROLES:
        hashes = [(r.inputs.files.get(role) or {}).get("md5") for r in runs]
        if any(hashes):
            rows.append(_row(label, [h[:SHORT_HASH] if h else "not produced" for h in hashes], hashes))
    rows.append(_row("audit passed", [fmt(r.audit_passed) for r in runs]))
    sections = sorted({k for r in runs for k in r.cfg} - set(NOT_SETTINGS))
    for sec in sections:
        shas = [section_sha256(r.cfg.get(sec)) if sec in r.cfg else None for r in runs]
        rows.append(_row(f"config: {sec}", [s[:SHORT_HASH] if s else "(not set)" for s in shas], shas))
    rows.append(_row("code: git revision (training, state.json)",
                     [str(r.state.get("git_revision") or "not recorded") for r in runs]))
    for stage, sig in sorted((code or {}).items()):
        rows.append(_row(f"code: {stage} (signature)", [sig for _ in runs]))
    return rows


def diff_table(runs: list[Run]) -> list[dict]:
    """The config keys that differ between the runs: ``[{"key", "values": [str per run]}]``."""
    rows = config_diff({r.run: r.cfg for r in runs}, ignore=NOT_SETTINGS)
    return [{"key": d["key"], "values": [str(MISSING) if d["values"][r.run] is MISSING else fmt(d["values"][r.run])
                                         for r in runs]} for d in rows]


def build_compare(cfg: dict, inputs_by_run: dict[str, dict[str, str]], out: str | Path) -> Path:
    """Render the comparison of the runs in ``inputs_by_run`` (experiment -> role -> path; roles as
    :data:`higgs_tune.outputs.COMPARE_ROLES` plus ``manifest``: the compare rule's inputs) to ``out``.

    Args:
        cfg: ``{"sweep": {"name", "base", "runs": {run: overlay}, "order": [experiment, ...]
            (declared order; the columns' order)}, "experiments": {experiment: resolved config},
            "code": {stage: code signature}}`` (the compare rule's --config-json).

    Raises:
        FileNotFoundError: a run's ``metrics`` or ``eval_metrics`` is missing (naming the rule to run).
        ValueError: a run's metrics hold no step rows; an experiment of ``inputs_by_run`` has no config.
    """
    sweep = cfg["sweep"]
    prefix = f"{sweep['base']}-"
    order = [e for e in sweep.get("order") or [] if e in inputs_by_run]
    runs = []
    for exp in order + [e for e in inputs_by_run if e not in order]:
        paths = inputs_by_run[exp]
        if exp not in cfg["experiments"]:
            raise ValueError(f"no config for experiment {exp!r} in --config-json experiments")
        run = exp[len(prefix):] if exp.startswith(prefix) else exp
        runs.append(Run(run, exp, cfg["experiments"][exp], paths))
    if not runs:
        raise ValueError("no runs to compare: no --input given")

    sns.set_theme(style="whitegrid", context="notebook")
    overlays = sweep.get("runs") or {}
    context = {
        "title": f"higgs-tune sweep '{sweep['name']}': {len(runs)} runs compared",
        "sweep": sweep["name"], "base": sweep["base"],
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "git": git_revision(),
        "runs": [{"run": r.run, "experiment": r.experiment, "overlay": fmt(overlays.get(r.run, {})),
                  "steps": fmt(int(r.metrics["step"].max())),
                  "final_loss": fmt(float(r.metrics["loss"].iloc[-1])) if "loss" in r.metrics else "",
                  "eval_loss": fmt(r.eval.get("loss")),
                  "random_init": "random_init" in (r.cfg["model"].get("source"), r.state.get("model_source"),
                                                   r.eval.get("model_source"))} for r in runs],
        "diff": diff_table(runs),
        "curves": curve_figures(runs),
        "eval_groups": eval_groups({r.run: r.eval for r in runs}),
        "eval_figures": eval_figures(runs),
        "lineage": lineage(runs, cfg.get("code") or {}),
        "files": [dict(f, run=r.run) for r in runs for f in r.inputs.files.values()],
        "packages": package_versions(),
        "sweep_yaml": yaml.safe_dump({"sweep": {"name": sweep["name"], "runs": overlays}}, sort_keys=False,
                                     default_flow_style=None, width=110),
    }
    context["random_init"] = any(r["random_init"] for r in context["runs"])
    context["run_names"] = [r.run for r in runs]
    write_text(out, render("compare.html.j2", context))
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m higgs_tune.compare", __doc__.split("\n")[0], outputs={"html": "the HTML file"})
    add_input_roles(parser, "EXPERIMENT:ROLE=PATH",
                    "input: one input of one run (its experiment, role and path: the compare rule's inputs); repeated")
    args = parser.parse_args(argv)
    if not args.config_json:
        parser.error("--config-json is required (the compare rule renders it: sweep, experiments, code)")
    out = build_compare(config_from_args(args), input_roles(parser, args.input, nested=True), args.html)
    plt.close("all")
    print(f"compare: {out}")


if __name__ == "__main__":
    main()
