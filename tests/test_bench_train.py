"""bench/bench_train.py starts and documents its options, its FLOP count matches what torch counts,
and (slow) its smallest setting runs both trainers and states the ratio on its last line."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from conftest import run_bench


def load_bench(repo_root):
    spec = importlib.util.spec_from_file_location("bench_train", repo_root / "bench" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_train_help(repo_root):
    proc = run_bench("bench_train", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("usage: bench/bench_train.py")
    for opt in ("--configfile", "--geometry", "--batch-size", "--grad-accum", "--steps", "--warmup", "--train",
                "--val", "--index", "--threads", "--peak-tflops", "--quick"):
        assert opt in out, opt
    assert "naive" in out and "MFU" in out and "Kaplan" in out and "PaLM" in out


def test_bench_train_rejects_partial_cached_inputs(repo_root):
    proc = run_bench("bench_train", "--index", "i.parquet")
    assert proc.returncode == 2 and "--train, --val and --index go together" in proc.stderr


def test_model_flops_match_torch_flop_counter(repo_root, demo_config, real_batch_factory):
    """model_flops (4 N_frozen + 6 N_trainable per position and weight, attention 12 L d T^2) against
    torch.utils.flop_counter on one real training micro-step of the demo's LoRA model (the text head
    on text targets only, as the trainer runs it), counting every position the model computes."""
    from torch.utils.flop_counter import FlopCounterMode

    from higgs_tune.loss import count_targets, forward_loss
    from higgs_tune.model import apply_lora

    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from higgs_tune.model import tiny_higgs_config

    bench = load_bench(repo_root)
    config = tiny_higgs_config(demo_config["model"]["arch"])
    # eager attention (explicit matmuls, which the counter sees; transformers would pick SDPA, whose
    # CPU flash kernel torch's counter has no formula for)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = apply_lora(HiggsAudioModel(config), demo_config["lora"])
    model.train()
    batch = real_batch_factory(model)
    with FlopCounterMode(display=False) as counter:
        out, loss = forward_loss(model, batch, "cpu", text_weight=1.0, audio_weight=1.0, text_logits_at_targets=True)
        loss.loss.backward()
    counted = counter.get_total_flops()
    b, length = out.attention_mask.shape
    arch = demo_config["model"]["arch"]
    kwargs = dict(positions=b * length, audio_out=int(batch.audio_out_ids.shape[-1]),
                  text_targets=count_targets(batch.label_ids, batch.label_audio_ids, batch.audio_out_ids_start).text,
                  layers=arch["num_layers"], width=arch["hidden_size"])
    expected = bench.model_flops(bench.matmul_params(model), seq_sq=b * length ** 2, **kwargs)
    attention = expected - bench.model_flops(bench.matmul_params(model), seq_sq=0, **kwargs)
    assert attention > 0.1 * expected  # the attention term is really part of what is compared
    # the first layer's projections compute no input gradient (the embeddings are frozen): the formula
    # counts 2 FLOPs per position and weight of them too much, ~1 % of this model's total
    assert 0.97 < counted / expected <= 1.0, (counted, expected)
    parts = bench.matmul_params(model)
    assert parts["text_head"][1] > 0 and parts["attn"][0] > 0 and parts["attn"][1] > 0  # trained head, LoRA


@pytest.mark.slow
def test_bench_train_quick_run(repo_root, tmp_path):
    proc = run_bench("bench_train", "--quick", "--threads", "1",
                      "--workdir", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"speed ratio \(audio frames/s, higgs-tune / naive\): ([\d.]+)x; padding efficiency: "
                     r"higgs-tune ([\d.]+), naive ([\d.]+)", last)
    assert m, last
    assert float(m.group(1)) > 0 and 0 < float(m.group(2)) <= 1 and 0 < float(m.group(3)) <= 1
    assert "warning: the timed steps are not whole epochs" in proc.stdout
