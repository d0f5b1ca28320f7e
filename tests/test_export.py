"""From adapter to voice: the export stage (LoRA merged into the base, the base checkpoint's layout),
the merged folder loaded by upstream ``HiggsAudioModel.from_pretrained`` and its serve engine."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from higgs_tune import data as D
from higgs_tune.model import apply_lora, load_text_tokenizer

from conftest import stage_train_inputs
from pretrained_layout import build_audio_tokenizer, build_model, hub_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_config, short_codes, transcripts, lj_dir):
    """``(cfg, io)``: the demo config (tiny random-init model, audio_lm_head and text_lm_head in
    modules_to_save) trained 6 steps on staged real clips by ``higgs_tune.train.train``."""
    from higgs_tune.train import train

    root = tmp_path_factory.mktemp("trained")
    cfg = copy.deepcopy(demo_config)
    cfg.update(results_dir=str(root / "results"), cache_dir=str(root / "cache"))
    cfg["train"].update(max_steps=6, batch_size=1, grad_accum_steps=1, warmup_steps=1, eval_interval=6,
                        predictions_interval=6, save_interval=6, log_interval=1)
    io = stage_train_inputs(root / "exp", short_codes, transcripts, lj_dir, audit_passed=True)
    train(cfg, io)
    return cfg, io


def val_batch(cfg, io, tok, model_config):
    codes = D.CodesIndex(io.index)
    rows = D.read_jsonl(io.val)
    return rows[0], D.make_collator(model_config)([D.build_dataset_sample(rows[0], tok, codes.get)]), codes


def forward(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**D.batch_to_model_kwargs(batch, "cpu"))
    return out.logits.float(), out.audio_logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_export_merges_adapter_and_loads_upstream(tmp_path, trained):
    """Merged-model logits = base + adapter logits (text and audio, <= 1e-4 relative) on a val sample;
    the folder loads with upstream HiggsAudioModel.from_pretrained and generates the same audio codes
    as the adapter with the project's generation code."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from higgs_tune.evaluate import load_trained
    from higgs_tune.export import export
    from higgs_tune.generate import generate_codes
    from higgs_tune.model import build_model as build_base

    cfg, io = trained
    out = export(cfg, adapter=io.adapter, out=tmp_path / "merged")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "higgs_tune_export.json"} <= files, files
    assert not any(n.startswith("adapter") for n in files)

    merged = HiggsAudioModel.from_pretrained(str(out)).eval()  # upstream, no peft
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"  # demo: model.dtype
    tok = load_text_tokenizer(str(out))
    row, batch, codes = val_batch(cfg, io, tok, merged.config)
    peft_model = load_trained(cfg, io.adapter, "cpu")
    text_m, audio_m = forward(merged, batch)
    text_p, audio_p = forward(peft_model, batch)
    assert rel(text_m, text_p) <= 1e-4 and rel(audio_m, audio_p) <= 1e-4, (rel(text_m, text_p), rel(audio_m, audio_p))
    # not vacuous: training moved the model away from the base (LoRA and both trained heads)
    text_b, audio_b = forward(build_base(cfg["model"], torch.float32, "cpu"), batch)
    assert rel(text_b, text_p) > 1e-2 and rel(audio_b, audio_p) > 1e-2, (rel(text_b, text_p), rel(audio_b, audio_p))
    heads = merged.audio_decoder_proj
    trained_heads = peft_model.get_base_model().audio_decoder_proj
    for name in ("audio_lm_head", "text_lm_head"):  # modules_to_save: the trained copies were written in
        assert torch.equal(getattr(heads, name).weight, getattr(trained_heads, name).modules_to_save["default"].weight)

    # generation: the project's code on the merged model = on base + adapter (greedy)
    greedy = {"max_frames": 20, "temperature": 0.0, "top_p": 1.0, "seed": 0, "device": "cpu"}
    g_merged = generate_codes(merged, tok, row, codes.get, **greedy)
    g_peft = generate_codes(peft_model.get_base_model(), tok, row, codes.get, **greedy)
    assert g_merged.codes.shape[0] == 8 and g_merged.codes.shape[1] > 0
    assert g_merged.codes.min() >= 0 and g_merged.codes.max() < 1024
    np.testing.assert_array_equal(g_merged.codes, g_peft.codes)


@pytest.fixture(scope="module")
def sharded_export(tmp_path_factory, demo_config):
    """A bf16 base in the hub layout (3 shards + index), an adapter with non-zero LoRA B and a trained
    audio_lm_head copy, and its export: ``(base_cfg, adapter, merged)``."""
    from higgs_tune.export import export

    root = tmp_path_factory.mktemp("sharded")
    base = build_model(root / "base")
    cfg = {"model": {"source": "pretrained", "path": str(base), "text_tokenizer": str(base), "device": "cpu",
                     "dtype": "bfloat16", "seed": 0,
                     "attn_implementation": None}}
    from higgs_tune.model import build_model as build_base

    lora = {**demo_config["lora"], "modules_to_save": ["audio_lm_head"]}
    model = apply_lora(build_base(cfg["model"], torch.float32, "cpu"), lora)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # LoRA A/B and the audio_lm_head copy: a "trained" adapter
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(root / "adapter"))
    return cfg, root / "adapter", export(cfg, adapter=root / "adapter", out=root / "merged")


def test_export_keeps_the_base_checkpoint_layout(sharded_export):
    """A sharded bf16 base gives a sharded bf16 merged folder (same shard count, index, tokenizer,
    generation config) that upstream from_pretrained loads, with the base + adapter logits."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from peft import PeftModel

    from higgs_tune.model import build_model as build_base

    cfg, adapter, out = sharded_export
    base = Path(cfg["model"]["path"])
    shards = lambda d: sorted(p.name for p in d.glob("*.safetensors"))  # noqa: E731
    assert shards(out) == shards(base) and len(shards(base)) == 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards(out))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # copied as they are
        assert (out / f).read_bytes() == (base / f).read_bytes(), f
    config = lambda d: {k: v for k, v in json.loads((d / "config.json").read_text()).items()  # noqa: E731
                        if k not in ("_name_or_path", "transformers_version")}
    assert config(out) == config(base)
    assert json.loads((out / "generation_config.json").read_text()) | {"transformers_version": None} == \
        json.loads((base / "generation_config.json").read_text()) | {"transformers_version": None}
    merged = HiggsAudioModel.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(build_base(cfg["model"], torch.float32, "cpu"), str(adapter)).eval()
    tok = load_text_tokenizer(str(out))
    sample = {"messages": [{"role": "user", "content": "Hello there."},
                           {"role": "assistant", "content": {"type": "audio", "audio_url": "a.wav"}}],
              "misc": {"id": "x", "audio_sha256": {"a.wav": "h"}}}
    codes = torch.randint(0, 1024, (8, 12), generator=torch.Generator().manual_seed(0))
    batch = D.make_collator(merged.config)([D.build_dataset_sample(sample, tok, lambda h: codes)])
    text_m, audio_m = forward(merged, batch)
    text_p, audio_p = forward(peft_model, batch)
    # merged in fp32, rounded once to bf16: bf16 rounding (8 bits of mantissa) bounds the difference
    assert rel(text_m, text_p) < 3e-2 and rel(audio_m, audio_p) < 3e-2, (rel(text_m, text_p), rel(audio_m, audio_p))
    text_b, audio_b = forward(build_base(cfg["model"], torch.float32, "cpu"), batch)
    assert rel(audio_b, audio_p) > 0.1  # the adapter matters far beyond that rounding


ENGINE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine
    from boson_multimodal.data_types import ChatMLSample, Message
    merged, tokenizer, out = sys.argv[1:4]
    engine = HiggsAudioServeEngine(model_name_or_path=merged, audio_tokenizer_name_or_path=tokenizer, device="cpu",
                                   kv_cache_lengths=[256])
    sample = ChatMLSample(messages=[Message(role="system", content="Generate audio following instruction."),
                                    Message(role="user", content="Hello there, this is the merged model.")])
    r = engine.generate(sample, max_new_tokens=24, temperature=0.0, force_audio_gen=True, seed=0)
    np.save(out + ".npy", r.audio)
    json.dump({"sampling_rate": r.sampling_rate, "tokens": r.generated_audio_tokens.tolist()}, open(out, "w"))
""")


def test_serve_engine_generates_from_the_merged_folder(tmp_path, trained, demo_config):
    """Upstream HiggsAudioServeEngine(model_name_or_path=merged, audio_tokenizer_name_or_path=<local
    folder>, device="cpu").generate(ChatMLSample) runs on the export, unpatched: the engine's audio
    tokenizer loads bosonai/hubert_base by its hard-coded hub id, which a local hub cache
    (HF_HUB_CACHE, offline) answers; its greedy audio is the project's greedy generation."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from higgs_tune.codec import build_codec
    from higgs_tune.export import export
    from higgs_tune.generate import generate_codes

    cfg, io = trained
    merged = export(cfg, adapter=io.adapter, out=tmp_path / "merged")
    at, hubert = build_audio_tokenizer(tmp_path / "audio_tokenizer", tmp_path / "hubert_base",
                                       demo_config["audio_tokenizer"]["arch"], demo_config["audio_tokenizer"]["seed"])
    cache = hub_cache(tmp_path / "hub", hubert)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT / "workflow")}
    res = subprocess.run([sys.executable, "-c", ENGINE, str(merged), str(at), str(tmp_path / "engine.json")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-5000:]
    got = json.loads((tmp_path / "engine.json").read_text())
    wave = np.load(tmp_path / "engine.json.npy")
    tokens = np.array(got["tokens"])  # (8, L) with the delay pattern, stream BOS first
    assert got["sampling_rate"] == 24000 and tokens.shape[0] == 8 and tokens.shape[1] > 8
    assert wave.ndim == 1 and len(wave) == 960 * (tokens.shape[1] - 8 - 1) and np.isfinite(wave).all()

    model = HiggsAudioModel.from_pretrained(str(merged)).eval()
    row = {"messages": [{"role": "system", "content": "Generate audio following instruction."},
                        {"role": "user", "content": "Hello there, this is the merged model."},
                        {"role": "assistant", "content": {"type": "audio", "audio_url": "placeholder"}}]}
    g = generate_codes(model, load_text_tokenizer(str(merged)), row, None, max_frames=24 - 8, temperature=0.0,
                       top_p=1.0, seed=0, device="cpu")
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

    engine_codes = revert_delay_pattern(torch.as_tensor(tokens)).clip(0, 1023)[:, 1:-1].numpy()
    np.testing.assert_array_equal(engine_codes, g.codes)
    # the engine's decoder is the configured audio tokenizer's: same wave as the project's codec
    np.testing.assert_allclose(wave, build_codec(demo_config["audio_tokenizer"]).decode(g.codes), atol=1e-5)


def test_export_rule_is_its_own_target(tmp_path):
    """`snakemake -n` plans the chain without export; `snakemake -n export` plans it after train."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "workflow")}
    opts = ["-n", "--configfile", "config/demo.yaml", "--config", f"results_dir={tmp_path}"]
    default = subprocess.run([sys.executable, "-m", "snakemake", *opts], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert default.returncode == 0 and "rule report:" in default.stdout and "rule export:" not in default.stdout
    export = subprocess.run([sys.executable, "-m", "snakemake", "export", *opts], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    assert "rule export:" in export.stdout and "rule train:" in export.stdout and "rule report:" not in export.stdout
    assert f"--adapter {tmp_path}/demo/train/adapter --merged {tmp_path}/demo/merged" in export.stdout
