"""The audit's outputs: the ``summary.json`` document, the per-sample table, writing both, and the
terminal report."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import SCHEMA
from ..fileio import atomic_file, write_json
from .checks import BatchResult
from .expect import NO_ROLE, ROLE_NAMES, jsonable
from .rules import RULES, Failure, scope_of

#: Rules whose threshold is ``audit.leak_tolerance``.
_TOLERANCE_RULES = ("probe_text_no_leak", "probe_text_next_token", "probe_audio_no_leak", "probe_audio_next_code",
                    "probe_causal_logits")
_MODEL_KEYS = ("use_delay_pattern", "audio_num_codebooks", "audio_codebook_size", "audio_stream_bos_id",
               "audio_stream_eos_id", "audio_in_token_idx", "audio_out_token_idx", "pad_token_id",
               "encode_whisper_embed", "encode_audio_in_tokens", "skip_audio_tower", "audio_adapter_type")


@functools.lru_cache(maxsize=1)
def audit_keys() -> tuple[str, ...]:
    """The ``audit:`` keys of ``workflow/schemas/config.schema.yaml`` (where their defaults live), in order."""
    with open(SCHEMA, encoding="utf-8") as f:
        return tuple(yaml.safe_load(f)["properties"]["audit"]["properties"])


def model_settings(model_config) -> dict[str, Any]:
    """The ``HiggsAudioConfig`` fields the tensors depend on (JSON-able; ``None`` for a missing field)."""
    return {k: jsonable(getattr(model_config, k, None)) for k in _MODEL_KEYS}


def sample_table(ids: list[str], split: list[str], per_sample: list[dict[str, Any]], columns: list[str],
                 failures: list[Failure]) -> dict[str, list]:
    """The ``samples.parquet`` columns: ``id``, ``split``, ``passed``, ``n_failures``, ``failed_rules``
    (comma-separated, sorted), then ``columns`` from :func:`~higgs_tune.audit.checks.sample_rows`
    (``None`` for a sample that was not checked)."""
    by_sample: dict[str, list[str]] = {}
    for f in failures:
        by_sample.setdefault(f.sample_id, []).append(f.rule)
    table: dict[str, list] = {c: [] for c in ("id", "split", "passed", "n_failures", "failed_rules", *columns)}
    for sid, sp, row in zip(ids, split, per_sample):
        rules_i = sorted(set(by_sample.get(sid, [])))
        table["id"].append(sid)
        table["split"].append(sp)
        table["passed"].append(not rules_i)
        table["n_failures"].append(len(by_sample.get(sid, [])))
        table["failed_rules"].append(",".join(rules_i))
        for c in columns:
            table[c].append(row.get(c))
    return table


def _rule_entries(n_by_rule: dict[str, int], acfg: dict[str, Any], probe_info: dict[str, Any]) -> list[dict]:
    """``summary["rules"]``: one entry per rule of :data:`RULES`, in order."""
    thresholds = {"masked_fraction": acfg["max_masked_fraction"], "codebook_coverage": acfg["min_audio_label_coverage"],
                  **{r: acfg["leak_tolerance"] for r in _TOLERANCE_RULES}}
    evaluated = set(probe_info.get("evaluated", []))
    rules = []
    for name, (desc, _) in RULES.items():
        scope, n = scope_of(name), n_by_rule.get(name, 0)
        entry = {"name": name, "passed": n == 0, "n_failed": n, "description": desc, "scope": scope}
        if name in thresholds:
            entry["threshold"] = thresholds[name]
        if scope == "probe" and name not in evaluated and not n:
            entry["evaluated"] = False
            entry["note"] = "leak probe disabled" if not probe_info.get("enabled") else "not reached"
        rules.append(entry)
    return rules


def _fraction(pos: int, tgt: int) -> dict[str, Any]:
    return {"positions": int(pos), "targets": int(tgt), "fraction": (tgt / pos) if pos else 0.0}


def _fractions(results: list[BatchResult]) -> dict[str, Any]:
    """``summary["fractions"]``: positions and targets by role and by modality, and the target shares."""
    zero = torch.zeros(NO_ROLE + 1, 2, dtype=torch.long)
    role_text = sum((r.role_text for r in results), zero)
    role_audio = sum((r.role_audio for r in results), zero)
    by_role = {name: {"text": _fraction(*role_text[rc].tolist()), "audio": _fraction(*role_audio[rc].tolist())}
               for rc, name in enumerate(ROLE_NAMES)}
    tt, at = role_text.sum(0).tolist(), role_audio.sum(0).tolist()
    n_tgt = tt[1] + at[1]
    return {"by_role": by_role, "by_modality": {"text": _fraction(*tt), "audio": _fraction(*at)},
            "target_share": {"text": tt[1] / n_tgt if n_tgt else 0.0, "audio": at[1] / n_tgt if n_tgt else 0.0}}


def build_summary(*, failures: list[Failure], acfg: dict[str, Any], K: int, split: list[str],
                  per_sample: list[dict[str, Any]], table: dict[str, list], results: list[BatchResult],
                  n_checked: int, coverage: list[float], collator_info: dict[str, Any], model_config,
                  probe_info: dict[str, Any], timing: dict[str, Any], inputs: dict[str, str]) -> dict[str, Any]:
    """The ``summary.json`` document.

    Keys: ``passed`` (bool, the gate: no failure at all); ``n_samples``, ``n_samples_checked``,
    ``n_samples_by_split``, ``n_samples_failed``; ``rules`` [{``name``, ``passed``, ``n_failed``,
    ``description``, ``scope`` (sample | aggregate | probe), ``threshold``?, ``evaluated``/``note``
    for probe rules that did not run}]; ``failures`` [{``rule``, ``sample_id`` ("*" for batch-,
    aggregate- and probe-level), ``message``, ``likely_cause``}] (at most ``max_failures_per_rule``
    per rule; ``n_failures`` counts all, ``failures_not_listed`` the rest); ``fractions``
    {``by_role``: {system|user|assistant|none: {text|audio: {positions, targets, fraction}}},
    ``by_modality``: {text|audio: {...}}, ``target_share``: {text, audio}}; ``codebook_coverage``
    (K floats); ``target_counts`` {text, audio, audio_per_codebook} (the train-time normalizer);
    ``masked_fraction`` {max, mean}; ``collator_settings`` {actual, expected, mismatches};
    ``model_settings``; ``leak_probe`` {enabled, passed, batch_size, sample_ids, tolerance, wiring,
    model, dtype, expanded_length, audio_rows, evaluated, checks [...], text [...], audio [...]};
    ``timing`` (seconds; ``tensor_checks_samples_per_s``); ``config`` (the schema's ``audit:`` keys,
    as used); ``inputs`` (paths).

    Args:
        acfg: the validated ``audit:`` section. results: the checked batches' results (no ``None``).
        per_sample: per-sample columns (``{}`` for unchecked samples). table: :func:`sample_table`.
    """
    cap = int(acfg["max_failures_per_rule"])
    n_by_rule: dict[str, int] = {}
    listed = []
    for f in failures:
        n_by_rule[f.rule] = n_by_rule.get(f.rule, 0) + 1
        if n_by_rule[f.rule] <= cap:
            listed.append(f.as_dict())
    text_targets = sum(r.text_targets for r in results)
    audio_targets = sum((r.audio_targets for r in results), torch.zeros(K, dtype=torch.long))
    masked = [p["masked_fraction"] for p in per_sample if p]
    return {
        "passed": not failures,
        "n_samples": len(split),
        "n_samples_checked": n_checked,
        "n_samples_by_split": {s: split.count(s) for s in ("train", "val")},
        "n_samples_failed": sum(1 for ok in table["passed"] if not ok),
        "rules": _rule_entries(n_by_rule, acfg, probe_info),
        "failures": listed,
        "n_failures": len(failures),
        "failures_not_listed": len(failures) - len(listed),
        "fractions": _fractions(results),
        "codebook_coverage": coverage,
        "target_counts": {"text": int(text_targets), "audio_per_codebook": audio_targets.tolist(),
                          "audio": int(audio_targets.sum())},
        "masked_fraction": {"max": max(masked, default=None), "mean": sum(masked) / max(1, len(masked))},
        "collator_settings": collator_info,
        "model_settings": model_settings(model_config),
        "leak_probe": probe_info,
        "timing": timing,
        "config": {k: acfg[k] for k in audit_keys() if k in acfg},
        "inputs": inputs,
    }


def write_outputs(summary: dict[str, Any], table: dict[str, list], summary_path: str | Path | None,
                  samples_path: str | Path | None) -> None:
    """Write ``summary`` as JSON (``fileio.write_json``) and ``table`` as parquet, each atomically;
    a ``None`` path is skipped."""
    if summary_path is not None:
        write_json(summary_path, summary)
    if samples_path is not None:
        import pandas as pd

        with atomic_file(samples_path) as tmp:
            pd.DataFrame(table).to_parquet(tmp, index=False)


def format_report(summary: dict[str, Any], summary_path: str | Path | None = None) -> str:
    """A few lines for the terminal: verdict, failed rules with counts, first failures, where the summary is."""
    lines = [f"audit {'PASSED' if summary['passed'] else 'FAILED'}: {summary['n_samples']} samples, "
             f"{summary['n_failures']} failures; tensor checks "
             f"{summary['timing'].get('tensor_checks_samples_per_s') or 0:.0f} samples/s"]
    for r in summary["rules"]:
        if not r["passed"]:
            lines.append(f"  FAILED {r['name']} ({r['n_failed']}): {r['description']}")
    for f in summary["failures"][:10]:
        lines.append(f"  - [{f['rule']}] {f['sample_id']}: {f['message']} -- likely cause: {f['likely_cause']}")
    if summary_path is not None:
        lines.append(f"  details: {summary_path}")
    return "\n".join(lines)
