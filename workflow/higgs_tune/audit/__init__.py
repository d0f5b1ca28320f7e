"""The label audit gate: prove that the tensors training will see teach the model the right thing.

Training only starts when the audit's ``summary.json`` says ``"passed": true``. The audit rebuilds
the **exact** training tensors from the kept manifests and the cached codes, with the functions
training uses (:func:`higgs_tune.data.build_dataset_sample` -> :func:`higgs_tune.data.make_collator`
on the model config), then checks them against rules derived independently of the collator (the
conventions of :mod:`higgs_tune.labels`):

* **text labels** (teacher forcing, unshifted: the label of position ``t`` is the token at ``t``,
  ignore index -100). Role spans are re-derived from the token stream
  (``<|start_header_id|>role<|end_header_id|>\\n\\n`` headers): only assistant turns at/after
  ``start_index`` carry labels; system and user turns, the header prefixes, the padding and the
  ``<|AUDIO_OUT|>`` placeholder are all -100; the assistant targets are all present; every sample
  has at least one learnable target and its masked fraction is under a threshold.
* **audio labels and inputs** per ``<|AUDIO_OUT|>`` segment and codebook ``k`` against
  :func:`higgs_tune.labels.delay_pattern` of its T frames of source codes: with the delay pattern,
  label row k is ``(k+1) x -100``, the T codes, one EOS (1025), ``(K-1-k) x -100``;
  ``audio_out_ids`` row k is ``(k+1) x BOS (1024)``, the T codes, ``(K-k) x EOS``. Without it:
  ``-100, codes, EOS`` / ``BOS, codes, EOS``. Reference (prompt) audio before ``start_index`` has
  labels all -100. Codes lie in ``[0, codebook_size)``.
* **collator settings** equal what the model config implies (:func:`higgs_tune.data.collator_settings`,
  as the upstream serve engine derives them): a train/inference mismatch fails.
* **train-time counts**: ``loss.count_targets`` on the collated batch equals the count of the
  model's ``expanded_labels`` (the model's own ``merge_input_ids_with_audio_features``, run with
  1-d dummy embeddings), and the expanded stream has one audio-out position per label column.
* **leak probe** through the real model and the real loss wiring (:mod:`.leak_probe`).

Modules, one job each: :mod:`.rules` (rule names, descriptions, likely causes, scopes; the
failure record), :mod:`.expect` (what the model config implies; building a sample once),
:mod:`.checks` (the per-sample tensor checks), :mod:`.leak_probe`, :mod:`.summary` (the outputs),
:mod:`.run` (:func:`run_audit` and the command line). The audit streams: it reads the rows as it
goes, builds each sample when its batch is due and drops it once the batch is checked, keeping a few
numbers per sample (its ``samples.parquet`` row, what the probe picks by): memory holds one batch of
samples whatever the number of rows; the probe's samples are built again from their rows.

CLI (the Snakemake rule ``audit`` renders every path)::

    python -m higgs_tune.audit --configfile config/demo.yaml --train results/demo/manifest/train.jsonl \\
        --val results/demo/manifest/val.jsonl --index results/demo/tokens/index.parquet \\
        --summary results/demo/audit/summary.json --samples results/demo/audit/samples.parquet

writes ``--summary`` (JSON) and ``--samples`` (parquet, one row per sample), and exits with status 1
when the gate fails (after writing both).
"""

from .checks import BatchResult, audit_batch, check_batch, run_tensor_checks, torch_threads
from .expect import (Expect, SampleMeta, build_sample, build_samples, check_collator, config_only, dry_expand,
                     model_config_of)
from .leak_probe import leak_probe, probe_indices, probe_pick
from .rules import RULES, SCOPES, Failure, scope_of
from .run import build_parser, main, run_audit
from .summary import audit_keys, build_summary, format_report, model_settings, write_outputs

__all__ = [
    "RULES", "SCOPES", "BatchResult", "Expect", "Failure", "SampleMeta", "audit_batch", "audit_keys",
    "build_parser", "build_sample", "build_samples", "build_summary", "check_batch", "check_collator", "config_only",
    "dry_expand", "format_report", "leak_probe", "main", "model_config_of", "model_settings", "probe_indices",
    "probe_pick", "run_audit", "run_tensor_checks",
    "scope_of", "torch_threads", "write_outputs",
]
