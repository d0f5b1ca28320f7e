"""Training on several processes (real processes, gloo on CPU), preemption with real signals, mixed
precision and gradient checkpointing, and the rendered multi-node launch."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import stage_train_inputs

ROOT = Path(__file__).resolve().parents[1]


def train_args(cfg: dict, io) -> list[str]:
    """The train rule's arguments for ``io`` (see workflow/rules/train.smk)."""
    args = ["--config-json", json.dumps({k: cfg[k] for k in ("model", "lora", "train", "eval")})]
    for f in fields(io):
        args += ["--" + f.name.replace("_", "-"), str(getattr(io, f.name))]
    return args


def launch_cmd(cfg: dict, io, processes: int) -> list[str]:
    return [sys.executable, "-m", "higgs_tune.launch", "--processes-per-node", str(processes),
            "--config-file", "config/accelerate.yaml", "--", *train_args(cfg, io)]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "HF_HUB_OFFLINE": "1",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}


def launch(cfg: dict, io, processes: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run training exactly as the train rule does (higgs_tune.launch -> accelerate launch)."""
    res = subprocess.run(launch_cmd(cfg, io, processes), cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=timeout)
    return res


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


@pytest.fixture
def train_cfg(tmp_config) -> dict:
    cfg = copy.deepcopy(tmp_config)
    cfg["train"].update(max_steps=4, grad_accum_steps=1, warmup_steps=1, eval_interval=2, predictions_interval=2,
                        save_interval=2, log_interval=1, learning_rate=3e-3)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_two_processes_equal_one_process_with_twice_the_batch(train_cfg, tmp_path, short_codes, transcripts, lj_dir,
                                                               packing):
    """2 processes x batch 1 and 1 process x batch 2: same samples per optimizer step, so the same
    per-step losses, grad norm and adapter. 5 train samples make each epoch end on a micro-step
    with one sample (process 1 gets none: its zero-weight forward keeps DDP in step), and the
    4 steps cross an epoch. Evaluation, predictions and checkpoints run on both (a hang would
    time the launch out). Packed (config/demo.yaml: 1 process packs its 2 samples into one row)
    and padded rows (config/cluster.yaml's setting)."""
    train_cfg = copy.deepcopy(train_cfg)
    train_cfg["train"]["packing"] = packing
    one = stage_train_inputs(tmp_path / "one", short_codes, transcripts, lj_dir, n_train=5, audit_passed=True)
    two = stage_train_inputs(tmp_path / "two", short_codes, transcripts, lj_dir, n_train=5, audit_passed=True)
    cfg1, cfg2 = copy.deepcopy(train_cfg), copy.deepcopy(train_cfg)
    cfg1["train"]["batch_size"], cfg2["train"]["batch_size"] = 2, 1
    r1 = launch(cfg1, one, 1)
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    r2 = launch(cfg2, two, 2)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "--multi_gpu" in r2.stdout and "--num_processes 2" in r2.stdout
    m1, m2 = rows(one.metrics), rows(two.metrics)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3, 4]
    assert [r["epoch"] for r in m2] == [1, 1, 1, 2]
    for a, b in zip(m1, m2):
        assert a["n_samples"] == b["n_samples"] and a["n_audio_targets"] == b["n_audio_targets"]
        # the same samples' positions; padding is per process (and process 1's zero-weight forward at
        # the epoch's short end is all padding)
        assert a["n_positions"] == b["n_positions"] and 0 < b["padding_efficiency"] <= 1
        for key in ("loss", "text_loss", "audio_loss", "grad_norm", "lr"):
            assert close(a[key], b[key]), (a["step"], key, a[key], b[key])
        assert all(close(x, y) for x, y in zip(a["codebook_losses"], b["codebook_losses"]))
    assert [r["n_samples"] for r in m2] == [2, 2, 1, 2]
    # packed: 1 process packs its 2 samples into one row, 2 processes run one sample each; the
    # equalities above hold across the two layouts. Padded: two rows, each a multiple of 8 wide
    pairs = [r for r in m1 if r["n_samples"] == 2]
    assert pairs and all(r["padding_efficiency"] > 0.95 for r in pairs) if packing else \
        all(r["n_padded_positions"] % 16 == 0 for r in pairs), m1
    w1 = load_file(one.adapter / "adapter_model.safetensors")
    w2 = load_file(two.adapter / "adapter_model.safetensors")
    assert w1.keys() == w2.keys() and len(w1) > 10
    for k in w1:  # AdamW divides by sqrt(v): a gradient near 0 that differs in its last bits (the
        # all-reduce sums in another order) moves a weight by up to ~1e-6 over 4 steps at lr 3e-3
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-5)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5 < max(w1[k].abs().max().item() for k in w1)
    v1, v2 = rows(one.val_metrics), rows(two.val_metrics)
    assert [v["step"] for v in v2] == [2, 4] and all(close(a["loss"], b["loss"]) for a, b in zip(v1, v2))
    assert [p["step"] for p in rows(two.predictions)] == [1, 2, 4]
    state = json.loads(two.state.read_text())
    assert state["num_processes"] == 2 and state["global_batch_size"] == 2 and state["finished"]
    assert (two.checkpoint / "rng-rank0.pt").is_file() and (two.checkpoint / "rng-rank1.pt").is_file()


def _wait_and_signal(proc: subprocess.Popen, metrics: Path, k: int, timeout: float = 600) -> None:
    """Once ``metrics`` holds ``k`` rows, SIGTERM every process of the launch (as Slurm does on
    preemption: the launcher, accelerate and the trainers all receive it)."""
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if metrics.is_file() and len(rows(metrics)) >= k:
            os.killpg(proc.pid, signal.SIGTERM)
            return
        time.sleep(0.05)
    raise AssertionError(f"training ended or stalled before step {k}")


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1])  # 2 processes: tests/test_preemption.py (SIGUSR1, SIGTERM, the rule's tree)
def test_sigterm_then_rerun_equals_uninterrupted(processes, train_cfg, tmp_path, short_codes, transcripts, lj_dir):
    """SIGTERM at a random step k: the trainer finishes that step, checkpoints, exits 75; the same
    command again resumes, and metrics rows (all but wall-clock time) and adapter bytes equal an
    uninterrupted run's."""
    cfg = copy.deepcopy(train_cfg)
    cfg["train"].update(max_steps=6, save_interval=4, batch_size=1, grad_accum_steps=2)
    k = random.Random().randint(1, 4)
    ref = stage_train_inputs(tmp_path / "ref", short_codes, transcripts, lj_dir, n_train=5, audit_passed=True)
    res = launch(cfg, ref, processes)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    cut = stage_train_inputs(tmp_path / "cut", short_codes, transcripts, lj_dir, n_train=5, audit_passed=True)
    proc = subprocess.Popen(launch_cmd(cfg, cut, processes), cwd=ROOT, env=env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_and_signal(proc, cut.metrics, k)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 75, f"k={k}\n" + out[-4000:]
    # the launcher removed the unfinished run's outputs; its state and rows are in the checkpoint
    assert not cut.metrics.exists() and not cut.state.exists()
    newest = sorted(cut.resume_dir.glob("*/step-*"))[-1]
    stopped = json.loads((newest / "state.json").read_text())
    assert stopped["preempted"] and not stopped["finished"] and k <= stopped["step"] < 6, (k, stopped)
    assert len(rows(newest / "logs" / "metrics.jsonl")) == stopped["step"]
    res = launch(cfg, cut, processes)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resumed from" in res.stdout + res.stderr
    strip = lambda rs: [{k2: v for k2, v in r.items() if k2 != "elapsed_s"} for r in rs]  # noqa: E731
    assert strip(rows(cut.metrics)) == strip(rows(ref.metrics)), f"k={k}"
    assert rows(cut.val_metrics) == rows(ref.val_metrics) and rows(cut.predictions) == rows(ref.predictions)
    assert (cut.adapter / "adapter_model.safetensors").read_bytes() == \
        (ref.adapter / "adapter_model.safetensors").read_bytes(), f"k={k}"
    assert json.loads(cut.state.read_text())["resumed_at_step"] == stopped["step"]


def test_bf16_base_trains_fp32_tensors(demo_config, real_batch_factory):
    """A bf16 base: every trainable tensor (LoRA and modules_to_save) becomes fp32, and one AdamW
    step at lr 1e-5 changes them. Without the cast, most of the bf16 head's weights stay put."""
    from higgs_tune.loss import forward_loss
    from higgs_tune.model import apply_lora, build_model
    from higgs_tune.train import autocast, trainable_to_fp32

    lora = {**demo_config["lora"], "modules_to_save": ["audio_lm_head"]}

    def one_step(cast: bool) -> tuple[dict, dict]:
        model = apply_lora(build_model(demo_config["model"], torch.bfloat16, "cpu"), lora)
        if cast:
            trainable_to_fp32(model)
        model.train()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in params.items()}
        opt = torch.optim.AdamW(params.values(), lr=1e-5)
        with autocast(torch.device("cpu"), torch.bfloat16):
            _, loss = forward_loss(model, real_batch_factory(model), "cpu", text_weight=1.0, audio_weight=1.0)
        loss.loss.backward()
        opt.step()
        return params, before

    params, before = one_step(cast=True)
    assert params and all(p.dtype == torch.float32 for p in params.values())
    head = [n for n in params if "audio_lm_head" in n and "modules_to_save" in n]
    assert head
    for n in head:
        changed = (params[n] != before[n]).float().mean().item()
        assert changed > 0.99, (n, changed)
    lora_b = [n for n in params if "lora_B" in n]
    assert lora_b and all(not torch.equal(params[n], before[n]) for n in lora_b)
    params, before = one_step(cast=False)
    bf16_head = [n for n in params if "audio_lm_head" in n and params[n].dtype == torch.bfloat16]
    assert bf16_head and max((params[n] != before[n]).float().mean().item() for n in bf16_head) < 0.9


def test_gradient_checkpointing_same_loss_and_gradients(demo_config, real_batch_factory):
    from higgs_tune.loss import forward_loss
    from higgs_tune.model import apply_lora, build_model
    from higgs_tune.train import enable_gradient_checkpointing

    def grads(checkpointing: bool):
        model = apply_lora(build_model(demo_config["model"], torch.float32, "cpu"), demo_config["lora"])
        calls = []
        if checkpointing:
            assert enable_gradient_checkpointing(model) == demo_config["model"]["arch"]["num_layers"]
            import torch.utils.checkpoint as tuc

            real = tuc.checkpoint

            def counting(*a, **kw):
                calls.append(1)
                return real(*a, **kw)

            tuc.checkpoint = counting
        try:
            model.train()
            _, loss = forward_loss(model, real_batch_factory(model), "cpu", text_weight=1.0, audio_weight=1.0)
            loss.loss.backward()
        finally:
            if checkpointing:
                tuc.checkpoint = real
        return float(loss.loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls

    l0, g0, _ = grads(False)
    l1, g1, calls = grads(True)
    assert len(calls) == demo_config["model"]["arch"]["num_layers"]  # really recomputed, layer by layer
    assert close(l0, l1) and g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-8)


def test_rendered_launches():
    """One process, 2 CPU processes, and 2 nodes x 4 GPUs inside a Slurm allocation."""
    from higgs_tune.launch import SlurmLayout, accelerate_command, slurm_command

    args = ["--config-json", "{}", "--state", "s.json"]
    one = accelerate_command(args, processes_per_node=1)
    assert one[:4] == ["accelerate", "launch", "--config_file", "config/accelerate.yaml"]
    assert "--multi_gpu" not in one and one[one.index("--num_processes") + 1] == "1"
    assert one[-len(args) - 2:] == ["-m", "higgs_tune.train", *args]
    two = accelerate_command(args, processes_per_node=2)
    assert "--multi_gpu" in two and two[two.index("--num_processes") + 1] == "2"
    assert two[two.index("--main_process_port") + 1] == "0"  # a free port: two trainings on one machine
    layout = SlurmLayout(nodes=2, hosts=("gpu-a17", "gpu-a18"), main_host="10.1.0.17", port=29517, job_id="4017",
                         cpus_per_node=16)
    step_env = {"SLURM_JOB_ID": "4017", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu-a17", "SLURM_CONF": "/x.conf",
                "HOME": "/root"}
    cmd = slurm_command(args, processes_per_node=4, layout=layout, env=step_env)
    assert cmd[:3] == ["env", "--unset=SLURM_JOB_NODELIST", "--unset=SLURM_NNODES"]
    assert cmd[3:16] == ["srun", "--jobid", "4017", "--overlap", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node",
                         "1", "--cpus-per-task=16", "--kill-on-bad-exit=1", "bash"]
    script = cmd[-1]
    for part in ("--num_processes 8", "--num_machines 2", "--machine_rank $SLURM_NODEID",
                 "--main_process_ip 10.1.0.17", "--main_process_port 29517", "--multi_gpu",
                 "--config_file config/accelerate.yaml", "-m higgs_tune.train --config-json '{}'"):
        assert part in script, part
    with pytest.raises(ValueError, match="rendezvous"):
        accelerate_command(args, processes_per_node=4, nodes=2)
    layout.check(4)  # no GPUs asked: CPU processes
    with pytest.raises(ValueError, match="split unevenly"):  # --gpus=8 on 2 nodes: maybe 6 + 2
        SlurmLayout(nodes=2, job_id="4017", gpus_per_job=8).check(4)
    SlurmLayout(nodes=1, job_id="4017", gpus_per_job=8).check(8)
    # the node rank is expanded on each node, by that node's shell, which says where it runs first
    out = subprocess.run(["bash", "-c", script.replace("exec accelerate", "echo accelerate")],
                         env={"SLURM_NODEID": "1", "SLURMD_NODENAME": "gpu-a18", "PATH": os.environ["PATH"]},
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0] == "launch: node gpu-a18, machine rank 1 of 2" and "--machine_rank 1 " in out[1], out


STEP = ROOT / "tests" / "data" / "slurm_two_node_step"  # recorded in a real jobstep (see its README.md)


def _replayed_slurm(tmp_path: Path) -> dict:
    """The environment of the rule's job step recorded on a real 2-node Slurm (through the executor
    plugins), with an ``scontrol`` that answers what the real one answered in that step."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f"""#!/bin/sh
case "$1 $2" in
  "show job") cat {STEP}/scontrol-show-job.txt ;;
  "show hostnames") cat {STEP}/scontrol-show-hostnames.txt ;;
  "show node") cat {STEP}/scontrol-show-node.txt ;;
  *) echo "scontrol: unexpected $*" >&2; exit 1 ;;
esac
""")
    (fake / "scontrol").chmod(0o755)
    recorded = dict(line.split("=", 1) for line in (STEP / "step.env").read_text().splitlines() if "=" in line)
    base = {k: v for k, v in env().items() if not k.startswith("SLURM_")}
    return {**base, **recorded, "PATH": f"{fake}{os.pathsep}{base['PATH']}"}


def test_launch_dry_run_in_a_recorded_two_node_job_step(tmp_path):
    """``python -m higgs_tune.launch`` in the job step of a real 2-node job, as the executor plugin
    runs the rule (``srun -n1``: its environment names one node, ``SLURM_NNODES=1``,
    ``SLURM_JOB_NODELIST=n1``): the layout comes from Slurm (``scontrol``), so the launch spans both
    nodes, meets at the first node's address and drops the step's one-node limits for its srun."""
    e = _replayed_slurm(tmp_path)
    assert e["SLURM_NNODES"] == "1" and e["SLURM_JOB_NODELIST"] == "n1" and "SLURM_JOB_NUM_NODES" not in e
    res = subprocess.run([sys.executable, "-m", "higgs_tune.launch", "--processes-per-node", "1", "--dry-run", "--",
                          "--config-json", "{}"], cwd=ROOT, env=e, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    job = e["SLURM_JOB_ID"]
    assert line.startswith("launch: env --unset=") and "--unset=SLURM_NNODES" in line, line
    assert "--unset=SLURM_JOB_NODELIST" in line and "--unset=SLURM_CONF" not in line and "--unset=SLURM_JOB_ID " not in line
    assert f" srun --jobid {job} --overlap --nodes 2 --ntasks 2 --ntasks-per-node 1 --cpus-per-task=2 " in line, line
    assert "--num_processes 2 --num_machines 2" in line and "--main_process_ip 127.0.0.2" in line, line
    assert f"--main_process_port {29500 + int(job) % 1000}" in line, line
    # the job asked for 1 GPU per node (--gres=gpu:1): 2 processes per node is not one per GPU
    res = subprocess.run([sys.executable, "-m", "higgs_tune.launch", "--processes-per-node", "2", "--dry-run", "--",
                          "--config-json", "{}"], cwd=ROOT, env=e, capture_output=True, text=True)
    assert res.returncode == 2 and "1 GPU(s) per node" in res.stderr and "launch:" not in res.stdout, res.stderr


def test_launch_in_a_slurm_job_it_cannot_read_stops(tmp_path):
    """Inside a Slurm job (``SLURM_JOB_ID``) whose nodes ``scontrol`` cannot give, the launch stops
    with an error naming the job and what to do, rather than training on this node alone."""
    e = _replayed_slurm(tmp_path)
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\n"
                                               "exit 1\n")
    res = subprocess.run([sys.executable, "-m", "higgs_tune.launch", "--processes-per-node", "1", "--dry-run", "--",
                          "--config-json", "{}"], cwd=ROOT, env=e, capture_output=True, text=True)
    assert res.returncode == 2 and "launch:" not in res.stdout, res.stdout
    assert f"Slurm job {e['SLURM_JOB_ID']} (SLURM_JOB_ID)" in res.stderr and "Invalid job id" in res.stderr, res.stderr
    assert "unset SLURM_JOB_ID" in res.stderr and "Traceback" not in res.stderr, res.stderr
    (tmp_path / "bin" / "scontrol").unlink()  # and where there is no scontrol at all
    e["PATH"] = os.pathsep.join(p for p in e["PATH"].split(os.pathsep) if not (Path(p) / "scontrol").exists())
    res = subprocess.run([sys.executable, "-m", "higgs_tune.launch", "--processes-per-node", "1", "--dry-run", "--",
                          "--config-json", "{}"], cwd=ROOT, env=e, capture_output=True, text=True)
    assert res.returncode == 2 and "scontrol" in res.stderr and "Traceback" not in res.stderr, res.stderr