"""Preemption: the signals Slurm sends (SIGTERM on preemption, ``scancel`` or at the time limit,
SIGUSR1 or SIGTERM ahead of it with ``--signal``) and the Slurm job's own end time, turned into one
flag every process agrees on between optimizer steps."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import torch

log = logging.getLogger("higgs_tune.train")

#: Exit status after a checkpoint on SIGTERM/SIGUSR1 (sysexits.h ``EX_TEMPFAIL``): rerun to resume.
EXIT_PREEMPTED = 75


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with :data:`EXIT_PREEMPTED`."""

    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step



#: ``higgs_tune.launch`` names a file here; a trainer that stops for a preemption writes its step to
#: it (the launcher's channel: the declared outputs are removed after such an exit)
PREEMPTED_FILE_ENV = "HIGGS_TUNE_PREEMPTED_FILE"
#: how often (s) the main process asks Slurm for the job's end time again (``scontrol update``
#: may change the time limit of a running job)
END_TIME_REFRESH_S = 60.0


def slurm_end_time(job_id: str) -> float | None:
    """The end time of Slurm job ``job_id`` (``squeue -h -j ID -o %e``) in seconds since the epoch,
    or None when the job has no time limit or Slurm does not answer (logged)."""
    try:
        res = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%e"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot ask Slurm for job %s's end time (%s): stopping on signals only", job_id, exc)
        return None
    out = res.stdout.strip()
    try:
        return time.mktime(time.strptime(out, "%Y-%m-%dT%H:%M:%S"))  # squeue prints local time
    except ValueError:
        if res.returncode != 0:
            log.warning("squeue -j %s failed (%s): stopping on signals only", job_id, res.stderr.strip()[:200])
        return None  # "N/A", "Unknown": no time limit


def note_preempted(step: int) -> None:
    """Tell the launcher (``$HIGGS_TUNE_PREEMPTED_FILE``, when set) that this process stopped for a
    preemption after ``step``."""
    path = os.environ.get(PREEMPTED_FILE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{step}\n")


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT (Slurm's preemption, ``scancel``, ``--signal`` lead time), or
    when the Slurm job ``job_id`` ends in less than ``stop_margin_s`` seconds; read between steps.

    Args:
        stop_margin_s: seconds before the job's end time at which to stop (0: signals only).
        job_id: the Slurm job to ask for its end time; None (not under Slurm, or not the main
            process: one process asks, :meth:`requested` shares its answer) for signals only.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, stop_margin_s: float, job_id: str | None = None):
        self.signum: int | None = None
        self.margin, self.job_id = float(stop_margin_s), job_id if stop_margin_s > 0 else None
        self.end: float | None = None
        self._asked = -float("inf")
        for s in self.SIGNALS:
            signal.signal(s, self._handler)
        self._near_end()

    def _handler(self, signum, frame) -> None:
        self.signum = signum
        log.warning("received %s: finishing this optimizer step, then checkpoint and exit %d",
                    signal.Signals(signum).name, EXIT_PREEMPTED)

    def _near_end(self) -> bool:
        if self.job_id is None:
            return False
        now = time.time()
        if now - self._asked >= END_TIME_REFRESH_S:
            self._asked, self.end = now, slurm_end_time(self.job_id)
        if self.end is not None and self.end - now < self.margin:
            log.warning("Slurm job %s ends at %s, in %.0f s (< train.stop_margin_s %.0f): checkpoint and exit %d",
                        self.job_id, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.end)), self.end - now,
                        self.margin, EXIT_PREEMPTED)
            return True
        return False

    def requested(self, accelerator) -> bool:
        """Whether any process was signalled or is near the job's end (one all-reduce when there are
        several)."""
        flag = torch.tensor(1.0 if self.signum is not None or self._near_end() else 0.0, device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, "max")
        return bool(flag.item())
