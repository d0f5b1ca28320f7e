"""The training loop: set-up, then one optimizer step after another, top to bottom; the
command-line entry point ``python -m higgs_tune.train``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from .. import data as D
from .. import health
from .. import packing
from ..config import config_from_args, deep_merge
from ..fileio import append_jsonl, git_revision, read_jsonl, write_json
from ..loss import count_targets, forward_loss
from ..metrics import MetricSums
from ..stage_cli import stage_parser
from .checkpoint import Checkpoints, run_fingerprint
from .contract import TRAIN_INPUTS, AuditNotPassed, TrainIO, require_passed_audit
from .early_stopping import EarlyStopping
from .model_prep import UnsupportedDtype, autocast, enable_gradient_checkpointing, refuse_float16, trainable_to_fp32
from .monitor import predictions_record, tensorboard_row, val_metrics
from .preemption import Preempted, PreemptionFlag, note_preempted
from .sampler import Batching, Position
from .schedule import Schedule, ScheduleError

log = logging.getLogger("higgs_tune.train")

#: Exit status when the audit gate or a health alarm stops training.
EXIT_REFUSED = 2


# ------------------------------------------------------------------------------------- training
def train(cfg: dict, io: TrainIO) -> dict:
    """Run training as configured; returns the last metrics row.

    At every save step (``train.save_interval``, and the last step) the adapter is also snapshot into
    the resume folder (``adapters/step-XXXXXXXX``, never pruned); at the end all of them are copied to
    ``io.steps``. With ``train.patience`` > 0 the run stops early (:class:`EarlyStopping`) and
    ``state.json`` records ``stopped_early``.

    Raises:
        AuditNotPassed: the audit summary is missing or failed.
        UnsupportedDtype: ``model.dtype`` is float16 (no loss scaling).
        ScheduleError: ``train.warmup_steps`` >= the run's optimizer steps, or the run made shorter
            than its latest checkpoint.
        health.TrainingHealthError: a health alarm fired.
        Preempted: SIGTERM/SIGUSR1 arrived; the checkpoint is written (exit :data:`EXIT_PREEMPTED`).
    """
    from accelerate import Accelerator

    from ..model import apply_lora, build_model, device_and_dtype, load_text_tokenizer

    tc = cfg["train"]
    require_passed_audit(io.audit)
    refuse_float16(cfg["model"]["dtype"])
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    torch.manual_seed(tc["seed"])
    random.seed(tc["seed"])
    np.random.seed(tc["seed"])
    _, dtype = device_and_dtype(cfg["model"]["device"], cfg["model"]["dtype"])
    # signals, and under Slurm the job's end time (one process asks; requested() shares the answer)
    preempt = PreemptionFlag(tc["stop_margin_s"], os.environ.get("SLURM_JOB_ID") if accelerator.is_main_process else None)

    tok = load_text_tokenizer(cfg["model"]["text_tokenizer"])
    codes = D.CodesIndex(io.index)
    # built when a micro-batch needs them: a process holds (and reads) the codes of its own share only
    train_samples, val_set = D.ManifestSamples(io.train, tok, codes), D.ManifestSamples(io.val, tok, codes)
    if not len(train_samples):
        raise SystemExit(f"{io.train} has no rows")
    model = build_model(cfg["model"], dtype, device=device)
    collator = D.make_collator(model.config)
    # each sample's positions in the model's merged sequence, from its tokens and the index's frame
    # counts (no codes, no forward): bucketing sorts by them, packing lays the samples out by them,
    # the token budget fills micro-batches by them
    sample_lengths = train_samples.lengths(model.config) \
        if tc["length_bucketing"] or tc["packing"] or tc["max_tokens"] else None
    plan = Batching(tc, len(train_samples), world, sample_lengths)
    # the in-training val pass and the probe: a fixed subset of the val rows (train.val_samples, drawn by
    # the seed: the same on every process and resume), each batch built and collated when the pass runs it
    val_idx = D.val_subset(len(val_set), tc["val_samples"], tc["seed"])
    val_batches = D.LazyBatches(val_set, val_idx, cfg["eval"]["batch_size"], collator)
    probe = (collator([val_set[val_idx[0]]]), D.sample_id(val_set.row(val_idx[0]))) if val_idx else None

    model = apply_lora(model, cfg["lora"])
    trainable_to_fp32(model)
    if tc["gradient_checkpointing"]:
        log.info("gradient checkpointing on %d decoder layers", enable_gradient_checkpointing(model))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=tc["learning_rate"], weight_decay=tc["weight_decay"])
    steps_per_epoch = plan.steps_per_epoch()
    max_steps = tc["max_steps"] or math.ceil((tc["epochs"] or 1) * steps_per_epoch)
    # the LR each optimizer step is applied with (raises when warmup_steps >= max_steps)
    schedule = Schedule(tc["learning_rate"], tc["warmup_steps"], max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    ckpts = Checkpoints(io.resume_dir / run_fingerprint(cfg, io, world), tc["keep_checkpoints"], accelerator)
    if accelerator.is_main_process:
        for f in io.logs:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("")
    accelerator.wait_for_everyone()
    state = {"model_source": cfg["model"]["source"], "git_revision": git_revision(), "max_steps": max_steps,
             "trainable_parameters": n_trainable, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "num_processes": world, "global_batch_size": plan.global_batch_size, "max_tokens": tc["max_tokens"],
             "resume_dir": str(ckpts.root)}
    step, pos, t0, evaluation_due = 0, Position(), time.time(), False
    early = EarlyStopping(tc["patience"])  # train.patience: val passes without a lower val loss
    latest = ckpts.latest()  # falls back past a torn newest checkpoint (a warning says so)
    if latest is not None:
        step, pos, saved = ckpts.load(latest, model, optimizer, schedule, io)
        evaluation_due = bool(saved.get("evaluation_due"))
        early = EarlyStopping(tc["patience"], saved.get("early_stopping"))  # the counter continues
        state.update({k: saved[k] for k in ("step", "epoch", "finished", "preempted", "elapsed_s") if k in saved})
        state.update(resumed_from=str(latest), resumed_at_step=step, started=saved.get("started", state["started"]),
                     resumes=saved.get("resumes", 0) + 1, preempted=False)
        t0 -= saved.get("elapsed_s", 0.0)
        log.info("resumed from %s at step %d (epoch %d, micro-step %d)", latest, step, pos.epoch, pos.index)
        if schedule.replan(step, max_steps):  # max_steps/epochs changed since: the LR plan continues from here
            log.info("the run is now %d steps: LR schedule re-planned from step %d", max_steps, step)
    state["schedule"] = schedule.state_dict()
    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        shutil.rmtree(io.tensorboard, ignore_errors=True)
        writer = SummaryWriter(str(io.tensorboard))
        for old in read_jsonl(io.metrics):  # a resumed run's curve starts where it left off
            tensorboard_row(writer, old)
    log.info("training %d samples on %d process(es), global batch %s, %d steps, %d trainable parameters "
             "(LoRA rank %d)", len(train_samples), world, plan.global_batch_size or
             f"of {tc['max_tokens']} positions x {world * tc['grad_accum_steps']} micro-batches", max_steps, n_trainable,
             cfg["lora"]["rank"])

    alarms, tw, aw = tc["alarms"], tc["text_weight"], tc["audio_weight"]

    def monitor(step: int, last: bool) -> None:
        """The validation pass and the probe's predictions due after optimizer step ``step``."""
        if val_batches and (step % tc["eval_interval"] == 0 or last):
            val = val_metrics(unwrapped, val_batches, accelerator, device, dtype, tw, aw)
            early.update(step, val["loss"])  # every process: the val sums are all-reduced
            if accelerator.is_main_process:
                append_jsonl(io.val_metrics, {"step": step, **val})
                writer.add_scalar("val/loss", val["loss"], step)
        if probe and accelerator.is_main_process and (step == 1 or step % tc["predictions_interval"] == 0 or last):
            with autocast(device, dtype):
                append_jsonl(io.predictions, predictions_record(unwrapped, probe[0], tok, device, step, probe[1],
                                                                text_weight=tw, audio_weight=aw))

    if evaluation_due:  # the preempted run checkpointed before its evaluation: run it first
        monitor(step, step == max_steps)
    row: dict = read_jsonl(io.metrics)[-1] if step and accelerator.is_main_process else {}
    while step < max_steps and not early.stop:
        window_idx, pos = plan.next_window(pos)  # window_idx[i][r]: process r's samples in micro-step i
        mine = [w[rank] for w in window_idx]
        # one micro-batch per micro-step: the padded rows, or (train.packing) the samples end to end
        # in rows with a block-diagonal attention mask (packing.py: same loss and gradients)
        packed, window = [], []
        for m, w in zip(mine, window_idx):
            idx = m or w[0][:1]  # an empty share runs a zero-weight forward on one sample
            samples = [train_samples[i] for i in idx]
            pk = packing.packed_collate(samples, [sample_lengths[i] for i in idx], collator, tc["pack_positions"]) \
                if tc["packing"] else None
            packed.append(pk)
            window.append(pk.batch if pk is not None else collator(samples))
        counts = None
        for m, b in zip(mine, window):
            if m:
                c = count_targets(b.label_ids, b.label_audio_ids, b.audio_out_ids_start)
                counts = c if counts is None else counts + c
        counts = counts or count_targets(window[0].label_ids[:, :0], None, None)
        if world > 1:
            counts.text = int(accelerator.reduce(torch.tensor(counts.text, device=device), "sum"))
            counts.codebooks = accelerator.reduce(counts.codebooks.to(device), "sum").cpu()
        health.check_targets(counts.text, counts.audio, step + 1)
        sums = MetricSums()
        positions = torch.zeros(2, dtype=torch.float64)  # real, padded (model's merged sequence)
        for i, (m, batch, pk) in enumerate(zip(mine, window, packed)):
            # gradients are all-reduced once per optimizer step, on its last micro-step
            with contextlib.nullcontext() if i == len(window) - 1 else accelerator.no_sync(model):
                with autocast(device, dtype), (packing.packed_attention(model, pk) if pk else contextlib.nullcontext()):
                    out, loss = forward_loss(model, batch, device, text_weight=tw, audio_weight=aw,
                                             normalizer=counts, text_logits_at_targets=True)
                # the merged attention mask: 1 = a sample's position, 0 = padding (a zero-weight
                # forward's positions are all padding: computed, not learned)
                positions += torch.tensor([float(out.attention_mask.sum()) if m else 0.0,
                                           float(out.attention_mask.numel())], dtype=torch.float64)
                if m:
                    health.check_audio_outputs(out.audio_logits, batch.label_audio_ids)
                    health.check_loss(loss.loss)
                    sums.add(loss, len(m))
                # DDP averages gradients over processes; the normalizer already counts all of them.
                # A process without samples in this micro-step (an epoch's short end) adds zeros.
                accelerator.backward(loss.loss * (world if m else 0.0))
        lora_norm = health.check_lora_grad(model, step + 1)
        grad_norm = float(accelerator.clip_grad_norm_(params, tc["max_grad_norm"]))
        lr = schedule.apply(optimizer, step + 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if world > 1:
            sums = sums.all_reduce(lambda t: accelerator.reduce(t.to(device), "sum"))
            positions = accelerator.reduce(positions.to(device), "sum").cpu()
        n_pos, n_padded = int(positions[0]), int(positions[1])
        row = {"step": step, "epoch": pos.epoch + 1, **sums.result(tw, aw),
               "padding_efficiency": n_pos / max(n_padded, 1), "n_positions": n_pos, "n_padded_positions": n_padded,
               "lr": lr,
               "grad_norm": grad_norm, "lora_grad_norm": lora_norm, "elapsed_s": round(time.time() - t0, 3)}
        health.check_audio_floor(row["audio_loss"], step, alarms["audio_loss_floor"], alarms["floor_check_steps"])
        last = step == max_steps
        if accelerator.is_main_process:
            append_jsonl(io.metrics, row)
            tensorboard_row(writer, row)
            if step % tc["log_interval"] == 0:
                log.info("step %d/%d loss %.4f text %.4f audio %.4f lr %.2e", step, max_steps, row["loss"],
                         row["text_loss"], row["audio_loss"], row["lr"])
        # read before the evaluation: a preempted job has seconds; the resumed run evaluates first
        stop = preempt.requested(accelerator)
        if not (stop and not last):
            monitor(step, last)
        if early.stop:  # train.patience val passes without improvement: this step is the run's last
            last = True
            state["stopped_early"] = early.record(step)
            log.info("early stopping at step %d: val loss %.4f at step %d not improved for %d val passes", step,
                     early.best_loss, early.best_step, early.patience)
        if step % tc["save_interval"] == 0 or last:  # eval.checkpoints scores these (train/steps)
            ckpts.save_adapter(step, model)
        if step % tc["save_interval"] == 0 or last or stop:
            state.update(step=step, epoch=pos.epoch + 1, finished=last, elapsed_s=row["elapsed_s"],
                         preempted=bool(stop and not last), evaluation_due=bool(stop and not last),
                         early_stopping=early.state_dict())
            latest = ckpts.save(step, model, optimizer, schedule, pos, io, state)
            if accelerator.is_main_process:
                write_json(io.state, state)
        if stop and not last:
            if writer is not None:
                writer.close()
            log.warning("preempted: checkpoint at step %d in %s; rerun to resume", step, ckpts.root)
            raise Preempted(step)
    if early.stop:  # also when the resumed run had stopped already (its checkpoint says so)
        state["stopped_early"] = early.record(step)
    if accelerator.is_main_process:
        writer.close()
        unwrapped.save_pretrained(str(io.adapter), safe_serialization=True)
        ckpts.copy_adapters(io.steps, step)
        shutil.rmtree(io.checkpoint, ignore_errors=True)
        shutil.copytree(latest, io.checkpoint)
        write_json(io.state, {**state, "finished": True})
    accelerator.wait_for_everyone()
    return row


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = stage_parser("python -m higgs_tune.train", "LoRA fine-tuning of Higgs Audio v2",
                          inputs={f.name: f"train rule's {f.name}" for f in fields(TrainIO) if f.name in TRAIN_INPUTS},
                          outputs={f.name: f"train rule's {f.name}" for f in fields(TrainIO)
                                   if f.name not in TRAIN_INPUTS})
    parser.add_argument("--monitor-json", default=None,
                        help="config keys that steer logging, evaluation and checkpointing only, as JSON, merged "
                             "over the config (the train rule passes them apart: higgs_tune.config.train_job_config)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.monitor_json:
        cfg = deep_merge(cfg, json.loads(args.monitor_json))
    try:
        train(cfg, TrainIO.from_args(args))
    except Preempted as exc:
        note_preempted(exc.step)
        raise
    except (AuditNotPassed, health.TrainingHealthError, ScheduleError, UnsupportedDtype) as exc:
        log.error("%s", exc)
        raise SystemExit(EXIT_REFUSED) from exc


if __name__ == "__main__":
    main()
