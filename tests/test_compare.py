"""Runs compared: a `sweep:` in the config resolves into one experiment per run (the rules take the
experiment as a wildcard), stages whose config equals the base experiment's are shared, and the
compare rule writes one self-contained HTML overlaying the runs (opened in headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from browser import chromium_path, html_tables, inspect_page, table_by_id
from higgs_tune.config import load_config
from higgs_tune.sweep import MISSING, config_diff, experiment_configs, sweep_experiments

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(ROOT),
             "--nolock"]
#: a run's report title carrying markup: it must show as text in both reports
PAYLOAD = "<img src=x onerror=alert(1)><script>document.title='pwned'</script>"


def run(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "workflow")}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, **kw)


# ----------------------------------------------------------------------------- resolution
def test_experiment_configs_merge_each_run_overlay():
    base = load_config([ROOT / "config" / "demo.yaml"])
    cfg = dict(base, sweep={"name": "lr", "runs": {"lr1e-3": {"train": {"learning_rate": 1.0e-3}},
                                                   "r4": {"lora": {"rank": 4, "alpha": 8}}}})
    exps = experiment_configs(cfg)
    assert list(exps) == ["demo", "demo-lr1e-3", "demo-r4"] and sweep_experiments(cfg) == ["demo-lr1e-3", "demo-r4"]
    assert all("sweep" not in c for c in exps.values())
    assert exps["demo"] == base  # the base experiment is the config itself
    lr = exps["demo-lr1e-3"]
    assert lr["experiment"] == "demo-lr1e-3" and lr["train"]["learning_rate"] == 1.0e-3
    assert lr["train"]["max_steps"] == base["train"]["max_steps"] and lr["lora"] == base["lora"]  # merged, not replaced
    r4 = exps["demo-r4"]["lora"]
    assert r4["rank"] == 4 and r4["target_modules"] == base["lora"]["target_modules"]
    assert sweep_experiments(base) == ["demo"] and list(experiment_configs(base)) == ["demo"]


def test_experiment_configs_reject_bad_runs():
    base = load_config([ROOT / "config" / "demo.yaml"])
    with pytest.raises(ValueError, match=r"run 'x' sets \['experiment'\]"):
        experiment_configs(dict(base, sweep={"name": "s", "runs": {"x": {"experiment": "other"}}}))
    with pytest.raises(Exception, match=r"(?s)run 'bad'.*\['rank'\]") as err:
        experiment_configs(dict(base, sweep={"name": "s", "runs": {"bad": {"lora": {"rank": 0}}}}))
    assert "sweep 's'" in str(err.value)


def test_config_diff_lists_only_differing_keys():
    a = {"experiment": "a", "train": {"learning_rate": 1e-3, "max_steps": 4}, "lora": {"rank": 16, "alpha": 32},
         "tags": [1, 2]}
    b = {"experiment": "b", "train": {"learning_rate": 3e-3, "max_steps": 4}, "lora": {"rank": 16, "alpha": 32},
         "tags": [1, 3], "extra": {"k": 1}}
    rows = config_diff({"a": a, "b": b})
    assert [r["key"] for r in rows] == ["extra.k", "tags", "train.learning_rate"]
    assert rows[0]["values"] == {"a": MISSING, "b": 1} and rows[2]["values"] == {"a": 1e-3, "b": 3e-3}
    assert config_diff({"a": a, "a2": dict(a, experiment="a2")}) == []  # the name aside: identical


def test_compare_names_the_rule_of_a_missing_input(tmp_path):
    from higgs_tune.compare import build_compare

    cfg = {"sweep": {"name": "lr", "base": "demo", "runs": {"a": {}}},
           "experiments": {"demo-a": load_config([ROOT / "config" / "demo.yaml"])}, "code": {}}
    missing = str(tmp_path / "demo-a" / "train" / "metrics.jsonl")
    with pytest.raises(FileNotFoundError, match="written by the 'train' rule") as err:
        build_compare(cfg, {"demo-a": {"metrics": missing, "eval_metrics": missing}}, tmp_path / "c.html")
    assert missing in str(err.value) and not (tmp_path / "c.html").exists()


# ----------------------------------------------------------------------------- the job graph
def _planned(out: str) -> list[tuple[str, list[str]]]:
    """(rule, outputs) of each job a dry run plans."""
    jobs = []
    for block in re.split(r"\n(?=rule \w+:)", out):
        m = re.match(r"rule (\w+):", block)
        if m:
            outs = re.search(r"^\s+output: (.*)$", block, re.M)
            jobs.append((m.group(1), outs.group(1).split(", ") if outs else []))
    return jobs


def test_dry_run_sweep_shares_upstream_stages(tmp_path):
    res_dir = tmp_path / "results"
    overlay = {"results_dir": str(res_dir), "sweep": {"name": "lr", "runs": {
        "lr1e-3": {"train": {"learning_rate": 1.0e-3}}, "lr1e-2": {"train": {"learning_rate": 1.0e-2}},
        "r4": {"lora": {"rank": 4}}, "same": {}}}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))  # runs in declared order
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/demo.yaml", str(tmp_path / "sweep.yaml")])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = _planned(res.stdout)
    folders = {}
    for rule, outs in jobs:
        folders.setdefault(rule, set()).update(Path(o).relative_to(res_dir).parts[0] for o in outs)
    # train-only runs read the base's manifest, tokens and audit; a LoRA-rank run audits again (the
    # audit probes the LoRA-wrapped model); an empty overlay shares everything but its report
    assert folders["manifest"] == folders["tokenize"] == {"demo"}
    assert folders["audit"] == {"demo", "demo-r4"}
    assert folders["train"] == folders["evaluate"] == {"demo", "demo-lr1e-3", "demo-lr1e-2", "demo-r4"}
    # the base model is generated and scored once for the whole sweep (no run changes the model, the
    # val set or the eval settings), and every run's evaluate pairs its rows with that one
    assert [r for r, _ in jobs].count("evaluate_base") == 1 and folders["evaluate_base"] == {"demo"}
    for block in (b for b in re.split(r"\n(?=rule \w+:)", res.stdout) if b.startswith("rule evaluate:")):
        assert f"--base-generated {res_dir}/demo/eval_base/generated.jsonl" in block, block
    assert folders["report"] == {"demo-lr1e-3", "demo-lr1e-2", "demo-r4", "demo-same"}
    assert folders["compare"] == {"compare-lr.html"}
    train_lr = next(b for b in re.split(r"\n(?=rule \w+:)", res.stdout)
                    if b.startswith("rule train:") and "demo-lr1e-3/train" in b)
    assert f"--audit {res_dir}/demo/audit/summary.json" in train_lr and '"learning_rate": 0.001' in train_lr
    assert f"--resume-dir .checkpoints/demo-lr1e-3" in train_lr
    # lint is clean with a sweep too
    res = run(SNAKEMAKE + ["--lint", "--configfile", "config/demo.yaml", str(tmp_path / "sweep.yaml")])
    assert res.returncode == 0 and "Congratulations" in res.stdout + res.stderr, res.stdout + res.stderr


def test_dry_run_without_sweep_plans_one_job_per_rule(tmp_path):
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/demo.yaml", "--config", f"results_dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = _planned(res.stdout)
    assert sorted(r for r, _ in jobs) == sorted(["manifest", "tokenize", "audit", "train", "curves", "evaluate_base",
                                                "evaluate", "select", "report", "all"])
    assert all(Path(o).relative_to(tmp_path).parts[0] == "demo" for _, outs in jobs for o in outs)
    # asking for a comparison that is not declared says so
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/demo.yaml", "--config", f"results_dir={tmp_path}", "--",
                           str(tmp_path / "compare-lr.html")])
    assert res.returncode != 0 and "no sweep named 'lr'" in res.stdout + res.stderr, res.stdout + res.stderr


def test_schema_rejects_a_run_setting_its_name(tmp_path):
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"sweep": {"name": "lr", "runs": {
        "a": {"experiment": "x"}}}}))
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/demo.yaml", str(tmp_path / "sweep.yaml"), "--config",
                           f"results_dir={tmp_path}"])
    assert res.returncode != 0 and "experiment" in res.stdout + res.stderr


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_sweep_end_to_end_compared_in_a_browser(tmp_path, demo_code_cache):
    """A 2-run learning-rate sweep on the demo data (4 steps): one manifest, tokenize and audit, two
    trainings, the comparison with each run's lineage and only the differing config keys; both
    reports open in headless Chromium with every figure and clip loaded, no fetch, no error."""
    res_dir = tmp_path / "results"
    overlay = {
        "results_dir": str(res_dir), "cache_dir": demo_code_cache(tmp_path / "cache"),  # the demo's codes
        "train": {"max_steps": 4, "batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 1, "eval_interval": 2,
                  "save_interval": 4, "predictions_interval": 2, "resume_dir": str(tmp_path / "resume")},
        "eval": {"generate": {"n_samples": 1, "max_seconds": 1}},
        "sweep": {"name": "lr", "runs": {"lr1e-3": {"train": {"learning_rate": 1.0e-3}},
                                         "lr1e-2": {"train": {"learning_rate": 1.0e-2}, "report": {"title": PAYLOAD}}}},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))  # runs in declared order
    args = SNAKEMAKE + ["--cores", "2", "--configfile", str(ROOT / "config/demo.yaml"), str(tmp_path / "sweep.yaml")]
    res = run(args, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ran = re.findall(r"^(?:local)?rule (\w+):", res.stdout + res.stderr, re.M)
    # one base-model evaluation shared by both runs (same base, val set and eval settings)
    assert sorted(ran) == sorted(["manifest", "tokenize", "audit", "evaluate_base", "train", "train", "curves", "curves",
                                  "evaluate", "evaluate", "select", "select", "report", "report", "compare", "all"]), ran
    check_sweep(res_dir, args)


def check_sweep(res_dir: Path, args: list[str]) -> None:
    """What the 2-run sweep of :func:`test_sweep_end_to_end_compared_in_a_browser` left in ``res_dir``."""
    runs = ["demo-lr1e-3", "demo-lr1e-2"]
    for exp, lr in zip(runs, (1e-3, 1e-2)):
        metrics = [json.loads(line) for line in open(res_dir / exp / "train" / "metrics.jsonl")]
        assert [m["step"] for m in metrics] == [1, 2, 3, 4]
        assert max(m["lr"] for m in metrics) == pytest.approx(lr)
        assert not (res_dir / exp / "manifest").exists() and not (res_dir / exp / "audit").exists()
    assert not (res_dir / "demo" / "train").exists()  # the base experiment itself is not a run here
    compare = res_dir / "compare-lr.html"
    html = compare.read_text()
    assert "url(" not in html and not [r for r in re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', html)
                                       if not r.startswith(("data:", "#"))]
    tables = html_tables(html)
    diff = tables["config-diff"]
    assert diff["head"] == [["key", "lr1e-3", "lr1e-2"]]
    assert diff["body"] == [["report.title", "higgs-tune demo report", PAYLOAD],
                            ["train.learning_rate", "0.001", "0.01"]]  # only the keys that differ
    lineage = {r[0]: r[1:] for r in tables["lineage-table"]["body"]}
    from higgs_tune.fileio import dvc_md5

    shared = {"data manifest (data.manifest)": ROOT / "data/demo/manifest.jsonl",
              "train manifest (kept rows)": res_dir / "demo/manifest/train.jsonl",
              "token index": res_dir / "demo/tokens/index.parquet",
              "audit summary": res_dir / "demo/audit/summary.json"}
    for label, path in shared.items():
        assert lineage[label] == [dvc_md5(path)["md5"][:12]] * 2, label
    for label in ("adapter (all files)", "train metrics", "eval metrics", "config: train"):
        assert len(set(lineage[label])) == 2, (label, lineage[label])
    assert lineage["config: model"][0] == lineage["config: model"][1]
    assert lineage["train metrics"][0] == dvc_md5(res_dir / "demo-lr1e-3/train/metrics.jsonl")["md5"][:12]
    assert lineage["adapter (all files)"][0] == dvc_md5(res_dir / "demo-lr1e-3/train/adapter")["md5"][:12]
    assert lineage["audit passed"] == ["True", "True"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert all(v.startswith(head) for v in lineage["code: git revision (training, state.json)"])
    groups = {g: [r[0] for r in rows] for g, rows in tables["eval-scores"]["groups"]}
    assert "loss" in groups["losses"] and "generation.wer" in groups["generation"]
    assert tables["eval-scores"]["head"] == [["metric", "lr1e-3", "lr1e-2", "meaning"]]

    # nothing left to do; every file under results/ lies in a declared output or log
    res = run(args + ["-n"])
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr, res.stdout[-3000:]
    res = run(args + ["--summary"])
    declared = [Path(line.split("\t")[0]) for line in res.stdout.splitlines()[1:] if line.strip()]
    logs = {p for p in res_dir.rglob("*.log")} | {p for p in res_dir.rglob("*.benchmark.tsv")}
    for f in (p for p in res_dir.rglob("*") if p.is_file()):
        assert f in logs or any(f == d or d in f.parents for d in declared), f"{f} is in no declared output"

    if chromium_path() is None:
        pytest.skip("no Chromium on PATH: run .ci/chromium-up (root, Debian) to open the reports in a browser")
    for path, n_audio in ((compare, 0), (res_dir / "demo-lr1e-2" / "report.html", 3)):
        page = inspect_page(path)
        assert page["console_errors"] == [] and page["exceptions"] == [] and page["dialogs"] == [], path
        assert page["requests"] == [] and page["scripts"] == 0, (path, page["requests"])
        assert page["images"] and all(i["complete"] and i["naturalWidth"] > 0 for i in page["images"]), path
        assert len(page["audio"]) >= n_audio
        assert all(a["error"] is None and a["readyState"] >= 1 and a["duration"] > 0 for a in page["audio"]), path
        assert PAYLOAD in page["text"]
    assert page["title"] == PAYLOAD  # the run report's title: the text, not markup
    page = inspect_page(compare)
    assert len(page["images"]) >= 5
    assert [c["text"] for c in table_by_id(page, "config-diff")["head"][0]] == ["key", "lr1e-3", "lr1e-2"]


def test_dry_run_sweep_of_eval_or_logging_settings_shares_the_training(tmp_path):
    """Runs differing only in evaluation (eval.generate) or logging/checkpoint settings of train
    read the base's training: they evaluate again, they never train again; a longer run trains."""
    res_dir = tmp_path / "results"
    overlay = {"results_dir": str(res_dir), "sweep": {"name": "gen", "runs": {
        "gen3": {"eval": {"generate": {"max_seconds": 3}}},
        "quiet": {"train": {"log_interval": 50, "eval_interval": 7, "save_interval": 9, "keep_checkpoints": 1}},
        "longer": {"train": {"max_steps": 200}}}}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/demo.yaml", str(tmp_path / "sweep.yaml")])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    folders = {}
    for rule, outs in _planned(res.stdout):
        folders.setdefault(rule, set()).update(Path(o).relative_to(res_dir).parts[0] for o in outs)
    assert folders["train"] == {"demo", "demo-longer"}
    # evaluate reads the whole train section (its loss weights): each run evaluates, on the base's adapter
    assert folders["evaluate"] == {"demo-gen3", "demo-quiet", "demo-longer"}
