"""Data memory of one training process: bounded by its shard, not the dataset. Codes are read on
demand in their stored int16 (``CodesIndex.load``), each training sample is built when its
micro-batch needs it (``ManifestSamples``), and lengths for bucketing come from the index's frame
counts, so set-up reads no codes file and a process reads only those of the samples it trains."""

from __future__ import annotations

import gc
import sys
import types
import weakref

import numpy as np
import pandas as pd
import pytest
import torch

from higgs_tune import data as D
from higgs_tune.model import tiny_higgs_config
from higgs_tune.train.sampler import Batching, Position, micro_steps

from conftest import SHORT, tts_row


def synthetic_corpus(root, n: int, texts: list[str], lj_dir, seed: int = 0):
    """``n`` TTS rows (real transcripts) over ``n`` synthetic int16 codes files of 5-10 s (125-250
    frames, 8 codebooks, values < 1024), with the tokenize stage's index: ``(train.jsonl, index)``."""
    rng = np.random.default_rng(seed)
    code_dir = root / "codes"
    code_dir.mkdir(parents=True)
    index, rows = [], []
    for i in range(n):
        sha = f"{i:064x}"
        t = int(rng.integers(125, 251))
        np.save(code_dir / f"{sha}.npy", rng.integers(0, 1024, size=(8, t), dtype=np.int16))
        index.append({"audio_sha256": sha, "codes_path": str(code_dir / f"{sha}.npy"), "n_frames": t,
                      "sample_rate": 24000, "duration_s": t / 25})
        row = tts_row(SHORT[i % len(SHORT)], texts[i % len(texts)], sha, lj_dir, sample_id=f"syn-{i}")
        rows.append(row)
    D.write_jsonl(root / "train.jsonl", rows)
    pd.DataFrame(index).to_parquet(root / "index.parquet")
    return root / "train.jsonl", root / "index.parquet"


class LoadLog:
    """Counts ``CodesIndex.load`` calls per hash and the bytes of the built samples' codes alive."""

    def __init__(self, monkeypatch):
        self.loads: dict[str, int] = {}
        self.live = self.peak = 0
        original = D.CodesIndex.load

        def load(index, sha):
            self.loads[sha] = self.loads.get(sha, 0) + 1
            return original(index, sha)

        monkeypatch.setattr(D.CodesIndex, "load", load)

    def track(self, sample):
        n = sample.audio_ids_concat.numel() * sample.audio_ids_concat.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(sample.audio_ids_concat, self._free, n)
        return sample

    def _free(self, n):
        self.live -= n


def held_bytes(*roots, exclude=()) -> int:
    """Bytes of every object reachable from ``roots`` (``sys.getsizeof``: numpy arrays with their
    data), each counted once; modules, classes, functions and ``exclude`` (shared, not data) not
    followed."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    seen, stack, total = {id(x) for x in exclude}, list(roots), 0
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        stack.extend(gc.get_referents(o))
    return total


def setup_bytes(train, index, tok, model_config, tc, world):
    """Bytes the data set-up of one process keeps: the codes index, the manifest's offsets, every
    sample's length, the epoch plan and the sampler's cache, after planning the first step."""
    micro_steps.cache_clear()
    samples = D.ManifestSamples(train, tok, D.CodesIndex(index))
    plan = Batching(tc, len(samples), world, samples.lengths(model_config))
    plan.next_window(Position())
    return held_bytes(samples, plan, micro_steps, exclude=[tok]), samples, plan


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, transcripts, lj_dir):
    root = tmp_path_factory.mktemp("corpus")
    texts = list(transcripts.values())
    big = synthetic_corpus(root / "10k", 10_000, texts, lj_dir)
    small = synthetic_corpus(root / "2k", 2_000, texts, lj_dir)
    return big, small


def test_data_memory_scales_with_the_shard_not_the_dataset(corpus, text_tokenizer, demo_config, monkeypatch):
    """10,000 synthetic samples (real transcripts, 5-10 s of int16 codes each). Set-up reads no
    codes file and keeps ~0.3 KB per sample (index entry, file offset, length, place in the epoch
    plan; asserted: under a quarter of the sample's int16 codes, ~3 KB, so under 1/32 of the two
    int64 copies every process once held: 1,000 h on 8 processes, 92 GB each). Through one epoch, rank 0 of 4 and of 8
    processes reads the codes of exactly its own shares, each once (a quarter, an eighth of the
    files), and holds at most the codes of one optimizer step's micro-batches at a time."""
    (big_train, big_index), (small_train, small_index) = corpus
    model_config = tiny_higgs_config(demo_config["model"]["arch"])
    tc = {**demo_config["train"], "batch_size": 2, "grad_accum_steps": 2, "packing": False, "max_tokens": None,
          "length_bucketing": True}
    log = LoadLog(monkeypatch)
    held_small, *_ = setup_bytes(small_train, small_index, text_tokenizer, model_config, tc, 4)
    held_big, samples, plan = setup_bytes(big_train, big_index, text_tokenizer, model_config, tc, 4)
    assert log.loads == {}  # lengths come from the index's frame counts
    per_row = (held_big - held_small) / 8_000
    frames = pd.read_parquet(big_index)["n_frames"]
    codes_per_row = 8 * 2 * float(frames.mean())  # int16
    assert 0 < per_row < codes_per_row / 4, (per_row, codes_per_row)
    assert held_big < 10_000 * codes_per_row / 4

    lengths, loaded = plan.lengths, {}
    for world in (4, 8):
        log.loads.clear()
        log.peak = 0
        plan = Batching(tc, len(samples), world, lengths)
        share: list[int] = []
        window_bytes = []
        pos = Position()
        while pos.epoch == 0:
            window, pos = plan.next_window(pos)
            mine = [w[0] for w in window]  # rank 0
            if pos.epoch > 0:
                break
            # as train/loop.py: the step's samples built (and collated there), dropped after the step
            built = [[log.track(samples[i]) for i in m] for m in mine]
            window_bytes.append(sum(8 * 2 * int(frames[i]) for m in mine for i in m))
            share += [i for m in mine for i in m]
            del built
        shas = {f"{i:064x}" for i in share}
        assert len(share) == len(shas) and set(log.loads) == shas  # exactly its own samples' codes
        assert all(v == 1 for v in log.loads.values())  # each read once
        assert 0.95 * 10_000 / world <= len(shas) <= 10_000 / world + 1
        assert 0 < log.peak <= max(window_bytes)  # one optimizer step's samples at a time
        assert log.live == 0  # nothing kept after the step
        loaded[world] = len(shas)
    assert loaded[8] < 0.55 * loaded[4]


def test_built_samples_are_the_eager_ones(tmp_path, short_codes, transcripts, text_tokenizer, tiny_model, lj_dir):
    """A lazily built sample (int16 codes) collates to exactly the batch of the eager long-codes
    sample, and its length counted from tokens + index frame counts equals the built sample's."""
    from conftest import stage_train_inputs

    io = stage_train_inputs(tmp_path, short_codes, transcripts, lj_dir, n_train=4)
    rows = D.read_jsonl(io.train)
    codes = D.CodesIndex(io.index)
    lazy = D.ManifestSamples(io.train, text_tokenizer, codes)
    assert len(lazy) == len(rows) == 4
    collator = D.make_collator(tiny_model.config)
    by_sha = {sha: c for sha, c in short_codes.values()}
    for i, row in enumerate(rows):
        s = lazy[i]
        assert s.audio_ids_concat.dtype == torch.int16
        eager = D.build_dataset_sample(row, text_tokenizer, by_sha.__getitem__)
        assert torch.equal(s.audio_ids_concat.long(), eager.audio_ids_concat)
        a, b = collator([s]), collator([eager])
        for name in ("input_ids", "label_ids", "audio_out_ids", "label_audio_ids", "audio_in_ids"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), name
        assert lazy.lengths(tiny_model.config)[i] == D.sample_length(eager, tiny_model.config)
    sha = short_codes[SHORT[0]][0]
    assert codes.n_frames(sha) == short_codes[SHORT[0]][1].shape[1] and sha in codes and "0" * 64 not in codes
    with pytest.raises(KeyError, match="rerun the tokenize stage"):
        codes.load("f" * 64)
    assert codes.get(sha).dtype == torch.long


def test_not_json_row_is_named(tmp_path, text_tokenizer, short_codes, transcripts, lj_dir):
    from conftest import stage_train_inputs

    io = stage_train_inputs(tmp_path, short_codes, transcripts, lj_dir, n_train=2)
    io.train.write_text(io.train.read_text() + "\n{broken\n")
    with pytest.raises(ValueError, match=r"train.jsonl:4: not JSON"):
        D.ManifestSamples(io.train, text_tokenizer, D.CodesIndex(io.index))
