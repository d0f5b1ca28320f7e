"""Held-out evaluation: text loss, audio loss, per-codebook loss and teacher-forced top-1 accuracy.

CLI (stage ``evaluate``): ``python -m higgs_tune.evaluate --configfile config/demo.yaml`` loads the
base model and the trained LoRA adapter (``results/{exp}/train/adapter``), runs the val split
with teacher forcing, and writes ``results/{exp}/eval/metrics.json``.

Accuracies are teacher-forced: the argmax of ``audio_logits[i, k]`` against
``label_audio_ids[k, i + 1]`` (same segment), and of ``logits[b, t]`` against
``expanded_labels[b, t + 1]`` — the same alignment as the loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from . import data as D
from .config import Paths, add_config_args, config_from_args
from .loss import forward_loss

log = logging.getLogger("higgs_tune.evaluate")


class MetricSums:
    """Target-weighted sums of CE and correct predictions, combined over batches."""

    def __init__(self, k: int = 8):
        self.text_sum = 0.0
        self.text_n = 0
        self.text_correct = 0
        self.cb_sum = torch.zeros(k, dtype=torch.float64)
        self.cb_n = torch.zeros(k, dtype=torch.long)
        self.cb_correct = torch.zeros(k, dtype=torch.long)
        self.n_samples = 0

    def add(self, out, n_samples: int) -> None:
        """Add one :class:`~higgs_tune.loss.HiggsLoss` (means times counts give sums)."""
        self.text_sum += float(out.text_loss.detach()) * out.n_text_targets
        self.text_n += out.n_text_targets
        self.text_correct += out.text_correct
        n = out.n_codebook_targets.cpu()
        self.cb_sum += out.codebook_losses.detach().double().cpu() * n
        self.cb_n += n
        self.cb_correct += out.codebook_correct.cpu()
        self.n_samples += n_samples

    def result(self, text_weight: float = 1.0, audio_weight: float = 1.0) -> dict[str, Any]:
        """Means over all targets: ``loss``, ``text_loss``, ``audio_loss`` (mean of codebook losses),
        ``codebook_losses`` (8), ``codebook_acc`` (8), ``text_acc``, counts."""
        cb_loss = (self.cb_sum / self.cb_n.clamp(min=1)).tolist()
        text_loss = self.text_sum / max(self.text_n, 1)
        audio_loss = sum(cb_loss) / len(cb_loss) if int(self.cb_n.sum()) else 0.0
        return {
            "loss": text_weight * text_loss + audio_weight * audio_loss,
            "text_loss": text_loss,
            "audio_loss": audio_loss,
            "codebook_losses": cb_loss,
            "codebook_acc": (self.cb_correct.double() / self.cb_n.clamp(min=1)).tolist(),
            "text_acc": self.text_correct / max(self.text_n, 1),
            "n_samples": self.n_samples,
            "n_text_targets": self.text_n,
            "n_audio_targets": int(self.cb_n.sum()),
        }


@torch.no_grad()
def evaluate_batches(model, batches: Iterable, device, *, text_weight=1.0, audio_weight=1.0) -> dict[str, Any]:
    """Teacher-forced metrics over collated ``batches`` (model switched to eval, then restored)."""
    was_training = model.training
    model.eval()
    sums = MetricSums()
    for batch in batches:
        _, loss = forward_loss(model, batch, device)
        sums.add(loss, int(batch.input_ids.shape[0]))
    model.train(was_training)
    return sums.result(text_weight, audio_weight)


def load_trained(cfg: dict, adapter_dir: Path, device):
    """Base model from config + the LoRA adapter saved by training, in eval mode on ``device``."""
    from peft import PeftModel

    from .model import build_model, device_and_dtype

    _, dtype = device_and_dtype(cfg["model"]["device"], cfg["model"]["dtype"])
    base = build_model(cfg["model"], dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).to(device).eval()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    cfg = config_from_args(parser.parse_args(argv))
    paths = Paths(cfg)
    from .model import device_and_dtype, load_text_tokenizer

    device, _ = device_and_dtype(cfg["model"]["device"], cfg["model"]["dtype"])
    t0 = time.time()
    model = load_trained(cfg, paths.adapter, device)
    tok = load_text_tokenizer(cfg["model"]["text_tokenizer"])
    codes = D.CodesIndex(paths.tokens_index)
    rows = D.read_jsonl(paths.val_manifest)
    if not rows:
        raise SystemExit(f"{paths.val_manifest} has no rows: raise data.val_fraction to evaluate")
    collator = D.make_collator(model.config)
    samples = [D.build_dataset_sample(r, tok, codes.get) for r in rows]
    batches = [collator(b) for b in D.batches(samples, cfg["eval"]["batch_size"], shuffle=False, seed=0)]
    tw, aw = cfg["train"]["text_weight"], cfg["train"]["audio_weight"]
    metrics = evaluate_batches(model, batches, device, text_weight=tw, audio_weight=aw)
    metrics.update(split="val", adapter=str(paths.adapter), model_source=cfg["model"]["source"],
                   elapsed_s=round(time.time() - t0, 2))
    paths.eval_metrics.parent.mkdir(parents=True, exist_ok=True)
    paths.eval_metrics.write_text(json.dumps(metrics, indent=2))
    log.info("val: loss %.4f text %.4f audio %.4f codebook acc %s", metrics["loss"], metrics["text_loss"],
             metrics["audio_loss"], [round(a, 3) for a in metrics["codebook_acc"]])


if __name__ == "__main__":
    main()
