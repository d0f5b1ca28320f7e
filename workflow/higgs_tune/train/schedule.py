"""The learning-rate plan: linear warmup then cosine decay, as the LR each optimizer step is applied
with; re-planned from a checkpoint when the run is made longer or shorter."""

from __future__ import annotations

import math


class ScheduleError(ValueError):
    """The configured schedule cannot run: warmup as long as the run, or a run shorter than its checkpoint."""


class Schedule:
    """LR of optimizer step ``k`` (1-based) as a list of segments, each ``{"from_step", "to_step",
    "warmup_steps", "start", "decay_from"}`` (the plan made at ``from_step`` for a run ending at
    ``to_step``); step ``k`` follows the last segment with ``from_step < k`` and runs at
    ``peak x factor``, where factor is ``start + (1 - start) x (k - from_step) / (warmup_steps + 1)``
    during the segment's warmup and then the cosine ``f0 x (1 + cos(pi x j / n)) / 2`` (``j`` steps after the
    warmup, ``n`` = the segment's steps after its warmup, ``f0`` = ``decay_from``). A fresh run is
    one segment from step 0 (start 0): steps 1..W ramp up linearly (step 1 at ``peak / (W + 1)``),
    step W + 1 runs at the peak, the cosine then decays and never reaches 0 within the run. :meth:`apply` sets the optimizer's lr *before* the
    step it is used for.

    Raises:
        ScheduleError: ``warmup_steps >= total_steps`` (the LR would never peak).
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int):
        if warmup_steps >= total_steps:
            raise ScheduleError(f"train.warmup_steps ({warmup_steps}) >= the run's optimizer steps ({total_steps}): "
                                f"the learning rate would never reach its peak; lower warmup_steps below "
                                f"{total_steps} or train longer (train.max_steps / train.epochs)")
        self.peak = float(peak)
        self.segments = [{"from_step": 0, "to_step": int(total_steps), "warmup_steps": int(warmup_steps),
                          "start": 0.0, "decay_from": 1.0}]

    @property
    def total_steps(self) -> int:
        return self.segments[-1]["to_step"]

    def factor(self, step: int) -> float:
        """The LR factor (of the peak) step ``step`` (1-based) is applied with."""
        seg = [s for s in self.segments if s["from_step"] < step][-1:] or self.segments[:1]
        seg = seg[0]
        k, w = step - seg["from_step"], seg["warmup_steps"]
        if k <= w:
            return seg["start"] + (1.0 - seg["start"]) * k / (w + 1)
        n = seg["to_step"] - seg["from_step"] - w
        return seg["decay_from"] * 0.5 * (1.0 + math.cos(math.pi * (k - w - 1) / n))

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1-based)."""
        return self.peak * self.factor(step)

    def apply(self, optimizer, step: int) -> float:
        """Set every param group's lr to :meth:`lr` of ``step`` (call before ``optimizer.step()``); returns it."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def replan(self, at_step: int, total_steps: int) -> bool:
        """Make the run ``total_steps`` long, continuing from ``at_step`` (a checkpoint's step); returns
        whether the plan changed. Steps up to ``at_step`` keep their LR; what was left of the warmup is
        kept; past it, the cosine decays from the LR of ``at_step`` towards 0 over the new remaining steps.

        Raises:
            ScheduleError: ``total_steps < at_step`` (the checkpoint is past the new end).
        """
        if total_steps == self.total_steps:
            return False
        if total_steps < at_step:
            raise ScheduleError(f"the run is now {total_steps} optimizer steps (train.max_steps / train.epochs) but "
                                f"its latest checkpoint is at step {at_step}: a checkpoint cannot be untrained; raise "
                                f"max_steps to at least {at_step}, or delete the experiment's train.resume_dir "
                                f"folder to train from step 0")
        first = self.segments[0]
        if at_step <= first["warmup_steps"]:  # the ramp to the peak (step W + 1) does not depend on the length
            if first["warmup_steps"] >= total_steps:
                raise ScheduleError(f"train.warmup_steps ({first['warmup_steps']}) >= the run's optimizer steps "
                                    f"({total_steps}): lower warmup_steps or train longer")
            self.segments = [{**first, "to_step": int(total_steps)}]
            return True
        keep = [s for s in self.segments if s["from_step"] < at_step]
        self.segments = keep + [{"from_step": int(at_step), "to_step": int(total_steps), "warmup_steps": 0,
                                 "start": 1.0, "decay_from": self.factor(at_step) if at_step else 1.0}]
        return True

    def state_dict(self) -> dict:
        return {"peak": self.peak, "segments": [dict(s) for s in self.segments]}

    def load_state_dict(self, state: dict) -> None:
        self.peak, self.segments = float(state["peak"]), [dict(s) for s in state["segments"]]
