"""Which checkpoint to ship: the scored steps compared on one metric (``eval.select``).

CLI (rule ``select``, ``workflow/rules/evaluate.smk``): ``python -m higgs_tune.select --config-json
JSON --final eval/metrics.json --state train/state.json [--steps eval/steps/N/metrics.json ...]
--out eval/selection.json``. The final adapter's scores (``evaluate``) are the row of the run's last
step (``state.json["step"]``); each ``--steps`` file is one ``evaluate_step`` job's metrics (``"step"``
in it; ``"skipped"``: that step's snapshot was never saved, the row is listed and not ranked).

``eval/selection.json``::

    {"metric": "loss", "mode": "min", "selected_step": 4, "final": false, "value": 2.31,
     "reason": "lowest val loss (2.31) of 3 checkpoints: steps 2, 4, 6",
     "steps": [{"step": 2, "final": false, "loss": ..., "generation.wer": ..., ...}, ...]}

``final``: whether the selected step is the final adapter (``train/adapter``) rather than a snapshot
(``train/steps/step-XXXXXXXX``). The export merges the selected one.

The steps scored are resolved when the workflow is planned (:func:`checkpoint_steps`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .config import config_from_args
from .fileio import write_json
from .stage_cli import stage_parser

log = logging.getLogger("higgs_tune.select")

#: numbers in metrics.json that count things rather than score the model: never a row's score
NOT_SCORES = frozenset({"step", "elapsed_s", "n_samples", "n_text_targets", "n_audio_targets"})
#: what the reason calls a metric (the rest by their key)
METRIC_NAMES = {"loss": "val loss", "text_loss": "val text loss", "audio_loss": "val audio loss"}


class SelectionError(ValueError):
    """The selection cannot be made as configured (the message names the key and what to do)."""


# --------------------------------------------------------------------------- which steps (DAG time)
def checkpoint_steps(cfg: dict) -> list[int]:
    """The steps ``evaluate_step`` scores for the resolved config ``cfg`` (``eval.checkpoints``),
    ascending, without the run's last step (the final adapter, scored by ``evaluate``).

    ``null``: none. ``"every"``: each multiple of ``train.save_interval`` below ``train.max_steps``.
    A list: its steps, each a save step of the config (a multiple of ``train.save_interval``, or
    ``train.max_steps``).

    Raises:
        SelectionError: ``"every"`` without ``train.max_steps`` (a run sized by ``train.epochs`` has
            its number of steps only once training starts); a listed step that is not a save step,
            or past ``train.max_steps``.
    """
    want = cfg["eval"]["checkpoints"]
    tc = cfg["train"]
    every, max_steps = int(tc["save_interval"]), tc["max_steps"]
    if want is None:
        return []
    if want == "every":
        if max_steps is None:
            raise SelectionError(
                "eval.checkpoints: every needs train.max_steps (the run's length is known when the workflow is "
                "planned only from max_steps, not from train.epochs): set train.max_steps, or list the steps "
                f"(multiples of train.save_interval = {every})")
        return list(range(every, int(max_steps), every))
    bad = [s for s in want if s % every and s != max_steps]
    if bad:
        raise SelectionError(
            f"eval.checkpoints lists step(s) {bad} that are not save steps: adapter snapshots are written every "
            f"train.save_interval = {every} steps and at train.max_steps ({max_steps}); list multiples of {every}")
    late = [s for s in want if max_steps is not None and s > max_steps]
    if late:
        raise SelectionError(f"eval.checkpoints lists step(s) {late} past train.max_steps ({max_steps}): the run "
                             "never gets there; drop them or raise train.max_steps")
    return sorted(s for s in want if s != max_steps)


# ----------------------------------------------------------------------------------- the choice
def scores(metrics: dict) -> dict[str, float]:
    """The numbers of one ``metrics.json`` a checkpoint can be selected by: its top-level numbers
    (``loss``, ``text_loss``, ``audio_loss``, ``text_acc``) and those of its ``generation`` section as
    ``generation.<key>`` (``generation.wer``, ``generation.sim``, ``generation.dnsmos_ovrl``, ...); not
    :data:`NOT_SCORES`, not lists, ``None`` or booleans."""
    out: dict[str, float] = {}
    for prefix, d in (("", metrics), ("generation.", metrics.get("generation") or {})):
        for k, v in d.items():
            if k not in NOT_SCORES and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[prefix + k] = float(v)
    return out


def select(rows: list[dict], metric: str, mode: str) -> dict[str, Any]:
    """Pick the checkpoint to ship from ``rows`` (one per scored step: ``{"step": int, "final": bool,
    "metrics": metrics.json's dict}``, or ``"skipped": reason`` instead of ``metrics``).

    The step whose ``metric`` (a key of :func:`scores`) is lowest (``mode`` ``"min"``) or highest
    (``"max"``) wins; on a tie the earliest step (the cheaper, less trained checkpoint). Skipped
    rows are listed and not ranked. Returns the ``selection.json`` dict (module docstring).

    Raises:
        SelectionError: ``mode`` is neither min nor max; no row is scored; ``metric`` is not a
            number in a scored row (the message lists the keys that are).
    """
    if mode not in ("min", "max"):
        raise SelectionError(f"eval.select.mode is {mode!r}: use min or max")
    rows = sorted(rows, key=lambda r: (r["step"], r.get("final", False)))
    scored = [r for r in rows if not r.get("skipped")]
    if not scored:
        raise SelectionError("no checkpoint was scored (every step skipped): nothing to select")
    table = []
    for r in rows:
        entry: dict[str, Any] = {"step": int(r["step"]), "final": bool(r.get("final", False))}
        if r.get("skipped"):
            entry["skipped"] = r["skipped"]
        else:
            s = scores(r["metrics"])
            if metric not in s or not math.isfinite(s[metric]):
                raise SelectionError(
                    f"eval.select.metric {metric!r} is not a number in the metrics of step {r['step']}; the keys "
                    f"that are: {', '.join(sorted(s))} (a generation score needs eval.generate.n_samples > 0)")
            entry.update(s)
        table.append(entry)
    ranked = [e for e in table if "skipped" not in e]
    sign = 1.0 if mode == "min" else -1.0
    best = min(ranked, key=lambda e: (sign * e[metric], e["step"]))  # ties: the earliest step
    name = METRIC_NAMES.get(metric, metric)
    steps = ", ".join(str(e["step"]) for e in ranked)
    reason = (f"{'lowest' if mode == 'min' else 'highest'} {name} ({best[metric]:.4g}) of {len(ranked)} "
              f"checkpoint{'s' if len(ranked) != 1 else ''}: step{'s' if len(ranked) != 1 else ''} {steps}")
    skipped = [e for e in table if "skipped" in e]
    if skipped:
        reason += "; skipped: " + "; ".join(f"step {e['step']} ({e['skipped']})" for e in skipped)
    return {"metric": metric, "mode": mode, "selected_step": best["step"], "final": best["final"],
            "value": best[metric], "reason": reason, "steps": table}


def selection_rows(final_metrics: dict, state: dict, step_metrics: list[dict]) -> list[dict]:
    """The rows :func:`select` ranks: the final adapter's (``evaluate``'s metrics; its step is
    ``state["step"]``, the run's last, also when it stopped early) and each ``evaluate_step`` job's,
    but a step job of the final step (its row is the final one)."""
    last = int(state["step"])
    rows = [{"step": last, "final": True, "metrics": final_metrics}]
    for m in step_metrics:
        if int(m["step"]) == last:
            continue
        rows.append({"step": int(m["step"]), "final": False, **({"skipped": m["skipped"]} if m.get("skipped")
                                                              else {"metrics": m})})
    return rows


def adapter_of(selection: dict, adapter: str | Path, steps: str | Path) -> Path:
    """The adapter folder of the selected checkpoint: ``adapter`` (the final one) when
    ``selection["final"]``, else ``steps/step-XXXXXXXX``.

    Raises:
        FileNotFoundError: that snapshot folder is missing.
    """
    if selection["final"]:
        return Path(adapter)
    path = Path(steps) / f"step-{int(selection['selected_step']):08d}"
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: the selected step's adapter snapshot is missing; rerun the train stage")
    return path


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = stage_parser("python -m higgs_tune.select", __doc__.splitlines()[0],
                          inputs={"final": "the final adapter's eval/metrics.json",
                                  "state": "train/state.json (the run's last step)",
                                  "steps": {"nargs": "*", "default": [], "required": False,
                                            "help": "each evaluate_step job's metrics.json"}},
                          outputs={"selection": "eval/selection.json"})
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    rows = selection_rows(json.loads(Path(args.final).read_text()), json.loads(Path(args.state).read_text()),
                          [json.loads(Path(p).read_text()) for p in args.steps])
    try:
        out = select(rows, cfg["eval"]["select"]["metric"], cfg["eval"]["select"]["mode"])
    except SelectionError as exc:
        raise SystemExit(f"select: {exc}") from exc
    write_json(args.selection, out)
    log.info("selected step %d: %s", out["selected_step"], out["reason"])


if __name__ == "__main__":
    main()
