"""The train stage's contract: every path the train rule renders on its command line
(:class:`TrainIO`), and the audit gate it must pass before step 0."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


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


#: the :class:`TrainIO` fields the stage reads (the rule's inputs); the others it writes (``resume_dir``: both)
TRAIN_INPUTS = ("audit", "train", "val", "index")


@dataclass(frozen=True)
class TrainIO:
    """Every file the train stage reads or writes: the train rule's inputs and outputs, plus the
    resume folder (outside the outputs: Snakemake deletes those before rerunning the job)."""

    audit: Path
    train: Path
    val: Path
    index: Path
    metrics: Path
    val_metrics: Path
    predictions: Path
    adapter: Path
    checkpoint: Path
    state: Path
    tensorboard: Path
    steps: Path  # the adapter snapshot of every save step: step-XXXXXXXX/ (eval.checkpoints scores them)
    resume_dir: Path

    @classmethod
    def from_args(cls, args) -> "TrainIO":
        return cls(**{f.name: Path(getattr(args, f.name)) for f in fields(cls)})

    @property
    def logs(self) -> tuple[Path, Path, Path]:
        """The JSONL files a checkpoint carries so that a resumed run continues them."""
        return self.metrics, self.val_metrics, self.predictions
