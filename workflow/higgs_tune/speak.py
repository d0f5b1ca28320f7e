"""Speak a text with a trained model: the base + a trained LoRA adapter, or a merged folder; optionally
in the voice of a reference clip. Writes a 24 kHz WAV.

    .venv/bin/python -m higgs_tune.speak --configfile config/demo.yaml \\
        --adapter results/demo/train/adapter --text "Hello" --out hello.wav
    .venv/bin/python -m higgs_tune.speak --configfile config/cluster.yaml --merged results/cluster/merged \\
        --text "Hello" --reference ref.wav --reference-text "What the reference clip says." --out hello.wav

The generation is the evaluate stage's: the prompt is a manifest row (system, [user reference text,
assistant reference audio,] user text) ending in ``<|audio_out_bos|>``, sampled by
:func:`higgs_tune.generate.generate_codes` and decoded by the configured audio tokenizer
(:func:`higgs_tune.codec.build_codec`; the reference clip is encoded by the same tokenizer, no
cache). ``--configfile`` supplies the ``model`` (base, text tokenizer, device, dtype),
``audio_tokenizer`` and ``eval.generate`` (sampling defaults) sections; with ``--merged`` the model
and text tokenizer come from that folder instead.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .config import add_config_args, config_from_args

log = logging.getLogger("higgs_tune.speak")

#: The system prompt of the demo data and upstream's generation examples.
DEFAULT_SYSTEM = "Generate audio following instruction."


def prompt_row(text: str, *, system: str = DEFAULT_SYSTEM, reference: str | None = None,
               reference_text: str | None = None, reference_sha256: str | None = None) -> dict:
    """A manifest row whose prompt asks for ``text`` as audio (the last turn is a placeholder assistant
    audio, dropped by :func:`higgs_tune.generate.split_row`); with ``reference`` (path, its
    ``reference_sha256`` the key of its codes) a voice-cloning row: the reference turns first.

    Raises:
        ValueError: ``reference`` without ``reference_text`` or ``reference_sha256``.
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    hashes = {}
    if reference is not None:
        if not reference_text or not reference_sha256:
            raise ValueError("a reference clip needs its transcript (--reference-text) and its codes")
        messages += [{"role": "user", "content": reference_text},
                     {"role": "assistant", "content": {"type": "audio", "audio_url": str(reference)}}]
        hashes[str(reference)] = reference_sha256
    messages += [{"role": "user", "content": text},
                 {"role": "assistant", "content": {"type": "audio", "audio_url": "placeholder"}}]
    return {"messages": messages, "misc": {"id": "speak", "audio_sha256": hashes}}


def load_model(cfg: dict[str, Any], *, adapter: str | Path | None, merged: str | Path | None, device, dtype):
    """``(HiggsAudioModel, text_tokenizer)`` in eval mode on ``device``: the base from ``cfg["model"]``
    (in ``model.dtype``) with the LoRA ``adapter`` injected (as the evaluate stage loads it), or the
    ``merged`` folder in ``dtype`` (``HiggsAudioModel.from_pretrained``, its own tokenizer files when present).

    Raises:
        ValueError: neither or both of ``adapter`` and ``merged``.
        FileNotFoundError: ``merged`` lacks ``config.json``, or ``adapter`` lacks ``adapter_config.json``.
    """
    from .model import load_text_tokenizer

    if (adapter is None) == (merged is None):
        raise ValueError("give exactly one of --adapter (a train/adapter folder) and --merged (an export folder)")
    if adapter is not None:
        from .evaluate import load_trained

        model = load_trained(cfg, Path(adapter), device).get_base_model()
        return model, load_text_tokenizer(cfg["model"]["text_tokenizer"])
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    merged = Path(merged)
    if not (merged / "config.json").is_file():
        raise FileNotFoundError(f"{merged}: no config.json; give the export stage's folder (results/<experiment>/merged)")
    model = HiggsAudioModel.from_pretrained(str(merged), torch_dtype=dtype, device_map={"": device}).eval()
    tok_src = str(merged) if (merged / "tokenizer.json").is_file() else cfg["model"]["text_tokenizer"]
    return model, load_text_tokenizer(tok_src)


def speak(cfg: dict[str, Any], text: str, out: str | Path, *, adapter: str | Path | None = None,
          merged: str | Path | None = None, reference: str | Path | None = None, reference_text: str | None = None,
          system: str = DEFAULT_SYSTEM, max_seconds: float | None = None, temperature: float | None = None,
          top_p: float | None = None, seed: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Generate ``text`` as speech and write it to ``out`` (mono float32 WAV at the tokenizer's 24 kHz).

    Args:
        cfg: config with ``model``, ``audio_tokenizer`` and (optional) ``eval.generate`` sections.
        adapter / merged: exactly one: a LoRA adapter folder (base from ``cfg``) or a merged model folder.
        reference, reference_text: a clip (any format libsndfile reads, any rate) and its transcript
            to clone the voice of.
        max_seconds, temperature, top_p, seed: default to ``eval.generate`` (15 s, 0.7, 0.95, 0).
        device: default ``model.device`` (``auto``: CUDA when available).

    Returns:
        ``{"out", "n_frames", "seconds", "ended", "sample_rate"}``; ``ended``: the model closed the
        audio stream (EOS) before ``max_seconds``.

    Raises:
        ValueError: neither or both of ``adapter``/``merged``, or ``reference`` without ``reference_text``.
    """
    import soundfile as sf
    import torch

    from . import audio_io
    from .codec import build_codec
    from .generate import generate_codes
    from .model import device_and_dtype

    if reference is not None and not reference_text:
        raise ValueError("--reference needs --reference-text: the transcript of the reference clip")
    gen = cfg["eval"]["generate"]
    dev, dtype = device_and_dtype(device or cfg["model"]["device"], cfg["model"]["dtype"])
    model, tok = load_model(cfg, adapter=adapter, merged=merged, device=dev, dtype=dtype)
    codec = build_codec({**cfg["audio_tokenizer"], "device": str(dev)})
    ref_codes, ref_sha = None, None
    if reference is not None:
        wave, rate = audio_io.load_audio(reference)
        ref_sha = audio_io.audio_sha256(wave, rate)
        ref_codes = torch.from_numpy(codec.encode([audio_io.to_mono_resampled(wave, rate, codec.sample_rate)])[0])
    row = prompt_row(text, system=system, reference=str(reference) if reference is not None else None,
                     reference_text=reference_text, reference_sha256=ref_sha)

    def codes_of(sha: str) -> torch.Tensor:
        return ref_codes

    seconds = float(max_seconds if max_seconds is not None else gen["max_seconds"])
    g = generate_codes(model, tok, row, codes_of, max_frames=int(seconds * codec.frame_rate),
                       temperature=float(temperature if temperature is not None else gen["temperature"]),
                       top_p=float(top_p if top_p is not None else gen["top_p"]),
                       seed=int(seed if seed is not None else gen["seed"]), device=dev)
    wave = codec.decode(g.codes) if g.codes.shape[1] else np.zeros(0, np.float32)
    if not g.codes.shape[1]:
        log.warning("the model produced no audio frames: %s is empty", out)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), wave, codec.sample_rate, subtype="FLOAT")
    result = {"out": str(out), "n_frames": int(g.codes.shape[1]), "seconds": len(wave) / codec.sample_rate,
              "ended": g.ended, "sample_rate": codec.sample_rate}
    log.info("wrote %s: %.2f s (%d frames%s)", out, result["seconds"], result["n_frames"],
             "" if g.ended else ", no EOS: cut at --max-seconds")
    return result


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m higgs_tune.speak", description=__doc__.splitlines()[0])
    add_config_args(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="a trained LoRA adapter folder (results/<experiment>/train/adapter)")
    which.add_argument("--merged", help="a merged model folder (results/<experiment>/merged, rule export)")
    parser.add_argument("--text", required=True, help="what to say")
    parser.add_argument("--out", required=True, help="output WAV (24 kHz, float32)")
    parser.add_argument("--reference", help="a clip whose voice to clone (needs --reference-text)")
    parser.add_argument("--reference-text", help="the transcript of --reference")
    parser.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt (scene description)")
    parser.add_argument("--max-seconds", type=float, help="longest audio to generate (default eval.generate.max_seconds)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="torch device (default model.device)")
    args = parser.parse_args(argv)
    if args.reference and not args.reference_text:
        parser.error("--reference needs --reference-text (the transcript of the reference clip)")
    result = speak(config_from_args(args), args.text, args.out, adapter=args.adapter, merged=args.merged,
                   reference=args.reference, reference_text=args.reference_text, system=args.system,
                   max_seconds=args.max_seconds, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                   device=args.device)
    print(f"{result['out']}: {result['seconds']:.2f} s at {result['sample_rate']} Hz")


if __name__ == "__main__":
    main()
