"""Sweeps: several experiments declared in one config, and what differs between them.

A config may declare ``sweep: {name, runs: {run: overlay}}``. :func:`experiment_configs` resolves
it into one experiment per run, named ``{experiment}-{run}``: the config with that run's overlay
deep-merged in (what ``workflow/rules/common.smk`` resolves per ``{experiment}`` wildcard; the
``compare`` rule compares the runs). No stage imports this module: declaring a sweep changes no
stage's code signature.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .config import deep_merge, validate

#: keys a sweep run's overlay may not set: the run's name is derived, all runs share one results
#: folder (the comparison reads across them), and a run is not a sweep.
SWEEP_FIXED_KEYS = ("experiment", "results_dir", "sweep")


def experiment_configs(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every experiment a validated config declares, ``{name: resolved config}``, base first.

    The base experiment is ``cfg`` itself (named ``cfg["experiment"]``), without its ``sweep`` key.
    Each run of ``cfg["sweep"]["runs"]`` adds ``f"{experiment}-{run}"``: the base deep-merged with
    the run's overlay (:func:`deep_merge`: lists are replaced), renamed, validated and filled with
    defaults. Without a sweep the result is ``{cfg["experiment"]: cfg}``.

    Raises:
        ValueError: a run's overlay sets one of :data:`SWEEP_FIXED_KEYS`.
        snakemake.exceptions.WorkflowError: a run's merged config fails the schema (the message
            names the run and the key).
    """
    base = {k: copy.deepcopy(v) for k, v in cfg.items() if k != "sweep"}
    out = {base["experiment"]: base}
    sweep = cfg.get("sweep") or {}
    for run, overlay in (sweep.get("runs") or {}).items():
        fixed = sorted(set(overlay or {}) & set(SWEEP_FIXED_KEYS))
        if fixed:
            raise ValueError(f"sweep {sweep.get('name')!r} run {run!r} sets {fixed}: a run's overlay may not set "
                             f"{list(SWEEP_FIXED_KEYS)} (the run is named {base['experiment']}-{run})")
        name = f"{base['experiment']}-{run}"
        run_cfg = deep_merge(base, overlay or {})
        run_cfg["experiment"] = name
        try:
            out[name] = validate(run_cfg)
        except Exception as exc:  # snakemake's WorkflowError: say which run
            raise type(exc)(f"sweep {sweep.get('name')!r} run {run!r}: {exc}") from exc
    return out


def sweep_experiments(cfg: dict[str, Any]) -> list[str]:
    """The experiments a config asks to run: one per ``sweep`` run (in declared order), else the base."""
    names = list(experiment_configs(cfg))
    return names[1:] if cfg.get("sweep") else names


def config_diff(configs: dict[str, dict[str, Any]], ignore: tuple[str, ...] = ("experiment",)) -> list[dict]:
    """The keys whose values differ between ``configs`` (``{name: config}``), as rows
    ``{"key": "train.learning_rate", "values": {name: value or MISSING}}``, in key order.

    Nested dicts are compared key by key (dotted keys); lists and scalars as wholes. A key absent
    from some configs differs (its value there is :data:`MISSING`); ``ignore`` lists dotted keys
    (or their prefixes) left out.
    """
    flat = {name: dict(_flat(cfg)) for name, cfg in configs.items()}
    keys = sorted(set().union(*flat.values())) if flat else []
    rows = []
    for key in keys:
        if any(key == i or key.startswith(i + ".") for i in ignore):
            continue
        values = {name: f.get(key, MISSING) for name, f in flat.items()}
        distinct = {"\0missing" if v is MISSING else json.dumps(v, sort_keys=True, default=str)
                    for v in values.values()}
        if len(distinct) > 1:
            rows.append({"key": key, "values": values})
    return rows


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"

    def __str__(self) -> str:
        return "(not set)"


#: a config key that one experiment lacks (see :func:`config_diff`)
MISSING: Any = _Missing()


def _flat(d: dict, prefix: str = ""):
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            yield from _flat(value, name)
        else:
            yield name, value
