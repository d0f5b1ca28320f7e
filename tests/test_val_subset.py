"""The in-training val pass: a fixed, seeded subset of the val rows (``train.val_samples``), each batch
built and collated when the pass runs it; with every row it computes what the eager val set did."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from higgs_tune import data as D

from conftest import SHORT, stage_train_inputs, tts_row


def test_val_subset_is_fixed_by_the_seed_of_the_asked_size_in_file_order():
    a = D.val_subset(1000, 37, seed=5)
    assert a == D.val_subset(1000, 37, seed=5)  # every process, every resume: the same rows
    assert len(a) == len(set(a)) == 37 and a == sorted(a) and 0 <= a[0] and a[-1] < 1000
    assert D.val_subset(1000, 37, seed=6) != a
    assert D.val_subset(10, None, seed=5) == list(range(10))  # null: every row
    assert D.val_subset(10, 10, seed=5) == D.val_subset(10, 99, seed=5) == list(range(10))
    assert D.val_subset(0, 3, seed=0) == []
    with pytest.raises(ValueError, match="train.val_samples"):
        D.val_subset(10, 0, seed=0)


def _stage_val(tmp_path, short_codes, transcripts, lj_dir):
    """Staged inputs whose val manifest holds 5 rows over the three short clips (distinct ids)."""
    io = stage_train_inputs(tmp_path / "exp", short_codes, transcripts, lj_dir)
    texts = list(transcripts.values())
    D.write_jsonl(io.val, [tts_row(SHORT[i % 3], texts[i], short_codes[SHORT[i % 3]][0], lj_dir,
                                   sample_id=f"val-{i}") for i in range(5)])
    return io


def test_lazy_val_batches_give_the_eager_val_sets_metrics(tmp_path, short_codes, transcripts, lj_dir,
                                                          text_tokenizer, tiny_model):
    from higgs_tune.train.monitor import val_metrics

    io = _stage_val(tmp_path, short_codes, transcripts, lj_dir)
    codes, collator = D.CodesIndex(io.index), D.make_collator(tiny_model.config)
    val_set = D.ManifestSamples(io.val, text_tokenizer, codes)
    # what the trainer built before step 1 until now: every val sample, every batch collated
    eager_samples = [D.build_dataset_sample(r, text_tokenizer, codes.load) for r in D.read_jsonl(io.val)]
    eager = [collator(b) for b in D.batches(eager_samples, 2, shuffle=False, seed=0)]
    lazy = D.LazyBatches(val_set, D.val_subset(len(val_set), None, seed=0), 2, collator)
    assert len(lazy) == len(eager) == 3
    for a, b in zip(lazy, eager):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.label_audio_ids, b.label_audio_ids)
    one = SimpleNamespace(process_index=0, num_processes=1)
    got = val_metrics(tiny_model, lazy, one, "cpu", torch.float32, 1.0, 1.0)
    assert got == val_metrics(tiny_model, eager, one, "cpu", torch.float32, 1.0, 1.0)
    assert got["n_samples"] == 5
    # process 1 of 2 runs batches 1, 3, ...: the lazy slice builds the same share
    share = lazy[1::2]
    assert len(share) == 1 and torch.equal(share[0].input_ids, eager[1].input_ids)


def test_training_validates_and_probes_the_seeded_subset(tmp_config, tmp_path, short_codes, transcripts, lj_dir):
    from higgs_tune.train import train

    io = _stage_val(tmp_path, short_codes, transcripts, lj_dir)
    io.audit.write_text(json.dumps({"passed": True}))
    cfg = tmp_config
    cfg["train"].update(max_steps=1, batch_size=1, grad_accum_steps=1, warmup_steps=0, eval_interval=1,
                        predictions_interval=1, save_interval=1, log_interval=1, val_samples=2)
    train(cfg, io)
    subset = D.val_subset(5, 2, cfg["train"]["seed"])
    (val,) = D.read_jsonl(io.val_metrics)
    assert val["step"] == 1 and val["n_samples"] == 2
    (pred,) = D.read_jsonl(io.predictions)
    assert pred["sample_id"] == f"val-{subset[0]}"
