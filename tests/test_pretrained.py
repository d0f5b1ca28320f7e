"""The pretrained path: config/cluster.yaml, unchanged but for paths, device and sizes, through every
stage to the report, on local folders in the exact layouts of the hub checkpoints (built from tiny
random models by ``tests/pretrained_layout.py``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import yaml

from pretrained_layout import build_pretrained_layout

ROOT = Path(__file__).resolve().parents[1]
#: short real clips: 6 TTS rows and one voice-cloning row (reference LJ001-0008, target LJ001-0013)
CLIPS = ["LJ001-0002", "LJ001-0008", "LJ001-0013", "LJ001-0011", "LJ001-0020", "LJ001-0004"]


@pytest.fixture(scope="module")
def layout(tmp_path_factory, demo_config):
    """The three hub layouts (model + text tokenizer, audio tokenizer, HuBERT) under one tmp folder."""
    return build_pretrained_layout(tmp_path_factory.mktemp("hub"), demo_config["audio_tokenizer"]["arch"])


def small_manifest(path: Path, transcripts: dict[str, str], lj_dir: Path) -> Path:
    """ChatML JSONL: one TTS row per clip in :data:`CLIPS`, plus one voice-cloning row."""
    wav = lambda c: str(lj_dir / "wavs" / f"{c}.wav")  # noqa: E731
    system = "Generate audio following instruction."
    rows = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": transcripts[c]},
                          {"role": "assistant", "content": {"type": "audio", "audio_url": wav(c)}}],
             "speaker": "LJ", "misc": {"id": f"tts-{c}"}} for c in CLIPS]
    ref, tgt = CLIPS[1], CLIPS[2]
    rows.append({"messages": [{"role": "system", "content": system},
                              {"role": "user", "content": transcripts[ref]},
                              {"role": "assistant", "content": {"type": "audio", "audio_url": wav(ref)}},
                              {"role": "user", "content": transcripts[tgt]},
                              {"role": "assistant", "content": {"type": "audio", "audio_url": wav(tgt)}}],
                 "start_index": 4, "speaker": "LJ", "misc": {"id": f"clone-{tgt}-ref-{ref}"}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_cluster_config_runs_on_pretrained_layouts(tmp_path, layout, transcripts, lj_dir):
    """snakemake --profile profiles/default with config/cluster.yaml + an overlay of paths, device and
    sizes only: every stage runs on the hub layouts (bf16 model on CPU) and writes the report."""
    cluster = yaml.safe_load((ROOT / "config" / "cluster.yaml").read_text())
    overlay = {
        "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
        "data": {"manifest": str(small_manifest(tmp_path / "manifest.jsonl", transcripts, lj_dir)),
                 "data_root": str(lj_dir)},
        "audio_tokenizer": {"path": str(layout.audio_tokenizer), "semantic_model": str(layout.hubert),
                            "device": "cpu", "num_workers": 2},
        "model": {"path": str(layout.model), "text_tokenizer": str(layout.model), "device": "cpu"},
        "train": {"max_steps": 2, "warmup_steps": 1, "batch_size": 2, "grad_accum_steps": 1, "log_interval": 1,
                  "eval_interval": 2, "save_interval": 2, "predictions_interval": 2,
                  "resume_dir": str(tmp_path / "resume")},
        "eval": {"batch_size": 2, "generate": {"n_samples": 1, "max_seconds": 2}},
    }
    # the overlay changes paths, devices and sizes only (warmup_steps: below the 2 steps, or training refuses):
    # source, dtype, LoRA, loss, audit stay the cluster's
    assert cluster["model"]["source"] == cluster["audio_tokenizer"]["source"] == "pretrained"
    assert cluster["model"]["dtype"] == "bfloat16"
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "workflow")}
    args = [sys.executable, "-m", "snakemake", "--profile", "profiles/default", "--snakefile", str(ROOT / "Snakefile"),
            "--directory", str(ROOT), "--nolock",
            # one --configfile with both files: a second --configfile flag replaces the first (argparse nargs="+")
            "--configfile", str(ROOT / "config" / "cluster.yaml"), str(tmp_path / "overlay.yaml")]
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = tmp_path / "results" / cluster["experiment"]
    logs = "".join(f"\n--- {p.name}\n" + p.read_text()[-3000:] for p in sorted((out / "logs").glob("*.log"))) \
        if (out / "logs").is_dir() else ""
    assert res.returncode == 0, res.stderr[-4000:] + logs

    tokens = json.loads((out / "tokens" / "stats.json").read_text())
    assert tokens
    summary = json.loads((out / "audit" / "summary.json").read_text())
    assert summary["passed"] is True and summary["n_samples"] == len(CLIPS) + 1
    metrics = [json.loads(line) for line in open(out / "train" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["n_audio_targets"] > 0 for m in metrics)
    state = json.loads((out / "train" / "state.json").read_text())
    assert state["model_source"] == "pretrained" and state["finished"]
    adapter_cfg = json.loads((out / "train" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(layout.model)
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    assert len(ev["codebook_acc"]) == 8 and ev["n_audio_targets"] > 0 and 0 < ev["audio_loss"] < 20
    gen = [json.loads(line) for line in open(out / "eval" / "generated.jsonl")]
    assert len(gen) == 1 == ev["generation"]["n_samples"]
    wave, rate = sf.read(gen[0]["generated"])
    assert rate == 24000 and len(wave) == 960 * gen[0]["n_frames"] and gen[0]["n_frames"] <= 50
    assert (out / "report.html").stat().st_size > 10_000
    assert not (out / "merged").exists()  # export is not in the default target

    # the export target: the merged model in the base's layout (same shard files), bf16 as the base
    # the target goes before --configfile, which would take it for one more config file
    res = subprocess.run(args[:3] + ["export"] + args[3:], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-4000:] + (out / "logs" / "export.log").read_text()[-3000:]
    assert re.findall(r"^(?:local)?rule (\w+):", res.stdout + res.stderr, re.M) == ["export_model", "export"]
    merged = out / "merged"
    assert sorted(p.name for p in merged.glob("*.safetensors")) == sorted(p.name for p in layout.model.glob("*.safetensors"))
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (merged / "tokenizer.json").is_file() and (merged / "model.safetensors.index.json").is_file()


def test_pretrained_loaders_read_the_hub_layouts(layout, demo_config, lj_dir):
    """model.build_model / load_text_tokenizer / codec.build_codec on the three folders: the bf16
    sharded weights as saved, the Higgs tokens at their ids, and the audio tokenizer's codes equal to
    those of the random-init tokenizer the folders were written from (every weight loaded)."""
    import torch
    from safetensors.torch import load_file

    from higgs_tune import audio_io
    from higgs_tune.codec import build_codec, tokenizer_geometry
    from higgs_tune.labels import HIGGS_SPECIAL_TOKENS
    from higgs_tune.model import build_model, load_text_tokenizer

    # the demo's validated sections (defaults filled), switched to the hub layouts
    cfg = {**demo_config["model"], "source": "pretrained", "path": str(layout.model)}
    model = build_model(cfg, torch.bfloat16, "cpu")
    saved = {}
    for shard in layout.model.glob("model-*.safetensors"):
        saved.update(load_file(shard))
    state = model.state_dict()
    assert len(list(layout.model.glob("model-*.safetensors"))) > 1 and set(saved) == set(state)
    assert all(torch.equal(state[k], v) for k, v in saved.items()) and model.dtype == torch.bfloat16
    tok = load_text_tokenizer(str(layout.model))
    assert all(tok.convert_tokens_to_ids(t) == i for i, t in HIGGS_SPECIAL_TOKENS.items())

    at = {**{k: v for k, v in demo_config["audio_tokenizer"].items() if k != "arch"}, "source": "pretrained",
          "path": str(layout.audio_tokenizer), "semantic_model": str(layout.hubert), "device": "cpu"}
    # an `arch` merged in from config/demo.yaml (the Snakefile's configfile) does not override config.json
    assert tokenizer_geometry({**at, "arch": {"ratios": [8, 5, 4, 2], "n_q": 4}}) == tokenizer_geometry(at)
    assert tokenizer_geometry(at)["hop_length"] == 960
    wave, rate = audio_io.load_audio(lj_dir / "wavs" / "LJ001-0008.wav")
    wave = audio_io.to_mono_resampled(wave, rate, 24000)
    pretrained, reference = build_codec(at), build_codec(demo_config["audio_tokenizer"])
    codes = pretrained.encode([wave])[0]
    assert codes.shape[0] == 8 and (codes == reference.encode([wave])[0]).all()


def test_pretrained_loader_errors_and_identity(tmp_path):
    """Missing files are named with what to do; model.pth that leaves tokenizer parameters unset is
    refused; the tokenizer identity covers config.json, model.pth and the semantic teacher."""
    import torch

    from higgs_tune.codec import audio_tokenizer_identity, load_tokenizer_weights, pretrained_folder
    from higgs_tune.model import build_model, load_text_tokenizer

    at = tmp_path / "at"
    at.mkdir()
    (at / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.pth"):
        pretrained_folder(str(at))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_text_tokenizer(str(at))
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_model({"source": "pretrained", "path": str(tmp_path)}, torch.float32, "cpu")

    net = torch.nn.Module()
    net.fc_prior, net.semantic_model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    state = net.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("semantic_model.")} | {"fc1.weight": torch.ones(1)},
               at / "ok.pth")
    load_tokenizer_weights(net, at / "ok.pth")  # the teacher may come from semantic_model; extra keys ignored
    torch.save({k: v for k, v in state.items() if k != "fc_prior.weight"}, at / "model.pth")
    with pytest.raises(ValueError, match=r"model\.pth.*fc_prior\.weight"):
        load_tokenizer_weights(net, at / "model.pth")

    hub = tmp_path / "hubert"
    hub.mkdir()
    (hub / "config.json").write_text("{}")
    (hub / "model.safetensors").write_bytes(b"a")
    cfg = {"source": "pretrained", "path": str(at), "semantic_model": str(hub)}
    ident = audio_tokenizer_identity(cfg)
    assert ident == audio_tokenizer_identity({**cfg, "device": "cuda", "fast_encode": False})
    (hub / "model.safetensors").write_bytes(b"b")
    assert audio_tokenizer_identity(cfg) != ident
    ident = audio_tokenizer_identity(cfg)
    (at / "config.json").write_text('{"n_q": 8}')
    assert audio_tokenizer_identity(cfg) != ident
