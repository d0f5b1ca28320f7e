"""The train -> inference proof: a model that memorized one real clip with the project's training loss
generates that clip's codes back, greedily, through the project's generation path.

It catches "the loss falls but the audio is noise" where the codes' layout differs between the
loss and generation: a delay pattern not reverted (checked by hand: 303 of 360 codes differ), or an
off-by-one between the labels the loss shifts and the frames generation feeds back. It does NOT
catch a generation prompt that differs from the training prompt (checked by hand: without the
system turn, without the assistant header, or without ``<|audio_out_bos|>`` the one memorized clip
still comes out: a model that knows one clip says it whatever it is asked); telling prompts apart
needs two memorized clips, which this tiny model did not learn to separate in 120 steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tts_row

CLIP = "LJ001-0008"  # 1.8 s: 45 frames of 8 codebooks


@pytest.mark.slow
def test_memorized_clip_is_generated_back_exactly(demo_config, text_tokenizer, audio_tokenizer, lj_dir, transcripts):
    """~100 full-batch steps of :func:`higgs_tune.loss.forward_loss` on one real LJSpeech clip (the
    random-init demo model; the tied 128256-row text embedding/head frozen to keep it fast), then
    ``generate_codes`` at temperature 0: the same number of frames, the stream closed by EOS, every
    code equal. Before training the same generation does not reproduce the clip."""
    from higgs_tune import audio_io
    from higgs_tune import data as D
    from higgs_tune.generate import generate_codes
    from higgs_tune.loss import forward_loss
    from higgs_tune.model import build_model

    wave, sr = audio_io.load_audio(lj_dir / "wavs" / f"{CLIP}.wav")
    sha = audio_io.audio_sha256(wave, sr)
    codes = audio_tokenizer.encode(audio_io.to_mono_resampled(wave, sr, 24000), sr=24000).long()  # (8, T)
    codes_of = {sha: codes}.__getitem__
    text = transcripts[CLIP].split("|")[-1]
    row = tts_row(CLIP, text, sha, lj_dir)
    model = build_model(demo_config["model"])
    max_frames = codes.shape[1] + 25  # room to run past the clip: the model must stop by itself

    before = generate_codes(model, text_tokenizer, row, codes_of, max_frames=max_frames, temperature=0)
    assert before.codes.shape != tuple(codes.shape) or not np.array_equal(before.codes, codes.numpy())

    batch = D.make_collator(model.config)([D.build_dataset_sample(row, text_tokenizer, codes_of)])
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "text_lm_head" in name:
            p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    torch.manual_seed(0)
    for _ in range(100):
        _, loss = forward_loss(model, batch, "cpu")
        opt.zero_grad()
        loss.loss.backward()
        opt.step()
    assert float(loss.audio_loss) < 0.05, float(loss.audio_loss)  # the loss says it is learned ...

    model.eval()
    got = generate_codes(model, text_tokenizer, row, codes_of, max_frames=max_frames, temperature=0)
    # ... and generation agrees: same length, closed by EOS, same codes
    assert got.ended, "the memorized stream did not end with EOS"
    assert got.codes.shape == tuple(codes.shape), (got.codes.shape, tuple(codes.shape))
    mismatch = np.argwhere(got.codes != codes.numpy())
    assert mismatch.size == 0, f"{len(mismatch)} of {codes.numel()} codes differ, first (codebook, frame) {mismatch[:5]}"
