"""The audio codec (higgs_tune.codec, higgs_tune.codec_fast) and the tokenize stage on real LJSpeech
audio with the demo config's random-init Higgs audio tokenizer.

Short real clips and crops of real clips (written to tmp) keep most of this file fast; the
fast-vs-reference codes check also encodes the longest clips (the tiled encoder path). Torch runs
one intra-op thread here (restored afterwards): on a loaded 2-core machine two threads are several
times slower than one (see bench/bench_tokenize.py).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from higgs_tune import audio_io, fileio
from higgs_tune import codec as C
from higgs_tune import codec_fast as CF
from higgs_tune import audio_tokens as T
from higgs_tune.data import CodesIndex
from higgs_tune.fileio import write_jsonl

RATE = 24000
HOP = 960  # prod(ratios) of the v2 tokenizer: 24000 / 960 = 25 frames/s


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def codec(demo_config):
    """A HiggsCodec of the demo tokenizer, fast path (built here: the codec modifies the tokenizer it owns)."""
    return C.build_codec(demo_config["audio_tokenizer"])


@pytest.fixture(scope="module")
def reference_codec(demo_config):
    """The same tokenizer with ``fast_encode: false``: upstream ``HiggsAudioTokenizer.encode``, built separately."""
    return C.build_codec({**demo_config["audio_tokenizer"], "fast_encode": False})


@pytest.fixture(scope="module")
def crops(lj_clips, tmp_path_factory) -> list[Path]:
    """Eight crops (0.9 s .. 1.6 s, all different lengths) of eight real clips, 22.05 kHz PCM16 WAV."""
    out = tmp_path_factory.mktemp("crops")
    paths = []
    for i, src in enumerate(lj_clips[:8]):
        data, sr = sf.read(src, dtype="int16")
        start, n = int(0.3 * sr), int((0.9 + 0.1 * i) * sr) + 7 * i
        p = out / f"crop{i}_{src.name}"
        sf.write(p, data[start:start + n], sr, subtype="PCM_16")
        paths.append(p)
    return paths


def wave24k(path) -> np.ndarray:
    samples, sr = audio_io.load_audio(path)
    return audio_io.to_mono_resampled(samples, sr, RATE)


def sha_of(path) -> str:
    return audio_io.audio_sha256(*audio_io.load_audio(path))


def row(sid: str, path: Path) -> dict:
    url = str(Path(path).resolve())
    return {
        "messages": [
            {"role": "user", "content": f"say sample {sid}"},
            {"role": "assistant", "content": {"type": "audio", "audio_url": url}},
        ],
        "misc": {"id": sid, "audio_sha256": {url: sha_of(path)}},
    }


def write_manifests(folder: Path, train: list[Path], val: list[Path]) -> list[Path]:
    """``folder/manifest/{train,val}.jsonl`` with rows for these clips; returns the two paths."""
    paths = [folder / "manifest" / "train.jsonl", folder / "manifest" / "val.jsonl"]
    write_jsonl(paths[0], [row(f"t{i}", c) for i, c in enumerate(train)])
    write_jsonl(paths[1], [row(f"v{i}", c) for i, c in enumerate(val)])
    return paths


def index_of(folder: Path) -> Path:
    return folder / "tokens" / "index.parquet"


def cache_entries(cfg: dict) -> list[Path]:
    return sorted((Path(cfg["cache_dir"]) / "codes").glob("*/*.npy"))


# --------------------------------------------------------------------------------------------- codes
def test_codes_shape_range_and_bit_identical_to_upstream(codec, demo_config, lj_clips):
    """T == ceil((n - 118) / 960) for n samples at 24 kHz (so ceil(25 * duration) or one less);
    codes equal a *separately built* upstream tokenizer's own ``encode`` (determinism across builds),
    on full clips and on crops hitting both of upstream's branches (acoustic/semantic frame counts
    equal, or not: the re-run on padded input that this stage predicts instead)."""
    short = sorted(lj_clips, key=lambda p: sf.info(p).frames)[:2]
    waves = [wave24k(p) for p in short]
    waves += [waves[0][:24000], waves[0][:24480], waves[1][:700]]  # match branch, mismatch branch, < 1 hop
    branches = {codec.fast.acoustic_frames(len(w)) == math.ceil((len(w) - 118) / 960) for w in waves[:4]}
    assert branches == {True, False}, "want both upstream branches covered"

    codes = codec.encode(waves)
    for w, c in zip(waves, codes):
        n = len(w)
        assert c.dtype.kind == "i" and c.shape[0] == 8
        assert c.shape[1] == (1 if n < HOP else math.ceil((n - 118) / HOP)) == C.HiggsCodec.expected_frames(n)
        assert abs(c.shape[1] - n / RATE * 25) < 1
        assert 0 <= c.min() and c.max() < 1024
    assert len(np.unique(codes[0][0])) > 5, "codes are not constant (codebooks are initialised)"

    at = demo_config["audio_tokenizer"]
    assert C.audio_tokenizer_identity(at) == C.audio_tokenizer_identity(copy.deepcopy(at))
    assert C.audio_tokenizer_identity(at) == C.audio_tokenizer_identity({**at, "fast_encode": False})  # same codes
    upstream = C.build_audio_tokenizer(at, device="cpu")  # random_init: codebooks drawn from the seed, never k-means
    assert C.init_codebooks(upstream, at["seed"]) == 0
    for layer in C.vq_layers(upstream):  # k-means-pending codebooks are refused without a seed
        layer._codebook.inited.fill_(0)
    with pytest.raises(ValueError, match="un-initialised"):
        C.HiggsCodec(upstream, fast=False, max_batch_seconds=60.0)
    assert C.init_codebooks(upstream, at["seed"]) == 8
    for w, c in zip(waves[:4], codes[:4]):
        ref = upstream.encode(w, RATE).numpy()  # HiggsAudioTokenizer.encode: (8, T)
        np.testing.assert_array_equal(ref, c)

    # The acoustic and semantic encoders' activations agree with upstream's modules to fp32 rounding
    # (tiled residual units and downsampling, folded weight norm, NumPy's sine, oneDNN 1x1
    # convolutions), on clips long enough to be tiled (64 channels x n samples >= 2**21), as
    # upstream's own agree between 1 and 2 torch threads.
    import torch

    patched = [m for m in codec.tok.encoder.modules()  # 36 Snakes, 15 residual units, 5 blocks
               if type(m).__name__ in ("Snake1d", "ResidualUnit", "EncoderBlock")]
    assert len(patched) == 36 + 15 + 5 and all("forward" in vars(m) for m in patched)
    assert codec.fast.patched == {"weight_norm": 37, "snakes": 36, "tiled": 15 + 5, "onednn": 9 + 4}
    pointwise = [m for part in (codec.tok.encoder, codec.tok.encoder_semantic) for m in part.modules()
                 if isinstance(m, torch.nn.Conv1d) and "forward" in vars(m)]  # on oneDNN
    assert len(pointwise) == 9 + 4 and all(m.kernel_size == (1,) and m.in_channels >= 256 for m in pointwise)
    with torch.inference_mode():
        for w in waves[:2]:
            assert 64 * len(w) >= 1 << 21
            x = torch.from_numpy(w)[None, None]
            got, ref = codec.tok.encoder(x), upstream.encoder(x)
            assert got.shape == ref.shape
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
            sem = upstream.get_regress_target(x).transpose(1, 2)
            got, ref = codec.tok.encoder_semantic(sem), upstream.encoder_semantic(sem)
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fast_encode_equals_reference_on_longest_clips(codec, reference_codec, lj_clips, monkeypatch):
    """``fast_encode: true`` (codec_fast) and ``false`` (upstream ``HiggsAudioTokenizer.encode``) give
    IDENTICAL codes on the longest real clips, where the encoder runs its tiled layers (residual units,
    downsampling, Snakes, NumPy sine, oneDNN 1x1 convolutions), one clip per upstream branch (acoustic
    and semantic frame counts equal, or not); ``encode`` and ``encode_equal_length`` alike."""
    assert reference_codec.fast is None and codec.fast is not None
    assert not any("forward" in vars(m) for m in reference_codec.tok.modules())  # upstream's modules, untouched
    longest = sorted(lj_clips, key=lambda p: sf.info(p).frames, reverse=True)
    waves = [wave24k(p) for p in longest[:4]]
    match = [codec.fast.acoustic_frames(len(w)) == C.HiggsCodec.expected_frames(len(w)) for w in waves]
    waves = [waves[match.index(True)], waves[match.index(False)]]  # the longest clip of each branch
    tiled = {"units": 0, "blocks": 0}

    def counting(fn, key):
        def wrapped(*a, **k):
            tiled[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(CF, "residual_unit_tiled", counting(CF.residual_unit_tiled, "units"))
    monkeypatch.setattr(CF, "downsample_tiled", counting(CF.downsample_tiled, "blocks"))
    fast = codec.encode(waves)
    assert tiled == {"units": 2 * 6, "blocks": 2 * 2}, tiled  # blocks 1-2 (64, 128 channels) on each clip
    ref = reference_codec.encode(waves)
    for w, f, r in zip(waves, fast, ref):
        assert len(w) > 9 * RATE and f.shape == (8, C.HiggsCodec.expected_frames(len(w)))
        np.testing.assert_array_equal(f, r)
    x = np.stack([w[:RATE] for w in waves])  # a batch of two equal-length clips, both paths
    np.testing.assert_array_equal(codec.encode_equal_length(x), reference_codec.encode_equal_length(x))


def test_tiled_layers_match_upstream_modules():
    """``residual_unit_tiled`` and ``downsample_tiled`` equal the DAC modules' own forward (fp32
    rounding) for batch 2, tiles that do not divide the length, tiles shorter than the halo, and
    every dilation and stride of the v2 encoder."""
    import torch
    from boson_multimodal.audio_processing.descriptaudiocodec.dac.model.dac import EncoderBlock

    torch.manual_seed(0)
    with torch.inference_mode():
        for dim, stride in ((128, 8), (256, 5)):
            block = EncoderBlock(dim, stride).eval()
            for m in block.modules():
                if hasattr(m, "weight_g"):
                    torch.nn.utils.remove_weight_norm(m)
                if type(m).__name__ == "Snake1d":
                    m.alpha.uniform_(0.5, 2.0)
            x = torch.randn(2, dim // 2, 1001)
            for unit in block.block[:3]:
                ref = unit(x)
                for tile in (7, 64, 1000, 5000):
                    got = CF.residual_unit_tiled(x, unit, tile)
                    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (dim, unit.block[1].dilation, tile)
                x = ref
            snake, conv = block.block[3], block.block[4]
            ref = conv(snake(x))
            for tile in (1, 13, 500):
                got = CF.downsample_tiled(x, snake, conv, tile)
                assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (stride, tile)


def test_numpy_sine_in_place_within_one_ulp_of_torch(lj_clips):
    """``_sin_`` (the Snakes' sine) is in place, within 1 ULP of ``torch.sin`` on a real clip scaled as
    the Snakes scale it, and leaves tensors NumPy cannot share (autograd, strided, float64) to torch."""
    import torch

    wave = torch.from_numpy(audio_io.to_mono_resampled(*audio_io.load_audio(lj_clips[0]), 24000))
    x = torch.cat([wave * 40.0, torch.linspace(-30.0, 30.0, 100_001)])  # |alpha * x| up to ~30 rad
    got = x.clone()
    assert CF._sin_(got) is got
    ref = torch.sin(x)
    ulp = torch.from_numpy(np.spacing(np.abs(ref.numpy())))
    assert ((got - ref).abs() <= ulp).all()
    assert not torch.equal(got, x)
    in_graph = x.clone().requires_grad_() * 1.0  # a non-leaf tensor that autograd tracks
    for t in (in_graph, x.clone()[::2], x.double()):
        expected = torch.sin(t.detach())
        assert torch.equal(CF._sin_(t).detach(), expected)


def test_resample_equals_librosa(lj_clips):
    """The stage's soxr resampling gives exactly ``librosa.load(path, sr=...)`` (what upstream
    ``HiggsAudioTokenizer.encode(path)`` reads), mono and stereo, up and down; NaN is refused."""
    import librosa

    for p in lj_clips[:3]:
        samples, sr = audio_io.load_audio(p)
        for rate in (RATE, 16000):
            got = audio_io.to_mono_resampled(samples, sr, rate)
            ref, _ = librosa.load(str(p), sr=rate)
            assert got.dtype == np.float32 and got.shape == ref.shape
            np.testing.assert_array_equal(got, ref)
        stereo = np.stack([samples[0], 0.5 * samples[0]])
        np.testing.assert_array_equal(
            audio_io.to_mono_resampled(stereo, sr, RATE),
            librosa.resample(stereo.mean(axis=0), orig_sr=sr, target_sr=RATE, res_type="soxr_hq"))
    with pytest.raises(ValueError, match="NaN"):
        audio_io.to_mono_resampled(np.array([[0.0, np.nan]], np.float32), 22050, RATE)


def test_equal_length_batch_equals_single(codec, crops):
    """Batching equal-length clips changes nothing (non-causal convs: never pad to batch)."""
    waves = [wave24k(p) for p in crops[3:6]]  # 1.2 .. 1.4 s
    for n in (24000, 24480):  # one length per upstream branch
        x = np.stack([w[:n] for w in waves])
        batched = codec.encode_equal_length(x)
        single = np.concatenate([codec.encode_equal_length(x[i:i + 1]) for i in range(len(x))])
        np.testing.assert_array_equal(batched, single)
    mixed = [waves[0][:24000], waves[1][:24480], waves[2][:24000]]
    got = codec.encode(mixed)  # groups equal lengths internally, returns in input order
    np.testing.assert_array_equal(got[0], codec.encode_equal_length(mixed[0][None])[0])
    np.testing.assert_array_equal(got[2], codec.encode_equal_length(mixed[2][None])[0])
    assert got[1].shape == (8, C.HiggsCodec.expected_frames(24480))


# --------------------------------------------------------------------------------------------- cache
def test_cache_rerun_shared_clips_and_index(codec, tmp_config, crops, tmp_path, caplog):
    cfg = tmp_config
    a, b, c, d = crops[:4]
    exp = tmp_path / "results" / "demo"
    manifests = write_manifests(exp, train=[a, b, a], val=[c, b])  # a used twice, b in both splits
    index, stats = index_of(exp), tmp_path / "elsewhere" / "stats.json"
    s1 = T.encode_all(cfg, manifests, index, stats, codec=codec)
    assert (s1["n_rows"], s1["n_clips"], s1["n_encoded"], s1["n_cached"]) == (5, 3, 3, 0)
    assert len(cache_entries(cfg)) == 3
    written = json.loads(stats.read_text())  # stats go to the given path only
    assert (written["n_encoded"], written["index"]) == (3, str(index)) and written["wall_s"] > 0
    assert sorted(p.name for p in index.parent.iterdir()) == ["index.parquet"]

    with caplog.at_level(logging.INFO, logger="higgs_tune.audio_tokens"):
        s2 = T.encode_all(cfg, manifests, index, codec=codec)
    assert (s2["n_encoded"], s2["n_cached"]) == (0, 3)
    assert "0 to encode, 3 cached" in caplog.text

    import pandas as pd

    df = pd.read_parquet(index)
    assert list(df.columns) == T.INDEX_COLUMNS
    assert len(df) == 3 and (df.sample_rate == RATE).all()
    codes_index = CodesIndex(index)
    for r in df.itertuples():
        codes = codes_index.get(r.audio_sha256)
        assert tuple(codes.shape) == (8, r.n_frames)
        assert abs(r.n_frames - r.duration_s * 25) < 1
        assert abs(r.duration_s - sf.info(r.audio_url).duration) < 1e-9
        assert r.cache_key == T.cache_key(r.audio_sha256, r.tokenizer_id, RATE)

    # a second experiment sharing the cache: only the clip it does not share is encoded
    other = tmp_path / "results" / "other"
    s3 = T.encode_all(cfg, write_manifests(other, train=[a, d], val=[]), index_of(other), codec=codec)
    assert (s3["n_clips"], s3["n_encoded"], s3["n_cached"]) == (2, 1, 1)
    assert len(cache_entries(cfg)) == 4

    # a corrupt (truncated) entry is detected, re-encoded, and ends up identical
    victim = T.entry_path(cfg["cache_dir"], df.cache_key.iloc[0])
    good = np.load(victim)
    victim.write_bytes(victim.read_bytes()[:100])
    s4 = T.encode_all(cfg, manifests, index, codec=codec)
    assert (s4["n_corrupt"], s4["n_encoded"], s4["n_cached"]) == (1, 1, 2)
    np.testing.assert_array_equal(T.read_entry(victim), good)


def test_hash_mismatch_and_missing_hash_raise(codec, tmp_config, crops, tmp_path):
    cfg = tmp_config
    bad = row("x", crops[0])
    url = bad["messages"][1]["content"]["audio_url"]
    bad["misc"]["audio_sha256"][url] = "0" * 64
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    write_jsonl(train, [bad])
    write_jsonl(val, [])
    with pytest.raises(ValueError, match="differs from the manifest"):
        T.encode_all(cfg, [train, val], index_of(tmp_path), codec=codec)
    del bad["misc"]["audio_sha256"][url]
    write_jsonl(train, [bad])
    with pytest.raises(ValueError, match="no misc.audio_sha256"):
        T.encode_all(cfg, [train, val], index_of(tmp_path), codec=codec)
    assert not index_of(tmp_path).exists()


def test_entry_io_is_atomic_and_validated(tmp_path):
    p = T.entry_path(tmp_path, "ab" + "0" * 62)
    T.write_entry(p, np.arange(16).reshape(8, 2))
    assert T.read_entry(p).dtype == np.int16 and [x.name for x in p.parent.iterdir()] == [p.name]
    for bad in (np.zeros((7, 3), np.int16), np.full((8, 3), 1024, np.int16), np.zeros((8, 3), np.float32)):
        np.save(p, bad)
        with pytest.raises(T.CorruptEntryError):
            T.read_entry(p)
    # an abandoned temp file of a dead writer on this host is swept; a live writer's is kept
    dead = p.parent / f".{'ab' + '1' * 62}.{fileio.tmp_owner().rsplit('-', 1)[0]}-999999.x1y2z3.tmp"
    live = p.parent / f".{'ab' + '2' * 62}.{fileio.tmp_owner()}.q.tmp"
    dead.write_bytes(b"partial")
    live.write_bytes(b"partial")
    assert fileio.clean_stale_temps(p.parent) == 1 and live.exists() and not dead.exists()


# ------------------------------------------------------------------------------------------ SIGKILL
def test_sigkill_mid_run_then_resume(codec, tmp_config, crops, repo_root, tmp_path):
    """kill -9 the CLI (run as the Snakemake rule runs it) once entries appear; the rerun encodes
    exactly the missing clips."""
    cfg = tmp_config
    clips = crops[2:8]  # six clips, 1.1 .. 1.6 s
    exp = tmp_path / "results" / "demo"
    train, val = write_manifests(exp, train=clips[:5], val=clips[5:])
    index, stats = index_of(exp), exp / "tokens" / "stats.json"
    env = {**os.environ, "PYTHONPATH": str(repo_root / "workflow"), "HIGGS_TUNE_THREADS": "1"}
    cfg_json = json.dumps({"audio_tokenizer": cfg["audio_tokenizer"], "cache_dir": cfg["cache_dir"]})
    proc = subprocess.Popen([sys.executable, "-m", "higgs_tune.audio_tokens", "encode", "--config-json", cfg_json,
                             "--train", str(train), "--val", str(val), "--index", str(index), "--stats", str(stats),
                             "--no-progress"], cwd=repo_root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while not cache_entries(cfg):
            assert proc.poll() is None, f"CLI exited early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no cache entry appeared in 180 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its decode workers, as a batch scheduler would
        proc.wait()
        proc.stderr.close()
    written = cache_entries(cfg)
    print(f"{len(written)} of 6 entries written before the kill")
    assert 1 <= len(written) < 6, "the run finished before the kill: make the clips longer"
    assert not index.exists() and not stats.exists(), "the index and stats are written only at the end"
    for p in written:
        T.read_entry(p)  # whole, valid entries only

    out = T.encode_all(cfg, [train, val], index, stats, codec=codec)
    assert out["n_cached"] == len(written)
    assert out["n_encoded"] == 6 - len(written)
    assert out["n_corrupt"] == 0
    assert not list(Path(cfg["cache_dir"]).rglob("*.tmp")), "no temp files left behind"
    codes_index = CodesIndex(index)
    assert all(tuple(codes_index.get(sha_of(p)).shape)[0] == 8 for p in clips)
    assert len(cache_entries(cfg)) == 6
    # what the killed CLI process wrote equals what this process computes
    killed_sha = next(s for s in map(sha_of, clips) if str(T.entry_path(cfg["cache_dir"], T.cache_key(
        s, out["tokenizer_id"], RATE))) in map(str, written))
    killed_clip = next(p for p in clips if sha_of(p) == killed_sha)
    np.testing.assert_array_equal(codes_index.get(killed_sha).numpy(), codec.encode([wave24k(killed_clip)])[0])


# ------------------------------------------------------------------------------------------- decode
def test_decode_cli_writes_24k_wav_of_clip_duration(codec, tmp_config, crops, tmp_path):
    cfg = tmp_config
    exp = tmp_path / "results" / "demo"
    T.encode_all(cfg, write_manifests(exp, train=[crops[1]], val=[]), index_of(exp), codec=codec)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "x.wav"
    assert T.main(["decode", "--configfile", str(cfg_file), "--index", str(index_of(exp)),
                   "--sha256", sha_of(crops[1]), "--out", str(out)]) == 0
    info = sf.info(out)
    assert info.samplerate == RATE
    assert abs(info.duration - sf.info(crops[1]).duration) < 0.05  # T * 40 ms vs the clip
    wav, _ = sf.read(out)
    assert np.isfinite(wav).all() and np.abs(wav).max() > 0
    # without --index the cache is looked up by key: same codes, same WAV
    out2 = tmp_path / "y.wav"
    assert T.main(["decode", "--configfile", str(cfg_file), "--sha256", sha_of(crops[1]), "--out", str(out2)]) == 0
    np.testing.assert_array_equal(sf.read(out2)[0], wav)
    with pytest.raises(SystemExit, match="no codes"):
        T.main(["decode", "--configfile", str(cfg_file), "--sha256", "f" * 64, "--out", str(out2)])


# ------------------------------------------------------------------------------------------- shards
def same_index_and_codes(one: Path, sharded: Path, one_cache: Path, sharded_cache: Path) -> None:
    """The two indexes have the same rows in the same order (columns, dtypes, values; codes_path
    the same entry of each cache) and every entry has the same bytes."""
    import pandas as pd

    a, b = pd.read_parquet(one), pd.read_parquet(sharded)
    pd.testing.assert_frame_equal(a.drop(columns="codes_path"), b.drop(columns="codes_path"))
    assert [Path(p).relative_to(one_cache) for p in a.codes_path] == [
        Path(p).relative_to(sharded_cache) for p in b.codes_path]
    for pa, pb in zip(a.codes_path, b.codes_path):
        assert Path(pa).read_bytes() == Path(pb).read_bytes(), (pa, pb)


def test_shards_partition_the_clips_and_the_gather_equals_one_job(codec, tmp_config, crops, tmp_path):
    """shards: 3 (three encode_all(shard=k) runs into their own cache, then gather_shards) gives the
    index and the codes of one job, a clip shared by rows and splits in exactly one shard; the gather
    refuses shards that do not match the manifests."""
    import pandas as pd

    a, b, c, d, e = crops[:5]
    manifests = write_manifests(tmp_path / "m", train=[a, b, c, a, d], val=[e, b])
    clips, n_rows = T.clips_from_manifests(manifests)
    assert [Path(x.path).name for x in clips] == [p.name for p in (a, b, c, d, e)] and n_rows == 7
    for n in range(1, 8):  # disjoint, covering, balanced, in the one-job order
        parts = [T.shard_clips(clips, n, k) for k in range(n)]
        flat = [x.sha for part in parts for x in part]
        assert sorted(flat) == sorted(x.sha for x in clips) and len(set(flat)) == len(clips)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert all([x.sha for x in part] == [x.sha for x in clips if x in part] for part in parts)
    for bad in ((3, 3), (3, -1), (0, 0)):
        with pytest.raises(ValueError, match="audio_tokenizer.shards"):
            T.shard_clips(clips, *bad)
    # with durations (the manifest stage's): balanced by audio, longest first, whatever the row order
    secs = [9.6, 1.9, 10.1, 5.0, 3.3, 0.7, 7.2, 2.4, 0.0, 6.1, 1.1]
    timed = [T.Clip(sha=f"{i:064x}", path=f"c{i}.wav", duration=d) for i, d in enumerate(secs)]
    for n in range(1, 6):
        where = T.shard_assignment(timed, n)
        assert where == T.shard_assignment(copy.deepcopy(timed), n)
        loads = [sum(d for d, k in zip(secs, where) if k == s) for s in range(n)]
        assert max(loads) - min(loads) <= max(secs), (n, loads)
        assert [c.sha for c in T.shard_clips(timed, n, 0)] == [c.sha for c, k in zip(timed, where) if k == 0]
    where = T.shard_assignment(timed, 2)
    assert (where[2], where[0], where[6]) == (0, 1, 1)  # 10.1 s -> shard 0, 9.6 s -> 1, 7.2 s -> 1 (9.6 < 10.1)

    one_cfg = tmp_config
    one = T.encode_all(one_cfg, manifests, tmp_path / "one" / "index.parquet", codec=codec)
    sh_cfg = copy.deepcopy(tmp_config)
    sh_cfg["cache_dir"] = str(tmp_path / "cache-sharded")
    sh_cfg["audio_tokenizer"]["shards"] = 3
    shard_dir = tmp_path / "sharded" / "tokens" / "shards"
    idx = [shard_dir / f"{k}-of-3.parquet" for k in range(3)]
    sts = [shard_dir / f"{k}-of-3.json" for k in range(3)]
    per = [T.encode_all(sh_cfg, manifests, idx[k], sts[k], codec=codec, shard=k) for k in range(3)]
    assert [(s["shard"], s["shards"], s["n_clips"], s["n_encoded"], s["n_clips_total"]) for s in per] == [
        (0, 3, 2, 2, 5), (1, 3, 2, 2, 5), (2, 3, 1, 1, 5)]
    assert [list(pd.read_parquet(p).audio_url) for p in idx] == [[str(a), str(d)], [str(b), str(e)], [str(c)]]
    out = tmp_path / "sharded" / "tokens" / "index.parquet"
    st = T.gather_shards(manifests, idx, sts, out, tmp_path / "sharded" / "tokens" / "stats.json")
    same_index_and_codes(tmp_path / "one" / "index.parquet", out, Path(one_cfg["cache_dir"]),
                         Path(sh_cfg["cache_dir"]))
    assert json.loads((out.parent / "stats.json").read_text()) == json.loads(json.dumps(st))
    for k in ("n_rows", "n_clips", "n_encoded", "n_cached", "n_corrupt", "tokenizer_id"):
        assert st[k] == one[k], k
    assert st["shards"] == 3 and st["shard_n_encoded"] == [2, 2, 1] and st["mode"] == "main"
    assert st["audio_s_encoded"] == pytest.approx(one["audio_s_encoded"])
    assert st["encode_wall_s"] == pytest.approx(sum(s["encode_wall_s"] for s in per))

    # a rerun of one shard finds its clips cached; stale or misplaced shards are refused, naming the file
    assert T.encode_all(sh_cfg, manifests, idx[1], sts[1], codec=codec, shard=1)["n_cached"] == 2
    with pytest.raises(ValueError, match=r"1-of-3.parquet: .* not the 2 clips shard 0 of 3"):
        T.gather_shards(manifests, [idx[1], idx[0], idx[2]], sts, tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="0-of-3.parquet: holds 2 clips, not the 3 clips shard 0 of 2"):
        T.gather_shards(manifests, idx[:2], sts[:2], tmp_path / "x.parquet")
    other = write_manifests(tmp_path / "other", train=[a, b, c, d], val=[])
    with pytest.raises(ValueError, match="1-of-3.parquet: holds 2 clips, not the 1 clips shard 1 of 3"):
        T.gather_shards(other, idx, sts, tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def job_counts(log: str) -> dict[str, int]:
    """Snakemake's ``Job stats:`` table (the first one in ``log``) as ``{rule: count}``, without ``total``."""
    lines = log.split("Job stats:", 1)[1].splitlines()[3:]
    counts = {}
    for line in lines:
        if not line.strip():
            break
        rule, n = line.split()
        counts[rule] = int(n)
    counts.pop("total", None)
    return counts


def shard_job_pid(marker: str, shard: int) -> int | None:
    """The pid of the running ``python -m higgs_tune.audio_tokens encode ... --shard K`` whose command line
    holds ``marker``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"higgs_tune.audio_tokens" in argv and marker.encode() in b" ".join(argv) and \
                any(a == b"--shard" and b == str(shard).encode() for a, b in zip(argv, argv[1:])):
            return int(proc.name)
    return None


@pytest.mark.slow
def test_snakemake_three_shard_jobs_one_gather_and_a_killed_shard_redone_alone(codec, tmp_config, crops, tmp_path,
                                                                              repo_root):
    """``audio_tokenizer.shards: 3`` through Snakemake: the run plans three tokenize_shard jobs and one
    tokenize_gather (as ``-n`` does: test_sharded_plan_...); shard 1's process is killed (SIGKILL)
    while it runs, the other shards finish (--keep-going); the rerun runs shard 1 and the gather only
    (the other shards' files untouched), and the index and codes equal those of one in-process job."""
    clips = crops[:4]
    raw = tmp_path / "raw.jsonl"
    write_jsonl(raw, [{"messages": [{"role": "user", "content": f"say sample {i}"},
                                    {"role": "assistant", "content": {"type": "audio", "audio_url": str(p)}}],
                       "misc": {"id": f"s{i}"}} for i, p in enumerate(clips)])
    overlay = {"experiment": "sharded", "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
               "data": {"manifest": str(raw)}, "audio_tokenizer": {"shards": 3, "num_workers": 0}}
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    out = tmp_path / "results" / "sharded"
    index = out / "tokens" / "index.parquet"
    shard_dir = out / "tokens" / "shards"
    env = {**os.environ, "PYTHONPATH": str(repo_root / "workflow"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(repo_root / "Snakefile"), "--directory",
           str(repo_root), "--cores", "2", "--nolock", "--configfile", str(repo_root / "config" / "demo.yaml"),
           str(tmp_path / "overlay.yaml")]

    def snakemake(*args):
        res = subprocess.run(cmd + [*args, "--", str(index)], cwd=repo_root, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
        return res.stdout + res.stderr

    proc = subprocess.Popen(cmd + ["--keep-going", "--", str(index)], cwd=repo_root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    while proc.poll() is None and killed is None:
        killed = shard_job_pid(str(tmp_path), 1)
        if killed is not None:
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    first = proc.communicate(timeout=600)[0]
    assert killed is not None and proc.returncode != 0, first[-3000:]
    assert job_counts(first) == {"manifest": 1, "tokenize_shard": 3, "tokenize_gather": 1}, first[-3000:]
    assert not (shard_dir / "1-of-3.parquet").exists() and not index.exists(), first[-3000:]
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for k in (0, 2) for p in shard_dir.glob(f"{k}-of-3.*")}
    assert len(kept) == 4, first[-3000:]  # shards 0 and 2 finished (their index and stats)

    log = snakemake()
    assert job_counts(log) == {"tokenize_shard": 1, "tokenize_gather": 1}, log[-3000:]
    assert re.findall(r"wildcards: experiment=sharded, shard=(\d+), nshards=3", log) == ["1"]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in kept} == kept
    redone = json.loads((shard_dir / "1-of-3.json").read_text())
    assert redone["n_clips"] == redone["n_encoded"] + redone["n_cached"] == 1
    stats = json.loads((out / "tokens" / "stats.json").read_text())
    assert (stats["shards"], stats["n_clips"], stats["n_rows"]) == (3, 4, 4)

    # the reference: one job, in this process, its own cache
    one_cfg = copy.deepcopy(tmp_config)
    one_cfg["cache_dir"] = str(tmp_path / "cache-one")
    T.encode_all(one_cfg, [out / "manifest" / "train.jsonl", out / "manifest" / "val.jsonl"],
                 tmp_path / "one.parquet", codec=codec)
    same_index_and_codes(tmp_path / "one.parquet", index, Path(one_cfg["cache_dir"]), tmp_path / "cache")


def test_sharded_plan_under_the_slurm_profile_and_its_dvc_stages(tmp_path, repo_root):
    """shards: 3 with profiles/slurm plans three tokenize_shard jobs on the gpu partition (one GPU each)
    and the gather on cpu without a GPU; the generated dvc.yaml has one stage per shard job
    (``tokenize_shard-<exp>-<k>``, each running only its own shard, with the clips as deps) and a gather
    stage reading all of them, and DVC reads it."""
    overlay = tmp_path / "sh3.yaml"
    overlay.write_text(yaml.safe_dump({"experiment": "sh3", "results_dir": str(tmp_path / "results"),
                                       "audio_tokenizer": {"shards": 3}}))
    env = {**os.environ, "PYTHONPATH": str(repo_root / "workflow"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--profile", "profiles/slurm", "--configfile",
                          "config/demo.yaml", str(overlay)], cwd=repo_root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    plan = res.stdout + res.stderr
    jobs = re.findall(r"^rule (tokenize\w*):\n(?:    .*\n)*?    resources: (.*)$", plan, re.M)
    assert sorted(r for r, _ in jobs) == ["tokenize_gather"] + ["tokenize_shard"] * 3, plan[-3000:]
    for rule, resources in jobs:
        gpu = rule == "tokenize_shard"
        assert f"slurm_partition={'gpu' if gpu else 'cpu'}" in resources and ("gpu=1" in resources) == gpu, resources

    out = tmp_path / "gen"
    res = subprocess.run([sys.executable, "-m", "higgs_tune.dvc_stages", "--out", str(out),
                          f"config/demo.yaml+{overlay}"], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    stages = yaml.safe_load((out / "dvc.yaml").read_text())["stages"]
    names = list(stages)
    assert names[1:5] == ["tokenize_shard-sh3-0", "tokenize_shard-sh3-1", "tokenize_shard-sh3-2", "tokenize_gather-sh3"]
    assert "tokenize-sh3" not in stages
    from higgs_tune import codesig

    code = [f.relative_to(repo_root).as_posix()
            for f in codesig.code_files("audio_tokens", pkg=repo_root / "workflow" / "higgs_tune")]
    for k in range(3):
        st = stages[f"tokenize_shard-sh3-{k}"]
        assert st["cmd"].endswith(f"--allowed-rules tokenize_shard --forcerun tokenize_shard -- "
                                  f"{tmp_path}/results/sh3/tokens/shards/{k}-of-3.parquet")
        assert "data/ljspeech32/wavs" in st["deps"] and [d for d in st["deps"] if d.endswith(".py")] == code
        assert st["params"] == [{"params/sh3.yaml": ["audio_tokenizer", "cache_dir"]}]
    gather = stages["tokenize_gather-sh3"]
    assert [d for d in gather["deps"] if "/shards/" in d] == [
        f"{tmp_path}/results/sh3/tokens/shards/{k}-of-3.{ext}" for ext in ("parquet", "json") for k in range(3)]
    assert "data/ljspeech32/wavs" not in gather["deps"] and "params" not in gather
    assert stages["audit-sh3"]["deps"][2] == f"{tmp_path}/results/sh3/tokens/index.parquet"
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=out, check=True, capture_output=True)
    listed = subprocess.run([str(dvc), "stage", "list", "--name-only"], cwd=out, capture_output=True, text=True,
                            check=True).stdout.split()
    assert sorted(listed) == sorted(names)

