"""Preemption on the paths a cluster takes, with real signals and real processes (2 trainers on
gloo): the train rule's own shell command, run by Snakemake with the committed local profile
(``keep-incomplete``), SIGUSR1 or SIGTERM to the launcher alone or to every process of the job's
process tree (as Slurm's ``--signal`` without ``B:`` and ``scancel`` do); then the workflow again."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import stage_train_inputs
from higgs_tune.launch import is_trainer

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 8
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
ENV.pop("SLURM_JOB_ID", None)


def _rows(path: Path, drop=("elapsed_s",)) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in open(path) if line.strip()]


def _workspace(root: Path, demo_config, short_codes, transcripts, lj_dir) -> tuple[Path, Path]:
    """results/{exp}/ with the train rule's inputs staged (manifest, tokens, a passed audit) and a
    config overlay; returns (overlay, results/{exp})."""
    exp = root / "results" / "pre"
    stage_train_inputs(exp, short_codes, transcripts, lj_dir, n_train=5, audit_passed=True)
    overlay = {"experiment": "pre", "results_dir": str(root / "results"), "cache_dir": str(root / "cache"),
               "data": {"manifest": str(ROOT / demo_config["data"]["manifest"])},
               "train": {"max_steps": MAX_STEPS, "batch_size": 1, "grad_accum_steps": 1, "warmup_steps": 1,
                         "eval_interval": 2, "predictions_interval": 2, "log_interval": 1, "processes": 2,
                         # past the end: only the signal can write a checkpoint before the last step
                         "save_interval": 1000, "resume_dir": str(root / "resume")}}
    (root / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    return root / "overlay.yaml", exp


def snakemake(overlay: Path, *targets: str, dry: bool = False, popen: bool = False):
    """The workflow through profiles/default, only the train rule allowed (its inputs are staged)."""
    cmd = [sys.executable, "-m", "snakemake", *targets, "--profile", "profiles/default", "--cores", "2", "--nolock",
           *(["-n"] if dry else []), "--allowed-rules", "train", "curves",
           "--configfile", str(ROOT / "config" / "demo.yaml"), str(overlay)]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def _tree(root: int) -> dict[int, list[str]]:
    """pid -> argv of ``root`` and its living descendants."""
    from higgs_tune.launch import _descendants

    return {root: Path(f"/proc/{root}/cmdline").read_bytes().decode().split("\0")[:-1], **dict(_descendants(root))}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_config, short_codes, transcripts, lj_dir):
    """The uninterrupted run's metrics, evaluation, predictions and adapter bytes."""
    root = tmp_path_factory.mktemp("ref")
    overlay, exp = _workspace(root, demo_config, short_codes, transcripts, lj_dir)
    res = snakemake(overlay, str(exp / "train" / "metrics.jsonl"))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    t = exp / "train"
    return {"metrics": _rows(t / "metrics.jsonl"), "val": _rows(t / "val_metrics.jsonl"),
            "predictions": _rows(t / "predictions.jsonl"), "adapter": (t / "adapter" / "adapter_model.safetensors").read_bytes()}


@pytest.mark.slow
@pytest.mark.parametrize("to", ["launcher", "tree"])
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_signal_checkpoints_exits_75_and_the_workflow_resumes(sig, to, reference, tmp_path, demo_config, short_codes,
                                                              transcripts, lj_dir):
    """2 processes, no checkpoint due before the last step: the signal (to the launcher alone, or to
    every process of the train job's process tree at once) makes every rank finish its step, skip
    the evaluation due, write one checkpoint and exit; the launcher exits 75 and removes the outputs
    (no target takes them as done: metrics and curves plan the train job again); no process is left.
    The workflow run again resumes and ends with the uninterrupted rows and adapter bytes."""
    overlay, exp = _workspace(tmp_path, demo_config, short_codes, transcripts, lj_dir)
    metrics = exp / "train" / "metrics.jsonl"
    proc = snakemake(overlay, str(metrics), popen=True)
    seen: dict[int, list[str]] = {}
    t0 = time.time()
    while time.time() - t0 < 600 and proc.poll() is None:
        tree = _tree(proc.pid) if _alive(proc.pid) else {}
        launcher = [p for p, a in tree.items() if "higgs_tune.launch" in a]
        trainers = [p for p, a in tree.items() if is_trainer(a)]
        if launcher and len(trainers) == 2 and metrics.is_file() and len(_rows(metrics)) >= 2:
            seen = _tree(launcher[0])
            for pid in ([launcher[0]] if to == "launcher" else list(seen)):
                os.kill(pid, sig)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=600)
    assert seen, "training ended before the signal:\n" + out[-4000:]
    assert proc.returncode != 0 and "exit status 75" in out, out[-4000:]
    assert not [p for p in seen if _alive(p)], {p: seen[p] for p in seen if _alive(p)}

    ckpts = sorted((tmp_path / "resume" / "pre").glob("*/step-*"))
    assert len(ckpts) == 1, ckpts  # the one the signal wrote
    stopped = json.loads((ckpts[0] / "state.json").read_text())
    step = int(ckpts[0].name.split("-")[1])
    assert stopped["preempted"] and not stopped["finished"] and 2 <= step == stopped["step"] < MAX_STEPS, stopped
    assert len(_rows(ckpts[0] / "logs" / "metrics.jsonl")) == step
    # the evaluation due at an even step was skipped: the resumed run does it first
    assert [v["step"] for v in _rows(ckpts[0] / "logs" / "val_metrics.jsonl")] == list(range(2, step, 2))
    assert stopped["evaluation_due"] is True
    for name in ("metrics.jsonl", "val_metrics.jsonl", "predictions.jsonl", "state.json", "adapter", "checkpoint"):
        assert not (exp / "train" / name).exists(), name
    plan = snakemake(overlay, str(metrics), str(exp / "train" / "curves.csv"), dry=True)
    assert plan.returncode == 0 and "rule train:" in plan.stdout, plan.stdout[-3000:] + plan.stderr[-3000:]

    res = snakemake(overlay, str(metrics))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    t = exp / "train"
    assert _rows(t / "metrics.jsonl") == reference["metrics"]
    assert _rows(t / "val_metrics.jsonl") == reference["val"] and _rows(t / "predictions.jsonl") == reference["predictions"]
    assert (t / "adapter" / "adapter_model.safetensors").read_bytes() == reference["adapter"]
    state = json.loads((t / "state.json").read_text())
    assert state["resumed_at_step"] == step and state["finished"] and state["num_processes"] == 2
