"""The workflow itself: lint, dry run, and the whole chain end to end on a few real clips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
CLIPS = ["LJ001-0002", "LJ001-0024", "LJ001-0030", "LJ001-0004"]


def run(args, cwd, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "workflow")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, **kw)


def test_lint():
    res = run(SNAKEMAKE + ["--lint", "--configfile", "config/demo.yaml"], ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Congratulations" in res.stdout + res.stderr or "no linting" in (res.stdout + res.stderr).lower()


def test_dry_run_plans_the_chain_and_validates_configs(tmp_path):
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/demo.yaml", "--config", f"results_dir={tmp_path}"], ROOT)
    assert res.returncode == 0, res.stderr
    for rule in ("manifest", "tokenize", "audit", "train", "evaluate", "report"):
        assert f"rule {rule}:" in res.stdout + res.stderr
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/cluster.yaml", "--config", f"results_dir={tmp_path}"], ROOT)
    assert res.returncode == 0, res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"lora": {"rank": 0}}))
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/demo.yaml", "--configfile", str(bad)], ROOT)
    assert res.returncode != 0 and "rank" in res.stdout + res.stderr


@pytest.mark.slow
def test_end_to_end_on_real_clips(tmp_path, lj_dir):
    """An overlay with `experiment` and `data.manifest` is enough to run the whole chain elsewhere."""
    texts = dict(line.rstrip("\n").split("|", 1) for line in open(lj_dir / "metadata.csv", encoding="utf-8"))
    data = tmp_path / "data"
    (data / "wavs").mkdir(parents=True)
    rows = []
    for cid in CLIPS:
        (data / "wavs" / f"{cid}.wav").write_bytes((lj_dir / "wavs" / f"{cid}.wav").read_bytes())
        rows.append({"messages": [{"role": "system", "content": "Generate audio following instruction."},
                                  {"role": "user", "content": texts[cid]},
                                  {"role": "assistant", "content": {"type": "audio", "audio_url": f"wavs/{cid}.wav"}}],
                     "misc": {"id": cid}})
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overlay = {
        "experiment": "e2e", "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
        "data": {"manifest": str(data / "train.jsonl"), "data_root": str(data), "val_fraction": 0.25},
        "train": {"max_steps": 3, "batch_size": 1, "grad_accum_steps": 1, "warmup_steps": 1, "eval_interval": 3,
                  "save_interval": 3, "predictions_interval": 3},
    }
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    args = SNAKEMAKE + ["--snakefile", str(ROOT / "Snakefile"), "--directory", str(ROOT), "--cores", "2",
                        "--configfile", str(ROOT / "config/demo.yaml"), "--configfile", str(tmp_path / "overlay.yaml")]
    res = run(args + ["--nolock"], ROOT, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    out = tmp_path / "results" / "e2e"
    summary = json.loads((out / "audit" / "summary.json").read_text())
    assert summary["passed"] is True
    metrics = [json.loads(line) for line in open(out / "train" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    assert len(ev["codebook_acc"]) == 8 and ev["n_audio_targets"] > 0
    html = (out / "report.html").read_text()
    assert "random" in html.lower() and "e2e" in html
    fixes = json.loads((out / "manifest" / "fixes.json").read_text())
    assert fixes["rows_in"] == 4 == fixes["rows_kept"] + fixes["rows_quarantined"]
    # a rerun has nothing to do
    res = run(args + ["--nolock", "-n"], ROOT)
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr, res.stdout + res.stderr
