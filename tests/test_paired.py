"""Base -> fine-tuned, paired: the statistics (on real scores of real clips and noise), the language-aware
ASR error rate (real transcripts, Whisper's normalizers), and generation health."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHORT, tts_row
from higgs_tune import audio_io
from higgs_tune import paired as P
from higgs_tune import speech_metrics as S

CLIPS = ["LJ001-0008", "LJ001-0002", "LJ001-0013", "LJ001-0011"]  # the four shortest (1.8-4.5 s)
ZH = "我们今天在北京见面，然后一起去吃午饭。"  # a real Mandarin sentence (17 characters once normalized)


def _text(transcripts, cid):
    return transcripts[cid].split("|")[-1]


def _scored(wave, rate, text, ref_emb, asr, spk, mos) -> dict:
    """A generated.jsonl-like row: the real scorers on ``wave``."""
    e = spk.embed(wave, rate)
    q = mos(wave, rate)
    metric, err = S.error_rate([text], [asr(wave, rate, "en")], "en")
    return {"asr_metric": metric, "wer": err, "cer": None, "sim": S.cosine(e, ref_emb),
            "dnsmos_ovrl": q["ovrl"], "dnsmos_sig": q["sig"], "dnsmos_bak": q["bak"]}


@pytest.fixture(scope="module")
def scored(lj_dir, transcripts):
    """Real scores (Whisper tiny.en, resemblyzer, DNSMOS) per clip of the real clip ("real") and of
    Gaussian noise of the same length, against the same text and speaker reference ("noise")."""
    asr, spk, mos = S.Transcriber(), S.SpeakerEncoder(), S.DNSMOS()
    ref_wave, ref_rate = audio_io.load_audio(lj_dir / "wavs" / f"{SHORT[2]}.wav")  # same speaker, another clip
    ref_emb = spk.embed(ref_wave[0], ref_rate)
    out = {"real": [], "noise": []}
    for i, cid in enumerate(CLIPS):
        wave, rate = audio_io.load_audio(lj_dir / "wavs" / f"{cid}.wav")
        text = _text(transcripts, cid)
        out["real"].append({"id": cid, "text": text, **_scored(wave[0], rate, text, ref_emb, asr, spk, mos)})
        noise = np.random.default_rng(i).normal(0, 0.05, wave.shape[1]).astype(np.float32)
        out["noise"].append({"id": cid, "text": text, **_scored(noise, rate, text, ref_emb, asr, spk, mos)})
    return out


def test_planted_improvement_has_an_interval_excluding_zero(scored):
    """Base = noise, "fine-tuned" = the ground-truth clips: WER falls, SIM and DNSMOS rise, each with
    a 95 % interval on the right side of 0 and every sample better."""
    real, noise = scored["real"], scored["noise"]
    rows = P.paired_rows(noise, real)
    summary = P.summarize(rows, n_boot=2000, seed=0, level=0.95)
    s = summary["scores"]
    assert s["err"]["ci_high"] < 0 and s["err"]["delta"] < -0.5, s["err"]
    assert s["err"]["better"] == len(CLIPS) and s["err"]["worse"] == 0
    for k in ("sim", "dnsmos_ovrl", "dnsmos_sig"):
        assert s[k]["ci_low"] > 0 and s[k]["better"] == len(CLIPS), (k, s[k])
    assert s["err"]["ci_low"] <= s["err"]["delta"] <= s["err"]["ci_high"]
    # the means are the scored sides' means; delta is their difference
    assert s["dnsmos_ovrl"]["tuned"] == pytest.approx(np.mean([r["dnsmos_ovrl"] for r in real]))
    assert s["dnsmos_ovrl"]["delta"] == pytest.approx(s["dnsmos_ovrl"]["tuned"] - s["dnsmos_ovrl"]["base"])
    # reversed sides: the same interval mirrored, every sample worse
    rev = P.summarize(P.paired_rows(real, noise), n_boot=2000, seed=0, level=0.95)["scores"]
    assert rev["err"]["ci_low"] > 0 and rev["err"]["worse"] == len(CLIPS)
    json.dumps(summary)


def test_same_model_on_both_sides_has_an_interval_covering_zero(tmp_path, tiny_model, text_tokenizer,
                                                               audio_tokenizer, demo_config, short_codes,
                                                               transcripts, lj_dir):
    """The base model against the same model with a fresh (zero) LoRA adapter, through the real
    generation path and scorers, same seeds: every sample the same, every delta 0, every interval
    [0, 0] (pairing by seed removes the sampling noise). And on null data (deltas centred on 0 with
    the spread of real scores) the 95 % interval covers 0 in about 95 % of 200 data sets."""
    from higgs_tune.codec import HiggsCodec
    from higgs_tune.evaluate import evaluate_generation
    from higgs_tune.model import apply_lora

    rows = [tts_row(c, _text(transcripts, c), short_codes[c][0], lj_dir) for c in SHORT[:2]]
    by_sha = {sha: codes for sha, codes in short_codes.values()}
    codec = HiggsCodec(audio_tokenizer, init_seed=demo_config["audio_tokenizer"]["seed"], fast=False,
                       max_batch_seconds=60.0)
    gen = {**demo_config["eval"]["generate"], "max_seconds": 0.4, "temperature": 0.7, "top_p": 0.95, "seed": 0}
    scorers = {"transcriber": S.Transcriber(), "speaker": S.SpeakerEncoder(), "quality": S.DNSMOS()}
    base, _ = evaluate_generation(tiny_model.eval(), text_tokenizer, rows, by_sha.__getitem__, codec,
                                  tmp_path / "base", gen, calibrate=False, language="en", device="cpu", **scorers)
    tuned_model = apply_lora(tiny_model, demo_config["lora"]).eval()
    tuned, _ = evaluate_generation(tuned_model.get_base_model(), text_tokenizer, rows, by_sha.__getitem__, codec,
                                   tmp_path / "tuned", gen, calibrate=False, language="en", device="cpu", **scorers)
    summary = P.summarize(P.paired_rows(base, tuned), n_boot=2000, seed=0, level=0.95)["scores"]
    assert summary["dnsmos_ovrl"]["n"] == 2
    for k, s in summary.items():
        if s["n"]:
            assert s["delta"] == 0 and s["ci_low"] == 0 == s["ci_high"] and s["same"] == s["n"], (k, s)

    spread = np.std([1.1, 1.3, 1.05, 1.2, 2.9, 3.3])  # DNSMOS OVRL of noise and speech (module docstring)
    rng = np.random.default_rng(0)
    covered = [lo <= 0 <= hi for lo, hi in (P.bootstrap_ci(rng.normal(0, spread, 16), n_boot=1000, seed=k, level=0.95)
                                            for k in range(200))]
    assert 0.88 <= np.mean(covered) <= 0.99, np.mean(covered)


def test_bootstrap_is_reproducible_with_its_seed():
    d = np.random.default_rng(3).normal(0.1, 1.0, 12)
    a, b = P.bootstrap_ci(d, n_boot=500, seed=7, level=0.95), P.bootstrap_ci(d, n_boot=500, seed=7, level=0.95)
    assert a == b and a[0] < d.mean() < a[1]
    assert P.bootstrap_ci(d, n_boot=500, seed=8, level=0.95) != a
    assert P.bootstrap_ci([0.25], n_boot=2000, seed=0, level=0.95) == (0.25, 0.25)
    with pytest.raises(ValueError, match="no paired"):
        P.bootstrap_ci([], n_boot=2000, seed=0, level=0.95)
    with pytest.raises(ValueError, match="share no sample"):
        P.paired_rows([{"id": "a", "wer": 0.1}], [{"id": "b", "wer": 0.2}])
    with pytest.raises(ValueError, match="repeat"):
        P.paired_rows([{"id": "a"}, {"id": "a"}], [{"id": "a"}])


def test_missing_scores_leave_the_sample_out_of_that_score_only():
    base = [{"id": "x", "asr_metric": "wer", "wer": 0.5, "sim": None, "dnsmos_ovrl": 1.2},
            {"id": "y", "asr_metric": "cer", "cer": 0.4, "wer": None, "sim": 0.6, "dnsmos_ovrl": 1.1}]
    tuned = [{"id": "y", "asr_metric": "cer", "cer": 0.1, "wer": None, "sim": 0.7, "dnsmos_ovrl": 2.0},
             {"id": "x", "asr_metric": "wer", "wer": 0.25, "sim": 0.8, "dnsmos_ovrl": 1.0}]
    rows = P.paired_rows(base, tuned)
    assert [r["id"] for r in rows] == ["y", "x"]
    assert rows[0]["delta_err"] == pytest.approx(-0.3) and rows[1]["delta_err"] == pytest.approx(-0.25)
    s = P.summarize(rows, n_boot=200, seed=0, level=0.95)["scores"]
    assert s["sim"]["n"] == 1 and s["err"]["n"] == 2 and s["dnsmos_sig"]["n"] == 0 and s["dnsmos_sig"]["delta"] is None
    assert (s["dnsmos_ovrl"]["better"], s["dnsmos_ovrl"]["worse"]) == (1, 1)


def test_cer_for_zh_and_wer_for_en_with_whisper_normalizers(lj_dir, transcripts):
    """A zh row is scored by CER over characters (punctuation and spaces removed by Whisper's basic
    normalizer), an en row by WER after Whisper's English normalizer (numbers, titles, contractions)."""
    assert S.asr_metric("zh") == S.asr_metric("ja") == S.asr_metric("zh-TW") == S.asr_metric("th") == "cer"
    assert S.asr_metric("en") == S.asr_metric("vi") == S.asr_metric("de") == "wer"
    # one character wrong of 17, and spacing/punctuation in the hypothesis does not count
    assert S.error_rate([ZH], ["我们今天在北京见面 然后一起去吃晚饭"], "zh") == ("cer", pytest.approx(1 / 17))
    assert S.error_rate([ZH], [ZH.replace("，", " ")], "zh") == ("cer", 0.0)
    # as WER the comma splits the sentence into two "words": one wrong character costs half of it
    assert S.error_rate([ZH], ["我们今天在北京见面 然后一起去吃晚饭"], "vi") == ("wer", 0.5)
    # English: a real LJSpeech transcript against Whisper tiny.en's transcript of the real clip
    cid = "LJ001-0008"
    wave, rate = audio_io.load_audio(lj_dir / "wavs" / f"{cid}.wav")
    hyp = S.Transcriber()(wave[0], rate, "en")
    text = _text(transcripts, cid)
    metric, wer = S.error_rate([text], [hyp], "en")
    assert metric == "wer" and wer < 0.25, (text, hyp)
    assert S.error_rate(["Mr. Smith paid twenty-five dollars."], ["mister smith paid $25"], "en") == ("wer", 0.0)
    assert S.normalizer_for("en")("It's fine, Dr. Who!") == S.normalizer_for("en")("it is fine doctor who")
    with pytest.raises(ValueError, match="ISO 639-1"):
        S.error_rate(["a"], ["a"], "")


def test_rows_carry_language_and_their_metric(tmp_path, tiny_model, text_tokenizer, audio_tokenizer, demo_config,
                                              short_codes, transcripts, lj_dir):
    """evaluate_generation: a row's own language (top-level, else misc.language) wins over the
    default; the zh row gets ``cer`` (``wer`` None), the en row ``wer``; the transcriber is asked for
    the row's language; health fields and rates are filled; the base side (calibrate=False) has no
    calibration fields and writes no codec clip."""
    from higgs_tune.codec import HiggsCodec
    from higgs_tune.evaluate import evaluate_generation, row_language

    asked = []

    class Asr:  # no multilingual Whisper is installable here: the zh transcript is given
        multilingual = True

        def __call__(self, wave, rate, language):
            asked.append(language)
            return "我们今天在北京见面然后一起去吃晚饭" if language == "zh" else _text(transcripts, SHORT[0])

    class Speaker:
        def embed(self, wave, rate):
            return np.ones(4, np.float32)

    def quality(wave, rate):
        return {"sig": 1.0, "bak": 1.0, "ovrl": 1.0}

    sha = short_codes[SHORT[0]][0]
    en = tts_row(SHORT[0], _text(transcripts, SHORT[0]), sha, lj_dir, sample_id="en-row")
    zh = tts_row(SHORT[0], ZH, sha, lj_dir, sample_id="zh-row")
    zh["misc"]["language"] = "zh"
    assert row_language(zh, "en") == "zh" and row_language({**en, "language": "DE"}, "zh") == "de"
    assert row_language(en, "en") == "en"
    by_sha = {s: c for s, c in short_codes.values()}
    codec = HiggsCodec(audio_tokenizer, init_seed=demo_config["audio_tokenizer"]["seed"], fast=False,
                       max_batch_seconds=60.0)
    gen = {**demo_config["eval"]["generate"], "max_seconds": 0.4, "temperature": 0.7, "top_p": 0.95, "seed": 0}
    rows, summary = evaluate_generation(tiny_model.eval(), text_tokenizer, [en, zh], by_sha.__getitem__, codec,
                                        tmp_path, gen, transcriber=Asr(), speaker=Speaker(), quality=quality,
                                        language="en", calibrate=False, device="cpu")
    r_en, r_zh = rows
    assert asked == ["en", "zh"]
    assert (r_en["language"], r_en["asr_metric"], r_en["cer"]) == ("en", "wer", None) and r_en["wer"] is not None
    assert (r_zh["language"], r_zh["asr_metric"], r_zh["wer"]) == ("zh", "cer", None)
    assert r_zh["cer"] == pytest.approx(1 / 17)
    assert summary["cer"] == pytest.approx(1 / 17) and summary["wer"] == r_en["wer"]
    assert summary["languages"] == ["en", "zh"]
    for r in rows:  # 0.4 s budget: the random-init model never closes the stream, it is cut
        assert r["gt_wer"] is None and r["codec"] is None and r["gt_dnsmos_ovrl"] is None
        assert r["hit_max"] is (not r["ended"]) and isinstance(r["trailing_silence_s"], float)
    assert summary["hit_max_rate"] == sum(r["hit_max"] for r in rows) / 2
    assert not list(tmp_path.glob("*.codec.wav")) and len(list(tmp_path.glob("*.generated.wav"))) == 2
    json.dumps(rows), json.dumps(summary)


def test_trailing_silence_and_flags(lj_dir):
    """A real clip padded with 1.5 s of silence ends in ~1.5 s more silence than the clip alone; it is
    flagged, and so is a generation cut at max_seconds."""
    wave, rate = audio_io.load_audio(lj_dir / "wavs" / "LJ001-0008.wav")
    clip = wave[0]
    base = S.trailing_silence_s(clip, rate)
    padded = np.concatenate([clip, np.zeros(int(1.5 * rate), np.float32)])
    assert S.trailing_silence_s(padded, rate) == pytest.approx(base + 1.5, abs=0.03)
    assert S.trailing_silence_s(np.zeros(rate, np.float32), rate) == pytest.approx(1.0)
    assert S.trailing_silence_s(np.zeros(0, np.float32), rate) == 0.0
    rows = [{"id": "a", "hit_max": True, "ended": False, "trailing_silence_s": base, "voiced": True},
            {"id": "b", "hit_max": False, "ended": True, "trailing_silence_s": base + 1.5, "voiced": True},
            {"id": "c", "hit_max": False, "ended": True, "trailing_silence_s": 0.1, "voiced": True}]
    flags = P.flagged(rows)
    assert [f["id"] for f in flags] == ["a", "b"]
    assert flags[0]["problems"] == ["cut at max_seconds without EOS"] and "silent tail" in flags[1]["problems"][0]
    rates = P.health_rates(rows)
    assert rates["hit_max_rate"] == pytest.approx(1 / 3) and rates["silent_tail_rate"] == pytest.approx(1 / 3)
    assert rates["eos_rate"] == pytest.approx(2 / 3)
