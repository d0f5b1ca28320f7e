"""Training-health alarms: cheap checks run at every step; each failure is a typed error naming
the cause and the fix.

They catch, in the first steps, the failures that make hand-rolled Higgs trainers "learn nothing":
a loss rebuilt from ``.item()`` (no gradient), batches with nothing to learn, PEFT or a wrapper
dropping ``audio_out_ids`` / ``label_audio_ids`` (``task_type="CAUSAL_LM"`` does), a leaking shift
(audio loss ~0 after a few steps), and adapters that receive no gradient.
"""

from __future__ import annotations

import math

import torch

from .labels import IGNORE_INDEX, has_audio_targets


class TrainingHealthError(RuntimeError):
    """Base class: training stopped because a health check failed."""

    cause = "training-health check failed"
    fix = ""

    def __init__(self, detail: str):
        super().__init__(f"{self.cause}: {detail}. Fix: {self.fix}")
        self.detail = detail


class NonFiniteLoss(TrainingHealthError):
    cause = "non-finite loss"
    fix = "lower the learning rate, check for fp16 overflow (use bf16/fp32), and look for empty or corrupt batches"


class LossWithoutGrad(TrainingHealthError):
    cause = "loss tensor has no gradient"
    fix = ("build the loss from the model's logits as tensors (never from .item()/.detach()/float()); "
           "check that trainable parameters exist (LoRA applied) and torch.no_grad is not active")


class NoLearnableTargets(TrainingHealthError):
    cause = f"batch has zero learnable targets (every text and audio label is {IGNORE_INDEX})"
    fix = ("the labels are over-masked: check start_index, that assistant turns exist, and rerun the audit stage; "
           "a correct sample always has audio targets after the delay-pattern BOS")


class AudioInputsDropped(TrainingHealthError):
    cause = "audio_logits are empty while the batch has audio labels"
    fix = ("the model never saw audio_out_ids/label_audio_ids: a wrapper dropped them. Build peft's LoraConfig "
           "WITHOUT task_type (task_type='CAUSAL_LM' rewrites forward kwargs) and pass every collator field to forward")


class AudioLossBelowFloor(TrainingHealthError):
    cause = "audio loss fell below its floor early in training"
    fix = ("this is the signature of a label leak (targets visible in the input: an unshifted or wrongly shifted "
           "audio loss) or of over-masking leaving only trivial targets (EOS/padding). Run the audit stage's leak "
           "probe; raise train.alarms.audio_loss_floor only if you are sure")


class ZeroLoraGradient(TrainingHealthError):
    cause = "LoRA parameters received zero gradient"
    fix = ("the adapters are not on the computation path: check lora.target_modules against the model's module "
           "names and that the loss depends on the model output")


def check_loss(loss: torch.Tensor) -> None:
    """Raise :class:`NonFiniteLoss` or :class:`LossWithoutGrad` for a scalar training loss."""
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad or loss.grad_fn is None:
        raise LossWithoutGrad(f"got {type(loss).__name__} with requires_grad="
                              f"{getattr(loss, 'requires_grad', None)}")
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLoss(f"loss = {value}")


def check_targets(n_text: int, n_audio: int, step: int) -> None:
    """Raise :class:`NoLearnableTargets` when a batch (or window) has nothing to learn."""
    if n_text + n_audio == 0:
        raise NoLearnableTargets(f"optimizer step {step}")


def check_audio_outputs(audio_logits: torch.Tensor | None, label_audio_ids: torch.Tensor | None) -> None:
    """Raise :class:`AudioInputsDropped` if labels hold audio targets but ``audio_logits`` has no rows.

    ``audio_logits``: ``(N, K, C)`` or None; ``label_audio_ids``: ``(K, N)`` or None.
    """
    has_labels = has_audio_targets(label_audio_ids)
    if has_labels and (audio_logits is None or audio_logits.shape[0] == 0):
        raise AudioInputsDropped(f"label_audio_ids {tuple(label_audio_ids.shape)} has "
                                 f"{int((label_audio_ids != IGNORE_INDEX).sum())} targets, audio_logits is "
                                 f"{None if audio_logits is None else tuple(audio_logits.shape)}")


def check_audio_floor(audio_loss: float, step: int, floor: float, check_steps: int) -> None:
    """Raise :class:`AudioLossBelowFloor` when ``audio_loss < floor`` at ``step <= check_steps``."""
    if step <= check_steps and audio_loss < floor:
        raise AudioLossBelowFloor(f"audio loss {audio_loss:.5f} < floor {floor} at step {step} "
                                  f"(checked for the first {check_steps} steps)")


def lora_grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of the gradients of parameters whose name contains ``lora_`` (0.0 when none)."""
    sq = 0.0
    for name, p in model.named_parameters():
        if "lora_" in name and p.grad is not None:
            sq += float(p.grad.detach().float().pow(2).sum())
    return math.sqrt(sq)


def check_lora_grad(model: torch.nn.Module, step: int) -> float:
    """Return the LoRA gradient norm; raise :class:`ZeroLoraGradient` when it is 0."""
    norm = lora_grad_norm(model)
    if norm == 0.0:
        raise ZeroLoraGradient(f"gradient norm 0 on every lora_ parameter at step {step}")
    return norm
