"""Target-weighted metric sums over batches: held-out losses and teacher-forced top-1 accuracy.

Used by training (per optimizer step, and its periodic val rows) and by the evaluate stage. Means
are over **targets**, not batches: a batch's ``text_loss`` times its ``n_text_targets`` gives its
sum; codebook losses likewise per codebook. ``audio_loss`` is the mean of the per-codebook means
(as :func:`higgs_tune.loss.higgs_loss` defines it). Accuracies are teacher-forced, with the same
alignment as the loss (:mod:`higgs_tune.labels`).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .labels import NUM_CODEBOOKS
from .loss import forward_loss


class MetricSums:
    """Sums of CE and correct predictions, combined over batches (and over ranks with :meth:`all_reduce`)."""

    def __init__(self, k: int = NUM_CODEBOOKS):
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

    def as_tensor(self) -> torch.Tensor:
        """All sums packed in one float64 vector ``(4 + 3K,)`` (for one all-reduce)."""
        head = torch.tensor([self.text_sum, self.text_n, self.text_correct, self.n_samples], dtype=torch.float64)
        return torch.cat([head, self.cb_sum, self.cb_n.double(), self.cb_correct.double()])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "MetricSums":
        """Inverse of :meth:`as_tensor`."""
        t = t.detach().double().cpu()
        k = (t.numel() - 4) // 3
        s = cls(k)
        s.text_sum, s.text_n, s.text_correct, s.n_samples = float(t[0]), int(t[1]), int(t[2]), int(t[3])
        s.cb_sum, s.cb_n, s.cb_correct = t[4:4 + k].clone(), t[4 + k:4 + 2 * k].round().long(), \
            t[4 + 2 * k:].round().long()
        return s

    def all_reduce(self, reduce) -> "MetricSums":
        """Sums over every rank; ``reduce(tensor) -> tensor`` sums across processes (e.g.
        ``lambda t: accelerator.reduce(t, "sum")``)."""
        return MetricSums.from_tensor(reduce(self.as_tensor()))

    def result(self, text_weight: float, audio_weight: float) -> dict[str, Any]:
        """Means over all targets: ``loss`` (``text_weight * text_loss + audio_weight * audio_loss``:
        ``train.text_weight``, ``train.audio_weight``), ``text_loss``, ``audio_loss`` (mean of codebook losses),
        ``codebook_losses`` (K), ``codebook_acc`` (K), ``text_acc``, ``n_samples``, target counts."""
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
def evaluate_sums(model, batches: Iterable, device, *, text_weight: float, audio_weight: float) -> MetricSums:
    """Teacher-forced :class:`MetricSums` over collated ``batches`` (model switched to eval, then restored);
    the weights as :func:`higgs_tune.loss.forward_loss`'s."""
    was_training = model.training
    model.eval()
    sums = MetricSums()
    for batch in batches:
        _, loss = forward_loss(model, batch, device, text_weight=text_weight, audio_weight=audio_weight)
        sums.add(loss, int(batch.input_ids.shape[0]))
    model.train(was_training)
    return sums


def evaluate_batches(model, batches: Iterable, device, *, text_weight: float, audio_weight: float) -> dict[str, Any]:
    """Teacher-forced metrics over collated ``batches`` (see :meth:`MetricSums.result`; the weights:
    ``train.text_weight``, ``train.audio_weight``)."""
    sums = evaluate_sums(model, batches, device, text_weight=text_weight, audio_weight=audio_weight)
    return sums.result(text_weight, audio_weight)
