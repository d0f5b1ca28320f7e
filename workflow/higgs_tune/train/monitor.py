"""What training reports besides its loss rows: teacher-forced val metrics, the predictions of one
fixed val sample, TensorBoard scalars."""

from __future__ import annotations

import torch

from ..labels import IGNORE_INDEX, shifted_audio_targets
from ..loss import forward_loss
from ..metrics import MetricSums
from .model_prep import autocast

@torch.no_grad()
def val_metrics(module, val_batches: list, accelerator, device, dtype, tw: float, aw: float) -> dict:
    """Teacher-forced val metrics; batches are split across processes, sums all-reduced.

    ``module`` is the unwrapped model: its forward has no collective, so no process can wait on a
    DDP buffer broadcast that another never starts.
    """
    was_training = module.training
    module.eval()
    sums = MetricSums()
    for batch in val_batches[accelerator.process_index::accelerator.num_processes]:
        with autocast(device, dtype):
            _, loss = forward_loss(module, batch, device, text_weight=tw, audio_weight=aw)
        sums.add(loss, int(batch.input_ids.shape[0]))
    module.train(was_training)
    if accelerator.num_processes > 1:
        sums = sums.all_reduce(lambda t: accelerator.reduce(t.to(device), "sum"))
    return sums.result(tw, aw)


@torch.no_grad()
def predictions_record(model, batch, tokenizer, device, step: int, sample_id: str, n: int = 10, *,
                       text_weight: float, audio_weight: float) -> dict:
    """Predicted vs label tokens for the first and last ``n`` learnable positions of one sample
    (``text_weight``, ``audio_weight``: ``train.*_weight``, passed to :func:`~higgs_tune.loss.forward_loss`).

    Text: argmax of ``logits[0, t]`` vs ``expanded_labels[0, t + 1]``; audio, per codebook k:
    argmax of ``audio_logits[i, k]`` vs ``label_audio_ids[k, i + 1]`` (same segment).
    """
    was_training = model.training
    model.eval()
    out, loss = forward_loss(model, batch, device, text_weight=text_weight, audio_weight=audio_weight)
    model.train(was_training)
    labels = out.expanded_labels[0, 1:]
    pos = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
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
            rows = (tgt[:, k] != IGNORE_INDEX).nonzero().flatten().tolist()
            rows = rows if len(rows) <= 2 * n else rows[:n] + rows[-n:]
            codebooks.append({"codebook": k, "positions": rows, "predicted": [int(pred[r, k]) for r in rows],
                              "label": [int(tgt[r, k]) for r in rows]})
    acc = (loss.codebook_correct.double() / loss.n_codebook_targets.clamp(min=1)).tolist()
    return {"step": step, "sample_id": sample_id, "text": text, "codebooks": codebooks, "codebook_acc": acc,
            "text_acc": loss.text_correct / max(loss.n_text_targets, 1)}


def tensorboard_row(writer, row: dict) -> None:
    """Write one train-metrics ``row`` (step, losses, LR, grad norm, text accuracy, per-codebook loss and
    accuracy) to the TensorBoard ``writer`` (``torch.utils.tensorboard.SummaryWriter``)."""
    step = row["step"]
    for key in ("loss", "text_loss", "audio_loss", "lr", "grad_norm", "text_acc"):
        writer.add_scalar(f"train/{key}", row[key], step)
    for k, (cl, ca) in enumerate(zip(row["codebook_losses"], row["codebook_acc"])):
        writer.add_scalar(f"train/codebook_{k}_loss", cl, step)
        writer.add_scalar(f"train/codebook_{k}_acc", ca, step)
