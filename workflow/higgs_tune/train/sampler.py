"""Which samples each process trains on, step by step: the epoch order, length bucketing, the
micro-steps of ``batch_size x processes`` samples, and each process's slice of them.

Each epoch's order is a permutation drawn from ``(train.seed, epoch)`` alone, so 2 processes x batch b
and 1 process x batch 2b see the same samples in the same optimizer steps.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from .. import data as D

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
