"""Resume checkpoints: what a checkpoint may be resumed under (the run fingerprint), writing one
atomically, finding the newest, and restoring every rank's state from it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..fileio import sha256_file, write_json
from .sampler import Position

if TYPE_CHECKING:
    from .loop import TrainIO

def run_fingerprint(cfg: dict, io: TrainIO, world: int) -> str:
    """What a checkpoint may be resumed under: the model/lora/train/eval config, the training
    inputs' bytes, the package's code and the number of processes. Any change starts from step 0."""
    h = hashlib.sha256()
    h.update(json.dumps({k: cfg.get(k) for k in ("model", "lora", "train", "eval")}, sort_keys=True).encode())
    for p in (io.train, io.val, io.index):
        h.update(sha256_file(p).encode())
    for src in sorted(Path(__file__).parent.parent.rglob("*.py")):
        h.update(src.read_bytes())
    h.update(str(world).encode())
    return h.hexdigest()[:16]


class Checkpoints:
    """Resume checkpoints in ``{resume_dir}/{fingerprint}/step-XXXXXXXX/``.

    Each holds ``trainable.safetensors`` (every trainable tensor, fp32), ``trainer.pt`` (optimizer,
    scheduler, step, data position), ``rng-rank{r}.pt`` per process (python, numpy, torch, CUDA),
    ``logs/`` (the metric JSONL files up to this step) and ``state.json``. A checkpoint is written
    into a temp folder and renamed into place when complete (rename is atomic on POSIX), so a kill
    at any moment leaves the previous one intact; the newest ``keep`` are kept.
    """

    def __init__(self, root: Path, keep: int, accelerator):
        self.root, self.keep, self.acc = Path(root), max(1, int(keep)), accelerator

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("step-*") if (p / "trainer.pt").is_file())
        return done[-1] if done else None

    def save(self, step: int, model, optimizer, scheduler, pos: Position, io: TrainIO, state: dict) -> Path:
        from safetensors.torch import save_file

        acc, final = self.acc, self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "logs").mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-rank{acc.process_index}.pt")
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
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(p for p in self.root.glob("step-*") if p != final)[:-(self.keep - 1) or None]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

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
