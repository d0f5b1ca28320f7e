"""Training throughput: higgs-tune's trainer against a naive Higgs trainer, same data and model, one run.

    .venv/bin/python bench/bench_train.py [--configfile config/demo.yaml] [--batch-size 4] [--grad-accum 1]
                                          [--steps N] [--warmup N] [--train T --val V --index I]
    .venv/bin/python bench/bench_train.py --quick                    # smallest setting (batch 2, 2 steps)
    .venv/bin/python bench/bench_train.py --max-tokens 2048          # (a) by token budget, (b) by --batch-size
    .venv/bin/python bench/bench_train.py --geometry 3b              # on a GPU: the real 3B geometry, bf16

(a) higgs-tune: ``higgs_tune.train.train`` as the train rule runs it (accelerate, one process):
    length-bucketed micro-steps (``train.length_bucketing``), packed into one row each where the
    config packs (``train.packing``: config/demo.yaml does, config/cluster.yaml and so ``--geometry
    3b`` do not), text cross-entropy on the gathered
    target positions only, target-count normalization over the accumulation window, the health
    checks every step. Evaluation, predictions and checkpoints fall outside the timed steps.
(b) naive: what public Higgs fine-tuning scripts do, written here: micro-batches drawn at random
    and padded to the batch maximum (same collator), full-vocabulary fp32 cross-entropy over every
    position (``logits.float()`` of all ``B x L x 128256`` logits, ``ignore_index=-100``), the
    per-codebook audio cross-entropy likewise on ``audio_logits.float()``, and a mean per
    micro-batch divided by the accumulation steps (no target-count normalization). The teacher-forcing
    shift is right (a wrong one costs the same time). Same model, LoRA, fp32 trainable tensors,
    AdamW, gradient clipping, autocast as (a).

Each side runs in a fresh Python process (imports and model build before its timer). The first
``--warmup`` optimizer steps (default 0) are not timed; the next ``--steps`` are, by default one
epoch (every sample once, the last micro-batch short on both sides), so that both sides time the
same samples; other settings print a warning that they may not. (a)'s timed span also holds its
TensorBoard writer's start and the step-1 prediction snapshot (one forward of a val sample); (b)
has no such extras. Reported per side:

* samples/s, audio frames/s (codec frames of every audio segment of the trained samples, reference
  and target: 25 frames = 1 s of audio), text tokens/s (``input_ids`` other than the audio
  placeholders), over the timed steps' wall time;
* padding efficiency: the samples' positions / all positions of the padded micro-batches, counted in
  the sequence the decoder layers run on (text plus audio columns, padded to the longest row and to
  a multiple of 8: the model's merged ``attention_mask``, ``higgs_tune.data.batch_positions``);
* peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: tracemalloc does not see torch's allocations),
  which includes the Python runtime, the imports and the model;
* on CUDA, MFU: model FLOPs per second over the card's dense bf16 peak (``--peak-tflops``,
  default 989 for an H100 SXM). Model FLOPs (:func:`model_flops`) count the useful work of the
  samples' real positions, the same number for both sides: padding, and text logits the loss does
  not read, are waste (as in PaLM's MFU). Per position and weight it passes through: 2 FLOPs
  forward (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1), 2 backward for
  the activation gradient, 2 for the weight gradient of trained weights only: 4 x N_frozen +
  6 x N_trainable (the usual 6 x N assumes every weight is trained; a LoRA base is frozen but still
  back-propagated through); attention adds 12 x layers x width x seq^2 per sample (PaLM,
  Chowdhery et al. 2022, appendix B). Checked against torch's FlopCounterMode in
  tests/test_bench_train.py.

The last line states the speed ratio (audio frames/s, (a) over (b)) and both padding efficiencies.

Data: by default the demo's kept train split (``higgs_tune.manifest`` run into a temp folder on
``data/demo/manifest.jsonl``: 35 rows) with random codes of each clip's length (ceil(duration x 25)
frames, within one frame of the audio tokenizer's count; code values do not change the cost), so
no tokenize stage runs. With ``--train/--val/--index`` (e.g. ``results/demo/{manifest,tokens}``
after the workflow) the kept rows and their cached codes. The audit is not run (a passed summary
is written for the trainer's gate). CPU threads: torch's default (all cores) on both sides, or
``--threads``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: Llama-3.2-3B backbone of Higgs Audio v2 (``bosonai/higgs-audio-v2-generation-3B-base`` config.json:
#: hidden 3072, 28 layers, 24 heads, 8 KV heads, intermediate 8192; DualFFN audio FFN on all 28 layers).
GEOMETRY_3B = {"hidden_size": 3072, "intermediate_size": 8192, "num_layers": 28, "num_heads": 24, "num_kv_heads": 8}
#: Dense bf16 peak of an H100 SXM (NVIDIA H100 datasheet: 989.4 TFLOP/s without sparsity).
H100_SXM_BF16_TFLOPS = 989.0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/bench_train.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", action="append", default=None,
                    help="repeatable, later files override (default config/demo.yaml)")
    ap.add_argument("--geometry", choices=["config", "3b"], default="config",
                    help="model: the config's (default; the demo's tiny model) or the real 3B geometry, random "
                         "init, bf16, LoRA as config/cluster.yaml (for a GPU)")
    ap.add_argument("--batch-size", type=int, default=4, help="samples per micro-step (train.batch_size)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="(a) by token budget (train.max_tokens: positions per micro-batch, padding included) "
                         "instead of --batch-size; (b) keeps --batch-size")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed optimizer steps per side (default: one epoch, so both sides time the same samples)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed optimizer steps first (default 0; a multiple of an epoch's steps keeps both sides "
                         "on the same samples)")
    ap.add_argument("--train", type=Path, default=None, help="kept train manifest (with --val and --index)")
    ap.add_argument("--val", type=Path, default=None, help="kept val manifest")
    ap.add_argument("--index", type=Path, default=None, help="tokens index (parquet) of the cached codes")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads on both sides (default: torch's, all cores; on a shared, loaded "
                         "machine 1 thread is steadier)")
    ap.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_TFLOPS,
                    help="the GPU's dense bf16 peak for MFU (default: H100 SXM, 989)")
    ap.add_argument("--workdir", type=Path, default=None, help="where inputs and outputs go (default: a temp folder)")
    ap.add_argument("--quick", action="store_true", help="smallest setting: --batch-size 2 --steps 2 --warmup 1")
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cached = (args.train, args.val, args.index)
    if any(cached) and not all(cached):
        ap.error("--train, --val and --index go together")
    if args.quick:
        args.batch_size, args.steps, args.warmup = 2, 2, 1  # not whole epochs: a smoke run
    if min(args.batch_size, args.grad_accum, args.steps or 1) < 1 or (args.warmup or 0) < 0:
        ap.error("--batch-size, --grad-accum and --steps must be >= 1, --warmup >= 0")
    return args


# ------------------------------------------------------------------------------------ set-up
def bench_config(args) -> dict:
    """The config both sides train with: the config file's, timed-run overrides, and for ``--geometry
    3b`` the 3B arch in bf16, sdpa attention, with config/cluster.yaml's LoRA, learning rate and packing."""
    import yaml

    from higgs_tune.config import deep_merge, load_config

    cfg = load_config(args.configfile or [str(ROOT / "config" / "demo.yaml")])
    if args.geometry == "3b":
        cluster = yaml.safe_load((ROOT / "config" / "cluster.yaml").read_text())
        cfg["model"] = {**cfg["model"], "source": "random_init", "arch": dict(GEOMETRY_3B), "dtype": "bfloat16",
                        "device": "auto", "text_tokenizer": "llama3.2-bundled", "attn_implementation": "sdpa"}
        cfg["lora"] = deep_merge(cfg["lora"], cluster["lora"])
        for key in ("learning_rate", "packing", "pack_positions"):  # train as the cluster config does
            cfg["train"][key] = cluster["train"].get(key, cfg["train"].get(key))
    cfg["train"].update(batch_size=args.batch_size, grad_accum_steps=args.grad_accum, epochs=None,
                        max_tokens=args.max_tokens,
                        warmup_steps=min(cfg["train"]["warmup_steps"], 1), eval_interval=10 ** 6,
                        save_interval=10 ** 6, predictions_interval=10 ** 6, log_interval=10 ** 6,
                        gradient_checkpointing=False, length_bucketing=True)
    return cfg


def stage_inputs(args, cfg: dict, work: Path) -> dict:
    """Kept manifests, a codes index and a passed audit summary under ``work`` (or the given cached
    ones); returns the paths as strings."""
    import numpy as np
    import pandas as pd

    from higgs_tune import data as D

    audit = work / "audit" / "summary.json"
    audit.parent.mkdir(parents=True, exist_ok=True)
    audit.write_text(json.dumps({"passed": True, "note": "bench_train.py: audit not run"}))
    if args.index is not None:
        return {"train": str(args.train), "val": str(args.val), "index": str(args.index), "audit": str(audit)}
    m = work / "manifest"
    data_cfg = {**cfg["data"], "manifest": str(ROOT / cfg["data"]["manifest"]),
                "data_root": str(ROOT / (cfg["data"]["data_root"] or "data"))}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    res = subprocess.run([sys.executable, "-m", "higgs_tune.manifest", "--config-json",
                          json.dumps({"data": data_cfg, "cache_dir": str(work / "cache")}),
                          "--manifest", data_cfg["manifest"], "--train", str(m / "train.jsonl"),
                          "--val", str(m / "val.jsonl"), "--quarantine", str(m / "quarantine.jsonl"),
                          "--fixes", str(m / "fixes.json")], cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"manifest stage failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    rng = np.random.default_rng(0)
    index, codes_dir = [], work / "codes"
    codes_dir.mkdir(exist_ok=True)
    seen = set()
    for split in ("train", "val"):
        for row in D.read_jsonl(m / f"{split}.jsonl"):
            misc = row["misc"]
            for url, sha in misc["audio_sha256"].items():
                if sha in seen:
                    continue
                seen.add(sha)
                frames = max(1, math.ceil(misc["audio_info"][url]["duration_s"] * 25))
                path = codes_dir / f"{sha}.npy"
                np.save(path, rng.integers(0, 1024, size=(8, frames), dtype=np.int64))
                index.append({"audio_sha256": sha, "codes_path": str(path), "n_frames": frames})
    pd.DataFrame(index).to_parquet(work / "index.parquet")
    return {"train": str(m / "train.jsonl"), "val": str(m / "val.jsonl"), "index": str(work / "index.parquet"),
            "audit": str(audit)}


# ------------------------------------------------------------------------------------ FLOPs
def matmul_params(model) -> dict[str, tuple[int, int]]:
    """Weights that take part in matmuls, by where they run: ``{part: (frozen, trainable)}``.

    Parts: ``attn`` (every decoder layer's q/k/v/o projections: every position), ``mlp`` (the text
    FFNs: every position outside audio-out segments), ``audio_mlp`` (the DualFFN audio FFNs:
    audio-out positions), ``text_head`` (``text_lm_head``), ``audio_head`` (``audio_lm_head``:
    audio-out positions). LoRA ``A``/``B`` matrices count with the module they adapt; a peft
    ``modules_to_save`` module counts its trained copy (the frozen original does not run).
    Embedding lookups and norms are not matmuls and are left out.
    """
    counts = {k: [0, 0] for k in ("attn", "mlp", "audio_mlp", "text_head", "audio_head")}
    for name, p in model.named_parameters():
        if p.dim() != 2 or "original_module" in name:
            continue
        kind = ("attn" if ".self_attn." in name else "audio_mlp" if ".audio_mlp." in name else
                "mlp" if ".mlp." in name else "text_head" if "text_lm_head" in name else
                "audio_head" if "audio_lm_head" in name else None)
        if kind:
            counts[kind][1 if p.requires_grad else 0] += p.numel()
    return {k: (v[0], v[1]) for k, v in counts.items()}


def model_flops(parts: dict, positions: int, audio_out: int, text_targets: int, seq_sq: int, layers: int,
                width: int) -> float:
    """Model FLOPs of one training pass (forward + backward) over the samples' real positions.

    Args:
        parts: :func:`matmul_params`.
        positions: real positions of all samples, of which ``audio_out`` lie in audio-out segments.
        text_targets: text-target positions (where the text loss needs the text head).
        seq_sq: sum over samples of ``positions_i ** 2``.
        layers, width: decoder layers; attention width (heads x head_dim).

    Per position and weight it passes through: 2 FLOPs forward (a multiply and an add; Kaplan et al.
    2020, "Scaling Laws for Neural Language Models", sec. 2.1), 2 backward for the gradient of the
    activations, 2 more for the weight's gradient if it is trained: ``4 x N_frozen + 6 x N_trainable``
    (the 6N rule assumes every weight is trained). Attention scores and their weighted sum add
    ``12 x layers x width x seq`` per position (PaLM, Chowdhery et al. 2022, appendix B), i.e.
    ``12 x layers x width x seq^2`` per sample. A position runs the attention projections and one
    FFN per layer (DualFFN: the audio FFN for audio-out positions); the text head counts at
    text targets only (the model's logits elsewhere are not needed: the useful work), the audio head
    at audio-out positions. (The first layer's projections need no input gradient: a few per cent
    less with 2 layers, well under 1 % with 28; not subtracted.)
    """
    f = lambda part, n: n * (4 * parts[part][0] + 6 * parts[part][1])  # noqa: E731
    return (f("attn", positions) + f("mlp", positions - audio_out) + f("audio_mlp", audio_out)
            + f("text_head", text_targets) + f("audio_head", audio_out) + 12 * layers * width * seq_sq)


# ------------------------------------------------------------------------------------ one side
def _load(spec: dict):
    """Config, samples (ChatMLDatasetSample), their lengths, audio frames and text tokens."""
    from higgs_tune import data as D
    from higgs_tune.model import load_text_tokenizer, tiny_higgs_config

    cfg = spec["cfg"]
    tok = load_text_tokenizer(cfg["model"]["text_tokenizer"])
    codes = D.CodesIndex(spec["inputs"]["index"], root=ROOT)
    samples = [D.build_dataset_sample(r, tok, codes.get) for r in D.read_jsonl(spec["inputs"]["train"])]
    mc = tiny_higgs_config(cfg["model"]["arch"])
    lengths = [D.sample_length(s, mc) for s in samples]
    frames = [int(s.audio_ids_concat.shape[-1]) for s in samples]
    text = [int(((s.input_ids != mc.audio_in_token_idx) & (s.input_ids != mc.audio_out_token_idx)).sum())
            for s in samples]
    return cfg, samples, lengths, frames, text, mc


def sample_counts(sample, mc) -> tuple[int, int]:
    """``(audio-out positions, text targets)`` of one sample (collated alone, as the model sees it)."""
    from higgs_tune import data as D
    from higgs_tune.loss import count_targets

    batch = D.make_collator(mc)([sample])
    n_out = int(batch.audio_out_ids.shape[-1]) if batch.audio_out_ids is not None else 0
    return n_out, count_targets(batch.label_ids, batch.label_audio_ids, batch.audio_out_ids_start).text


def _peak_memory(device) -> tuple[float, str]:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "peak RSS (ru_maxrss)"


def _summary(spec, steps: list[list[int]], seconds: float, samples, lengths, frames, text, mc, device, model,
             padded_override: int | None = None) -> dict:
    from higgs_tune import data as D

    idx = [i for s in steps for i in s]
    real = sum(lengths[i].positions for i in idx)
    padded = padded_override if padded_override is not None else sum(
        D.batch_positions([lengths[i] for i in s])[1] for s in steps)
    mem, mem_kind = _peak_memory(device)
    out = {"seconds": seconds, "samples": len(idx), "audio_frames": sum(frames[i] for i in idx),
           "text_tokens": sum(text[i] for i in idx), "positions": real, "padded_positions": padded,
           "padding_efficiency": real / padded, "peak_memory_gib": mem, "memory_kind": mem_kind,
           "device": str(device)}
    if device.type == "cuda":
        arch = spec["cfg"]["model"]["arch"]
        counts = [sample_counts(samples[i], mc) for i in idx]
        flops = model_flops(matmul_params(model), real, sum(c[0] for c in counts), sum(c[1] for c in counts),
                            sum(lengths[i].positions ** 2 for i in idx), arch["num_layers"],
                            arch["hidden_size"] // arch["num_heads"] * arch["num_heads"])
        out["model_flops"] = flops
        out["mfu"] = flops / seconds / (spec["peak_tflops"] * 1e12)
    return out


def child_ours(spec: dict) -> dict:
    """(a): ``higgs_tune.train.train`` on the staged inputs; timing from its metrics rows."""
    import torch

    from higgs_tune import train as T
    from higgs_tune.fileio import read_jsonl
    from higgs_tune.train.sampler import Batching

    cfg, samples, lengths, frames, text, mc = _load(spec)
    work = Path(spec["work"]) / "ours"
    inp = spec["inputs"]
    io = T.TrainIO(audit=Path(inp["audit"]), train=Path(inp["train"]), val=Path(inp["val"]),
                   index=Path(inp["index"]), metrics=work / "metrics.jsonl", val_metrics=work / "val_metrics.jsonl",
                   predictions=work / "predictions.jsonl", adapter=work / "adapter", checkpoint=work / "checkpoint",
                   state=work / "state.json", tensorboard=work / "tensorboard", steps=work / "steps",
                   resume_dir=work / "resume")
    T.train(cfg, io)
    rows = read_jsonl(io.metrics)
    w, tc = spec["warmup"], cfg["train"]
    seconds = rows[-1]["elapsed_s"] - (rows[w - 1]["elapsed_s"] if w else 0.0)  # from train()'s t0 (set-up done)
    # the same order the trainer drew (deterministic from the seed), for the timed steps' samples
    pos, steps, plan = T.Position(), [], Batching(tc, len(samples), 1, tuple(lengths))
    for k in range(len(rows)):
        window, pos = plan.next_window(pos)
        if k >= w:
            steps += [m[0] for m in window]
    padded = sum(r["n_padded_positions"] for r in rows[w:])
    assert sum(r["n_positions"] for r in rows[w:]) == sum(lengths[i].positions for s in steps for i in s)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = None
    if device.type == "cuda":  # for the parameter counts of model_flops only: a copy on the meta device
        from boson_multimodal.model.higgs_audio import HiggsAudioModel

        from higgs_tune.model import apply_lora

        with torch.device("meta"):
            model = apply_lora(HiggsAudioModel(mc), cfg["lora"])
    return _summary(spec, steps, seconds, samples, lengths, frames, text, mc, device, model, padded)


def naive_loss(out, batch, device):
    """Mean CE per micro-batch as public scripts write it: all ``B x L`` text logits to fp32, CE over
    every position with ``ignore_index``; per-codebook audio CE on ``audio_logits.float()``, mean."""
    import torch.nn.functional as F

    from higgs_tune.labels import shifted_audio_targets

    logits = out.logits.float()
    labels = out.expanded_labels
    text = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    audio_logits = out.audio_logits.float()  # (N, K, C)
    tgt = shifted_audio_targets(batch.label_audio_ids.to(device), batch.audio_out_ids_start.to(device))
    audio = sum(F.cross_entropy(audio_logits[:, k], tgt[:, k], ignore_index=-100)
                for k in range(audio_logits.shape[1])) / audio_logits.shape[1]
    return text + audio


def child_naive(spec: dict) -> dict:
    """(b): the naive trainer on the same inputs, model and LoRA."""
    import random

    import torch

    from higgs_tune import data as D
    from higgs_tune.model import apply_lora, build_model, device_and_dtype
    from higgs_tune.train import autocast, trainable_to_fp32

    cfg, samples, lengths, frames, text, mc = _load(spec)
    tc = cfg["train"]
    device, dtype = device_and_dtype(cfg["model"]["device"], cfg["model"]["dtype"])
    torch.manual_seed(tc["seed"])
    model = apply_lora(build_model(cfg["model"], dtype, device=device), cfg["lora"])
    trainable_to_fp32(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc["learning_rate"], weight_decay=tc["weight_decay"])
    collator = D.make_collator(model.config)
    bs, accum = tc["batch_size"], tc["grad_accum_steps"]
    stream, epoch = [], 0
    timed: list[list[int]] = []
    padded = 0
    t0 = None
    for step in range(spec["warmup"] + spec["steps"]):
        if step == spec["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        for _ in range(accum):
            if not stream:  # random batches: a fresh shuffle each epoch, the last batch short (drop_last=False)
                order = list(range(len(samples)))
                random.Random(tc["seed"] * 100_003 + epoch).shuffle(order)
                stream, epoch = order, epoch + 1
            idx, stream = stream[:bs], stream[bs:]
            batch = collator([samples[i] for i in idx])
            with autocast(device, dtype):
                out = model(**D.batch_to_model_kwargs(batch, device))
                loss = naive_loss(out, batch, device) / accum
            loss.backward()
            if step >= spec["warmup"]:
                timed.append(idx)
                padded += out.attention_mask.numel()
        torch.nn.utils.clip_grad_norm_(params, tc["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # waits for the device
    seconds = time.perf_counter() - t0
    return _summary(spec, timed, seconds, samples, lengths, frames, text, mc, device, model, padded)


# ------------------------------------------------------------------------------------ main
def run_side(side: str, spec_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", side, str(spec_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    if res.returncode or not lines:
        raise SystemExit(f"side {side} failed (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        side, spec_path = args.child
        spec = json.loads(Path(spec_path).read_text())
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        result = (child_ours if side == "ours" else child_naive)(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(args)
    inputs = stage_inputs(args, cfg, work)
    n_train = sum(1 for _ in open(inputs["train"]))
    epoch_steps = math.ceil(math.ceil(n_train / args.batch_size) / args.grad_accum)
    micro_per_epoch = math.ceil(n_train / args.batch_size)
    if args.max_tokens:  # (a)'s epoch in token-budget micro-batches; (b) keeps its fixed batch
        from higgs_tune.train.sampler import Batching

        _, _, lengths, *_ = _load({"cfg": cfg, "inputs": inputs})
        micro_per_epoch = len(Batching(cfg["train"], n_train, 1, tuple(lengths)).epoch_batches(0))
        epoch_steps = math.ceil(micro_per_epoch / args.grad_accum)
    warmup = args.warmup
    steps = epoch_steps if args.steps is None else args.steps
    cfg["train"]["max_steps"] = warmup + steps
    # the LR warmup must be shorter than the run (the trainer refuses otherwise)
    cfg["train"]["warmup_steps"] = min(cfg["train"]["warmup_steps"], cfg["train"]["max_steps"] - 1)
    spec = {"cfg": cfg, "inputs": inputs, "work": str(work), "warmup": warmup, "steps": steps,
            "peak_tflops": args.peak_tflops, "threads": args.threads}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    whole = not args.max_tokens and micro_per_epoch % args.grad_accum == 0 and warmup % epoch_steps == 0 \
        and steps % epoch_steps == 0
    arch = cfg["model"]["arch"]
    print(f"data: {n_train} train samples ({'cached codes' if args.index else 'random codes of the real clip lengths'})"
          f"; model: hidden {arch['hidden_size']}, {arch['num_layers']} layers, {cfg['model']['dtype']}; "
          f"batch {f'of {args.max_tokens} positions (b: {args.batch_size} samples)' if args.max_tokens else args.batch_size}"
          f" x accum {args.grad_accum}; {warmup} warm-up + {steps} timed steps "
          f"({epoch_steps} per epoch); torch threads {args.threads or 'default'}; "
          f"load {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    if not whole:
        print("  warning: the timed steps are not whole epochs: the two sides time different samples", flush=True)
    results = {}
    for side in ("ours", "naive"):
        t = time.perf_counter()
        results[side] = run_side(side, spec_path)
        print(f"  {side}: done in {time.perf_counter() - t:.0f} s (process, incl. start-up)", flush=True)
    header = f"{'':>22} {'higgs-tune':>12} {'naive':>12} {'ratio':>7}"
    print(header)
    for key, label, fmt in (("samples_s", "samples/s", "{:12.2f}"), ("frames_s", "audio frames/s", "{:12.1f}"),
                            ("tokens_s", "text tokens/s", "{:12.1f}"),
                            ("padding_efficiency", "padding efficiency", "{:12.3f}"),
                            ("peak_memory_gib", "peak memory GiB", "{:12.2f}"), ("mfu", "MFU", "{:12.4f}")):
        vals = []
        for side in ("ours", "naive"):
            r = results[side]
            v = {"samples_s": r["samples"] / r["seconds"], "frames_s": r["audio_frames"] / r["seconds"],
                 "tokens_s": r["text_tokens"] / r["seconds"]}.get(key, r.get(key))
            vals.append(v)
        if None in vals:
            continue
        print(f"{label:>22} " + " ".join(fmt.format(v) for v in vals) + f" {vals[0] / vals[1]:7.2f}")
    o, n = results["ours"], results["naive"]
    print(f"  ({o['memory_kind']}; timed {o['seconds']:.1f} s / {n['seconds']:.1f} s; samples {o['samples']} / "
          f"{n['samples']}; device {o['device']})")
    ratio = (o["audio_frames"] / o["seconds"]) / (n["audio_frames"] / n["seconds"])
    print(f"speed ratio (audio frames/s, higgs-tune / naive): {ratio:.2f}x; padding efficiency: higgs-tune "
          f"{o['padding_efficiency']:.3f}, naive {n['padding_efficiency']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
