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


# ------------------------------------------------------------- what a training run depends on
#: ``train`` keys that steer logging, monitoring and checkpointing, not what is learned: the train rule
#: passes them untracked (a change takes effect the next time training runs; it never reruns a finished
#: train job) and the resume fingerprint ignores them
TRAIN_MONITOR_KEYS = ("log_interval", "eval_interval", "predictions_interval", "save_interval", "keep_checkpoints",
                      "resume_dir", "stop_margin_s", "val_samples")
#: ``eval`` keys the trainer reads: the batch size of its in-training val pass (monitoring, untracked)
EVAL_KEYS_IN_TRAINING = ("batch_size",)
#: ``train`` keys that set how long the run is: a change reruns the train job, which continues from
#: the latest checkpoint (the resume fingerprint ignores them; the LR schedule is re-planned; ``patience``:
#: early stopping, whose counter the checkpoint carries)
TRAIN_LENGTH_KEYS = ("max_steps", "epochs", "patience")
#: ``train`` keys that check a run without changing it (a change reruns the job, never resets it)
TRAIN_CHECK_KEYS = ("alarms", "processes")


def train_job_config(cfg: dict) -> tuple[dict, dict]:
    """The train job's config, split in two: ``(tracked, monitor)``.

    ``tracked``: ``model``, ``lora`` and ``train`` without :data:`TRAIN_MONITOR_KEYS` (the train
    rule's ``params.cfg``: a change reruns the job). ``monitor``: ``{"train": {monitor keys},
    "eval": {EVAL_KEYS_IN_TRAINING}}`` (passed untracked). ``deep_merge(tracked, monitor)`` is the
    config the trainer runs on.
    """
    tracked = {k: copy.deepcopy(cfg.get(k)) for k in ("model", "lora", "train")}
    train = tracked["train"] or {}
    monitor = {"train": {k: train.pop(k) for k in TRAIN_MONITOR_KEYS if k in train},
               "eval": {k: cfg["eval"][k] for k in EVAL_KEYS_IN_TRAINING}}
    return tracked, monitor


def trajectory_config(cfg: dict) -> dict:
    """What identifies a training trajectory in ``cfg``: ``model``, ``lora`` and the optimization keys
    of ``train`` (all but :data:`TRAIN_MONITOR_KEYS`, :data:`TRAIN_LENGTH_KEYS` and
    :data:`TRAIN_CHECK_KEYS`). Part of the resume fingerprint."""
    tracked, _ = train_job_config(cfg)
    for k in TRAIN_LENGTH_KEYS + TRAIN_CHECK_KEYS:
        tracked["train"].pop(k, None)
    return tracked
