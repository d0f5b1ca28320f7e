"""Early stopping (``train.patience``): the run stops once the in-training val loss has not improved
for ``patience`` val passes in a row."""

from __future__ import annotations


class EarlyStopping:
    """The patience counter over the in-training val passes (``val_metrics`` rows, every
    ``train.eval_interval`` steps and at the last step).

    A pass improves when its val loss is strictly below the lowest so far (the first pass always
    does). :attr:`stop` is true once ``patience`` passes in a row did not improve; ``patience`` 0
    never stops. The counter travels in the checkpoint's ``state.json`` (:meth:`state_dict`), so a
    resumed run continues it; ``patience`` itself is read from the config each run (a length key:
    raising it after a stop lets the run continue from its latest checkpoint).
    """

    def __init__(self, patience: int, state: dict | None = None):
        state = state or {}
        self.patience = int(patience)
        self.best_step: int | None = state.get("best_step")
        self.best_loss: float | None = state.get("best_val_loss")
        self.since_best: int = int(state.get("evaluations_since_best", 0))

    def update(self, step: int, val_loss: float) -> None:
        """Count the val pass after optimizer step ``step`` with val loss ``val_loss`` (nats)."""
        if self.best_loss is None or val_loss < self.best_loss:
            self.best_step, self.best_loss, self.since_best = step, float(val_loss), 0
        else:
            self.since_best += 1

    @property
    def stop(self) -> bool:
        """True when ``patience`` > 0 passes in a row did not improve the val loss."""
        return self.patience > 0 and self.since_best >= self.patience

    def state_dict(self) -> dict:
        """``{"best_step", "best_val_loss", "evaluations_since_best"}`` (JSON; for the checkpoint)."""
        return {"best_step": self.best_step, "best_val_loss": self.best_loss, "evaluations_since_best": self.since_best}

    def record(self, step: int) -> dict:
        """What ``state.json["stopped_early"]`` says of a run stopped at ``step``: ``{"step",
        "best_step", "best_val_loss", "patience"}``."""
        return {"step": step, "best_step": self.best_step, "best_val_loss": self.best_loss, "patience": self.patience}
