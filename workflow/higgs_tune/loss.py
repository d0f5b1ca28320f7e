"""The Higgs Audio training loss: next-token cross-entropy on text and on each audio codebook.

``HiggsAudioModel.forward`` returns no loss and its labels are not shifted: the shift (text
``logits[:, t]`` -> ``expanded_labels[:, t + 1]``; audio ``audio_logits[i]`` ->
``label_audio_ids[:, i + 1]`` inside one segment) is defined once in :mod:`higgs_tune.labels`
and applied here.

Skipping the shift (predicting the label of the input position itself) lets the model copy its
input: the loss falls to ~0 and generation produces silence or noise. The audit stage's leak probe
checks this wiring on the real model before training starts.

Gradient accumulation: a mean over each micro-batch weights micro-batches equally, not targets
(the bug transformers fixed for gradient accumulation in v4.46, Oct 2024). Pass ``normalizer``,
the target counts of the whole accumulation window (:func:`count_targets`), and the micro-batch
losses sum to the loss of the window as one batch.

Text logits at the targets only: ``HiggsAudioModel.forward`` applies the 128256-way text head to
every position, audio positions included, although only the text targets (a few per TTS sample)
enter the loss. ``forward_loss(..., text_logits_at_targets=True)`` (training) makes the head pass
its input through during the forward and applies it afterwards to the target positions alone:
the same loss and gradients (tested), without the ``B x L x V`` logits and their gradient.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .labels import IGNORE_INDEX, NUM_CODEBOOKS, same_segment_mask, shifted_audio_targets, shifted_text_labels

__all__ = ["HiggsLoss", "TargetCounts", "count_targets", "deferred_text_head", "forward_loss", "higgs_loss",
           "same_segment_mask", "shifted_audio_targets", "text_head_of"]


@dataclass
class TargetCounts:
    """Numbers of learnable targets. ``text``: int; ``codebooks``: int tensor ``(K,)``."""

    text: int
    codebooks: torch.Tensor

    def __add__(self, other: "TargetCounts") -> "TargetCounts":
        return TargetCounts(self.text + other.text, self.codebooks + other.codebooks)

    @property
    def audio(self) -> int:
        return int(self.codebooks.sum())


@dataclass
class HiggsLoss:
    """Result of :func:`higgs_loss`. Scalars are 0-d float tensors; ``loss`` carries the graph.

    Attributes:
        loss: ``text_weight * text_loss + audio_weight * audio_loss`` (normalized by ``normalizer``
            when one was given, else by this batch's own counts).
        text_loss: mean CE over this batch's valid text targets (0 when there are none).
        audio_loss: mean of the K ``codebook_losses``.
        codebook_losses: ``(K,)`` mean CE over this batch's valid targets of codebook k.
        codebook_correct: ``(K,)`` number of targets whose argmax prediction is right
            (teacher-forced top-1 accuracy = ``codebook_correct / n_codebook_targets``).
        text_correct: number of text targets predicted right by argmax.
        n_text_targets: number of valid text targets.
        n_codebook_targets: ``(K,)`` number of valid targets per codebook.
        n_audio_targets: sum of ``n_codebook_targets``.
    """

    loss: torch.Tensor
    text_loss: torch.Tensor
    audio_loss: torch.Tensor
    codebook_losses: torch.Tensor
    codebook_correct: torch.Tensor
    text_correct: int
    n_text_targets: int
    n_codebook_targets: torch.Tensor
    n_audio_targets: int


def count_targets(label_ids: torch.Tensor, label_audio_ids: torch.Tensor | None,
                  audio_out_ids_start: torch.Tensor | None, num_codebooks: int = NUM_CODEBOOKS) -> TargetCounts:
    """Learnable-target counts of a collated batch, before any forward pass.

    ``label_ids (B, L)`` are the collator's text labels (the model only inserts -100 for audio
    positions when it expands them, so the counts match ``expanded_labels``).
    """
    text = int((label_ids[:, 1:] != IGNORE_INDEX).sum())
    if label_audio_ids is None or label_audio_ids.numel() == 0:
        return TargetCounts(text, torch.zeros(num_codebooks, dtype=torch.long))
    tgt = shifted_audio_targets(label_audio_ids, audio_out_ids_start)
    return TargetCounts(text, (tgt != IGNORE_INDEX).sum(0).cpu())


def higgs_loss(
    logits: torch.Tensor,
    expanded_labels: torch.Tensor,
    audio_logits: torch.Tensor | None,
    label_audio_ids: torch.Tensor | None,
    audio_out_ids_start: torch.Tensor | None,
    *,
    text_weight: float,
    audio_weight: float,
    normalizer: TargetCounts | None = None,
    text_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> HiggsLoss:
    """Next-token CE for text and per audio codebook (teacher forcing, ignore index -100).

    Args:
        logits: float ``(B, L, V)`` text logits from ``HiggsAudioModel.forward``; with ``text_head``,
            the ``(B, L, H)`` hidden states the text head maps to them.
        expanded_labels: long ``(B, L)``, unshifted labels (``outputs.expanded_labels``).
        audio_logits: float ``(N, K, C)`` (C = codebook size + 2 = 1026), or None / N = 0.
        label_audio_ids: long ``(K, N)``, unshifted audio labels from the collator.
        audio_out_ids_start: long ``(S,)``, segment starts in the concatenated audio stream.
        text_weight, audio_weight: weights of the two terms in ``loss`` (``train.text_weight``,
            ``train.audio_weight``); the other fields do not depend on them.
        normalizer: counts over a whole gradient-accumulation window; when given, ``loss`` is
            ``sum of CE / window count`` so that micro-batch losses add up to the window's loss.
        text_head: ``(n, H) -> (n, V)``, applied to the hidden states of the target positions only.

    Returns:
        :class:`HiggsLoss`. Empty modalities contribute 0 (never NaN).

    Raises:
        ValueError: on shape mismatches (``expanded_labels`` vs ``logits``, ``audio_logits`` rows vs
            ``label_audio_ids`` columns, codebook count).
    """
    if expanded_labels.shape != logits.shape[:2]:
        raise ValueError(f"expanded_labels {tuple(expanded_labels.shape)} does not match logits {tuple(logits.shape)}")
    # text: logits at t predict the label of t + 1
    # only target positions are gathered and cast to fp32 (never a copy of all B x L x V logits)
    t_labels = shifted_text_labels(expanded_labels)
    valid = t_labels != IGNORE_INDEX
    n_text = int(valid.sum())
    if n_text:
        t_rows = logits[:, :-1][valid]  # (n_text, V), or (n_text, H) with text_head
        t_logits = (text_head(t_rows) if text_head is not None else t_rows).float()
        t_tgt = t_labels[valid]
        text_sum = F.cross_entropy(t_logits, t_tgt, reduction="sum")
        text_correct = int((t_logits.argmax(-1) == t_tgt).sum())
    else:  # keep the graph connected (zero gradients) so DDP and accumulation see every parameter
        text_sum = (logits.sum() + (text_head(logits[:1, 0]).sum() if text_head is not None else 0.0)) * 0.0
        text_correct = 0

    k = label_audio_ids.shape[0] if label_audio_ids is not None and label_audio_ids.dim() == 2 else (
        audio_logits.shape[1] if audio_logits is not None and audio_logits.dim() == 3 else NUM_CODEBOOKS)
    cb_sum = logits.new_zeros(k, dtype=torch.float32)
    cb_n = torch.zeros(k, dtype=torch.long, device=logits.device)
    cb_correct = torch.zeros(k, dtype=torch.long, device=logits.device)
    has_audio = label_audio_ids is not None and label_audio_ids.numel() > 0
    if audio_logits is not None:
        cb_sum = cb_sum + audio_logits.sum() * 0.0  # graph-connected zeros, as for text
    if has_audio:
        n = label_audio_ids.shape[1]
        if audio_logits is None or audio_logits.shape[0] != n:
            got = None if audio_logits is None else tuple(audio_logits.shape)
            raise ValueError(f"audio_logits {got} must have one row per label_audio_ids column ({n})")
        if audio_logits.shape[1] != k:
            raise ValueError(f"audio_logits has {audio_logits.shape[1]} codebooks, label_audio_ids {k}")
        targets = shifted_audio_targets(label_audio_ids, audio_out_ids_start)  # (N, K)
        a_valid = targets != IGNORE_INDEX
        if a_valid.any():
            flat_logits = audio_logits.float()[a_valid]  # (M, C)
            flat_tgt = targets[a_valid]
            ce = F.cross_entropy(flat_logits, flat_tgt, reduction="none")
            cb_index = torch.arange(k, device=logits.device).expand_as(targets)[a_valid]
            cb_sum = cb_sum.index_add(0, cb_index, ce)
            cb_n = a_valid.sum(0)
            cb_correct = torch.zeros_like(cb_n).index_add(0, cb_index, (flat_logits.argmax(-1) == flat_tgt).long())

    text_loss = text_sum / max(n_text, 1)
    codebook_losses = cb_sum / cb_n.clamp(min=1)
    audio_loss = codebook_losses.mean()  # all-zero (graph-connected) when there is no audio
    if normalizer is None:
        loss = text_weight * text_loss + audio_weight * audio_loss
    else:
        norm_cb = normalizer.codebooks.to(cb_sum.device).clamp(min=1)
        loss = text_weight * text_sum / max(normalizer.text, 1) + audio_weight * (cb_sum / norm_cb).mean()
    return HiggsLoss(
        loss=loss,
        text_loss=text_loss,
        audio_loss=audio_loss,
        codebook_losses=codebook_losses,
        codebook_correct=cb_correct,
        text_correct=text_correct,
        n_text_targets=n_text,
        n_codebook_targets=cb_n,
        n_audio_targets=int(cb_n.sum()),
    )


def text_head_of(model) -> torch.nn.Module:
    """The text head (``audio_decoder_proj.text_lm_head``) of a ``HiggsAudioModel``, also inside peft
    and DDP wrappers (a peft ``modules_to_save`` wrapper is returned as it is: calling it runs the
    trained copy)."""
    m = model
    while isinstance(getattr(m, "module", None), torch.nn.Module):  # DistributedDataParallel
        m = m.module
    if hasattr(m, "get_base_model"):  # peft
        m = m.get_base_model()
    return m.audio_decoder_proj.text_lm_head


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def deferred_text_head(model):
    """While active, ``model``'s text head returns its input: ``outputs.logits`` holds the final
    hidden states ``(B, L, H)``. Yields the head (call it on the rows that need logits); restored on
    exit, even on an error."""
    head = text_head_of(model)
    head.forward = _identity  # an instance attribute shadows the class's forward (nn.Module calls self.forward)
    try:
        yield head
    finally:
        del head.forward


def forward_loss(model, batch, device, *, text_weight: float, audio_weight: float, normalizer=None,
                 text_logits_at_targets: bool = False):
    """Run ``model`` on one collated ``HiggsAudioBatchInput`` and return ``(outputs, HiggsLoss)``.

    The one place where model outputs meet :func:`higgs_loss`: training, evaluation, predictions and
    the audit all call it, so they share one wiring (``outputs.expanded_labels``, the collator's
    ``label_audio_ids`` and ``audio_out_ids_start``). ``text_weight``, ``audio_weight``, ``normalizer``:
    as :func:`higgs_loss`.

    With ``text_logits_at_targets`` (training) the text head runs on the target positions only
    (:func:`deferred_text_head`): same loss and gradients, and ``outputs.logits`` then holds the
    final hidden states ``(B, L, H)``, not logits.
    """
    from .data import batch_to_model_kwargs

    kwargs = batch_to_model_kwargs(batch, device)
    head = None
    if text_logits_at_targets:
        with deferred_text_head(model) as head:
            out = model(**kwargs)
    else:
        out = model(**kwargs)
    loss = higgs_loss(out.logits, out.expanded_labels, out.audio_logits, kwargs["label_audio_ids"],
                      kwargs["audio_out_ids_start"], text_weight=text_weight, audio_weight=audio_weight,
                      normalizer=normalizer, text_head=head)
    return out, loss
