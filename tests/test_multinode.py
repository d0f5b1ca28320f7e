"""Training on two Slurm nodes through ``profiles/slurm`` and the real executor plugins.

``.ci/slurm-two-nodes-up`` starts a second, separate Slurm on this machine with two nodes, ``n1``
(127.0.0.2) and ``n2`` (127.0.0.3), each its own ``slurmd``; the single-node Slurm of
``.ci/slurm-up`` (tests/test_slurm.py) is not touched. Skipped, with the reason, where that cluster
does not answer; ``.ci/run`` starts it.

The train rule is submitted by Snakemake's slurm executor as in production: ``sbatch --nodes=2
--gres=gpu:1``, then the jobstep executor inside the job runs the rule under ``srun -n1 --nodes=2``
(one task on the first node) with every ``SLURM_*`` variable but the job id removed, and
``higgs_tune.launch`` starts one launcher per node from what Slurm reports of the job.
"""

from __future__ import annotations

import copy
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
TWO = Path(os.environ.get("SLURM_TWO_NODES_DIR", "/var/tmp/slurm-two-nodes"))
CONF = TWO / "etc" / "slurm.conf"
SLURM_ENV = {**os.environ, "SLURM_CONF": str(CONF)}


def _two_nodes_missing() -> str | None:
    hint = "start the two-node Slurm with .ci/slurm-two-nodes-up (root, after .ci/slurm-up)"
    if shutil.which("sinfo") is None:
        return f"no sinfo on PATH ({hint})"
    if not CONF.is_file():
        return f"no {CONF} ({hint})"
    res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30,
                         env=SLURM_ENV)
    if res.returncode != 0:
        return f"sinfo on {CONF} failed: {res.stderr.strip()[:200]} ({hint})"
    up = [line.split()[0] for line in res.stdout.splitlines() if re.search(r"idle|mix|alloc", line)]
    if sorted(up) != ["n1", "n2"]:
        return f"the two-node Slurm has nodes {res.stdout.split()} up, not n1 and n2 ({hint})"
    return None


_MISSING = _two_nodes_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def two_node_profile(dest: Path) -> dict:
    """profiles/slurm/config.yaml for the two-node test cluster: ``train`` on 2 nodes with 1 GPU each
    (``nodes: 2``, ``gres: "gpu:1"``, as the profile's comment says for several nodes), CPUs and memory
    clamped to a test node, and ``squeue`` for job status (this cluster keeps no accounting)."""
    cfg = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    for res in [cfg["default-resources"], *cfg["set-resources"].values()]:
        for key, cap in (("cpus_per_task", 2), ("mem_mb", 1500), ("runtime", 30)):
            if key in res:
                res[key] = min(int(res[key]), cap)
    train = cfg["set-resources"]["train"]
    train.pop("gpu", None)
    train.update(nodes=2, gres="gpu:1")
    cfg.update({"slurm-init-seconds-before-status-checks": 1, "seconds-between-status-checks": 2,
                "slurm-status-command": "squeue"})
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def snakemake(profile: Path, overlay: Path, *extra: str, env: dict = ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--profile", str(profile), "--nolock",
                           "--configfile", str(ROOT / "config/demo.yaml"), str(overlay), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


def small_manifest(dest: Path, n: int = 12) -> Path:
    """The first ``n`` samples of the demo manifest, audio paths made absolute (fewer clips to tokenize)."""
    demo = ROOT / "data" / "demo" / "manifest.jsonl"

    def absolute(node):
        if isinstance(node, dict):
            return {k: str((demo.parent / v).resolve()) if k == "audio_url" else absolute(v) for k, v in node.items()}
        return [absolute(v) for v in node] if isinstance(node, list) else node

    rows = [absolute(json.loads(line)) for line in demo.read_text().splitlines()[:n]]
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in open(path) if line.strip()]


def test_train_rule_on_two_nodes_equals_two_processes_on_one(tmp_path):
    """The train rule through the profile on a 2-node allocation starts one launcher on each node
    (Slurm launched a step of the job on n2; each node logs its machine rank), one process group of
    2 x 1 processes, and trains exactly as 1 node x 2 processes: the same metrics rows and adapter."""
    overlay = {
        "experiment": "nodes", "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
        "data": {"manifest": str(small_manifest(tmp_path / "manifest.jsonl")), "val_fraction": 0.25},
        "train": {"max_steps": 3, "batch_size": 1, "grad_accum_steps": 1, "warmup_steps": 1, "eval_interval": 3,
                  "save_interval": 3, "predictions_interval": 3, "processes": 2,
                  "resume_dir": str(tmp_path / "resume-local")},
    }
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(overlay))
    # the reference, and the upstream stages both runs train on: here, 2 CPU processes on one node
    res = snakemake(ROOT / "profiles" / "default", tmp_path / "local.yaml", "--until", "train")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    train, train_log = tmp_path / "results" / "nodes" / "train", tmp_path / "results" / "nodes" / "logs" / "train.log"
    assert "--num_processes 2 --num_machines 1 " in train_log.read_text() and "srun" not in train_log.read_text()
    reference = {"metrics": _rows(train / "metrics.jsonl"), "val": _rows(train / "val_metrics.jsonl"),
                 "adapter": (train / "adapter" / "adapter_model.safetensors").read_bytes(),
                 "state": json.loads((train / "state.json").read_text())}
    assert [r["step"] for r in reference["metrics"]] == [1, 2, 3] and reference["state"]["num_processes"] == 2

    # the same run on two nodes, a fresh start (another resume_dir), train only through Slurm
    again = copy.deepcopy(overlay)
    again["train"]["resume_dir"] = str(tmp_path / "resume-nodes")
    (tmp_path / "nodes.yaml").write_text(yaml.safe_dump(again))
    two_node_profile(tmp_path / "profile")
    res = snakemake(tmp_path / "profile", tmp_path / "nodes.yaml", "--until", "train", "--forcerun", "train",
                    env={**ENV, **{"SLURM_CONF": str(CONF)}})
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: .*?/rule_(\w+)/", log)
    assert [rule for _, rule in submitted] == ["train"], log[-3000:]
    jobid = submitted[0][0]
    job = subprocess.run(["scontrol", "show", "job", "--oneliner", jobid], capture_output=True, text=True,
                         env=SLURM_ENV, check=True).stdout
    assert "JobState=COMPLETED" in job and " NumNodes=2 " in job and " NodeList=n[1-2] " in job, job

    train_log = train_log.read_text()
    launch = next(line for line in train_log.splitlines() if line.startswith("launch: "))
    assert f"srun --jobid {jobid} --overlap --nodes 2 --ntasks 2 --ntasks-per-node 1" in launch, launch
    assert "--num_processes 2 --num_machines 2" in launch and "--main_process_ip 127.0.0.2" in launch, launch
    # each node's launcher ran, on its node, with its machine rank; Slurm's n2 launched the step
    assert "launch: node n1, machine rank 0 of 2" in train_log, train_log[-3000:]
    assert "launch: node n2, machine rank 1 of 2" in train_log, train_log[-3000:]
    n2_log = (TWO / "log" / "slurmd.n2.log").read_text()
    assert re.search(rf"launch task StepId={jobid}\.\d+ ", n2_log), n2_log[-2000:]

    state = json.loads((train / "state.json").read_text())
    assert state["num_processes"] == 2 and state["finished"], state
    assert _rows(train / "metrics.jsonl") == reference["metrics"]
    assert _rows(train / "val_metrics.jsonl") == reference["val"]
    assert (train / "adapter" / "adapter_model.safetensors").read_bytes() == reference["adapter"]
