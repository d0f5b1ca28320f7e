"""The train -> inference proof: a model that memorized two real clips with the project's training loss
generates each clip's codes back from its own prompt, greedily, through the project's generation path.

It catches "the loss falls but the audio is noise" where the codes' layout differs between the loss
and generation (checked by hand: without revert_delay_pattern, 303 of 360 codes differ), an
off-by-one between the labels the loss shifts and the frames generation feeds back, and a prompt
unlike the training one in what precedes the audio (checked by hand: without the assistant header,
clip LJ001-0008 comes out 47 frames long instead of 45). It does not catch every prompt change:
without the system turn both clips still come out right (the texts still tell them apart).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tts_row

CLIPS = ("LJ001-0008", "LJ001-0002")  # 1.8 s and 1.9 s: 45 and 48 frames of 8 codebooks
STEPS = 300  # full-batch optimizer steps (~1.5 min on one CPU core)


@pytest.mark.slow
def test_memorized_clips_are_generated_back_exactly(demo_config, text_tokenizer, audio_tokenizer, lj_dir,
                                                    transcripts):
    """Full-batch steps of :func:`higgs_tune.loss.forward_loss` on two real LJSpeech clips (the
    random-init demo model; the tied 128256-row text embedding/head frozen to keep it fast), then
    ``generate_codes`` at temperature 0 from each clip's own prompt: the same number of frames, the
    stream closed by EOS, every code equal. Two clips, so that the prompt's text decides which one
    comes out (one memorized clip comes out of any prompt). Before training neither is reproduced."""
    from higgs_tune import audio_io
    from higgs_tune import data as D
    from higgs_tune.generate import generate_codes
    from higgs_tune.loss import forward_loss
    from higgs_tune.model import build_model

    rows, target, by_sha = [], {}, {}
    for cid in CLIPS:
        wave, sr = audio_io.load_audio(lj_dir / "wavs" / f"{cid}.wav")
        sha = audio_io.audio_sha256(wave, sr)
        by_sha[sha] = target[cid] = audio_tokenizer.encode(audio_io.to_mono_resampled(wave, sr, 24000),
                                                           sr=24000).long()  # (8, T)
        rows.append(tts_row(cid, transcripts[cid].split("|")[-1], sha, lj_dir))
    codes_of = by_sha.__getitem__
    model = build_model(demo_config["model"], torch.float32, "cpu")

    def generate(row, cid):  # room to run past the clip: the model must stop by itself
        return generate_codes(model, text_tokenizer, row, codes_of, max_frames=target[cid].shape[1] + 25,
                              temperature=0, top_p=1.0, seed=0, device="cpu")

    for row, cid in zip(rows, CLIPS):
        before = generate(row, cid)
        assert before.codes.shape != tuple(target[cid].shape) or not np.array_equal(before.codes, target[cid].numpy())

    batch = D.make_collator(model.config)([D.build_dataset_sample(r, text_tokenizer, codes_of) for r in rows])
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "text_lm_head" in name:
            p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    torch.manual_seed(0)
    for _ in range(STEPS):
        _, loss = forward_loss(model, batch, "cpu", text_weight=1.0, audio_weight=1.0)
        opt.zero_grad()
        loss.loss.backward()
        opt.step()
    assert float(loss.audio_loss) < 0.05, float(loss.audio_loss)  # the loss says it is learned ...

    model.eval()
    for row, cid in zip(rows, CLIPS):  # ... and generation agrees: same length, closed by EOS, same codes
        got, want = generate(row, cid), target[cid].numpy()
        assert got.ended, f"{cid}: the memorized stream did not end with EOS"
        assert got.codes.shape == want.shape, (cid, got.codes.shape, want.shape)
        mismatch = np.argwhere(got.codes != want)
        assert len(mismatch) == 0, f"{cid}: {len(mismatch)} of {want.size} codes differ, first (codebook, frame) " \
                                   f"{mismatch[:5].tolist()}"
