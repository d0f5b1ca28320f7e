"""Which samples each process trains on, step by step: the epoch order, length bucketing, the
micro-steps of ``batch_size x processes`` samples (or of one token-budget micro-batch per process,
``train.max_tokens``), and each process's share of them (:class:`Batching` puts them together).

Each epoch's order is a permutation drawn from ``(train.seed, epoch)`` alone, so 2 processes x batch b
and 1 process x batch 2b see the same samples in the same optimizer steps; with a token budget,
2 processes x ``grad_accum_steps`` a and 1 process x 2a do.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

from .. import data as D
from ..packing import pack_rows

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


def bucketed_micro_steps(lengths, batch_size: int, world: int, seed: int, epoch: int, pool: int) -> list[list[int]]:
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
        pool: micro-steps per sorting pool (``train.bucket_pool``), >= 1 (larger: less padding, less
            varied batches; a pool of a whole epoch repeats the same micro-batches every epoch, in a new order).

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
                pool: int | None = None) -> list[list[int]]:
    """One epoch cut into micro-steps of ``batch_size x world`` sample indices (the last may be short).

    ``lengths`` (a tuple of :class:`higgs_tune.data.SampleLength`, one per sample) turns on length
    bucketing (:func:`bucketed_micro_steps`, pools of ``pool`` micro-steps, ``train.bucket_pool``: required
    then); ``None`` keeps the random order: :func:`epoch_order` cut in order. Cached (the result must not be
    modified).

    Raises:
        ValueError: when ``lengths`` does not hold ``n_samples`` entries, or is given without ``pool``.
    """
    size = batch_size * world
    if lengths is not None:
        if len(lengths) != n_samples:
            raise ValueError(f"{len(lengths)} lengths for {n_samples} samples")
        if pool is None:
            raise ValueError("length bucketing needs pool (train.bucket_pool)")
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
                lengths: tuple | None = None, pool: int | None = None) -> tuple[list[list[int]], Position]:
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


# ------------------------------------------------------------------------------ token budget
def micro_batch_positions(lengths, packing: bool, pack_positions: int | None = None) -> int:
    """All positions (padding included) of one process's micro-batch of samples with these
    :class:`higgs_tune.data.SampleLength` s, as the model runs it: padded rows
    (:func:`higgs_tune.data.batch_positions`: ``B x`` the longest rounded up to 8), or with
    ``packing`` (``train.packing``) the rows of :func:`higgs_tune.packing.pack_rows` (at most ``pack_positions`` each,
    ``None``: one row) times the longest row rounded up to 8. What ``n_padded_positions`` counts."""
    if not packing:
        return D.batch_positions(list(lengths))[1]
    rows = pack_rows([x.positions for x in lengths], pack_positions)
    loads = [sum(lengths[i].positions for i in r) for r in rows]
    return D.batch_positions([D.SampleLength(n, n) for n in loads])[1]


def budget_batches(lengths, max_tokens: int, seed: int, epoch: int, *, pool: int, bucketing: bool,
                   packing: bool, pack_positions: int | None = None
                   ) -> list[list[int]]:
    """One epoch cut into micro-batches of at most ``max_tokens`` positions each
    (:func:`micro_batch_positions`): every sample exactly once, from ``(seed, epoch)`` only, whatever
    the number of processes.

    1. :func:`epoch_order`'s permutation; with ``bucketing`` it is cut into pools of consecutive
       samples holding about ``pool x max_tokens`` positions (a pool closes at the first sample that
       reaches it), each sorted by ``positions``, longest first (ties keep the permutation's order).
    2. Each pool (or, without bucketing, the permutation as it is) is filled greedily: a sample joins
       the current micro-batch if the batch then still fits ``max_tokens``, else it opens the next.
    3. The micro-batches are shuffled (same random stream).

    Args:
        lengths: one :class:`higgs_tune.data.SampleLength` per training sample (index = sample).
        max_tokens: positions per micro-batch (``train.max_tokens``), >= 1.
        pool: about how many micro-batches' worth of positions each sorting pool holds (``train.bucket_pool``), >= 1.
        bucketing: sort within pools (``train.length_bucketing``).
        packing, pack_positions: how a micro-batch is measured (``train.packing``, ``train.pack_positions``;
            :func:`micro_batch_positions`).

    Returns:
        Lists of sample indices, one per micro-batch.

    Raises:
        ValueError: a sample alone exceeds ``max_tokens`` (naming it), or ``max_tokens`` < 1.
    """
    if max_tokens < 1:
        raise ValueError(f"train.max_tokens must be >= 1 position, got {max_tokens}")
    too_long = [i for i, x in enumerate(lengths) if micro_batch_positions([x], packing, pack_positions) > max_tokens]
    if too_long:
        i = max(too_long, key=lambda k: lengths[k].positions)
        raise ValueError(f"{len(too_long)} sample(s) exceed train.max_tokens {max_tokens} on their own (the longest, "
                         f"sample {i}, takes {lengths[i].positions} positions, "
                         f"{micro_batch_positions([lengths[i]], packing, pack_positions)} rounded up to "
                         f"{D.MODEL_ROUND_TO}): raise train.max_tokens or lower data.max_duration_s")
    n = len(lengths)
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(n))
    rng.shuffle(order)  # == epoch_order(n, seed, epoch)
    pools: list[list[int]] = []
    if bucketing:
        cur, load = [], 0
        for i in order:
            cur.append(i)
            load += lengths[i].positions
            if load >= pool * max_tokens:
                pools.append(cur)
                cur, load = [], 0
        pools += [cur] if cur else []
        pools = [sorted(p, key=lambda i: -lengths[i].positions) for p in pools]
    else:
        pools = [order]
    out: list[list[int]] = []
    for p in pools:
        cur = []
        for i in p:
            if cur and micro_batch_positions([lengths[k] for k in cur + [i]], packing, pack_positions) > max_tokens:
                out.append(cur)
                cur = []
            cur.append(i)
        out += [cur] if cur else []
    rng.shuffle(out)
    return out


class Batching:
    """The micro-steps of every optimizer step, from the config: fixed or token-budget micro-batches.

    * ``train.max_tokens`` null: micro-steps of ``batch_size x processes`` samples
      (:func:`next_window`), process r taking slice r (:func:`rank_slice`).
    * ``train.max_tokens`` set: each epoch is cut into micro-batches of at most ``max_tokens``
      positions (:func:`budget_batches`, independent of the number of processes); the epochs'
      micro-batches form one stream, and each micro-step takes the next ``processes`` of them, one
      per process (so no process ever has an empty share, and an optimizer step always trains
      ``processes x grad_accum_steps`` micro-batches, across an epoch's end too). ``batch_size`` is
      not used; the number of samples per step varies (``n_samples`` in the metrics rows).

    Args:
        tc: the validated ``train`` config section.
        n_samples: training samples.
        world: number of processes.
        lengths: a tuple of :class:`higgs_tune.data.SampleLength` per sample, or ``None`` when neither
            ``length_bucketing``, ``packing`` nor ``max_tokens`` needs them.

    Raises:
        ValueError: ``max_tokens`` is set but no ``lengths`` are given, or a sample exceeds it.
    """

    def __init__(self, tc: dict, n_samples: int, world: int, lengths: tuple | None):
        self.n_samples, self.world, self.seed, self.accum = n_samples, world, tc["seed"], tc["grad_accum_steps"]
        self.batch_size, self.max_tokens = tc["batch_size"], tc["max_tokens"]
        self.lengths, self.bucketing, self.pool = lengths, tc["length_bucketing"], tc["bucket_pool"]
        self.packing, self.pack_positions = tc["packing"], tc["pack_positions"]
        self._epochs: dict[int, list[list[int]]] = {}
        if self.max_tokens is not None:
            if lengths is None or len(lengths) != n_samples:
                raise ValueError("train.max_tokens needs every sample's length (one SampleLength per sample)")
            self.epoch_batches(0)  # fails early on a sample over the budget

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Token-budget mode: :func:`budget_batches` of ``epoch`` (the last two epochs' are kept)."""
        if epoch not in self._epochs:
            self._epochs = {e: b for e, b in self._epochs.items() if e == epoch - 1}
            self._epochs[epoch] = budget_batches(self.lengths, self.max_tokens, self.seed, epoch,
                                                 bucketing=self.bucketing, pool=self.pool, packing=self.packing,
                                                 pack_positions=self.pack_positions)
        return self._epochs[epoch]

    @property
    def global_batch_size(self) -> int | None:
        """Samples per optimizer step with a fixed batch; ``None`` with a token budget (it varies)."""
        return None if self.max_tokens is not None else self.batch_size * self.world * self.accum

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (at least 1); with a token budget, those of epoch 0."""
        if self.max_tokens is None:
            return max(1, math.ceil(self.n_samples / (self.batch_size * self.world)) // self.accum)
        return max(1, len(self.epoch_batches(0)) // (self.world * self.accum))

    def next_window(self, pos: Position) -> tuple[list[list[list[int]]], Position]:
        """The ``grad_accum_steps`` micro-steps of the next optimizer step, each as one list of sample
        indices per process (``window[i][rank]``; a fixed batch's short last micro-step may leave a
        process an empty list), and the position after them (a window may span an epoch boundary)."""
        if self.max_tokens is None:
            window, pos = next_window(pos, self.n_samples, self.batch_size, self.world, self.seed, self.accum,
                                      self.lengths if self.bucketing else None, self.pool)
            return [[rank_slice(w, self.batch_size, r) for r in range(self.world)] for w in window], pos
        flat, epoch, index = [], pos.epoch, pos.index
        batches = self.epoch_batches(epoch)
        while len(flat) < self.accum * self.world:
            if index >= len(batches):
                epoch, index = epoch + 1, 0
                batches = self.epoch_batches(epoch)
            flat.append(batches[index])
            index += 1
        return [flat[i * self.world:(i + 1) * self.world] for i in range(self.accum)], Position(epoch, index)
