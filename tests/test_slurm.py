"""The workflow through ``profiles/slurm`` on a real Slurm (``.ci/slurm-up`` starts a single-node one).

Skipped, with the reason, where no Slurm answers (``sinfo``/``sacct``): on a developer machine run
``.ci/slurm-up`` (root, Debian) first; ``.ci/run`` does. The committed profile is used as is, except
that its ``cpus_per_task`` / ``mem_mb`` / ``runtime`` are clamped to what this one node has.
"""

from __future__ import annotations

import copy
import json
import os
import time
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GPU_RULES = {"tokenize", "audit", "train", "evaluate", "evaluate_base"}  # profiles/slurm puts these on the gpu partition


def _slurm_missing() -> str | None:
    for cmd in (["sinfo", "-h", "-o", "%P %T"], ["sacct", "-n", "-X", "-S", "now-1minutes"]):
        if shutil.which(cmd[0]) is None:
            return f"no {cmd[0]} on PATH (start a local Slurm with .ci/slurm-up)"
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            return f"{' '.join(cmd)} failed: {res.stderr.strip()[:200]} (start a local Slurm with .ci/slurm-up)"
    return None


_MISSING = _slurm_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def local_profile(dest: Path) -> dict:
    """profiles/slurm/config.yaml with per-job CPUs, memory and time clamped to this node, polled often."""
    cfg = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    node = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], capture_output=True, text=True, check=True)
    cpus, mem = (int(x) for x in node.stdout.split()[:2])
    for res in [cfg["default-resources"], *cfg["set-resources"].values()]:
        for key, cap in (("cpus_per_task", cpus), ("mem_mb", mem), ("runtime", 30)):
            if key in res:
                res[key] = min(int(res[key]), cap)
    # poll a one-node test cluster often (the defaults suit a busy cluster: 40 s before the first check)
    cfg.update({"slurm-init-seconds-before-status-checks": 1, "seconds-between-status-checks": 2})
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def sacct(jobid: str) -> dict[str, str]:
    out = subprocess.run(["sacct", "-j", jobid, "-X", "-n", "-P", "-o", "Partition,State,AllocTRES"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    partition, state, tres = out.split("|")
    return {"partition": partition, "state": state, "tres": tres}


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def snakemake_args(profile: Path, *configfiles: Path) -> list[str]:
    # one --configfile with several files: a second --configfile flag would replace the first
    return [sys.executable, "-m", "snakemake", "--profile", str(profile), "--nolock",
            "--configfile", str(ROOT / "config/demo.yaml"), *map(str, configfiles)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, demo_code_cache):
    """The whole chain through the committed Slurm profile (clamped to this node). The code cache starts
    with the demo's codes but one clip's (encoding is tests/test_tokenize.py's subject): the tokenize
    job encodes that clip inside its Slurm job and reads the rest."""
    tmp_path = tmp_path_factory.mktemp("slurm")
    cfg = local_profile(tmp_path / "profile")
    cache = Path(demo_code_cache(tmp_path / "cache"))
    sorted(cache.rglob("*.npy"))[0].unlink()
    overlay = {
        "experiment": "slurm", "results_dir": str(tmp_path / "results"), "cache_dir": str(cache),
        "data": {"val_fraction": 0.25},
        "eval": {"generate": {"n_samples": 1, "max_seconds": 1}},  # generation is evaluate's own test
        "train": {"max_steps": 6, "batch_size": 1, "grad_accum_steps": 1, "warmup_steps": 1, "eval_interval": 3,
                  "save_interval": 2, "predictions_interval": 3, "resume_dir": str(tmp_path / "resume")},
    }
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    res = subprocess.run(snakemake_args(tmp_path / "profile", tmp_path / "overlay.yaml"), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=1800)
    if (tmp_path / "results" / "slurm" / "train").is_dir():  # the unsignalled run, before tests rerun it
        shutil.copytree(tmp_path / "results" / "slurm" / "train", tmp_path / "reference-train")
    return tmp_path, cfg, overlay, res


def test_workflow_runs_through_the_slurm_profile(chain):
    """Every rule of the chain is a Slurm job on the partition the profile names, GPU rules get
    their GPU (gres), every job COMPLETED (sacct), and the report comes out."""
    tmp_path, cfg, _, res = chain
    assert cfg["executor"] == "slurm" and cfg["slurm-requeue"] is True and cfg["retries"] >= 1
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]

    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: .*?/rule_(\w+)/", log)
    rules = {rule for _, rule in submitted}
    assert rules == {"manifest", "tokenize", "audit", "train", "evaluate_base", "evaluate", "select", "report"}, \
        log[-3000:]
    for jobid, rule in submitted:
        job = sacct(jobid)
        assert job["state"] == "COMPLETED", (rule, job)
        want = "gpu" if rule in GPU_RULES else cfg["default-resources"]["slurm_partition"]
        assert job["partition"] == want, (rule, job)
        assert ("gres/gpu=1" in job["tres"]) == (rule in GPU_RULES), (rule, job)

    out = tmp_path / "results" / "slurm"
    tokens = json.loads((out / "tokens" / "stats.json").read_text())
    assert tokens["n_encoded"] == 1 and tokens["n_cached"] == tokens["n_clips"] - 1, tokens
    assert json.loads((out / "audit" / "summary.json").read_text())["passed"] is True
    assert [json.loads(line)["step"] for line in open(out / "train" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert len(json.loads((out / "eval" / "metrics.json").read_text())["codebook_acc"]) == 8
    assert (out / "report.html").stat().st_size > 10_000


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in open(path) if line.strip()]


def _squeue_state(jobid: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", jobid, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def _squeue_reason(jobid: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", jobid, "-o", "%r"], capture_output=True, text=True).stdout.strip()


def test_train_job_requeued_then_near_its_time_limit_resumes_to_the_same_curve(chain):
    """One train job meets both things a cluster does to it, under the profile's own settings:

    1. Slurm requeues it (``scontrol requeue``: SIGTERM to every process of the job, back to the
       queue, as on preemption) once it has logged step 2: the requeued job resumes;
    2. the requeued job's time limit then drops to 2 minutes (``scontrol update``) as it restarts:
       the trainer, which asks Slurm for the job's end time, stops train.stop_margin_s before it,
       checkpoints and exits 75; its outputs are removed and Snakemake retries the job
       (``retries``), which resumes again.

    The run ends with the unsignalled run's curve, val curve and adapter, byte for byte; sacct shows
    the first job REQUEUED and then not COMPLETED, the retry COMPLETED."""
    tmp_path, cfg, overlay, res = chain
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    ref, out = tmp_path / "reference-train", tmp_path / "results" / "slurm" / "train"
    again = copy.deepcopy(overlay)
    again["train"]["resume_dir"] = str(tmp_path / "resume-interrupted")  # a fresh start
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(again))
    metrics = out / "metrics.jsonl"
    metrics.unlink()  # this run's rows only (the job step deletes it too, but only once it starts)
    # the resume folder is where checkpoints live, not what the trajectory is: force the train job
    proc = subprocess.Popen(snakemake_args(tmp_path / "profile", tmp_path / "again.yaml")
                            + ["--until", "train", "--forcerun", "train"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    first, phase, t0 = None, "requeue", time.time()
    while phase != "done" and time.time() - t0 < 900 and proc.poll() is None:
        jobs = re.findall(r"submitted with SLURM jobid (\d+) \(log: .*?/rule_train/", "".join(lines))
        state = _squeue_state(jobs[0]) if jobs else ""
        if phase == "requeue" and state == "RUNNING" and metrics.is_file() and len(_rows(metrics)) >= 2:
            first = jobs[0]
            subprocess.run(["scontrol", "requeue", first], check=True)
            phase = "requeued"
        elif phase == "requeued" and state != "RUNNING":
            phase = "restarting"  # seen back in the queue
        elif phase == "restarting" and state == "PENDING":
            # Slurm holds a requeued job back for 2 minutes (reason BeginTime); a test need not wait
            if _squeue_reason(first) == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={first}", "StartTime=now"], capture_output=True)
        elif phase == "restarting" and state == "RUNNING":
            # 2 minutes from the restart (Slurm's unit is the minute): the trainer learns its end time as it
            # starts (well inside train.stop_margin_s) and stops after its first step, long before Slurm would
            subprocess.run(["scontrol", "update", f"JobId={first}", "TimeLimit=2"], check=True)
            phase = "done"
        time.sleep(0.3)
    proc.wait(timeout=1800)
    reader.join(timeout=60)
    log = "".join(lines)
    assert phase == "done", f"the train job ended in phase {phase!r}:\n" + log[-3000:]
    assert proc.returncode == 0, log[-6000:]
    jobs = re.findall(r"submitted with SLURM jobid (\d+) \(log: .*?/rule_train/", log)
    assert len(jobs) == 2 and jobs[0] == first, jobs
    history = subprocess.run(["sacct", "-j", first, "--duplicates", "-X", "-n", "-P", "-o", "State"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert "REQUEUED" in history[:-1] and history[-1] != "COMPLETED", history
    assert sacct(jobs[1])["state"] == "COMPLETED"
    state = json.loads((out / "state.json").read_text())
    assert state["resumes"] == 2 and 2 <= state["resumed_at_step"] < 6 and state["finished"], state
    assert _rows(out / "metrics.jsonl") == _rows(ref / "metrics.jsonl")
    assert _rows(out / "val_metrics.jsonl") == _rows(ref / "val_metrics.jsonl")
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (ref / "adapter" / "adapter_model.safetensors").read_bytes()


def test_trainer_reads_the_slurm_jobs_end_time():
    """The trainer's preemption flag asks the real Slurm for a job's end time: a 1-minute job ends
    within a minute, so a 300 s margin stops now and a 1 s margin does not (yet)."""
    from types import SimpleNamespace

    from higgs_tune.train.preemption import PreemptionFlag, slurm_end_time

    jobid = subprocess.run(["sbatch", "--parsable", "-p", cfg_partition(), "--time=1", "-o", "/dev/null",
                            "--wrap", "sleep 50"], capture_output=True, text=True, check=True).stdout.strip()
    import signal

    handlers = {s: signal.getsignal(s) for s in PreemptionFlag.SIGNALS}  # the flag sets its own
    try:
        t0 = time.time()
        while time.time() - t0 < 120 and subprocess.run(["squeue", "-h", "-j", jobid, "-o", "%T"], capture_output=True,
                                                        text=True).stdout.strip() != "RUNNING":
            time.sleep(0.5)
        end = slurm_end_time(jobid)
        assert end is not None and 0 < end - time.time() <= 61, end
        acc = SimpleNamespace(device="cpu", num_processes=1)
        assert PreemptionFlag(300, jobid).requested(acc) and not PreemptionFlag(1, jobid).requested(acc)
        assert not PreemptionFlag(300, None).requested(acc)  # not under Slurm: signals only
        assert slurm_end_time("999999999") is None
    finally:
        subprocess.run(["scancel", jobid])
        for s, h in handlers.items():
            signal.signal(s, h)


def cfg_partition() -> str:
    return yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())["default-resources"]["slurm_partition"]
