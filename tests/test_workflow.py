"""The workflow itself: lint, dry run, and the whole chain end to end on a few real clips."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


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
    for rule in ("manifest", "tokenize", "audit", "train", "evaluate_base", "evaluate", "select", "report", "curves"):
        assert f"rule {rule}:" in res.stdout + res.stderr
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/cluster.yaml", "--config", f"results_dir={tmp_path}"], ROOT)
    assert res.returncode == 0, res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"lora": {"rank": 0}}))
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/demo.yaml", str(bad)], ROOT)
    assert res.returncode != 0 and "rank" in res.stdout + res.stderr


def test_every_output_is_a_row_of_the_table_of_outputs(tmp_path):
    """Every job of every rule (one tokenize job and tokenize shards, checkpoint steps and the merged
    model planned too) writes exactly its rows of higgs_tune.outputs.OUTPUTS, in order, under
    results_dir/experiment (the sweep's comparison, results_dir/compare-NAME.html, is no experiment's):
    a rule declaring an output the table lacks fails here. The roles the report, the comparison and
    the lineage read resolve to their rules."""
    from higgs_tune import outputs

    overlay = tmp_path / "all.yaml"
    overlay.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "r"), "eval": {"checkpoints": "every"},
                                       "train": {"max_steps": 4, "save_interval": 2},
                                       "sweep": {"name": "s", "runs": {"one": {}, "sharded": {
                                           "audio_tokenizer": {"shards": 2}}}}}))
    res = run(SNAKEMAKE + ["-n", "--forceall", "--configfile", "config/demo.yaml", str(overlay), "--", "all", "export"],
              ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    planned = re.findall(r"^rule (\w+):\n(?:    .*\n)*?    output: (.*)$", res.stdout, re.M)
    rules_seen = set()
    for rule, outs in planned:
        if rule == "compare":
            continue
        rows = outputs.of_rule(rule)
        paths = outs.split(", ")
        assert len(paths) == len(rows), (rule, paths)
        for row, path in zip(rows, paths):
            pattern = re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(str(tmp_path / "r" / "{experiment}" / row.path)))
            assert re.fullmatch(pattern, path), (rule, row, path)
            assert outputs.role_of(rule, path) == row.role
        rules_seen.add(rule)
    assert rules_seen == {r for o in outputs.OUTPUTS for r in o.rules}, rules_seen
    assert [outputs.producer(r) for r in ("metrics", "adapter", "tokens_index", "base_audio", "selection")] == [
        "train", "train", "tokenize", "evaluate_base", "select"]
    with pytest.raises(KeyError, match="no output has role"):
        outputs.producer("nonsense")


@pytest.mark.slow
def test_end_to_end_on_the_bad_input_corpus(tmp_path, lj_dir):
    """The whole chain on tests/data/bad_inputs (real LJSpeech clips made bad, plus good rows):
    0 crashes, rows in = kept + quarantined, the kept rows pass the audit and train; and an overlay
    with `experiment` and `data.manifest` is all it takes to run on another dataset."""
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "tests" / "data" / "bad_inputs", corpus, symlinks=True)
    link = corpus / "wavs" / "outside_link.wav"
    link.unlink()
    link.symlink_to(lj_dir / "wavs" / "LJ001-0008.wav")  # a symlink out of the data root
    overlay = {
        "experiment": "e2e", "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
        "data": {"manifest": str(corpus / "manifest.jsonl"), "data_root": str(corpus), "val_fraction": 0.2,
                 "max_duration_s": 8.0, "max_quarantine_fraction": 1.0},
        "train": {"max_steps": 3, "batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 1, "eval_interval": 3,
                  "save_interval": 3, "predictions_interval": 3, "resume_dir": str(tmp_path / "resume")},
        "eval": {"generate": {"max_seconds": 2}},  # the demo's 4 samples, each capped at 50 frames
    }
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    args = SNAKEMAKE + ["--snakefile", str(ROOT / "Snakefile"), "--directory", str(ROOT), "--cores", "2", "--nolock",
                        "--configfile", str(ROOT / "config/demo.yaml"), str(tmp_path / "overlay.yaml")]
    res = run(args, ROOT, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    out = tmp_path / "results" / "e2e"
    fixes = json.loads((out / "manifest" / "fixes.json").read_text())
    rows_in = sum(1 for line in open(corpus / "manifest.jsonl", "rb") if line.strip())
    quarantined = [json.loads(line) for line in open(out / "manifest" / "quarantine.jsonl")]
    kept = sum(1 for split in ("train", "val") for _ in open(out / "manifest" / f"{split}.jsonl"))
    assert fixes["rows_in"] == rows_in == kept + len(quarantined) and kept > 5 and len(quarantined) > 20
    assert all(q["reason"] and q["message"] and q["line"] for q in quarantined)
    summary = json.loads((out / "audit" / "summary.json").read_text())
    assert summary["passed"] is True and summary["n_samples"] == kept
    metrics = [json.loads(line) for line in open(out / "train" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["n_audio_targets"] > 0 for m in metrics)
    # the demo config packs each micro-batch into one row (train.packing): almost no padding
    assert all(m["padding_efficiency"] >= 0.95 and m["n_samples"] == 2 for m in metrics), metrics
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    assert len(ev["codebook_acc"]) == 8 and ev["n_audio_targets"] > 0
    gen = [json.loads(line) for line in open(out / "eval" / "generated.jsonl")]
    n_val = sum(1 for _ in open(out / "manifest" / "val.jsonl"))
    assert len(gen) == min(4, n_val) == ev["generation"]["n_samples"] > 0
    assert ev["generation"]["gt_wer"] < 0.35, gen  # the ASR hears the real held-out clips
    from higgs_tune.speech_metrics import error_rate

    for g in gen:
        wave, rate = sf.read(g["generated"])
        assert rate == 24000 and len(wave) == 960 * g["n_frames"]
        # eval.generate.max_seconds 2 at 25 frames/s: a stream the model did not end runs to the cap
        assert g["n_frames"] <= 50 and (g["ended"] or g["n_frames"] >= 49), g
        assert g["language"] == "en" and g["asr_metric"] == "wer" and g["cer"] is None  # data.language default
        assert g["wer"] == error_rate([g["text"]], [g["hypothesis"]], "en")[1] and g["text"]
        assert g["hit_max"] == (not g["ended"]) and 0 <= g["trailing_silence_s"] <= g["duration_s"]
        codec_wave, _ = sf.read(g["codec"])
        assert len(codec_wave) % 960 == 0 and len(codec_wave) > 0
    # base -> fine-tuned: the base model generated the same prompts with the same seeds; eval/ pairs them
    base = [json.loads(line) for line in open(out / "eval_base" / "generated.jsonl")]
    paired = [json.loads(line) for line in open(out / "eval" / "paired.jsonl")]
    summary = json.loads((out / "eval" / "paired.json").read_text())
    assert [r["id"] for r in base] == [r["id"] for r in paired] == [g["id"] for g in gen]
    assert all(b["gt_wer"] is None and b["codec"] is None for b in base)  # calibration is evaluate's
    assert summary["n_samples"] == len(gen) and ev["paired"]["scores"] == summary["scores"]
    err = summary["scores"]["err"]
    assert err["n"] == len(gen) and err["ci_low"] <= err["delta"] <= err["ci_high"]
    assert err["better"] + err["worse"] + err["same"] == len(gen)
    assert ev["generation"]["hit_max_rate"] == sum(g["hit_max"] for g in gen) / len(gen)
    html = (out / "report.html").read_text()
    assert html.index('id="paired"') < html.index('id="training"') and "95 % CI" in html
    assert "random" in html.lower() and "e2e" in html
    assert "padding efficiency (whole run)" in html and "packed (2 samples per process" in html
    assert html.count("<audio") >= 3 * len(gen) and "generation.gt_wer" in html
    res = run(args + ["-n"], ROOT)  # a rerun has nothing to do
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr, res.stdout + res.stderr

    # the rules are the contract: every file under results/e2e lies in a declared output or log
    res = run(args + ["--summary"], ROOT)
    assert res.returncode == 0, res.stderr
    declared = [Path(line.split("\t")[0]) for line in res.stdout.splitlines()[1:] if line.strip()]
    assert declared
    logs = {out / "logs" / f"{r}.log" for r in ("manifest", "tokenize", "audit", "train", "evaluate_base", "evaluate",
                                                 "select", "report", "curves")}
    logs |= {out / "logs" / f"{r}.benchmark.tsv" for r in ("tokenize", "audit", "train")}
    for f in (p for p in out.rglob("*") if p.is_file()):
        assert f in logs or any(f == d or d in f.parents for d in declared), f"{f} is in no declared output"

    # code is part of the graph: a comment in loss.py reruns what imports it; undoing it is a no-op
    copy = tmp_path / "code"
    shutil.copytree(ROOT / "workflow", copy / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "Snakefile", copy / "Snakefile")
    code_args = [a if a != str(ROOT / "Snakefile") else str(copy / "Snakefile") for a in args]
    loss_py = copy / "workflow" / "higgs_tune" / "loss.py"
    original = loss_py.read_text()
    loss_py.write_text(original + "# a comment\n")
    res = run(code_args + ["-n"], ROOT)
    planned = set(re.findall(r"^rule (\w+):", res.stdout, re.M))
    assert res.returncode == 0 and planned >= {"audit", "train", "evaluate_base", "evaluate", "report"}, \
        res.stdout[-3000:]
    assert not planned & {"manifest", "tokenize"}, planned
    loss_py.write_text(original)
    res = run(code_args + ["-n"], ROOT)
    assert "Nothing to be done" in res.stdout + res.stderr, res.stdout[-3000:]


def test_gutted_dataset_stops_the_workflow_and_keeps_outputs(tmp_path):
    """Above data.max_quarantine_fraction the manifest job fails with a message naming the quarantine
    file, nothing downstream runs, and the manifest outputs stay for inspection (keep-incomplete)."""
    corpus = ROOT / "tests" / "data" / "bad_inputs"
    overlay = {"experiment": "gutted", "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
               "data": {"manifest": str(corpus / "manifest.jsonl"), "data_root": str(corpus),
                        "max_quarantine_fraction": 0.05}}
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    res = run(SNAKEMAKE + ["--snakefile", str(ROOT / "Snakefile"), "--directory", str(ROOT), "--cores", "1",
                           "--nolock", "--configfile", str(ROOT / "config/demo.yaml"),
                           str(tmp_path / "overlay.yaml")], ROOT, timeout=600)
    assert res.returncode != 0
    out = tmp_path / "results" / "gutted"
    log = (out / "logs" / "manifest.log").read_text()
    assert "max_quarantine_fraction" in log and str(out / "manifest" / "quarantine.jsonl") in log
    fixes = json.loads((out / "manifest" / "fixes.json").read_text())
    assert fixes["rows_quarantined"] / fixes["rows_in"] > 0.05
    assert not (out / "tokens").exists()


@pytest.mark.slow
def test_edits_that_do_not_change_training_keep_it_and_a_longer_run_resumes(tmp_path, lj_dir):
    """A finished tiny run (6 real clips, 2 steps, through the workflow): editing eval.generate.*, the
    logging/eval/checkpoint intervals, eval.batch_size or report.py schedules no train job; raising
    train.max_steps reruns the job, which resumes from the last checkpoint (train.log says so) and
    keeps the first rows as they were."""
    rows = [json.loads(line) for line in open(ROOT / "data" / "demo" / "manifest.jsonl")][:6]
    for r in rows:
        r["messages"][2]["content"]["audio_url"] = str(lj_dir / "wavs" / Path(
            r["messages"][2]["content"]["audio_url"]).name)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"experiment": "keep", "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
            "data": {"manifest": str(manifest), "val_fraction": 0.34},
            "train": {"max_steps": 2, "batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 1, "eval_interval": 2,
                      "save_interval": 1, "keep_checkpoints": 3, "predictions_interval": 2,
                      "resume_dir": str(tmp_path / "resume")},
            "eval": {"generate": {"n_samples": 1, "max_seconds": 1}}}

    def args(overlay, snakefile=ROOT / "Snakefile"):
        (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
        return SNAKEMAKE + ["--configfile", str(ROOT / "config/demo.yaml"), str(tmp_path / "overlay.yaml"),
                            "--snakefile", str(snakefile), "--directory", str(ROOT), "--cores", "2", "--nolock"]

    def planned(res):
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return set(re.findall(r"^rule (\w+):", res.stdout, re.M))

    out = tmp_path / "results" / "keep"
    target = str(out / "train" / "state.json")
    res = run(args(base) + [target], ROOT, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    before = [json.loads(line) for line in open(out / "train" / "metrics.jsonl")]
    assert [r["step"] for r in before] == [1, 2]

    edited = yaml.safe_load(yaml.safe_dump(base))
    edited["eval"] = {"batch_size": 1, "generate": {"n_samples": 2, "max_seconds": 3}}
    edited["train"].update(log_interval=5, eval_interval=1, predictions_interval=1, save_interval=7,
                           keep_checkpoints=1)
    jobs = planned(run(args(edited) + ["-n"], ROOT))
    assert "evaluate" in jobs and "train" not in jobs, jobs
    res = run(args(edited) + ["-n", target], ROOT)
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr, res.stdout[-3000:]

    copy = tmp_path / "code"
    shutil.copytree(ROOT / "workflow", copy / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "Snakefile", copy / "Snakefile")
    report_py = copy / "workflow" / "higgs_tune" / "report.py"
    report_py.write_text(report_py.read_text() + "# a comment\n")
    jobs = planned(run(args(base, copy / "Snakefile") + ["-n"], ROOT))
    assert "report" in jobs and "train" not in jobs, jobs

    longer = yaml.safe_load(yaml.safe_dump(base))
    longer["train"]["max_steps"] = 4
    assert "train" in planned(run(args(longer) + ["-n", target], ROOT))
    res = run(args(longer) + [target], ROOT, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    log = (out / "logs" / "train.log").read_text()
    assert re.search(r"resumed from \S+/step-00000002 at step 2", log), log[-3000:]
    assert "re-planned from step 2" in log
    after = [json.loads(line) for line in open(out / "train" / "metrics.jsonl")]
    assert [r["step"] for r in after] == [1, 2, 3, 4] and after[:2] == before
    state = json.loads((out / "train" / "state.json").read_text())
    assert state["finished"] and state["resumed_at_step"] == 2 and len(state["schedule"]["segments"]) == 2
