"""LoRA fine-tuning of Higgs Audio v2: text loss + per-codebook audio loss, teacher forcing.

Launch (one entry point, one config; Snakemake renders these through :mod:`higgs_tune.launch`):

    # one process (CPU or one GPU)
    accelerate launch --config_file config/accelerate.yaml --num_processes 1 -m higgs_tune.train ARGS
    # 8 GPUs on one node (or 2 CPU processes on gloo: same command, no GPU)
    accelerate launch --config_file config/accelerate.yaml --multi_gpu --num_processes 8 -m higgs_tune.train ARGS
    # 2 nodes x 4 GPUs: one launcher per node, rendezvous on the first host (inside a Slurm allocation)
    srun --overlap --nodes 2 --ntasks-per-node 1 bash -c 'accelerate launch --config_file config/accelerate.yaml \\
        --multi_gpu --num_machines 2 --num_processes 8 --machine_rank $SLURM_NODEID \\
        --main_process_ip HOST0 --main_process_port 29500 -m higgs_tune.train ARGS'
    # all of it via the workflow
    snakemake --profile profiles/slurm --configfile config/cluster.yaml

``ARGS`` are ``--config-json`` (or ``--configfile``) and the paths of :class:`TrainIO`, as the train
rule renders them. Refuses to start unless the audit passed.

**Global batch** = ``train.batch_size`` (per process) x processes x ``train.grad_accum_steps``.
Each epoch's sample order is a permutation drawn from ``(train.seed, epoch)`` alone; it is cut into
micro-steps of ``batch_size x processes`` samples, and process r takes slice r of each (so 2
processes x batch b and 1 process x batch 2b see the same samples in the same optimizer steps). With
``train.length_bucketing`` (default) the permutation is first cut into pools of ``train.bucket_pool``
micro-steps, each sorted by length and cut into micro-steps, and the micro-steps are shuffled
(:func:`bucketed_micro_steps`): less padding, every sample still once per epoch. With
``train.packing`` each process's micro-batch is packed end to end into rows of at most
``train.pack_positions`` positions (one row when null) under a block-diagonal attention mask
(:mod:`higgs_tune.packing`): the same loss and gradients with almost no padding. The
loss of one optimizer step is normalized by the target counts of the whole window across all
processes (``loss.py``), so it equals the loss of the global batch as one batch. The LR schedule
(linear warmup, cosine) counts optimizer steps, whatever the number of processes.

**Outputs** (one row per optimizer step in ``metrics``: ``step, epoch, loss, text_loss, audio_loss,
codebook_losses[K], codebook_acc[K], text_acc, n_samples, n_text_targets, n_audio_targets,
padding_efficiency, n_positions, n_padded_positions, lr, grad_norm, lora_grad_norm, elapsed_s``;
``n_positions`` / ``n_padded_positions``: the samples' positions / all positions of the padded
micro-batches of the step (all processes, all micro-steps) in the sequence the decoder layers run on
(text plus audio columns, padded to a multiple of 8: the model's merged ``attention_mask``, see
:func:`higgs_tune.data.batch_positions`); ``padding_efficiency`` is their ratio; ``val_metrics`` every
``eval_interval`` steps; ``predictions`` for a fixed val sample; TensorBoard scalars; the adapter; the final checkpoint).

**Preemption.** On SIGTERM or SIGUSR1 the trainer finishes the optimizer step in flight, writes a
checkpoint and exits with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again"). Checkpoints
(trainable parameters, optimizer, scheduler, every rank's RNG, data position, step, and the metric
rows so far) go to ``resume_dir`` every ``save_interval`` steps, atomically, the last
``keep_checkpoints`` kept; the next run of the same config on the same data resumes from the latest
one, and its metrics files continue with no gap and no duplicate.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from . import data as D
from . import health
from . import packing as P
from .config import add_config_args, config_from_args
from .fileio import append_jsonl, git_revision, read_jsonl, sha256_file, write_json, write_jsonl
from .labels import IGNORE_INDEX, shifted_audio_targets
from .loss import count_targets, forward_loss
from .metrics import MetricSums

log = logging.getLogger("higgs_tune.train")

#: Exit status after a checkpoint on SIGTERM/SIGUSR1 (sysexits.h ``EX_TEMPFAIL``): rerun to resume.
EXIT_PREEMPTED = 75
#: Exit status when the audit gate or a health alarm stops training.
EXIT_REFUSED = 2


class AuditNotPassed(RuntimeError):
    """Training refused: the audit summary is missing or says ``passed: false``."""


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with :data:`EXIT_PREEMPTED`."""

    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


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
    resume_dir: Path

    @classmethod
    def from_args(cls, args) -> "TrainIO":
        return cls(**{f.name: Path(getattr(args, f.name)) for f in fields(cls)})

    @property
    def logs(self) -> tuple[Path, Path, Path]:
        """The JSONL files a checkpoint carries so that a resumed run continues them."""
        return self.metrics, self.val_metrics, self.predictions


# ------------------------------------------------------------------------------------ data order
#: Default ``train.bucket_pool``: micro-steps per length-sorting pool.
BUCKET_POOL = 64


def epoch_order(n_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation of ``range(n_samples)`` from ``(seed, epoch)`` only."""
    order = list(range(n_samples))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def _groups_cost(lengths, groups: list[list[int]]) -> int:
    return sum(D.batch_positions([lengths[i] for i in g])[1] for g in groups)


def serpentine(step: list[int], world: int) -> list[int]:
    """Lay out one full micro-step (samples longest first, ``len(step)`` a multiple of ``world``) so
    that each process's contiguous slice (:func:`rank_slice`) has a similar total length.

    Samples are dealt to processes in boustrophedon order (0, 1, ..., W-1, W-1, ..., 1, 0, 0, 1, ...),
    then the processes' lists are concatenated: process r's share is ``result[r*b:(r+1)*b]``. With
    ``world`` 1 the step is returned as it is.
    """
    if world <= 1:
        return list(step)
    shares: list[list[int]] = [[] for _ in range(world)]
    for k, i in enumerate(step):
        turn, r = divmod(k, world)
        shares[r if turn % 2 == 0 else world - 1 - r].append(i)
    return [i for share in shares for i in share]


def bucketed_micro_steps(lengths, batch_size: int, world: int, seed: int, epoch: int, pool: int = BUCKET_POOL
                         ) -> list[list[int]]:
    """Length-bucketed micro-steps of one epoch: every sample exactly once, from ``(seed, epoch)`` only.

    With ``size = batch_size x world`` samples per micro-step:

    1. :func:`epoch_order`'s permutation is cut into pools of ``pool x size`` samples (the last pool
       takes the rest).
    2. Each pool is sorted by ``positions``, longest first (ties keep the permutation's order; a
       micro-batch's padded row is its longest sample's positions rounded up to 8,
       :func:`higgs_tune.data.batch_positions`), and cut into micro-steps of ``size`` samples. When
       ``size`` does not divide the epoch, the last pool also yields one short micro-step of
       ``n % size`` samples, placed where, in that pool's sorted order, it minimizes the pool's
       padded positions.
    3. The full micro-steps are shuffled (same random stream); the short one comes last, as in the
       random order, its samples in rank order (rank 0 first; a process may get none).
    4. Each full micro-step is laid out by :func:`serpentine`, so that the processes' slices have
       similar total lengths. (DDP waits for the slowest process, the one holding the longest
       sample whatever the split: balancing the slices costs no time and evens out idle waits.)

    Which samples form a micro-step depends on ``size`` only, never on the split, so 2 processes x
    batch b and 1 process x batch 2b see the same samples in the same optimizer steps.

    Args:
        lengths: one :class:`higgs_tune.data.SampleLength` per training sample (index = sample).
        batch_size: samples per process and micro-step, >= 1.
        world: number of processes, >= 1.
        pool: micro-steps per sorting pool, >= 1 (larger: less padding, less varied batches; a pool
            of a whole epoch repeats the same micro-batches every epoch, in a new order).

    Returns:
        Lists of sample indices, one per micro-step.
    """
    size = batch_size * world
    n = len(lengths)
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(n))
    rng.shuffle(order)  # == epoch_order(n, seed, epoch)
    per_pool = pool * size
    full: list[list[int]] = []
    short: list[int] = []
    for start in range(0, n, per_pool):
        chunk = sorted(order[start:start + per_pool], key=lambda i: -lengths[i].positions)
        rest = len(chunk) % size if start + per_pool >= n else 0
        if not rest:
            full += [chunk[j:j + size] for j in range(0, len(chunk), size)]
            continue
        # the short micro-step starts at t * size; full groups before it are aligned at 0, after it at `rest`
        g = (len(chunk) - rest) // size
        before = [0] * (g + 1)
        for t in range(g):
            before[t + 1] = before[t] + _groups_cost(lengths, [chunk[t * size:(t + 1) * size]])
        after = [0] * (g + 1)
        for t in range(g - 1, -1, -1):
            after[t] = after[t + 1] + _groups_cost(lengths, [chunk[rest + t * size:rest + (t + 1) * size]])
        t = min(range(g + 1), key=lambda t: (before[t] + after[t]
                                             + _groups_cost(lengths, [chunk[t * size:t * size + rest]]), t))
        full += [chunk[j * size:(j + 1) * size] for j in range(t)]
        full += [chunk[rest + j * size:rest + (j + 1) * size] for j in range(t, g)]
        short = chunk[t * size:t * size + rest]
    rng.shuffle(full)
    return [serpentine(step, world) for step in full] + ([short] if short else [])


@functools.lru_cache(maxsize=4)
def micro_steps(n_samples: int, batch_size: int, world: int, seed: int, epoch: int, lengths: tuple | None = None,
                pool: int = BUCKET_POOL) -> list[list[int]]:
    """One epoch cut into micro-steps of ``batch_size x world`` sample indices (the last may be short).

    ``lengths`` (a tuple of :class:`higgs_tune.data.SampleLength`, one per sample) turns on length
    bucketing (:func:`bucketed_micro_steps`, pools of ``pool`` micro-steps); ``None`` keeps the
    random order: :func:`epoch_order` cut in order. Cached (the result must not be modified).

    Raises:
        ValueError: when ``lengths`` does not hold ``n_samples`` entries.
    """
    size = batch_size * world
    if lengths is not None:
        if len(lengths) != n_samples:
            raise ValueError(f"{len(lengths)} lengths for {n_samples} samples")
        return bucketed_micro_steps(lengths, batch_size, world, seed, epoch, pool)
    order = epoch_order(n_samples, seed, epoch)
    return [order[i:i + size] for i in range(0, n_samples, size)]


def rank_slice(step_indices: list[int], batch_size: int, rank: int) -> list[int]:
    """Process ``rank``'s share of one micro-step: slice ``[rank*b, (rank+1)*b)`` (may be empty at an
    epoch's short last micro-step; that process then runs a zero-weight forward to keep DDP in step)."""
    return step_indices[rank * batch_size:(rank + 1) * batch_size]


@dataclass
class Position:
    """Where the data stream stands: ``epoch`` (0-based) and the next micro-step ``index`` in it."""

    epoch: int = 0
    index: int = 0


def next_window(pos: Position, n_samples: int, batch_size: int, world: int, seed: int, accum: int,
                lengths: tuple | None = None, pool: int = BUCKET_POOL) -> tuple[list[list[int]], Position]:
    """The ``accum`` micro-steps of the next optimizer step (a window may span an epoch boundary)
    and the position after it; ``lengths`` and ``pool`` as in :func:`micro_steps`."""
    window, epoch, index = [], pos.epoch, pos.index
    steps = micro_steps(n_samples, batch_size, world, seed, epoch, lengths, pool)
    while len(window) < accum:
        if index >= len(steps):
            epoch, index = epoch + 1, 0
            steps = micro_steps(n_samples, batch_size, world, seed, epoch, lengths, pool)
        window.append(steps[index])
        index += 1
    return window, Position(epoch, index)


# ------------------------------------------------------------------------------- model set-up
def trainable_to_fp32(model: torch.nn.Module) -> int:
    """Cast every trainable tensor (LoRA and ``modules_to_save`` copies) to fp32; return how many.

    peft keeps ``modules_to_save`` copies in the base dtype: with a bf16 base, AdamW's update of a
    bf16 weight at lr 1e-4..1e-5 mostly rounds away (bf16 has 8 bits of mantissa).
    """
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each decoder layer's activations in the backward pass (``torch.utils.checkpoint``,
    non-reentrant); return the number of layers wrapped.

    Upstream ``HiggsAudioModel._forward_core`` has no activation checkpointing, and it dispatches on
    the layer's class, so the layer's bound ``forward`` is wrapped in place. Active only while
    gradients are enabled and the KV cache is off (training); generation is unchanged.
    """
    import torch.utils.checkpoint as tuc

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = 0
    for layer in base.layers:
        inner = layer.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled() and not kwargs.get("use_cache"):
                return tuc.checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = forward
        n += 1
    return n


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast for a low-precision base (fp32 trainable weights meet bf16 activations);
    a no-op context for an fp32 base."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# -------------------------------------------------------------------------------- checkpoints
def run_fingerprint(cfg: dict, io: TrainIO, world: int) -> str:
    """What a checkpoint may be resumed under: the model/lora/train/eval config, the training
    inputs' bytes, the package's code and the number of processes. Any change starts from step 0."""
    h = hashlib.sha256()
    h.update(json.dumps({k: cfg.get(k) for k in ("model", "lora", "train", "eval")}, sort_keys=True).encode())
    for p in (io.train, io.val, io.index):
        h.update(sha256_file(p).encode())
    for src in sorted(Path(__file__).parent.rglob("*.py")):
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


# ------------------------------------------------------------------------------ eval, predictions
@torch.no_grad()
def val_metrics(module, val_batches: list, accelerator, device, dtype, tw: float, aw: float) -> dict:
    """Teacher-forced val metrics; batches are split across processes, sums all-reduced.

    ``module`` is the unwrapped model: its forward has no collective, so no process can wait on a
    DDP buffer broadcast that another never starts.
    """
    was_training = module.training
    module.eval()
    sums = MetricSums()
    for batch in val_batches[accelerator.process_index::accelerator.num_processes]:
        with autocast(device, dtype):
            _, loss = forward_loss(module, batch, device)
        sums.add(loss, int(batch.input_ids.shape[0]))
    module.train(was_training)
    if accelerator.num_processes > 1:
        sums = sums.all_reduce(lambda t: accelerator.reduce(t.to(device), "sum"))
    return sums.result(tw, aw)


@torch.no_grad()
def predictions_record(model, batch, tokenizer, device, step: int, sample_id: str, n: int = 10) -> dict:
    """Predicted vs label tokens for the first and last ``n`` learnable positions of one sample.

    Text: argmax of ``logits[0, t]`` vs ``expanded_labels[0, t + 1]``; audio, per codebook k:
    argmax of ``audio_logits[i, k]`` vs ``label_audio_ids[k, i + 1]`` (same segment).
    """
    was_training = model.training
    model.eval()
    out, loss = forward_loss(model, batch, device)
    model.train(was_training)
    labels = out.expanded_labels[0, 1:]
    pos = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    pos = pos if len(pos) <= 2 * n else pos[:n] + pos[-n:]
    pred_ids = out.logits[0, :-1].argmax(-1)
    text = {
        "positions": pos,
        "predicted": [tokenizer.decode([int(pred_ids[p])]) for p in pos],
        "label": [tokenizer.decode([int(labels[p])]) for p in pos],
    }
    codebooks = []
    if out.audio_logits is not None and out.audio_logits.shape[0]:
        tgt = shifted_audio_targets(batch.label_audio_ids.to(device), batch.audio_out_ids_start.to(device))
        pred = out.audio_logits.argmax(-1)  # (N, K)
        for k in range(tgt.shape[1]):
            rows = (tgt[:, k] != IGNORE_INDEX).nonzero().flatten().tolist()
            rows = rows if len(rows) <= 2 * n else rows[:n] + rows[-n:]
            codebooks.append({"codebook": k, "positions": rows, "predicted": [int(pred[r, k]) for r in rows],
                              "label": [int(tgt[r, k]) for r in rows]})
    acc = (loss.codebook_correct.double() / loss.n_codebook_targets.clamp(min=1)).tolist()
    return {"step": step, "sample_id": sample_id, "text": text, "codebooks": codebooks, "codebook_acc": acc,
            "text_acc": loss.text_correct / max(loss.n_text_targets, 1)}


def _tensorboard_row(writer, row: dict) -> None:
    step = row["step"]
    for key in ("loss", "text_loss", "audio_loss", "lr", "grad_norm", "text_acc"):
        writer.add_scalar(f"train/{key}", row[key], step)
    for k, (cl, ca) in enumerate(zip(row["codebook_losses"], row["codebook_acc"])):
        writer.add_scalar(f"train/codebook_{k}_loss", cl, step)
        writer.add_scalar(f"train/codebook_{k}_acc", ca, step)


# ------------------------------------------------------------------------------------- training
def train(cfg: dict, io: TrainIO) -> dict:
    """Run training as configured; returns the last metrics row.

    Raises:
        AuditNotPassed: the audit summary is missing or failed.
        health.TrainingHealthError: a health alarm fired.
        Preempted: SIGTERM/SIGUSR1 arrived; the checkpoint is written (exit :data:`EXIT_PREEMPTED`).
    """
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    from .model import apply_lora, build_model, device_and_dtype, load_text_tokenizer

    tc = cfg["train"]
    require_passed_audit(io.audit)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    torch.manual_seed(tc["seed"])
    random.seed(tc["seed"])
    np.random.seed(tc["seed"])
    _, dtype = device_and_dtype(cfg["model"]["device"], cfg["model"]["dtype"])
    preempt = PreemptionFlag()

    tok = load_text_tokenizer(cfg["model"]["text_tokenizer"])
    codes = D.CodesIndex(io.index)
    train_rows, val_rows = D.read_jsonl(io.train), D.read_jsonl(io.val)
    if not train_rows:
        raise SystemExit(f"{io.train} has no rows")
    model = build_model(cfg["model"], dtype, device=device)
    collator = D.make_collator(model.config)
    train_samples = [D.build_dataset_sample(r, tok, codes.get) for r in train_rows]
    # each sample's positions in the model's merged sequence (no forward): bucketing sorts by them,
    # packing lays the samples out by them
    sample_lengths = tuple(D.sample_length(s, model.config) for s in train_samples) \
        if tc["length_bucketing"] or tc["packing"] else None
    lengths = sample_lengths if tc["length_bucketing"] else None
    val_samples = [D.build_dataset_sample(r, tok, codes.get) for r in val_rows]
    val_batches = [collator(b) for b in D.batches(val_samples, cfg["eval"]["batch_size"], shuffle=False, seed=0)]
    probe = (collator([val_samples[0]]), D.sample_id(val_rows[0])) if val_samples else None

    model = apply_lora(model, cfg["lora"])
    trainable_to_fp32(model)
    if tc["gradient_checkpointing"]:
        log.info("gradient checkpointing on %d decoder layers", enable_gradient_checkpointing(model))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=tc["learning_rate"], weight_decay=tc["weight_decay"])
    bs, accum = tc["batch_size"], tc["grad_accum_steps"]
    steps_per_epoch = max(1, math.ceil(len(train_samples) / (bs * world)) // accum)
    max_steps = tc["max_steps"] or math.ceil((tc["epochs"] or 1) * steps_per_epoch)
    # not prepared: accelerate would step a prepared scheduler once per process per optimizer step
    scheduler = get_cosine_schedule_with_warmup(optimizer, tc["warmup_steps"], max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    ckpts = Checkpoints(io.resume_dir / run_fingerprint(cfg, io, world), tc["keep_checkpoints"], accelerator)
    if accelerator.is_main_process:
        for f in io.logs:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("")
    accelerator.wait_for_everyone()
    state = {"model_source": cfg["model"]["source"], "git_revision": git_revision(), "max_steps": max_steps,
             "trainable_parameters": n_trainable, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "num_processes": world, "global_batch_size": bs * world * accum, "resume_dir": str(ckpts.root)}
    step, pos, t0 = 0, Position(), time.time()
    latest = ckpts.latest()
    if latest is not None:
        step, pos, saved = ckpts.load(latest, model, optimizer, scheduler, io)
        state.update({k: saved[k] for k in ("step", "epoch", "finished", "preempted", "elapsed_s") if k in saved})
        state.update(resumed_from=str(latest), resumed_at_step=step, started=saved.get("started", state["started"]),
                     resumes=saved.get("resumes", 0) + 1, preempted=False)
        t0 -= saved.get("elapsed_s", 0.0)
        log.info("resumed from %s at step %d (epoch %d, micro-step %d)", latest, step, pos.epoch, pos.index)
    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        shutil.rmtree(io.tensorboard, ignore_errors=True)
        writer = SummaryWriter(str(io.tensorboard))
        for old in read_jsonl(io.metrics):  # a resumed run's curve starts where it left off
            _tensorboard_row(writer, old)
    log.info("training %d samples on %d process(es), global batch %d, %d steps, %d trainable parameters "
             "(LoRA rank %d)", len(train_samples), world, bs * world * accum, max_steps, n_trainable,
             cfg["lora"]["rank"])

    alarms, tw, aw = tc["alarms"], tc["text_weight"], tc["audio_weight"]
    row: dict = read_jsonl(io.metrics)[-1] if step and accelerator.is_main_process else {}
    while step < max_steps:
        window_idx, pos = next_window(pos, len(train_samples), bs, world, tc["seed"], accum, lengths,
                                      tc["bucket_pool"])
        mine = [rank_slice(w, bs, rank) for w in window_idx]
        # one micro-batch per micro-step: the padded rows, or (train.packing) the samples end to end
        # in rows with a block-diagonal attention mask (packing.py: same loss and gradients)
        packed, window = [], []
        for m, w in zip(mine, window_idx):
            idx = m or w[:1]  # an empty share runs a zero-weight forward on one sample
            samples = [train_samples[i] for i in idx]
            pk = P.packed_collate(samples, [sample_lengths[i] for i in idx], collator, tc["pack_positions"]) \
                if tc["packing"] else None
            packed.append(pk)
            window.append(pk.batch if pk is not None else collator(samples))
        counts = None
        for m, b in zip(mine, window):
            if m:
                c = count_targets(b.label_ids, b.label_audio_ids, b.audio_out_ids_start)
                counts = c if counts is None else counts + c
        counts = counts or count_targets(window[0].label_ids[:, :0], None, None)
        if world > 1:
            counts.text = int(accelerator.reduce(torch.tensor(counts.text, device=device), "sum"))
            counts.codebooks = accelerator.reduce(counts.codebooks.to(device), "sum").cpu()
        health.check_targets(counts.text, counts.audio, step + 1)
        sums = MetricSums()
        positions = torch.zeros(2, dtype=torch.float64)  # real, padded (model's merged sequence)
        for i, (m, batch, pk) in enumerate(zip(mine, window, packed)):
            # gradients are all-reduced once per optimizer step, on its last micro-step
            with contextlib.nullcontext() if i == len(window) - 1 else accelerator.no_sync(model):
                with autocast(device, dtype), (P.packed_attention(model, pk) if pk else contextlib.nullcontext()):
                    out, loss = forward_loss(model, batch, device, text_weight=tw, audio_weight=aw,
                                             normalizer=counts, text_logits_at_targets=True)
                # the merged attention mask: 1 = a sample's position, 0 = padding (a zero-weight
                # forward's positions are all padding: computed, not learned)
                positions += torch.tensor([float(out.attention_mask.sum()) if m else 0.0,
                                           float(out.attention_mask.numel())], dtype=torch.float64)
                if m:
                    health.check_audio_outputs(out.audio_logits, batch.label_audio_ids)
                    health.check_loss(loss.loss)
                    sums.add(loss, len(m))
                # DDP averages gradients over processes; the normalizer already counts all of them.
                # A process without samples in this micro-step (an epoch's short end) adds zeros.
                accelerator.backward(loss.loss * (world if m else 0.0))
        lora_norm = health.check_lora_grad(model, step + 1)
        grad_norm = float(accelerator.clip_grad_norm_(params, tc["max_grad_norm"]))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if world > 1:
            sums = sums.all_reduce(lambda t: accelerator.reduce(t.to(device), "sum"))
            positions = accelerator.reduce(positions.to(device), "sum").cpu()
        n_pos, n_padded = int(positions[0]), int(positions[1])
        row = {"step": step, "epoch": pos.epoch + 1, **sums.result(tw, aw),
               "padding_efficiency": n_pos / max(n_padded, 1), "n_positions": n_pos, "n_padded_positions": n_padded,
               "lr": scheduler.get_last_lr()[0],
               "grad_norm": grad_norm, "lora_grad_norm": lora_norm, "elapsed_s": round(time.time() - t0, 3)}
        health.check_audio_floor(row["audio_loss"], step, alarms["audio_loss_floor"], alarms["floor_check_steps"])
        last = step == max_steps
        if accelerator.is_main_process:
            append_jsonl(io.metrics, row)
            _tensorboard_row(writer, row)
            if step % tc["log_interval"] == 0:
                log.info("step %d/%d loss %.4f text %.4f audio %.4f lr %.2e", step, max_steps, row["loss"],
                         row["text_loss"], row["audio_loss"], row["lr"])
        if val_batches and (step % tc["eval_interval"] == 0 or last):
            val = val_metrics(unwrapped, val_batches, accelerator, device, dtype, tw, aw)
            if accelerator.is_main_process:
                append_jsonl(io.val_metrics, {"step": step, **val})
                writer.add_scalar("val/loss", val["loss"], step)
        if probe and accelerator.is_main_process and (step == 1 or step % tc["predictions_interval"] == 0 or last):
            with autocast(device, dtype):
                append_jsonl(io.predictions, predictions_record(unwrapped, probe[0], tok, device, step, probe[1]))
        stop = preempt.requested(accelerator)
        if step % tc["save_interval"] == 0 or last or stop:
            state.update(step=step, epoch=pos.epoch + 1, finished=last, elapsed_s=row["elapsed_s"],
                         preempted=bool(stop and not last))
            ckpts.save(step, model, optimizer, scheduler, pos, io, state)
            if accelerator.is_main_process:
                write_json(io.state, state)
        if stop and not last:
            if writer is not None:
                writer.close()
            log.warning("preempted: checkpoint at step %d in %s; rerun to resume", step, ckpts.root)
            raise Preempted(step)
    if accelerator.is_main_process:
        writer.close()
        unwrapped.save_pretrained(str(io.adapter), safe_serialization=True)
        shutil.rmtree(io.checkpoint, ignore_errors=True)
        shutil.copytree(ckpts.latest(), io.checkpoint)
        write_json(io.state, state)
    accelerator.wait_for_everyone()
    return row


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m higgs_tune.train", description=__doc__.splitlines()[0])
    add_config_args(parser)
    for f in fields(TrainIO):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, required=True)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    try:
        train(cfg, TrainIO.from_args(args))
    except (AuditNotPassed, health.TrainingHealthError) as exc:
        log.error("%s", exc)
        raise SystemExit(EXIT_REFUSED) from exc


if __name__ == "__main__":
    main()
