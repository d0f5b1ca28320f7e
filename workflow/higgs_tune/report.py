"""Report stage: one self-contained HTML file summarising an experiment.

Reads the training curves, the label audit, the eval metrics, the manifest fixes/quarantine, the
prediction snapshots and any eval audio; embeds every plot (base64 PNG) and audio clip (base64 WAV
data URI) so the file can be mailed around. Every figure's caption names the exact input files it
was drawn from (path + the md5 DVC records for it in ``dvc.lock``: :func:`higgs_tune.fileio.dvc_md5`)
plus the experiment name and the config hash. The helpers it shares with the comparison live in
:mod:`higgs_tune.figures`.

    python -m higgs_tune.report --config-json CONFIG --input metrics=PATH --input ... --html report.html

(as ``workflow/rules/report.smk`` renders it: one ``--input ROLE=PATH`` per input of that rule, the
role being its key; the report reads nothing else. The convention: :mod:`higgs_tune.stage_cli`).
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import yaml  # noqa: E402

from higgs_tune.config import config_from_args  # noqa: E402
from higgs_tune.fileio import git_revision, read_jsonl, write_text  # noqa: E402
from higgs_tune.figures import (Inputs, eval_groups, flatten, fmt, melt_lists, melt_scalars,  # noqa: E402
                                package_versions, per_codebook, png_uri, render, require)
from higgs_tune.outputs import DATA_MANIFEST_ROLE, REPORT_ROLES  # noqa: E402
from higgs_tune.stage_cli import add_input_roles, input_roles, stage_parser  # noqa: E402

MAX_TABLE_ROWS = 200
MAX_AUDIO_BYTES = 8 * 1024 * 1024


# ----------------------------------------------------------------------------- small helpers
def table(df: pd.DataFrame, max_rows: int = MAX_TABLE_ROWS) -> dict:
    """A DataFrame as ``{columns, rows, total}`` of pre-formatted strings (the template escapes)."""
    shown = df.head(max_rows)
    return {"columns": [str(c) for c in shown.columns],
            "rows": [[fmt(v) for v in row] for row in shown.itertuples(index=False)],
            "total": len(df)}


def records(rows: list[dict], max_rows: int = MAX_TABLE_ROWS) -> dict | None:
    """JSON records (keys may differ per row) as a table; a key a row lacks is an empty cell."""
    if not rows:
        return None
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return {"columns": columns, "rows": [[fmt(r.get(c)) for c in columns] for r in rows[:max_rows]],
            "total": len(rows)}


def _curves(train: pd.DataFrame, val: pd.DataFrame, title: str, ylabel: str, log: bool = False,
            palette: str = "tab10", ylim=None):
    fig, ax = plt.subplots(figsize=(9, 4.2))
    order = list(dict.fromkeys(list(train["series"]) + list(val["series"])))
    cbs = [s for s in order if s.startswith("cb")] if palette == "viridis" else order
    colors = dict(zip(cbs, sns.color_palette(palette, len(cbs))))
    colors.update({s: "black" for s in order if s not in colors})  # e.g. text_acc beside 8 codebooks
    if not train.empty:
        sns.lineplot(data=train, x="step", y="value", hue="series", hue_order=order, palette=colors, ax=ax, lw=1.4)
    if not val.empty:
        sns.lineplot(data=val, x="step", y="value", hue="series", hue_order=order, palette=colors, ax=ax,
                     linestyle="--", marker="o", markersize=5, lw=1.1, alpha=0.85, legend=train.empty)
    values = pd.concat([train["value"], val["value"]]).astype(float)
    if log and len(values) and (values > 0).all() and values.max() / values.min() > 20:
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(title="solid: train\ndashed o: val" if not val.empty else None, fontsize=9, title_fontsize=9,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def training_figures(metrics: pd.DataFrame, val: pd.DataFrame, inputs: Inputs) -> list[dict]:
    roles = ("metrics", "val_metrics") if not val.empty else ("metrics",)
    cap = inputs.caption(*roles)
    loss_cols = ["loss", "text_loss", "audio_loss"]
    figs = [
        ("Training loss (total, text, audio)",
         _curves(melt_scalars(metrics, loss_cols), melt_scalars(val, loss_cols), "Loss", "cross-entropy", log=True)),
        ("Per-codebook audio loss",
         _curves(melt_lists(metrics, "codebook_losses", "cb"), melt_lists(val, "codebook_losses", "cb"),
                 "Per-codebook loss", "cross-entropy", log=True, palette="viridis")),
    ]
    acc_train = pd.concat([melt_lists(metrics, "codebook_acc", "cb"), melt_scalars(metrics, ["text_acc"])])
    acc_val = pd.concat([melt_lists(val, "codebook_acc", "cb"), melt_scalars(val, ["text_acc"])])
    figs.append(("Teacher-forced top-1 accuracy per codebook (and text)",
                 _curves(acc_train, acc_val, "Teacher-forced top-1 accuracy", "accuracy",
                         palette="viridis", ylim=(-0.02, 1.02))))
    out = [{"title": t, "uri": png_uri(f), "caption": cap} for t, f in figs]
    sched = [c for c in ("lr", "grad_norm") if c in metrics and metrics[c].notna().any()]
    if sched:
        fig, axes = plt.subplots(1, len(sched), figsize=(9, 3.2), squeeze=False)
        for ax, col in zip(axes[0], sched):
            sns.lineplot(data=metrics, x="step", y=col, ax=ax, color="C0" if col == "lr" else "C3")
            ax.set(title={"lr": "Learning-rate schedule", "grad_norm": "Gradient norm (pre-clip)"}[col],
                   xlabel="optimizer step", ylabel=col)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        out.append({"title": "Learning rate and gradient norm", "uri": png_uri(fig),
                    "caption": inputs.caption("metrics")})
    padding = padding_figure(metrics, inputs)
    if padding:
        out.append(padding)
    return out


PADDING_NOTE = ("Padding efficiency = the samples' positions / all positions of the padded micro-batches "
                "of a step (all processes, all micro-steps), counted in the sequence the decoder layers run "
                "on: text tokens plus each audio segment's columns (frames + BOS/EOS + delay-pattern columns), "
                "padded to the longest row and to a multiple of 8 (the model's merged attention mask). "
                "1 = no padding.")


def batching(train_cfg: dict) -> str:
    """How the run built its micro-batches, in words (``train.packing``, ``train.length_bucketing``)."""
    per = f"{train_cfg['batch_size']} samples per process and micro-step"
    if train_cfg["packing"]:
        cap = train_cfg["pack_positions"]
        rows = f"rows of at most {cap} positions" if cap else "one row"
        return f"packed ({per} in {rows}, block-diagonal attention)"
    if train_cfg["length_bucketing"]:
        return f"length-bucketed ({per}, padded rows)"
    return f"random order ({per}, padded rows)"


def overall_padding_efficiency(metrics: pd.DataFrame) -> float | None:
    """Positions over padded positions summed over every step (``n_positions`` /
    ``n_padded_positions``), or the mean of ``padding_efficiency`` when the counts are absent;
    ``None`` when the metrics carry neither (a run before padding was logged)."""
    if {"n_positions", "n_padded_positions"} <= set(metrics) and metrics["n_padded_positions"].notna().any():
        padded = float(metrics["n_padded_positions"].sum())
        return float(metrics["n_positions"].sum()) / padded if padded else None
    if "padding_efficiency" in metrics and metrics["padding_efficiency"].notna().any():
        return float(metrics["padding_efficiency"].mean())
    return None


def padding_figure(metrics: pd.DataFrame, inputs: Inputs) -> dict | None:
    """Per-step padding efficiency with the run's overall value; ``None`` when it was not logged."""
    overall = overall_padding_efficiency(metrics)
    if overall is None or "padding_efficiency" not in metrics:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.0))
    sns.lineplot(data=metrics, x="step", y="padding_efficiency", ax=ax, color="C2", lw=1.2, marker="o", markersize=3)
    ax.axhline(overall, color="black", ls="--", lw=1, label=f"whole run: {overall:.3f}")
    ax.set_ylim(min(0.5, float(metrics["padding_efficiency"].min()) - 0.02), 1.01)
    ax.set(title="Padding efficiency per optimizer step", xlabel="optimizer step", ylabel="real / padded positions")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", frameon=False)
    return {"title": "Padding efficiency", "uri": png_uri(fig),
            "caption": f"{PADDING_NOTE} Batching: {batching(inputs.cfg['train'])}. Whole run: "
                       f"{overall:.3f}. {inputs.caption('metrics')}"}


def codebook_bars(values: dict[str, list], title: str, caption: str) -> dict:
    """One bar panel per metric (metrics have different scales), x = codebook."""
    fig, axes = plt.subplots(1, len(values), figsize=(max(9, 4.6 * len(values)), 3.2), squeeze=False)
    for ax, (name, vals) in zip(axes[0], values.items()):
        df = pd.DataFrame({"codebook": [f"cb{k}" for k in range(len(vals))], "value": vals})
        sns.barplot(data=df, x="codebook", y="value", ax=ax, color="C0")
        ax.bar_label(ax.containers[0], fmt="%.3g", fontsize=8)
        ax.set_ylim(0, max([float(v) for v in vals if v is not None] + [1e-9]) * 1.15)
        ax.set(title=name, xlabel="", ylabel="")
        ax.grid(alpha=0.3, axis="y")
    if len(values) > 1:
        fig.suptitle(title)
    else:
        axes[0][0].set_title(title)
    fig.tight_layout()
    return {"title": title, "uri": png_uri(fig), "caption": caption}


# ----------------------------------------------------------------------------- sections
#: role rows of the learnable-fractions table, in order (audit ROLE_NAMES; "none": tokens before the
#: first header, e.g. <|begin_of_text|>)
ROLE_ORDER = ("system", "user", "assistant", "none")
MODALITY_ORDER = ("text", "audio")


def fractions_table(fractions: dict) -> dict | None:
    """``summary["fractions"]`` as a role × modality table, or ``None`` when it has no ``by_role``.

    Returns ``{"modalities": [...], "rows": [{"role", "cells": [{"positions", "targets",
    "fraction"} per modality] (formatted strings), "learned": bool}], "total": {"role", "cells"}
    (``by_modality``), "target_share": [str per modality]}``.
    """
    by_role = (fractions or {}).get("by_role") or {}
    if not by_role:
        return None
    seen = list(dict.fromkeys(m for per in by_role.values() for m in (per or {})))
    modalities = [m for m in MODALITY_ORDER if m in seen] + [m for m in seen if m not in MODALITY_ORDER]
    roles = [r for r in ROLE_ORDER if r in by_role] + [r for r in by_role if r not in ROLE_ORDER]

    def cell(d: dict | None) -> dict:
        d = d or {}
        return {k: fmt(d.get(k)) for k in ("positions", "targets", "fraction")}

    rows = [{"role": r, "cells": [cell((by_role[r] or {}).get(m)) for m in modalities],
             "learned": any(((by_role[r] or {}).get(m) or {}).get("targets") for m in modalities)} for r in roles]
    by_mod = fractions.get("by_modality") or {}
    share = fractions.get("target_share") or {}
    return {"modalities": modalities, "rows": rows,
            "total": {"role": "all roles", "cells": [cell(by_mod.get(m)) for m in modalities]} if by_mod else None,
            "target_share": [fmt(share.get(m)) for m in modalities] if share else None}


def audit_section(summary: dict, samples: Path | None, inputs: Inputs) -> dict:
    cov = summary.get("codebook_coverage") or []
    sec = {
        "passed": bool(summary.get("passed")),
        "n_samples": summary.get("n_samples"),
        "rules": records(summary.get("rules") or []),
        "failed_rules": [r["name"] for r in summary.get("rules", []) if not r.get("passed", True)],
        "failures": records(summary.get("failures") or []),
        "fractions": fractions_table(summary.get("fractions") or {}),
        "settings": {name: [(k, fmt(v)) for k, v in flatten(summary.get(name) or {})]
                     for name in ("collator_settings", "model_settings", "leak_probe")},
        "figure": codebook_bars({"label coverage": cov}, "Audit: audio-label coverage per codebook",
                                inputs.caption("audit_summary")) if cov else None,
        "caption": inputs.caption("audit_summary"),
        "samples": None,
    }
    if samples is not None:
        sec["samples"] = table(pd.read_parquet(samples))
        sec["samples_caption"] = inputs.caption("audit_samples")
    return sec


def eval_section(metrics: dict, inputs: Inputs) -> dict:
    per_cb = per_codebook(metrics)
    n = max((len(v) for v in per_cb.values()), default=0)
    cb_table = None
    if per_cb:
        df = pd.DataFrame({"codebook": [f"cb{k}" for k in range(n)],
                           **{k: v + [None] * (n - len(v)) for k, v in per_cb.items()}})
        cb_table = table(df)
    caption = inputs.caption("eval_metrics")
    figure = codebook_bars(per_cb, "Eval: per-codebook metrics", caption) if per_cb else None
    return {"groups": eval_groups({"value": metrics}), "per_codebook": cb_table, "figure": figure,
            "caption": caption}


def _cells(positions: list, predicted: list, label: list, text: bool) -> list[dict]:
    """Aligned prediction/label cells; a gap marker where positions jump (first/last-10 windows)."""
    cells, prev = [], None
    for pos, p, lab in zip(positions, predicted, label):
        if prev is not None and pos != prev + 1:
            cells.append({"gap": True})
        prev = pos
        show = (lambda s: repr(str(s))[1:-1].replace(" ", "\u2423")) if text else str
        cells.append({"pos": pos, "pred": show(p), "label": show(lab), "ok": p == lab})
    return cells


def _join(positions: list, tokens: list) -> str:
    """Decoded token strings concatenated, `` … `` where positions skip (first/last-10 windows)."""
    out, prev = [], None
    for pos, tok in zip(positions, tokens):
        if prev is not None and pos != prev + 1:
            out.append(" … ")
        out.append(str(tok))
        prev = pos
    return "".join(out)


def predictions_section(rows: list[dict], inputs: Inputs) -> list[dict]:
    if not rows:
        return []
    rows = sorted(rows, key=lambda r: r.get("step", 0))
    picks = [("latest", rows[-1])] + ([("first", rows[0])] if len(rows) > 1 else [])
    out = []
    for which, r in picks:
        txt = r.get("text") or {}
        out.append({
            "which": which, "step": r.get("step"), "sample_id": r.get("sample_id"),
            "text_acc": fmt(r.get("text_acc")),
            "codebook_acc": [fmt(a) for a in r.get("codebook_acc") or []],
            "text_pred": _join(txt.get("positions", []), txt.get("predicted", [])),
            "text_label": _join(txt.get("positions", []), txt.get("label", [])),
            "text_cells": _cells(txt.get("positions", []), txt.get("predicted", []), txt.get("label", []), True),
            "codebooks": [{"codebook": cb.get("codebook"),
                           "cells": _cells(cb.get("positions", []), cb.get("predicted", []), cb.get("label", []),
                                           False)}
                          for cb in r.get("codebooks") or []],
        })
    return [{"caption": inputs.caption("predictions"), "n_snapshots": len(rows),
             "steps": [r.get("step") for r in rows], "panels": out}]


def manifest_section(fixes: Path | None, quarantine: Path | None, inputs: Inputs) -> dict | None:
    if fixes is None and quarantine is None:
        return None
    sec: dict[str, Any] = {"caption": inputs.caption("fixes", "quarantine")}
    if fixes is not None:
        f = json.loads(fixes.read_text())
        sec["counts"] = [(k, fmt(f.get(k))) for k in ("rows_in", "rows_kept", "rows_quarantined", "rows_train",
                                                       "rows_val", "split_by") if k in f]
        sec["counts"] += [(f"split.{k}", fmt(v)) for k, v in (f.get("split") or {}).items()]
        sec["fixes"] = sorted((f.get("fixes") or {}).items(), key=lambda kv: -kv[1])
        sec["reasons"] = sorted((f.get("reasons") or {}).items(), key=lambda kv: -kv[1])
    if quarantine is not None:
        q = read_jsonl(quarantine)
        sec["quarantine_total"] = len(q)
        sec["quarantine"] = [{"line": r.get("line"), "reason": r.get("reason"), "message": r.get("message"),
                              "row": fmt(r.get("row", r.get("text")))} for r in q[:20]]
    return sec


def _resolve_audio(ref: str | None, audio_dir: Path | None) -> Path | None:
    """An eval audio reference: absolute, or relative to the working directory or the eval audio folder."""
    if not ref:
        return None
    p = Path(ref)
    for cand in [p] if p.is_absolute() else [p] + ([audio_dir / p.name] if audio_dir else []):
        if cand.is_file():
            return cand
    return None


#: per-sample scores shown beside the players, in order (evaluate.py's ``metrics.json["audio"]`` keys)
AUDIO_SCORES = ("language", "hypothesis", "wer", "cer", "sim", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "gt_wer",
                "codec_wer", "gt_cer", "codec_cer", "gt_dnsmos_ovrl", "codec_dnsmos_ovrl", "ended", "hit_max",
                "trailing_silence_s")

#: paired score -> the eval/metrics.json ``generation`` keys of its ground-truth and codec ceilings
CEILINGS = {"err": ("gt_wer", "gt_cer", "codec_wer", "codec_cer"), "sim": ("gt_sim", None, "codec_sim", None),
            "dnsmos_ovrl": ("gt_dnsmos_ovrl", None, "codec_dnsmos_ovrl", None),
            "dnsmos_sig": ("gt_dnsmos_sig", None, "codec_dnsmos_sig", None),
            "dnsmos_bak": ("gt_dnsmos_bak", None, "codec_dnsmos_bak", None)}


def _ceiling(gen: dict, wer_key: str | None, cer_key: str | None) -> str:
    vals = [(m, gen.get(k)) for m, k in (("WER", wer_key), ("CER", cer_key)) if k and gen.get(k) is not None]
    if len(vals) == 1 or (vals and cer_key is None):
        return fmt(vals[0][1])
    return ", ".join(f"{m} {fmt(v)}" for m, v in vals)


def paired_section(summary: dict | None, eval_metrics: dict, base_rows: list[dict], inputs: Inputs) -> dict | None:
    """The report's opening table, base -> fine-tuned: per score (``paired.SCORES``) the base and
    fine-tuned means, the mean paired difference Δ with its bootstrap CI, samples better / worse /
    equal, and the ground-truth and codec ceilings (``eval_metrics["generation"]``); ``None`` without
    a paired summary (eval.generate.n_samples 0). Plus the generation-health rows flagged on either side."""
    if not summary or not summary.get("scores"):
        return None
    from higgs_tune.paired import flagged

    gen = eval_metrics.get("generation") or {}
    rows = []
    for k, s in summary["scores"].items():
        gt_w, gt_c, co_w, co_c = CEILINGS.get(k, (None,) * 4)
        verdict = ""
        if s["delta"] is not None and s["ci_low"] is not None:
            if s["ci_low"] > 0 or s["ci_high"] < 0:
                verdict = "better" if (s["ci_low"] > 0) == s["higher_is_better"] else "worse"
            else:
                verdict = "no clear change"
        rows.append({"score": s["label"] + (" ↓" if not s["higher_is_better"] else " ↑"),
                     "base → fine-tuned": f"{fmt(s['base'])} → {fmt(s['tuned'])}" if s["n"] else "",
                     "Δ": fmt(s["delta"]),
                     f"{round(100 * summary['level'])} % CI": f"[{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]"
                     if s["ci_low"] is not None else "",
                     "verdict": verdict,
                     "better / worse / same": f"{s['better']} / {s['worse']} / {s['same']}", "n": s["n"],
                     "ground truth": _ceiling(gen, gt_w, gt_c), "codec": _ceiling(gen, co_w, co_c)})
    health = [{"side": "fine-tuned", **f} for f in gen.get("flagged") or []] + \
        [{"side": "base", **f} for f in flagged(base_rows)]
    rates = [(f"{name} ({side})", fmt(m.get(name)))
             for side, m in (("fine-tuned", gen), ("base", (summary.get("base_generation") or {})))
             for name in ("eos_rate", "hit_max_rate", "silent_tail_rate") if m.get(name) is not None]
    return {"table": records(rows), "health": records([{**h, "problems": "; ".join(h["problems"])} for h in health]),
            "rates": rates, "n_samples": summary["n_samples"], "n_boot": summary["n_boot"], "seed": summary["seed"],
            "caption": inputs.caption("paired_summary")}


def audio_section(audio_dir: Path | None, eval_metrics: dict, inputs: Inputs,
                  base_rows: list[dict] | None = None, base_audio: Path | None = None) -> list[dict]:
    """Players for eval/metrics.json ``audio`` entries (with the base model's clip of the same prompt,
    from ``base_rows``, when given), then any unlisted WAV of the eval audio folder."""
    entries, seen = [], set()
    base_by_id = {r["id"]: r for r in base_rows or []}
    for i, item in enumerate(eval_metrics.get("audio") or []):
        clips = []
        if item.get("id") in base_by_id:
            path = _resolve_audio(base_by_id[item["id"]].get("generated"), base_audio)
            clips.append(_clip("base model", base_by_id[item["id"]].get("generated"), path,
                               f"base_audio:{item['id']}", inputs))
        for kind in ("generated", "codec", "reference"):
            if kind not in item:
                continue
            path = _resolve_audio(item.get(kind), audio_dir)
            clips.append(_clip(kind, item.get(kind), path, f"audio:{item.get('id', i)}:{kind}", inputs))
            if path:
                seen.add(path.resolve())
        scores = [(k, fmt(item[k])) for k in AUDIO_SCORES if k in item]
        entries.append({"id": item.get("id", i), "text": item.get("text"), "clips": clips, "scores": scores})
    for wav in sorted(audio_dir.glob("*.wav")) if audio_dir and audio_dir.is_dir() else []:
        if wav.resolve() not in seen:
            entries.append({"id": wav.stem, "text": None,
                            "clips": [_clip("generated", str(wav), wav, f"audio:{wav.stem}", inputs)]})
    return entries


def _clip(kind: str, ref: str | None, path: Path | None, role: str, inputs: Inputs) -> dict:
    if path is None:
        return {"kind": kind, "uri": None, "note": f"not produced ({ref})" if ref else "not produced"}
    inputs.add(role, path)
    if path.stat().st_size > MAX_AUDIO_BYTES:
        return {"kind": kind, "uri": None, "note": f"{path} too large to embed"}
    uri = "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode()
    return {"kind": kind, "uri": uri, "note": inputs.caption(role)}


# ------------------------------------------------------------------------- checkpoints compared
#: the scores the checkpoint figure and table show when a selection row has them (plus the selection metric)
CHECKPOINT_SCORES = ("loss", "text_loss", "audio_loss", "generation.wer", "generation.cer", "generation.sim",
                     "generation.dnsmos_ovrl", "generation.eos_rate")


def checkpoints_section(selection: dict | None, inputs: Inputs) -> dict | None:
    """The checkpoint comparison (``eval/selection.json``): the reason the selected step was chosen,
    a table of every scored step (skipped ones with why) and a figure of the val loss and the
    generation scores against step, the selected step marked. ``None`` without a selection."""
    if not selection:
        return None
    rows = selection.get("steps") or []
    metric = selection["metric"]
    shown = [c for c in dict.fromkeys((*CHECKPOINT_SCORES, metric)) if any(c in r for r in rows)]
    table_rows = [{"step": r["step"], "adapter": "final (train/adapter)" if r.get("final") else "snapshot (train/steps)",
                   "selected": "◀ selected" if r["step"] == selection["selected_step"] else "",
                   **{c: r.get(c) for c in shown}, **({"skipped": r["skipped"]} if r.get("skipped") else {})}
                  for r in rows]
    scored = pd.DataFrame([r for r in rows if not r.get("skipped")])
    panels = [p for p in (["loss", "text_loss", "audio_loss"], [metric] if metric not in CHECKPOINT_SCORES[:3] else [],
                          ["generation.wer", "generation.cer"], ["generation.sim", "generation.dnsmos_ovrl"])
              if p and any(c in scored for c in p)]
    figure = None
    if not scored.empty and panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(max(9, 4.4 * len(panels)), 3.4), squeeze=False)
        for ax, cols in zip(axes[0], panels):
            cols = [c for c in cols if c in scored]
            data = melt_scalars(scored, cols)
            sns.lineplot(data=data, x="step", y="value", hue="series", marker="o", ax=ax, lw=1.3)
            ax.axvline(selection["selected_step"], color="black", ls=":", lw=1.2)
            sel = data[data["step"] == selection["selected_step"]]
            ax.scatter(sel["step"], sel["value"], s=140, marker="*", color="black", zorder=5, label="selected")
            ax.set(xlabel="optimizer step", ylabel="", title=" / ".join(cols))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, frameon=False)
        fig.tight_layout()
        figure = {"title": "Checkpoints: val loss and generation scores against step", "uri": png_uri(fig),
                  "caption": inputs.caption("selection") + f" The selected step ({selection['selected_step']}) "
                             "is starred and dotted."}
    return {"reason": selection["reason"], "selected_step": selection["selected_step"], "metric": metric,
            "mode": selection["mode"], "final": selection.get("final"), "table": records(table_rows),
            "figure": figure, "caption": inputs.caption("selection")}


# ----------------------------------------------------------------------------- main
def build_report(cfg: dict, inputs_by_role: dict[str, str], out: str | Path) -> Path:
    """Render the report to ``out`` from the files named in ``inputs_by_role`` (role -> path: the
    report rule's inputs: the data manifest and :data:`higgs_tune.outputs.REPORT_ROLES`; ``adapter``,
    ``audio`` and ``base_audio`` are folders). Each is named by its DVC md5 (:class:`higgs_tune.figures.Inputs`).

    Raises:
        FileNotFoundError: ``metrics``, ``audit_summary`` or ``eval_metrics`` is missing (naming the rule to run).
        ValueError: the metrics file holds no step rows.
    """
    metrics_path = require(inputs_by_role, "metrics")
    audit_path = require(inputs_by_role, "audit_summary")
    eval_path = require(inputs_by_role, "eval_metrics")
    inputs = Inputs(cfg)
    for role in (DATA_MANIFEST_ROLE, *REPORT_ROLES):
        if inputs_by_role.get(role):
            inputs.add(role, Path(inputs_by_role[role]))
    adapter = Path(inputs_by_role["adapter"]) if inputs_by_role.get("adapter") else None
    if adapter and adapter.is_dir():  # each file too (DVC's md5 of it: an entry of the folder's .dir listing)
        for f in sorted(p for p in adapter.rglob("*") if p.is_file()):
            inputs.add(f"adapter:{f.relative_to(adapter)}", f)
    audio_dir = Path(inputs_by_role["audio"]) if inputs_by_role.get("audio") else None
    present = {r: Path(f["path"]) for r, f in inputs.files.items() if f["md5"] and Path(f["path"]).is_file()}

    sns.set_theme(style="whitegrid", context="notebook")
    metrics = pd.DataFrame(read_jsonl(metrics_path))
    val = pd.DataFrame(read_jsonl(present["val_metrics"])) if "val_metrics" in present else pd.DataFrame()
    if metrics.empty or "step" not in metrics:
        raise ValueError(f"{metrics_path} holds no step rows")
    eval_metrics = json.loads(eval_path.read_text())
    state = json.loads(present["train_state"].read_text()) if "train_state" in present else {}
    sources = {"model (config)": cfg["model"].get("source"),
               "audio_tokenizer (config)": cfg["audio_tokenizer"].get("source"),
               "model (train/state.json)": state.get("model_source") or "not recorded",
               "model (eval/metrics.json)": eval_metrics.get("model_source") or "not recorded"}
    random_init = "random_init" in (cfg["model"].get("source"), state.get("model_source"),
                                    eval_metrics.get("model_source"))

    last = metrics.iloc[-1]
    context = {
        "title": cfg["report"]["title"],
        "experiment": cfg["experiment"], "config_hash": inputs.cfg_hash,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "random_init": random_init, "sources": sources,
        "audio_tokenizer_random": cfg["audio_tokenizer"].get("source") == "random_init",
        "headline": [(k, fmt(last.get(k))) for k in ("step", "loss", "text_loss", "audio_loss", "text_acc")
                     if k in metrics] + [("eval " + k, fmt(eval_metrics.get(k)))
                                         for k in ("loss", "text_acc") if k in eval_metrics]
                    + ([("padding efficiency (whole run)", fmt(overall_padding_efficiency(metrics))),
                        ("batching", batching(cfg["train"]))]
                       if overall_padding_efficiency(metrics) is not None else []),
        "train_figures": training_figures(metrics, val, inputs),
        "val_missing": val.empty,
        "checkpoints": checkpoints_section(json.loads(present["selection"].read_text()) if "selection" in present
                                           else None, inputs),
        "audit": audit_section(json.loads(audit_path.read_text()), present.get("audit_samples"), inputs),
        "eval": eval_section(eval_metrics, inputs),
        "paired": paired_section(json.loads(present["paired_summary"].read_text()) if "paired_summary" in present
                                 else eval_metrics.get("paired"), eval_metrics,
                                 read_jsonl(present["base_generated"]) if "base_generated" in present else [], inputs),
        "predictions": predictions_section(read_jsonl(present["predictions"]) if "predictions" in present else [],
                                           inputs),
        "manifest": manifest_section(present.get("fixes"), present.get("quarantine"), inputs),
        "audio": audio_section(audio_dir, eval_metrics, inputs,
                               read_jsonl(present["base_generated"]) if "base_generated" in present else None,
                               Path(inputs_by_role["base_audio"]) if inputs_by_role.get("base_audio") else None),
        "state": [(k, fmt(v)) for k, v in flatten(state)],
        "git": git_revision(), "train_git": state.get("git_revision"),
        "packages": package_versions(),
        "files": list(inputs.files.values()),
        "config_yaml": yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=110),
    }
    write_text(out, render("report.html.j2", context))
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m higgs_tune.report", __doc__.split("\n")[0], outputs={"html": "the HTML file"})
    add_input_roles(parser, help_="input: one of the report rule's inputs, its key (role) and path; repeated")
    args = parser.parse_args(argv)
    out = build_report(config_from_args(args), input_roles(parser, args.input), args.html)
    print(f"report: {out}")


if __name__ == "__main__":
    main()
