"""Load, merge and validate higgs-tune configs; the output paths every stage agrees on.

``snakemake --configfile A --configfile B``, ``dvc repro`` and ``python -m higgs_tune.<stage>
--configfile A --configfile B`` all resolve the same dict: later files override earlier ones key by
key, then ``workflow/schemas/config.schema.yaml`` validates it and fills defaults.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import yaml

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``, recursing into dicts (lists are replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(cfg: dict) -> dict:
    """Validate against the schema and fill defaults in place (snakemake's validator).

    Raises:
        snakemake.exceptions.WorkflowError: naming the offending key.
    """
    from snakemake.utils import validate as sm_validate

    sm_validate(cfg, str(SCHEMA), set_default=True)
    return cfg


def load_config(files: list[str | Path] | None = None, as_json: str | None = None) -> dict[str, Any]:
    """Merge YAML ``files`` in order (or parse ``as_json``), validate, fill defaults."""
    cfg: dict = json.loads(as_json) if as_json else {}
    for f in files or []:
        with open(f) as fh:
            cfg = deep_merge(cfg, yaml.safe_load(fh) or {})
    return validate(cfg)


def add_config_args(parser) -> None:
    """``--configfile`` (repeatable) and ``--config-json`` options for a stage's CLI."""
    parser.add_argument("--configfile", action="append", default=[], help="YAML config; later files override")
    parser.add_argument("--config-json", default=None, help="the whole config as JSON (used by Snakemake)")


ENV_VAR = "HIGGS_TUNE_CONFIG_JSON"


def config_from_args(args) -> dict[str, Any]:
    """The validated config named by :func:`add_config_args` options.

    Without options, the JSON in the ``HIGGS_TUNE_CONFIG_JSON`` environment variable (set by the
    Snakefile to Snakemake's merged config) is used.

    Raises:
        SystemExit: when no config is given at all.
    """
    as_json = args.config_json or (None if args.configfile else os.environ.get(ENV_VAR))
    if not args.configfile and not as_json:
        raise SystemExit("give --configfile FILE (e.g. config/demo.yaml), --config-json, or set " + ENV_VAR)
    return load_config(args.configfile, as_json)


class Paths:
    """Every output path of one experiment (the output contract in README.md).

    ``results/{experiment}/``: ``manifest/{train,val,quarantine}.jsonl``, ``manifest/fixes.json``,
    ``tokens/index.parquet``, ``audit/summary.json``, ``audit/samples.parquet``,
    ``train/metrics.jsonl``, ``train/predictions.jsonl``, ``train/adapter/``, ``train/state.json``,
    ``eval/metrics.json``, ``report.html``. The code cache lives in ``cache_dir`` (shared).
    """

    def __init__(self, cfg: dict[str, Any]):
        self.root = Path(cfg.get("results_dir", "results")) / cfg["experiment"]
        self.cache = Path(cfg.get("cache_dir", ".cache/higgs-tune"))
        m = self.root / "manifest"
        self.train_manifest, self.val_manifest = m / "train.jsonl", m / "val.jsonl"
        self.quarantine, self.fixes = m / "quarantine.jsonl", m / "fixes.json"
        self.tokens_index = self.root / "tokens" / "index.parquet"
        self.audit_summary, self.audit_samples = self.root / "audit" / "summary.json", self.root / "audit" / "samples.parquet"
        t = self.root / "train"
        self.train_dir, self.metrics, self.predictions = t, t / "metrics.jsonl", t / "predictions.jsonl"
        self.adapter, self.train_state, self.tensorboard = t / "adapter", t / "state.json", t / "tensorboard"
        self.eval_metrics = self.root / "eval" / "metrics.json"
        self.eval_generated, self.eval_audio = self.root / "eval" / "generated.jsonl", self.root / "eval" / "audio"
        self.report = self.root / "report.html"
        self.logs = self.root / "logs"
