"""Compare stage: one self-contained HTML comparing the runs of a sweep.

Overlays the runs' train/val loss curves, per-codebook loss and accuracy curves and held-out eval
scores (seaborn, embedded as base64 PNGs), lists each run's lineage (the sha256 of the data
manifest, kept manifests, token index, audit summary, adapter, metrics, of every config section,
and the code revisions) and a table of the config keys that differ between the runs (only those).

    python -m higgs_tune.compare --config-json CONFIG --html compare.html
        --input demo-lr1e-3:metrics=PATH --input ...

(as ``workflow/rules/compare.smk`` renders it: ``--config-json`` holds ``sweep`` (name, base
experiment, each run's overlay), ``experiments`` (each run's resolved config) and ``code`` (stage ->
code signature); one ``--input EXPERIMENT:ROLE=PATH`` per input of each run; the comparison
reads nothing else). Shares its helpers and templates with :mod:`higgs_tune.report`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import yaml

from higgs_tune.config import add_config_args, config_from_args
from higgs_tune.fileio import git_revision, read_jsonl, sha256_file, write_text
from higgs_tune.report import (SHORT, Inputs, _expand, _melt, eval_groups, eval_scalars, fmt, package_versions,
                               per_codebook, png_uri, render, require)
from higgs_tune.sweep import MISSING, config_diff

#: input roles of one run read as files (``adapter`` is a folder), in lineage order
LINEAGE_ROLES = (("manifest", "data manifest (data.manifest)"), ("train_manifest", "train manifest (kept rows)"),
                 ("val_manifest", "val manifest (kept rows)"), ("tokens_index", "token index"),
                 ("audit_summary", "audit summary"), ("metrics", "train metrics"), ("val_metrics", "val metrics"),
                 ("train_state", "train state"), ("eval_metrics", "eval metrics"),
                 ("paired_summary", "base -> fine-tuned summary"), ("base_eval_metrics", "base-model eval metrics"))
#: config keys that are not a run's settings (the name is the run's column; all runs share results_dir)
NOT_SETTINGS = ("experiment", "results_dir")
#: eval scores drawn as bars, when present
EVAL_BARS = ("loss", "text_loss", "audio_loss", "text_acc", "generation.wer", "generation.sim")


def dir_sha256(folder: Path) -> tuple[str | None, list[tuple[str, str]]]:
    """A folder's digest: sha256 of its files' ``relative path NUL sha256 LF`` lines in path order,
    and those ``(path, sha256)`` pairs; ``(None, [])`` for a missing or empty folder. Snakemake's
    ``.snakemake_timestamp`` marker is left out (the same adapter has the same digest whoever ran it)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".snakemake"))
    files = files if Path(folder).is_dir() else []
    pairs = [(str(f.relative_to(folder)), sha256_file(f)) for f in files]
    if not pairs:
        return None, []
    h = hashlib.sha256("".join(f"{p}\0{s}\n" for p, s in pairs).encode())
    return h.hexdigest(), pairs


def section_sha256(value: Any) -> str:
    """sha256 of a config section as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class Run:
    """One run of the sweep: its name, experiment, config, inputs (with sha256) and loaded data."""

    def __init__(self, run: str, experiment: str, cfg: dict, paths: dict[str, str]):
        self.run, self.experiment, self.cfg, self.paths = run, experiment, cfg, paths
        self.inputs = Inputs(cfg)
        metrics_path = require(paths, "metrics")
        eval_path = require(paths, "eval_metrics")
        for role, _ in LINEAGE_ROLES:
            if paths.get(role):
                self.inputs.add(role, Path(paths[role]))
        self.adapter_sha, adapter_files = dir_sha256(Path(paths["adapter"])) if paths.get("adapter") else (None, [])
        for rel, _ in adapter_files:
            self.inputs.add(f"adapter:{rel}", Path(paths["adapter"]) / rel)
        self.metrics = pd.DataFrame(read_jsonl(metrics_path))
        if self.metrics.empty or "step" not in self.metrics:
            raise ValueError(f"{metrics_path} holds no step rows (run {run})")
        present = {r: Path(f["path"]) for r, f in self.inputs.files.items() if f["sha256"]}
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
    loss = _long(runs, lambda d: _melt(d, ["loss", "text_loss", "audio_loss"]))
    if not loss.empty:
        figs.append(("Train (solid) and val (dashed) loss", overlay(loss, names, "Loss", "cross-entropy", log=True)))
    cb_loss = _long(runs, lambda d: _expand(d, "codebook_losses", "cb"))
    if not cb_loss.empty:
        figs.append(("Per-codebook audio loss", overlay(cb_loss, names, "Per-codebook loss", "cross-entropy",
                                                        col_wrap=4, log=True)))
    cb_acc = _long(runs, lambda d: pd.concat([_expand(d, "codebook_acc", "cb"), _melt(d, ["text_acc"])]))
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
    """Rows ``{"label", "values" (short, per run), "full", "differs"}``: the sha256 of each input
    file, of the adapter folder (:func:`dir_sha256`), of every config section; the audit verdict; the
    git revision training ran at; the code signature of each stage."""
    rows = []
    for role, label in LINEAGE_ROLES:
        shas = [(r.inputs.files.get(role) or {}).get("sha256") for r in runs]
        if any(shas):
            rows.append(_row(label, [s[:SHORT] if s else "not produced" for s in shas], shas))
        if role == "train_state":
            rows.append(_row("adapter (all files)", [s[:SHORT] if s else "not produced" for s in
                                                       (r.adapter_sha for r in runs)],
                             [r.adapter_sha for r in runs]))
    rows.append(_row("audit passed", [fmt(r.audit_passed) for r in runs]))
    sections = sorted({k for r in runs for k in r.cfg} - set(NOT_SETTINGS))
    for sec in sections:
        shas = [section_sha256(r.cfg.get(sec)) if sec in r.cfg else None for r in runs]
        rows.append(_row(f"config: {sec}", [s[:SHORT] if s else "(not set)" for s in shas], shas))
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
    the compare rule's :data:`COMPARE_ROLES` plus ``manifest``) to ``out``.

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
    from higgs_tune.stage_cli import add_input_roles, input_roles, stage_parser

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
