"""Figure and table helpers shared by the report (:mod:`higgs_tune.report`) and the comparison
(:mod:`higgs_tune.compare`): cells, inputs named by their DVC hash, eval score tables, long-form
curves for seaborn, PNG data URIs and the HTML templates (``workflow/report/``).
"""

from __future__ import annotations

import base64
import io
import json
import math
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from jinja2 import Environment, FileSystemLoader  # noqa: E402

from higgs_tune.fileio import SHORT_HASH, canonical_sha256, dvc_md5  # noqa: E402
from higgs_tune.outputs import BY_ROLE, DATA_MANIFEST_ROLE, producer  # noqa: E402

#: the HTML templates (Jinja2) of the report and the comparison
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "report"
#: distributions whose versions the pages list
PACKAGES = ["torch", "transformers", "peft", "boson-multimodal", "pandas", "seaborn", "matplotlib"]


def config_hash(cfg: dict) -> str:
    """The first :data:`~higgs_tune.fileio.SHORT_HASH` hex digits of the sha256 of ``cfg`` as canonical JSON
    (:func:`higgs_tune.fileio.canonical_sha256`)."""
    return canonical_sha256(cfg, SHORT_HASH)


def require(inputs: dict[str, str], role: str) -> Path:
    """The path of input ``role``.

    Raises:
        FileNotFoundError: naming the file and the Snakemake rule that writes it
            (:func:`higgs_tune.outputs.producer`), when it is absent.
    """
    path = Path(inputs[role]) if inputs.get(role) else None
    if path is None or not path.exists():
        rule = producer(role) if role in BY_ROLE or role == DATA_MANIFEST_ROLE else role
        raise FileNotFoundError(
            f"{path or role} is missing: it is written by the '{rule}' rule; run the workflow "
            f"(snakemake --profile profiles/default --configfile YOUR.yaml), which runs '{rule}' first")
    return path


def fmt(value: Any) -> str:
    """One table cell: floats to 4 significant digits, containers as compact (truncated) JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if hasattr(value, "tolist"):  # numpy scalars / arrays from parquet
        value = value.tolist()
        if isinstance(value, float):
            return fmt(value)
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
        return text if len(text) <= 160 else text[:157] + "..."
    return str(value)


def flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ``[(dotted key, leaf value)]`` in order (``{"a": {"b": 1}}`` -> ``[("a.b", 1)]``)."""
    out: list[tuple[str, Any]] = []
    for key, value in (d or {}).items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.extend(flatten(value, name))
        else:
            out.append((name, value))
    return out


def package_versions() -> dict[str, str]:
    """``{distribution: version}`` of :data:`PACKAGES` (``"not installed"`` for an absent one)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class Inputs:
    """The input files and folders a page read, each named by the hash DVC records for it.

    ``files``: role -> ``{"role", "path", "bytes", "md5", "nfiles"}``: ``md5`` is
    :func:`higgs_tune.fileio.dvc_md5` (a file: the md5 of its bytes; a folder: ``<md5>.dir``, as in
    ``dvc.lock``); ``bytes``/``md5``/``nfiles`` are ``None`` for a path that does not exist.
    """

    def __init__(self, cfg: dict):
        self.exp, self.cfg_hash, self.files = cfg["experiment"], config_hash(cfg), {}
        self.cfg = cfg

    def add(self, role: str, path: str | Path) -> Path | None:
        """Record ``path`` (a file or a folder) as input ``role``; the path if it exists, else ``None``."""
        path = Path(path)
        if path.exists():
            h = dvc_md5(path)
            self.files[role] = {"role": role, "path": str(path), "bytes": h["size"], "md5": h["md5"],
                                "nfiles": h.get("nfiles")}
            return path
        self.files[role] = {"role": role, "path": str(path), "bytes": None, "md5": None, "nfiles": None}
        return None

    def caption(self, *roles: str) -> str:
        """``Source: <path> (md5 <hash>); ... Experiment '<name>', config hash <hash>.``: the recorded
        ``roles`` that exist, each with its full DVC md5 (find it in ``dvc.lock``)."""
        used = [self.files[r] for r in roles if self.files.get(r, {}).get("md5")]
        src = "; ".join(f"{f['path']} (md5 {f['md5']})" for f in used)
        return f"Source: {src}. Experiment '{self.exp}', config hash {self.cfg_hash}."


def render(template: str, context: dict) -> str:
    """Render ``workflow/report/<template>`` with ``context``; every value is HTML-escaped
    (autoescape), so text from data (transcripts, hypotheses, config) shows as text."""
    env = Environment(loader=FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template(template).render(**context)


# ----------------------------------------------------------------------------- plots
def png_uri(fig) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def melt_lists(df: pd.DataFrame, column: str, prefix: str) -> pd.DataFrame:
    """A list column of ``df`` (one value per codebook, per row; rows have ``step``) as long rows
    ``step, series, value`` with series ``<prefix><index>`` (``cb0``...); empty (those columns) when
    the column is absent or all null."""
    if column not in df or df[column].isna().all():
        return pd.DataFrame(columns=["step", "series", "value"])
    rows = [{"step": s, "series": f"{prefix}{k}", "value": v}
            for s, vals in zip(df["step"], df[column]) if isinstance(vals, list) for k, v in enumerate(vals)]
    return pd.DataFrame(rows)


def melt_scalars(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The scalar ``columns`` of ``df`` (those present; rows have ``step``) as long rows ``step, series,
    value`` (series: the column name), nulls dropped; empty (those columns) when none is present."""
    cols = [c for c in columns if c in df]
    if df.empty or not cols:
        return pd.DataFrame(columns=["step", "series", "value"])
    return df.melt(id_vars="step", value_vars=cols, var_name="series", value_name="value").dropna()


#: eval score groups, in table order
EVAL_GROUPS = ("losses", "accuracies", "generation", "calibration", "counts and run")
#: what an eval/metrics.json key means (shown beside its value)
EVAL_HELP = {
    "loss": "text_weight × text CE + audio_weight × audio CE (held-out, teacher-forced)",
    "text_loss": "text cross-entropy per text target", "audio_loss": "mean of the per-codebook audio CE",
    "text_acc": "teacher-forced top-1 accuracy of text targets",
    "generation.wer": "ASR word error rate of the generated audio against the text (corpus)",
    "generation.sim": "speaker similarity of the generated audio to the speaker's real audio (mean)",
    "generation.eos_rate": "share of generations the model ended itself (EOS)",
    "generation.voiced_rate": "share of generations with voiced audio (SIM defined)",
    "generation.n_samples": "generated samples",
    "generation.gt_wer": "WER of the real clips: the ASR's own error",
    "generation.codec_wer": "WER of the real clips' codes decoded: what the audio tokenizer allows",
    "generation.gt_sim": "SIM of the real clip to its cloning reference",
    "generation.codec_sim": "SIM of the decoded codes to the real audio",
    "generation.asr_model": "the ASR scoring WER", "generation.speaker_model": "the speaker encoder scoring SIM",
    "generation.cer": "ASR character error rate (corpus) of the rows in languages written without spaces",
    "generation.hit_max_rate": "share of generations cut at eval.generate.max_seconds without EOS",
    "generation.silent_tail_rate": "share of generations ending in at least 1 s of silence",
    "generation.trailing_silence_s": "mean seconds of silence at the end of a generation",
    "generation.asr_multilingual": "the ASR model transcribes languages other than English",
    "paired.scores.err.delta": "mean paired difference fine-tuned − base of WER/CER (see the opening table)",
}


def eval_group(key: str) -> str:
    """The :data:`EVAL_GROUPS` entry of a dotted eval/metrics.json key."""
    leaf = key.rsplit(".", 1)[-1]
    if key.startswith("generation."):
        return "calibration" if leaf.startswith(("gt_", "codec_")) or leaf.endswith("_model") else "generation"
    if "loss" in leaf:
        return "losses"
    if leaf.endswith("acc"):
        return "accuracies"
    return "counts and run"


def eval_scalars(metrics: dict) -> dict[str, Any]:
    """The scalar scores of eval/metrics.json as ``{dotted key: value}`` (lists of numbers, e.g.
    per-codebook scores, and the ``audio`` players are left out)."""
    out = {}
    for key, value in flatten({k: v for k, v in (metrics or {}).items() if k != "audio"}):
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            continue
        out[key] = value
    return out


def eval_groups(columns: dict[str, dict]) -> list[dict]:
    """Eval scores grouped (:data:`EVAL_GROUPS`) for a table with one value column per entry of
    ``columns`` (``{column name: eval/metrics.json}``; one column for a report, one per run for a
    comparison). Returns ``[{"group", "rows": [{"key", "values": [str per column], "help",
    "differs"}]}]``, empty groups left out."""
    scal = {name: eval_scalars(m) for name, m in columns.items()}
    keys = list(dict.fromkeys(k for s in scal.values() for k in s))
    groups = []
    for g in EVAL_GROUPS:
        rows = []
        for k in (k for k in keys if eval_group(k) == g):
            vals = [fmt(scal[name].get(k)) for name in columns]
            rows.append({"key": k, "values": vals, "help": EVAL_HELP.get(k, ""), "differs": len(set(vals)) > 1})
        if rows:
            groups.append({"group": g, "rows": rows})
    return groups


def per_codebook(metrics: dict) -> dict[str, list]:
    """The per-codebook score lists of eval/metrics.json (top-level lists of numbers), by key."""
    return {k: v for k, v in (metrics or {}).items()
            if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v)}
