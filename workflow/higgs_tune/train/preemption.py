"""Preemption: the signals Slurm sends (SIGTERM on preemption or ``scancel``, SIGUSR1 ahead of the
time limit), turned into one flag every process agrees on between optimizer steps."""

from __future__ import annotations

import logging
import signal

import torch

log = logging.getLogger("higgs_tune.train")

#: Exit status after a checkpoint on SIGTERM/SIGUSR1 (sysexits.h ``EX_TEMPFAIL``): rerun to resume.
EXIT_PREEMPTED = 75


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with :data:`EXIT_PREEMPTED`."""

    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step



class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm's preemption and ``--signal`` lead time); read between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        for s in self.SIGNALS:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signum = signum
        log.warning("received %s: finishing this optimizer step, then checkpoint and exit %d",
                    signal.Signals(signum).name, EXIT_PREEMPTED)

    def requested(self, accelerator) -> bool:
        """Whether any process was signalled (one all-reduce when there are several)."""
        flag = torch.tensor(1.0 if self.signum is not None else 0.0, device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, "max")
        return bool(flag.item())
