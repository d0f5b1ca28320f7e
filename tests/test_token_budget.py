"""Micro-batches by token budget (train.max_tokens): every micro-batch within the budget, every
sample once per epoch, deterministic from (seed, epoch), the same micro-batches whatever the number
of processes (2 processes x accumulation a train what 1 process x 2a does), and a training run
with it end to end."""

from __future__ import annotations

import copy
import json

import pytest

from higgs_tune import data as D
from higgs_tune import packing as P
from higgs_tune.train.sampler import Batching, Position, budget_batches, micro_batch_positions

from conftest import stage_train_inputs
from test_bucketing import synthetic_lengths

SETTINGS = [dict(packing=False, pack_positions=None, bucketing=True), dict(packing=False, pack_positions=None,
            bucketing=False), dict(packing=True, pack_positions=None, bucketing=True),
            dict(packing=True, pack_positions=600, bucketing=True)]


@pytest.mark.parametrize("s", SETTINGS, ids=["padded", "padded-random", "packed", "packed-600"])
def test_every_micro_batch_fits_and_every_sample_once(s):
    lengths = synthetic_lengths(3000)
    budget = 2048
    for epoch in (0, 1):
        batches = budget_batches(lengths, budget, 7, epoch, pool=16, **s)
        assert sorted(i for b in batches for i in b) == list(range(3000))
        costs = [micro_batch_positions([lengths[i] for i in b], s["packing"], s["pack_positions"]) for b in batches]
        assert max(costs) <= budget
        assert batches == budget_batches(lengths, budget, 7, epoch, pool=16, **s)  # deterministic
        if s["bucketing"] and not s["packing"]:
            assert sum(costs) < 1.15 * sum(x.positions for x in lengths)  # budget filled, little padding
    assert budget_batches(lengths, budget, 7, 0, pool=16, **s) != budget_batches(lengths, budget, 7, 1, pool=16, **s)


def test_sample_over_the_budget_is_a_clear_error():
    lengths = synthetic_lengths(50)
    longest = max(x.positions for x in lengths)
    with pytest.raises(ValueError, match=r"exceed train.max_tokens 64 .*raise train.max_tokens"):
        budget_batches(lengths, 64, 0, 0, pool=16, bucketing=True, packing=False)
    assert budget_batches(lengths, -(-longest // 8) * 8, 0, 0, pool=16, bucketing=True, packing=False)


def test_positions_measure_is_what_packing_and_padding_build(short_codes, transcripts, text_tokenizer, tiny_model,
                                                            lj_dir, tmp_path):
    """The budget's measure equals the padded positions of the real micro-batches: the packed
    layout packed_collate builds (the model's merged mask is checked against it in every packed
    forward) and batch_positions (tested against the model in test_bucketing)."""
    io = stage_train_inputs(tmp_path, short_codes, transcripts, lj_dir, n_train=5)
    samples = D.ManifestSamples(io.train, text_tokenizer, D.CodesIndex(io.index))
    lengths = samples.lengths(tiny_model.config)
    collator = D.make_collator(tiny_model.config)
    for idx in ([0], [0, 1], [1, 2, 3], [0, 1, 2, 3, 4]):
        ls = [lengths[i] for i in idx]
        for cap in (None, 300):
            pk = P.packed_collate([samples[i] for i in idx], ls, collator, cap)
            assert micro_batch_positions(ls, True, cap) == pk.padded_positions
        assert micro_batch_positions(ls, False) == D.batch_positions(ls)[1]


def test_two_processes_take_what_one_process_with_twice_the_accumulation_takes():
    lengths = synthetic_lengths(500)
    tc = {"seed": 3, "grad_accum_steps": 2, "batch_size": 1, "max_tokens": 1500, "length_bucketing": True,
          "bucket_pool": 8, "packing": False, "pack_positions": None}
    two = Batching(tc, 500, 2, lengths)
    one = Batching({**tc, "grad_accum_steps": 4}, 500, 1, lengths)
    assert two.global_batch_size is None and two.steps_per_epoch() == one.steps_per_epoch()
    p1 = p2 = Position()
    seen = []
    for _ in range(3 * one.steps_per_epoch()):  # crosses epoch ends
        w1, p1 = one.next_window(p1)
        w2, p2 = two.next_window(p2)
        assert all(len(w) == 2 and all(w) for w in w2)  # one non-empty micro-batch per process
        assert [b for w in w1 for b in w] == [b for w in w2 for b in w]
        assert p1 == p2
        seen += [i for w in w1 for b in w for i in b]
    epoch0 = budget_batches(lengths, 1500, 3, 0, pool=8, bucketing=True, packing=False)
    n0 = sum(len(b) for b in epoch0)
    assert sorted(seen[:n0]) == list(range(500))  # the stream's first epoch: every sample once


def test_training_with_a_token_budget(tmp_config, tmp_path, short_codes, transcripts, lj_dir, text_tokenizer):
    """A tiny run with train.max_tokens: micro-batches within the budget, samples per step vary and
    are reported, the epoch's samples all trained."""
    from higgs_tune.train import train

    cfg = copy.deepcopy(tmp_config)
    cfg["train"].update(max_steps=3, grad_accum_steps=2, warmup_steps=1, eval_interval=3, predictions_interval=3,
                        save_interval=3, log_interval=1, max_tokens=400, packing=False)
    io = stage_train_inputs(tmp_path / "exp", short_codes, transcripts, lj_dir, n_train=5, audit_passed=True)
    train(cfg, io)
    rows = [json.loads(line) for line in io.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["n_padded_positions"] <= 2 * 400 and r["n_samples"] >= 2 for r in rows)
    from higgs_tune.model import tiny_higgs_config

    samples = D.ManifestSamples(io.train, text_tokenizer, D.CodesIndex(io.index))
    plan = Batching(cfg["train"], len(samples), 1, samples.lengths(tiny_higgs_config(cfg["model"]["arch"])))
    pos, planned = Position(), []
    for _ in rows:
        window, pos = plan.next_window(pos)
        planned.append(sum(len(b) for w in window for b in w))
    assert [r["n_samples"] for r in rows] == planned and len(set(planned)) > 1 or planned[0] > 2
    state = json.loads(io.state.read_text())
    assert state["max_tokens"] == 400 and state["global_batch_size"] is None and state["finished"]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_twice_the_accumulation(tmp_config, tmp_path, short_codes, transcripts,
                                                                    lj_dir):
    """With a token budget, 2 processes x accumulation 1 and 1 process x accumulation 2 train the
    same micro-batches in the same optimizer steps (launched as the train rule does, gloo): the same
    losses, sample counts and positions per step; the loss normalized over the whole window across
    processes. 5 samples, 3 steps: the stream crosses an epoch's end."""
    from test_distributed import close, launch, rows

    cfg = copy.deepcopy(tmp_config)
    cfg["train"].update(max_steps=3, warmup_steps=1, eval_interval=3, predictions_interval=3, save_interval=3,
                        log_interval=1, learning_rate=3e-3, max_tokens=400, packing=False)
    one = stage_train_inputs(tmp_path / "one", short_codes, transcripts, lj_dir, n_train=5, audit_passed=True)
    two = stage_train_inputs(tmp_path / "two", short_codes, transcripts, lj_dir, n_train=5, audit_passed=True)
    cfg1, cfg2 = copy.deepcopy(cfg), copy.deepcopy(cfg)
    cfg1["train"]["grad_accum_steps"], cfg2["train"]["grad_accum_steps"] = 2, 1
    r1 = launch(cfg1, one, 1)
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    r2 = launch(cfg2, two, 2)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    m1, m2 = rows(one.metrics), rows(two.metrics)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):
        for key in ("n_samples", "n_positions", "n_padded_positions", "n_audio_targets", "n_text_targets"):
            assert a[key] == b[key], (a["step"], key)
        for key in ("loss", "text_loss", "audio_loss", "grad_norm", "lr"):
            assert close(a[key], b[key]), (a["step"], key, a[key], b[key])
