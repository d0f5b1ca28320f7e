"""Resume checkpoints: what a checkpoint may be resumed under (the run fingerprint), writing one
atomically, finding the newest, and restoring every rank's state from it."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import codesig
from ..config import trajectory_config
from ..fileio import canonical_json, sha256_file, write_json
from .sampler import Position

if TYPE_CHECKING:
    from .contract import TrainIO

log = logging.getLogger("higgs_tune.train")

#: written last into a checkpoint: every other file's relative path, size (bytes) and sha256
MANIFEST = "manifest.json"


def run_fingerprint(cfg: dict, io: TrainIO, world: int) -> str:
    """What a checkpoint may be resumed under: exactly what changes the training trajectory, the
    model/lora config and the optimization keys of ``train`` (:func:`higgs_tune.config.trajectory_config`:
    not the run's length, logging, evaluation or checkpointing keys), the training inputs' bytes, the
    trainer's code (:func:`higgs_tune.codesig.code_sig` of the ``train`` package's import closure, as the
    rules hash it; the train rule also hashes the launcher, ``launch``, which reruns the job but does not
    change the trajectory, so a launcher edit still resumes) and the number of processes; the config as :func:`higgs_tune.fileio.canonical_json`.
    Any change of these starts from step 0; 16 hex digits."""
    h = hashlib.sha256()
    h.update(canonical_json(trajectory_config(cfg)).encode())
    for p in (io.train, io.val, io.index):
        h.update(sha256_file(p).encode())
    h.update(codesig.code_sig("train").encode())
    h.update(str(world).encode())
    return h.hexdigest()[:16]


class Checkpoints:
    """Resume checkpoints in ``{resume_dir}/{fingerprint}/step-XXXXXXXX/``.

    Beside them, ``adapters/step-XXXXXXXX/`` holds the LoRA adapter of every save step
    (:meth:`save_adapter`; not pruned). Each checkpoint holds ``trainable.safetensors`` (every
    trainable tensor, fp32), ``trainer.pt`` (optimizer,
    LR plan, step, data position), ``rng-rank{r}.pt`` per process (python, numpy, torch, CUDA),
    ``logs/`` (the metric JSONL files up to this step), ``state.json`` and, written last,
    :data:`MANIFEST` (each other file's size and sha256). A checkpoint is written into a temp folder,
    every file and folder fsynced, and renamed into place (atomic on POSIX), the parent fsynced; the
    newest ``keep`` are kept, temp folders of killed saves are removed. :meth:`latest` uses only a
    checkpoint whose files match its manifest, and falls back past a torn one with a warning.
    """

    def __init__(self, root: Path, keep: int, accelerator):
        self.root, self.keep, self.acc = Path(root), max(1, int(keep)), accelerator

    def latest(self) -> Path | None:
        """The newest complete checkpoint (its files match its manifest), or None. Torn or
        unverifiable ones are skipped with a warning naming what is wrong. Checked on the main
        process, the answer broadcast to the others."""
        choice = [None]
        if self.acc.is_main_process:
            self.remove_temporaries()
            for path in sorted(self.root.glob("step-*"), reverse=True):
                problem = verify(path)
                if problem is None:
                    choice[0] = str(path)
                    break
                log.warning("checkpoint %s is incomplete (%s): skipped, falling back to the previous one",
                            path, problem)
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(choice)
        return Path(choice[0]) if choice[0] else None

    def remove_temporaries(self) -> int:
        """Remove the temp folders (``.step-*.tmp``) of saves that were killed; return how many (main process)."""
        stale = list(self.root.glob(".step-*.tmp")) if self.root.is_dir() else []
        for tmp in stale:
            shutil.rmtree(tmp, ignore_errors=True)
        if stale:
            log.info("removed %d unfinished checkpoint temp folder(s) in %s", len(stale), self.root)
        return len(stale)

    def save(self, step: int, model, optimizer, scheduler, pos: Position, io: TrainIO, state: dict) -> Path:
        """Write the checkpoint of ``step`` (every rank calls it); returns its folder. ``scheduler``:
        anything with ``state_dict()`` (the :class:`~higgs_tune.train.schedule.Schedule`)."""
        from safetensors.torch import save_file

        acc, final = self.acc, self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            self.remove_temporaries()
            (tmp / "logs").mkdir(parents=True)
        acc.wait_for_everyone()
        rng = tmp / f"rng-rank{acc.process_index}.pt"
        torch.save(_rng_state(), rng)
        _fsync(rng)
        acc.wait_for_everyone()
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(model)
            save_file({n: p.detach().contiguous().cpu() for n, p in unwrapped.named_parameters() if p.requires_grad},
                      str(tmp / "trainable.safetensors"))
            for f in io.logs:
                shutil.copy2(f, tmp / "logs" / f.name)
            write_json(tmp / "state.json", state)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                        "position": {"epoch": pos.epoch, "index": pos.index}, "world": acc.num_processes},
                       tmp / "trainer.pt")
            files = sorted(f for f in tmp.rglob("*") if f.is_file())
            for f in files:
                _fsync(f)
            manifest = {f.relative_to(tmp).as_posix(): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                        for f in files}
            (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1, sort_keys=True))
            _fsync(tmp / MANIFEST)
            _fsync(tmp / "logs")
            _fsync(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync(self.root)
            others = sorted(p for p in self.root.glob("step-*") if p != final)
            # past this step: torn ones the resume skipped (a complete one would have been resumed)
            later = [p for p in others if p.name > final.name]
            for old in later + [p for p in others if p not in later][:-(self.keep - 1) or None]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    @property
    def adapters(self) -> Path:
        """``{root}/adapters``: the adapter snapshots, one ``step-XXXXXXXX/`` per save step (never pruned)."""
        return self.root / "adapters"

    def save_adapter(self, step: int, model) -> Path | None:
        """Write the LoRA adapter of ``step`` (``save_pretrained``: ``adapter_model.safetensors``,
        ``adapter_config.json``, the modules_to_save tensors included) to ``adapters/step-XXXXXXXX/``,
        atomically (a temp folder, fsynced, renamed into place). Not pruned by ``keep``: it is what
        ``eval.checkpoints`` scores, and it survives a preemption. Main process only (others: None)."""
        if not self.acc.is_main_process:
            return None
        final = self.adapters / f"step-{step:08d}"
        tmp = self.adapters / f".step-{step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.acc.unwrap_model(model).save_pretrained(str(tmp), safe_serialization=True)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(self.adapters)
        return final

    def copy_adapters(self, dest: Path, last_step: int) -> list[int]:
        """Replace folder ``dest`` with the adapter snapshots of steps <= ``last_step`` (each
        ``step-XXXXXXXX/``, as :meth:`save_adapter` wrote it); returns their steps, ascending."""
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        steps = []
        for snap in sorted(self.adapters.glob("step-*")) if self.adapters.is_dir() else []:
            if int(snap.name.removeprefix("step-")) <= last_step:
                shutil.copytree(snap, dest / snap.name)
                steps.append(int(snap.name.removeprefix("step-")))
        return steps

    def load(self, path: Path, model, optimizer, scheduler, io: TrainIO) -> tuple[int, Position, dict]:
        """Restore everything saved in ``path``; rewrite ``io``'s metric files as they were at that step."""
        from safetensors.torch import load_file

        acc = self.acc
        tensors = load_file(str(path / "trainable.safetensors"))
        params = dict(acc.unwrap_model(model).named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        _set_rng_state(torch.load(path / f"rng-rank{acc.process_index}.pt", weights_only=False))
        if acc.is_main_process:
            for f in io.logs:
                shutil.copy2(path / "logs" / f.name, f)
        acc.wait_for_everyone()
        return int(trainer["step"]), Position(**trainer["position"]), json.loads((path / "state.json").read_text())


def verify(path: Path) -> str | None:
    """None when checkpoint folder ``path`` is complete (its :data:`MANIFEST` is readable and every
    file it lists has the listed size and sha256), else what is wrong, in words."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable {MANIFEST}: {exc.__class__.__name__}: {exc}"
    for rel, want in sorted(manifest.items()):
        f = Path(path) / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
        if sha256_file(f) != want["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's data to disk (a folder: its entries, e.g. after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a folder: its files are synced already
        if not (Path(path).is_dir() and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
