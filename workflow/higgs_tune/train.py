"""LoRA fine-tuning of Higgs Audio v2: text loss + per-codebook audio loss, teacher forcing.

Launch (one entry point, one config):

    accelerate launch --num_processes 1 -m higgs_tune.train --configfile config/demo.yaml
    # GPU cluster (via Snakemake): snakemake --profile profiles/slurm --configfile config/cluster.yaml

Refuses to start unless the audit stage passed (``results/{exp}/audit/summary.json``). Every
optimizer step appends one JSON object to ``train/metrics.jsonl`` (``step, epoch, loss, text_loss,
audio_loss, codebook_losses[8], codebook_acc[8], text_acc, lr, grad_norm, lora_grad_norm,
n_text_targets, n_audio_targets, elapsed_s``) and scalars to TensorBoard (``train/tensorboard``);
every ``eval_interval`` steps a val row goes to ``train/val_metrics.jsonl``; every
``predictions_interval`` steps predictions vs labels for a fixed val sample go to
``train/predictions.jsonl``. The LoRA adapter is saved as safetensors in ``train/adapter`` and the
optimizer/scheduler/RNG state with ``accelerate`` in ``train/checkpoint``.

Gradient accumulation normalizes by the target counts of the whole window (see ``loss.py``), so
``grad_accum_steps x batch_size`` equals one batch of that size.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import time
from pathlib import Path

import torch

from . import data as D
from . import health
from .config import Paths, add_config_args, config_from_args
from .metrics import MetricSums, evaluate_batches
from .loss import count_targets, forward_loss, shifted_audio_targets

log = logging.getLogger("higgs_tune.train")


class AuditNotPassed(RuntimeError):
    """Training refused: the audit summary is missing or says ``passed: false``."""


def require_passed_audit(summary_path: Path) -> dict:
    """Load the audit summary; raise :class:`AuditNotPassed` unless ``passed`` is true."""
    if not summary_path.exists():
        raise AuditNotPassed(f"{summary_path} does not exist: run the audit stage first")
    summary = json.loads(summary_path.read_text())
    if summary.get("passed") is not True:
        failed = [r["name"] for r in summary.get("rules", []) if not r.get("passed", True)]
        raise AuditNotPassed(f"audit failed ({', '.join(failed) or 'see summary'}): fix the data/labels; "
                             f"details in {summary_path}")
    return summary


def git_revision() -> str:
    """``git describe --always --dirty`` of the working tree, or ``unknown``."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        return "unknown"


def predictions_record(model, batch, tokenizer, device, step: int, sample_id: str, n: int = 10) -> dict:
    """Predicted vs label tokens for the first and last ``n`` learnable positions of one sample.

    Text: argmax of ``logits[0, t]`` vs ``expanded_labels[0, t + 1]``; audio, per codebook k:
    argmax of ``audio_logits[i, k]`` vs ``label_audio_ids[k, i + 1]`` (same segment).
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out, loss = forward_loss(model, batch, device)
    model.train(was_training)
    labels = out.expanded_labels[0, 1:]
    pos = (labels != -100).nonzero().flatten().tolist()
    pos = pos if len(pos) <= 2 * n else pos[:n] + pos[-n:]
    pred_ids = out.logits[0, :-1].argmax(-1)
    text = {
        "positions": pos,
        "predicted": [tokenizer.decode([int(pred_ids[p])]) for p in pos],
        "label": [tokenizer.decode([int(labels[p])]) for p in pos],
    }
    codebooks = []
    if out.audio_logits is not None and out.audio_logits.shape[0]:
        tgt = shifted_audio_targets(batch.label_audio_ids.to(device), batch.audio_out_ids_start.to(device))
        pred = out.audio_logits.argmax(-1)  # (N, K)
        for k in range(tgt.shape[1]):
            rows = (tgt[:, k] != -100).nonzero().flatten().tolist()
            rows = rows if len(rows) <= 2 * n else rows[:n] + rows[-n:]
            codebooks.append({"codebook": k, "positions": rows, "predicted": [int(pred[r, k]) for r in rows],
                              "label": [int(tgt[r, k]) for r in rows]})
    acc = (loss.codebook_correct.double() / loss.n_codebook_targets.clamp(min=1)).tolist()
    return {"step": step, "sample_id": sample_id, "text": text, "codebooks": codebooks, "codebook_acc": acc,
            "text_acc": loss.text_correct / max(loss.n_text_targets, 1)}


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def train(cfg: dict) -> dict:
    """Run training as configured; returns the last metrics row. Raises health / audit errors."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from .model import apply_lora, build_model, device_and_dtype, load_text_tokenizer

    paths = Paths(cfg)
    tc = cfg["train"]
    require_passed_audit(paths.audit_summary)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(tc["seed"])
    _, dtype = device_and_dtype(cfg["model"]["device"], cfg["model"]["dtype"])

    tok = load_text_tokenizer(cfg["model"]["text_tokenizer"])
    codes = D.CodesIndex(paths.tokens_index)
    train_rows, val_rows = D.read_jsonl(paths.train_manifest), D.read_jsonl(paths.val_manifest)
    if not train_rows:
        raise SystemExit(f"{paths.train_manifest} has no rows")
    model = build_model(cfg["model"], dtype)
    collator = D.make_collator(model.config)
    train_samples = [D.build_dataset_sample(r, tok, codes.get) for r in train_rows]
    val_samples = [D.build_dataset_sample(r, tok, codes.get) for r in val_rows]
    val_batches = [collator(b) for b in D.batches(val_samples, cfg["eval"]["batch_size"], shuffle=False, seed=0)]
    probe = (collator([val_samples[0]]), D.sample_id(val_rows[0])) if val_samples else None

    model = apply_lora(model, cfg["lora"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=tc["learning_rate"], weight_decay=tc["weight_decay"])
    bs, accum = tc["batch_size"], tc["grad_accum_steps"]
    steps_per_epoch = max(1, math.ceil(len(train_samples) / bs) // accum)
    max_steps = tc["max_steps"] or math.ceil((tc["epochs"] or 1) * steps_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(optimizer, tc["warmup_steps"], max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    device = accelerator.device

    paths.train_dir.mkdir(parents=True, exist_ok=True)
    for f in (paths.metrics, paths.predictions, paths.train_dir / "val_metrics.jsonl"):
        f.unlink(missing_ok=True)
    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(paths.tensorboard))
    state = {"model_source": cfg["model"]["source"], "git_revision": git_revision(), "max_steps": max_steps,
             "trainable_parameters": n_trainable, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "num_processes": accelerator.num_processes}
    log.info("training %d samples, %d steps, %d trainable parameters (LoRA rank %d)", len(train_samples),
             max_steps, n_trainable, cfg["lora"]["rank"])

    alarms = tc["alarms"]
    epoch, step, t0, row = 0, 0, time.time(), {}
    micro = iter(())
    while step < max_steps:
        window = []
        while len(window) < accum:
            nxt = next(micro, None)
            if nxt is None:
                micro = iter(D.batches(train_samples, bs, shuffle=True, seed=tc["seed"], epoch=epoch))
                epoch += 1
                continue
            window.append(collator(nxt))
        counts = sum((count_targets(b.label_ids, b.label_audio_ids, b.audio_out_ids_start) for b in window[1:]),
                     count_targets(window[0].label_ids, window[0].label_audio_ids, window[0].audio_out_ids_start))
        counts.text = int(accelerator.reduce(torch.tensor(counts.text, device=device), "sum"))
        counts.codebooks = accelerator.reduce(counts.codebooks.to(device), "sum").cpu()
        health.check_targets(counts.text, counts.audio, step + 1)
        sums = MetricSums()
        for batch in window:
            out, loss = forward_loss(model, batch, device, text_weight=tc["text_weight"],
                                     audio_weight=tc["audio_weight"], normalizer=counts)
            health.check_audio_outputs(out.audio_logits, batch.label_audio_ids)
            health.check_loss(loss.loss)
            accelerator.backward(loss.loss * accelerator.num_processes)  # DDP averages; counts are global
            sums.add(loss, int(batch.input_ids.shape[0]))
        lora_norm = health.check_lora_grad(model, step + 1)
        grad_norm = float(accelerator.clip_grad_norm_(params, tc["max_grad_norm"]))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        row = {"step": step, "epoch": epoch, **sums.result(tc["text_weight"], tc["audio_weight"]),
               "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "lora_grad_norm": lora_norm,
               "elapsed_s": round(time.time() - t0, 3)}
        health.check_audio_floor(row["audio_loss"], step, alarms["audio_loss_floor"], alarms["floor_check_steps"])
        if accelerator.is_main_process:
            _append_jsonl(paths.metrics, row)
            for key in ("loss", "text_loss", "audio_loss", "lr", "grad_norm", "text_acc"):
                writer.add_scalar(f"train/{key}", row[key], step)
            for k, (cl, ca) in enumerate(zip(row["codebook_losses"], row["codebook_acc"])):
                writer.add_scalar(f"train/codebook_{k}_loss", cl, step)
                writer.add_scalar(f"train/codebook_{k}_acc", ca, step)
            if step % tc["log_interval"] == 0:
                log.info("step %d/%d loss %.4f text %.4f audio %.4f lr %.2e", step, max_steps, row["loss"],
                         row["text_loss"], row["audio_loss"], row["lr"])
            if val_batches and (step % tc["eval_interval"] == 0 or step == max_steps):
                val = evaluate_batches(model, val_batches, device, text_weight=tc["text_weight"],
                                       audio_weight=tc["audio_weight"])
                _append_jsonl(paths.train_dir / "val_metrics.jsonl", {"step": step, **val})
                writer.add_scalar("val/loss", val["loss"], step)
            if probe and (step == 1 or step % tc["predictions_interval"] == 0 or step == max_steps):
                _append_jsonl(paths.predictions, predictions_record(model, probe[0], tok, device, step, probe[1]))
            if step % tc["save_interval"] == 0 or step == max_steps:
                accelerator.unwrap_model(model).save_pretrained(str(paths.adapter), safe_serialization=True)
                accelerator.save_state(str(paths.train_dir / "checkpoint"))
                state.update(step=step, epoch=epoch, finished=step == max_steps)
                paths.train_state.write_text(json.dumps(state, indent=2))
    if writer:
        writer.close()
    accelerator.wait_for_everyone()
    return row


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    cfg = config_from_args(parser.parse_args(argv))
    try:
        train(cfg)
    except (AuditNotPassed, health.TrainingHealthError) as exc:
        log.error("%s", exc)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
