"""LoRA fine-tuning of Higgs Audio v2: text loss + per-codebook audio loss, teacher forcing.

Launch (one entry point, one config; Snakemake renders these through :mod:`higgs_tune.launch`):

    # one process (CPU or one GPU)
    accelerate launch --config_file config/accelerate.yaml --num_processes 1 -m higgs_tune.train ARGS
    # 8 GPUs on one node (or 2 CPU processes on gloo: same command, no GPU)
    accelerate launch --config_file config/accelerate.yaml --multi_gpu --num_processes 8 -m higgs_tune.train ARGS
    # 2 nodes x 4 GPUs: one launcher per node, rendezvous on the first host (inside a Slurm allocation)
    srun --overlap --nodes 2 --ntasks-per-node 1 bash -c 'accelerate launch --config_file config/accelerate.yaml \\
        --multi_gpu --num_machines 2 --num_processes 8 --machine_rank $SLURM_NODEID \\
        --main_process_ip HOST0 --main_process_port 29500 -m higgs_tune.train ARGS'
    # all of it via the workflow
    snakemake --profile profiles/slurm --configfile config/cluster.yaml

``ARGS`` are ``--config-json`` (or ``--configfile``) and the paths of :class:`TrainIO`, as the train
rule renders them. Refuses to start unless the audit passed.

**Global batch** = ``train.batch_size`` (per process) x processes x ``train.grad_accum_steps``.
Each epoch's sample order is a permutation drawn from ``(train.seed, epoch)`` alone; it is cut into
micro-steps of ``batch_size x processes`` samples, and process r takes slice r of each (so 2
processes x batch b and 1 process x batch 2b see the same samples in the same optimizer steps). With
``train.length_bucketing`` (default) the permutation is first cut into pools of ``train.bucket_pool``
micro-steps, each sorted by length and cut into micro-steps, and the micro-steps are shuffled
(:func:`bucketed_micro_steps`): less padding, every sample still once per epoch. With
``train.max_tokens`` micro-batches are filled up to a token budget instead, one per process and
micro-step (:class:`~higgs_tune.train.sampler.Batching`; samples per step vary). With
``train.packing`` each process's micro-batch is packed end to end into rows of at most
``train.pack_positions`` positions (one row when null) under a block-diagonal attention mask
(:mod:`higgs_tune.packing`): the same loss and gradients with almost no padding. The
loss of one optimizer step is normalized by the target counts of the whole window across all
processes (``loss.py``), so it equals the loss of the global batch as one batch. The LR schedule
(linear warmup, cosine; :class:`Schedule`) counts optimizer steps, whatever the number of processes:
step k is applied with the lr its metrics row logs (step 1 > 0); ``warmup_steps`` >= the run's steps
is refused, and so is ``model.dtype: float16`` (no loss scaling).

**Outputs** (one row per optimizer step in ``metrics``: ``step, epoch, loss, text_loss, audio_loss,
codebook_losses[K], codebook_acc[K], text_acc, n_samples, n_text_targets, n_audio_targets,
padding_efficiency, n_positions, n_padded_positions, lr, grad_norm, lora_grad_norm, elapsed_s``;
``n_positions`` / ``n_padded_positions``: the samples' positions / all positions of the padded
micro-batches of the step (all processes, all micro-steps) in the sequence the decoder layers run on
(text plus audio columns, padded to a multiple of 8: the model's merged ``attention_mask``, see
:func:`higgs_tune.data.batch_positions`); ``padding_efficiency`` is their ratio; ``val_metrics`` every
``eval_interval`` steps; ``predictions`` for a fixed val sample; TensorBoard scalars; the adapter; the final checkpoint).

**Preemption.** On SIGTERM or SIGUSR1 the trainer finishes the optimizer step in flight, writes a
checkpoint and exits with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again"). Checkpoints
(trainable parameters, optimizer, LR plan, every rank's RNG, data position, step, and the metric
rows so far) go to ``resume_dir`` every ``save_interval`` steps, fsynced, renamed into place, with a
manifest of sizes and sha256 written last, the last ``keep_checkpoints`` kept; the next run with the
same trajectory (:func:`run_fingerprint`) resumes from the newest complete one (a torn one is skipped
with a warning), and its metrics files continue with no gap and no duplicate. A longer run
(``max_steps``/``epochs`` raised) continues from it with the LR schedule re-planned.
"""

from .checkpoint import Checkpoints, run_fingerprint
from .contract import AuditNotPassed, TrainIO, require_passed_audit
from .loop import EXIT_REFUSED, main, train
from .model_prep import UnsupportedDtype, autocast, enable_gradient_checkpointing, refuse_float16, trainable_to_fp32
from .monitor import predictions_record, val_metrics
from .preemption import EXIT_PREEMPTED, Preempted, PreemptionFlag
from .schedule import Schedule, ScheduleError
from .sampler import (Position, bucketed_micro_steps, epoch_order, micro_steps, next_window, rank_slice,
                      serpentine)

__all__ = ["AuditNotPassed", "Checkpoints", "EXIT_PREEMPTED", "EXIT_REFUSED", "Position", "Preempted",
           "PreemptionFlag", "TrainIO", "autocast", "bucketed_micro_steps", "enable_gradient_checkpointing",
           "epoch_order", "main", "micro_steps", "next_window", "predictions_record", "rank_slice",
           "require_passed_audit", "run_fingerprint", "serpentine", "train", "trainable_to_fp32", "val_metrics",
           "Schedule", "ScheduleError", "UnsupportedDtype", "refuse_float16"]
