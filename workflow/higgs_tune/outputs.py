"""The outputs of one experiment, in one table: which rule writes each, under which name and path.

Every named output a rule writes under ``{results_dir}/{experiment}/`` is one :class:`Output` row of
:data:`OUTPUTS`. The rules declare their outputs from it (``workflow/rules/common.smk``:
``rule_outputs``), the report and the comparison read their inputs by its roles (:data:`REPORT_ROLES`,
:data:`COMPARE_ROLES`) and name the rule to run for a missing one (:func:`producer`), and
``python -m higgs_tune.lineage`` names each output's role. Standard library only (the rules import it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Output:
    """One output of an experiment.

    Attributes:
        role: the name the report, the comparison and the lineage know it by (unique).
        rule: the Snakemake rule writing it (for the tokens: ``tokenize``, or with
            ``audio_tokenizer.shards > 1`` ``tokenize_gather``, at the same path: :attr:`also`).
        key: its name among that rule's outputs (``rules.<rule>.output.<key>``, ``{output.<key>}``).
        path: relative to ``{results_dir}/{experiment}``; may hold the rule's other wildcards
            (``{step}``, ``{shard}``, ``{nshards}``).
        label: what it is, in words.
        kind: ``"file"`` or ``"dir"`` (a folder: Snakemake's ``directory()``; DVC hashes it as ``<md5>.dir``).
        also: other rules writing the same path under the same key.
    """

    role: str
    rule: str
    key: str
    path: str
    label: str
    kind: str = "file"
    also: tuple[str, ...] = ()

    @property
    def rules(self) -> tuple[str, ...]:
        """Every rule writing this output, :attr:`rule` first."""
        return (self.rule, *self.also)


F, D = "file", "dir"
#: every named output of every rule, by rule in the chain's order (the rule's output order)
OUTPUTS: tuple[Output, ...] = (
    Output("train_manifest", "manifest", "train", "manifest/train.jsonl", "train manifest (kept rows)"),
    Output("val_manifest", "manifest", "val", "manifest/val.jsonl", "val manifest (kept rows)"),
    Output("quarantine", "manifest", "quarantine", "manifest/quarantine.jsonl", "quarantined rows and why"),
    Output("fixes", "manifest", "fixes", "manifest/fixes.json", "manifest fixes and counts"),
    Output("tokens_index", "tokenize", "index", "tokens/index.parquet", "token index", also=("tokenize_gather",)),
    Output("tokens_stats", "tokenize", "stats", "tokens/stats.json", "tokenize statistics", also=("tokenize_gather",)),
    Output("tokens_shard_index", "tokenize_shard", "index", "tokens/shards/{shard}-of-{nshards}.parquet",
           "one shard's token index rows"),
    Output("tokens_shard_stats", "tokenize_shard", "stats", "tokens/shards/{shard}-of-{nshards}.json",
           "one shard's tokenize statistics"),
    Output("audit_summary", "audit", "summary", "audit/summary.json", "audit summary"),
    Output("audit_samples", "audit", "samples", "audit/samples.parquet", "audited samples"),
    Output("metrics", "train", "metrics", "train/metrics.jsonl", "train metrics"),
    Output("val_metrics", "train", "val_metrics", "train/val_metrics.jsonl", "val metrics"),
    Output("predictions", "train", "predictions", "train/predictions.jsonl", "prediction snapshots"),
    Output("adapter", "train", "adapter", "train/adapter", "adapter (all files)", D),
    Output("train_checkpoint", "train", "checkpoint", "train/checkpoint", "last training checkpoint", D),
    Output("train_state", "train", "state", "train/state.json", "train state"),
    Output("tensorboard", "train", "tensorboard", "train/tensorboard", "TensorBoard logs", D),
    Output("train_steps", "train", "steps", "train/steps", "adapter of every save step (step-XXXXXXXX/)", D),
    Output("base_eval_metrics", "evaluate_base", "metrics", "eval_base/metrics.json", "base-model eval metrics"),
    Output("base_generated", "evaluate_base", "generated", "eval_base/generated.jsonl", "base-model generations"),
    Output("base_audio", "evaluate_base", "audio", "eval_base/audio", "base-model audio", D),
    Output("eval_metrics", "evaluate", "metrics", "eval/metrics.json", "eval metrics"),
    Output("generated", "evaluate", "generated", "eval/generated.jsonl", "generations"),
    Output("audio", "evaluate", "audio", "eval/audio", "generated audio", D),
    Output("paired", "evaluate", "paired", "eval/paired.jsonl", "base -> fine-tuned, per sample"),
    Output("paired_summary", "evaluate", "paired_summary", "eval/paired.json", "base -> fine-tuned summary"),
    Output("step_eval_metrics", "evaluate_step", "metrics", "eval/steps/{step}/metrics.json",
           "eval metrics of a saved step"),
    Output("step_generated", "evaluate_step", "generated", "eval/steps/{step}/generated.jsonl",
           "generations of a saved step"),
    Output("step_audio", "evaluate_step", "audio", "eval/steps/{step}/audio", "generated audio of a saved step", D),
    Output("step_paired", "evaluate_step", "paired", "eval/steps/{step}/paired.jsonl",
           "base -> saved step, per sample"),
    Output("step_paired_summary", "evaluate_step", "paired_summary", "eval/steps/{step}/paired.json",
           "base -> saved step summary"),
    Output("selection", "select", "selection", "eval/selection.json", "checkpoint selection"),
    Output("report", "report", "html", "report.html", "the report"),
    Output("merged", "export_model", "merged", "merged", "merged model", D),
    Output("train_curves", "curves", "train", "train/curves.csv", "train curves (CSV)"),
    Output("val_curves", "curves", "val", "train/val_curves.csv", "val curves (CSV)"),
)
del F, D

#: role -> its row
BY_ROLE: dict[str, Output] = {o.role: o for o in OUTPUTS}
if len(BY_ROLE) != len(OUTPUTS):  # pragma: no cover - a typo in the table
    raise RuntimeError("higgs_tune.outputs: two rows share a role")

#: the input that is no output: the experiment's data manifest as given (``data.manifest``)
DATA_MANIFEST_ROLE = "manifest"
DATA_MANIFEST_LABEL = "data manifest (data.manifest)"

#: what the report reads (beside the data manifest), in the report's order: the report rule's inputs
REPORT_ROLES = ("train_manifest", "val_manifest", "fixes", "quarantine", "tokens_index", "audit_summary",
                "audit_samples", "metrics", "val_metrics", "predictions", "train_state", "adapter", "eval_metrics",
                "generated", "audio", "paired", "paired_summary", "base_eval_metrics", "base_generated", "base_audio",
                "selection")
#: what the comparison reads of each run (beside the data manifest), in lineage order: the curves, the
#: eval scores, and the lineage (the data, tokens, audit, adapter and training state each run was built from)
COMPARE_ROLES = ("train_manifest", "val_manifest", "tokens_index", "audit_summary", "metrics", "val_metrics",
                 "train_state", "adapter", "eval_metrics", "paired_summary", "base_eval_metrics")


def of_rule(rule: str) -> list[Output]:
    """The rows ``rule`` writes (also those it writes beside another rule: :attr:`Output.also`), in order."""
    return [o for o in OUTPUTS if rule in o.rules]


def producer(role: str) -> str:
    """The rule writing output ``role`` (the data manifest: ``manifest``, the rule reading it).

    Raises:
        KeyError: no output has that role (the message lists the roles).
    """
    if role == DATA_MANIFEST_ROLE:
        return "manifest"
    if role not in BY_ROLE:
        raise KeyError(f"no output has role {role!r}; roles: {', '.join(BY_ROLE)}")
    return BY_ROLE[role].rule


def role_of(rule: str, path: str) -> str | None:
    """The role of ``path`` (any prefix, e.g. ``results/demo/``) written by ``rule``: the row of that rule
    whose path (wildcards matching one path segment's text) ends ``path``; ``None`` when none does."""
    path = path.replace("\\", "/").rstrip("/")
    for o in of_rule(rule):
        pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part)
                          for part in re.split(r"(\{\w+\})", o.path))
        if re.search(rf"(?:^|/){pattern}$", path):
            return o.role
    return None
