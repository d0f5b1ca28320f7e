"""The workflow through ``profiles/slurm`` on a real Slurm (``.ci/slurm-up`` starts a single-node one).

Skipped, with the reason, where no Slurm answers (``sinfo``/``sacct``): on a developer machine run
``.ci/slurm-up`` (root, Debian) first; ``.ci/run`` does. The committed profile is used as is, except
that its ``cpus_per_task`` / ``mem_mb`` / ``runtime`` are clamped to what this one node has.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GPU_RULES = {"tokenize", "audit", "train", "evaluate"}  # profiles/slurm puts these on the gpu partition


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


def test_workflow_runs_through_the_slurm_profile(tmp_path):
    """Every rule of the chain is a Slurm job on the partition the profile names, GPU rules get
    their GPU (gres), every job COMPLETED (sacct), and the report comes out."""
    cfg = local_profile(tmp_path / "profile")
    assert cfg["executor"] == "slurm"
    overlay = {
        "experiment": "slurm", "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
        "data": {"val_fraction": 0.25},
        "train": {"max_steps": 2, "batch_size": 1, "grad_accum_steps": 1, "warmup_steps": 1, "eval_interval": 2,
                  "save_interval": 2, "predictions_interval": 2, "resume_dir": str(tmp_path / "resume")},
    }
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", str(tmp_path / "profile"), "--nolock",
         "--configfile", str(ROOT / "config/demo.yaml"), "--configfile", str(tmp_path / "overlay.yaml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]

    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: .*?/rule_(\w+)/", log)
    rules = {rule for _, rule in submitted}
    assert rules == {"manifest", "tokenize", "audit", "train", "evaluate", "report"}, log[-3000:]
    for jobid, rule in submitted:
        job = sacct(jobid)
        assert job["state"] == "COMPLETED", (rule, job)
        want = "gpu" if rule in GPU_RULES else cfg["default-resources"]["slurm_partition"]
        assert job["partition"] == want, (rule, job)
        assert ("gres/gpu=1" in job["tres"]) == (rule in GPU_RULES), (rule, job)

    out = tmp_path / "results" / "slurm"
    assert json.loads((out / "audit" / "summary.json").read_text())["passed"] is True
    assert [json.loads(line)["step"] for line in open(out / "train" / "metrics.jsonl")] == [1, 2]
    assert len(json.loads((out / "eval" / "metrics.json").read_text())["codebook_acc"]) == 8
    assert (out / "report.html").stat().st_size > 10_000
