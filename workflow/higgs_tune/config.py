"""Load, merge and validate higgs-tune configs.

``snakemake --configfile A B`` and :func:`load_config` resolve the same dict: later files
override earlier ones key by key, then ``workflow/schemas/config.schema.yaml`` validates it and fills
defaults. Paths are not here: the Snakemake rules own every path and pass them to the stages.
"""

from __future__ import annotations

import copy
import json
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
    """``--config-json`` (what a Snakemake rule passes: the config sections the stage reads, already
    validated) and ``--configfile`` (repeatable; for running a stage by hand) options."""
    parser.add_argument("--config-json", default=None,
                        help="the config sections this stage reads, as JSON (rendered by the Snakemake rule)")
    parser.add_argument("--configfile", action="append", default=[],
                        help="YAML config, validated against the schema; later files override")


def config_from_args(args) -> dict[str, Any]:
    """The config named by :func:`add_config_args` options.

    ``--config-json`` is taken as it is (the Snakefile validated the merged config and filled its
    defaults before rendering the sections); ``--configfile`` files are merged and validated.

    Raises:
        SystemExit: when neither is given.
        snakemake.exceptions.WorkflowError: a config file that fails the schema, naming the key.
    """
    if args.config_json:
        return json.loads(args.config_json)
    if not args.configfile:
        raise SystemExit("give --config-json JSON or --configfile FILE (e.g. config/demo.yaml)")
    return load_config(args.configfile)
