"""Report stage: one self-contained HTML file with captions naming each input's sha256.

Its inputs are produced by the real stages on real clips (the manifest stage on the bad-input
corpus, the audit gate passing and failing, training, evaluation), so a renamed audit rule, fix
kind or quarantine reason, or a changed metrics key, shows up here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import stage_train_inputs
from higgs_tune import data as D
from higgs_tune.fileio import git_revision
from higgs_tune.report import build_report

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "bad_inputs"


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def stage_outputs(tmp_path_factory, demo_config, short_codes, transcripts, lj_dir):
    """Outputs of the real manifest, audit (pass and fail), train and evaluate code, role -> path."""
    from higgs_tune.audit.run import run_audit
    from higgs_tune.evaluate import run_evaluate
    from higgs_tune.manifest import QuarantineTooLarge, run_manifest
    from higgs_tune.train import train

    root = tmp_path_factory.mktemp("report")
    cfg = copy.deepcopy(demo_config)
    cfg["cache_dir"] = str(root / "cache")
    # manifest: the bad-input corpus (real fixes and quarantine reasons)
    corpus_cfg = copy.deepcopy(cfg)
    corpus_cfg["data"].update(yaml.safe_load((CORPUS / "config.yaml").read_text())["data"])
    corpus_cfg["data"].update(manifest=str(CORPUS / "manifest.jsonl"), data_root=str(CORPUS),
                              max_quarantine_fraction=1.0)
    m = root / "manifest"
    run_manifest(corpus_cfg, train_out=m / "train.jsonl", val_out=m / "val.jsonl",
                 quarantine_out=m / "quarantine.jsonl", fixes_out=m / "fixes.json")
    # train + audit + evaluate on three real short clips
    io = stage_train_inputs(root / "exp", short_codes, transcripts, lj_dir, n_train=2)
    audit = {"summary": io.audit, "samples": io.audit.parent / "samples.parquet"}
    summary = run_audit(cfg, train_manifest=io.train, val_manifest=io.val, tokens_index=io.index,
                        summary_path=audit["summary"], samples_path=audit["samples"])
    assert summary["passed"], summary["failures"][:3]
    failed = root / "audit-failed"
    bad = run_audit(cfg, train_manifest=io.train, val_manifest=io.val, tokens_index=io.index,
                    summary_path=failed / "summary.json", samples_path=failed / "samples.parquet",
                    collator=D.make_collator(_model_config(cfg), mask_audio_out_token_label=False))
    assert not bad["passed"]
    cfg["train"].update(max_steps=3, batch_size=1, grad_accum_steps=1, warmup_steps=1, eval_interval=2,
                        predictions_interval=2, save_interval=3)
    train(cfg, io)
    cfg["eval"]["generate"].update(n_samples=1, max_seconds=1)
    ev = root / "exp" / "eval"
    run_evaluate(cfg, adapter=io.adapter, val=io.val, index=io.index, metrics_out=ev / "metrics.json",
                 generated_out=ev / "generated.jsonl", audio_dir=ev / "audio")
    paths = {"manifest": CORPUS / "manifest.jsonl", "train_manifest": io.train, "val_manifest": io.val,
             "fixes": m / "fixes.json", "quarantine": m / "quarantine.jsonl", "tokens_index": io.index,
             "audit_summary": audit["summary"], "audit_samples": audit["samples"], "metrics": io.metrics,
             "val_metrics": io.val_metrics, "predictions": io.predictions, "train_state": io.state,
             "adapter": io.adapter, "eval_metrics": ev / "metrics.json", "generated": ev / "generated.jsonl",
             "audio": ev / "audio"}
    return cfg, {k: str(v) for k, v in paths.items()}, failed


def _model_config(cfg):
    from higgs_tune.model import tiny_higgs_config

    return tiny_higgs_config(cfg["model"]["arch"])


@pytest.fixture
def inputs(stage_outputs, tmp_path):
    """A private copy of the stage outputs (tests delete some) and the report path."""
    cfg, paths, failed = stage_outputs
    copied = {}
    for role, p in paths.items():
        src, dst = Path(p), tmp_path / "in" / role / Path(p).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        copied[role] = str(dst)
    for role in ("generated", "eval_metrics"):  # eval rows name the WAVs: point them at the copy
        text = Path(copied[role]).read_text().replace(paths["audio"], copied["audio"])
        Path(copied[role]).write_text(text)
    return copy.deepcopy(cfg), copied, failed, tmp_path / "out" / "report.html"


def _external_refs(html: str) -> list[str]:
    refs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', html)
    return [r for r in refs if not (r.startswith("data:") or r.startswith("#"))]


def test_report_self_contained_with_provenance(inputs, repo_root):
    cfg, paths, _, out = inputs
    assert build_report(cfg, paths, out) == out and out.is_file()
    html = out.read_text()
    assert _external_refs(html) == []
    assert "url(" not in html and "@import" not in html
    assert html.count('src="data:image/png;base64,') >= 5
    gen = [json.loads(line) for line in open(paths["generated"])]
    assert len(gen) == 1 and re.search(r'<audio[^>]*src="data:audio/wav;base64,', html)
    assert "generation.wer" in html and f"<th>hypothesis</th><td>{gen[0]['hypothesis']}</td>" in html
    assert 'id="random-init-banner"' in html and "not speech" in html
    assert cfg["report"]["title"] in html and "PASSED" in html
    for role in ("metrics", "val_metrics", "predictions", "audit_summary", "audit_samples", "eval_metrics",
                 "fixes", "quarantine"):
        assert _sha(paths[role])[:12] in html, role
    assert _sha(Path(paths["adapter"]) / "adapter_config.json")[:12] in html
    assert _sha(paths["metrics"])[:12] in re.search(r"<figcaption>.*?</figcaption>", html, re.S).group(0)
    assert paths["metrics"] in html
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True).stdout.strip()
    assert head and head in html
    # the manifest section lists the fix kinds and quarantine reasons the manifest stage wrote
    fixes = json.loads(Path(paths["fixes"]).read_text())
    assert fixes["fixes"] and fixes["reasons"]
    for kind in list(fixes["fixes"]) + list(fixes["reasons"]):
        assert f"<th>{kind}</th>" in html, kind
    # a quarantined row's text is shown escaped, never run
    quarantined = [json.loads(line) for line in open(paths["quarantine"])]
    assert len(quarantined) > 5
    # every rule of the audit summary is in the audit table, by its name
    summary = json.loads(Path(paths["audit_summary"]).read_text())
    from higgs_tune.audit.rules import RULES

    assert [r["name"] for r in summary["rules"]] == list(RULES)
    for name in RULES:
        assert name in html, name
    preds = [json.loads(line) for line in open(paths["predictions"])]
    assert preds and preds[0]["text"]["label"][0] in html.replace("&lt;", "<").replace("&gt;", ">")


def test_failed_audit_names_rule_and_cause(inputs):
    cfg, paths, failed, out = inputs
    shutil.copy2(failed / "summary.json", paths["audit_summary"])
    summary = json.loads((failed / "summary.json").read_text())
    html = build_report(cfg, paths, out).read_text()
    bad = [r["name"] for r in summary["rules"] if not r["passed"]]
    assert bad == ["audio_out_token_label_masked"] or "audio_out_token_label_masked" in bad, bad
    assert "FAILED" in html and "audio_out_token_label_masked" in html
    cause = summary["failures"][0]["likely_cause"]
    assert cause and cause.replace("'", "&#39;") in html


def test_pretrained_has_no_banner(inputs):
    cfg, paths, _, out = inputs
    cfg["model"]["source"] = "pretrained"
    for role in ("train_state", "eval_metrics"):
        doc = json.loads(Path(paths[role]).read_text())
        doc["model_source"] = "pretrained"
        Path(paths[role]).write_text(json.dumps(doc))
    html = build_report(cfg, paths, out).read_text()
    assert "random-init-banner" not in html


def test_optional_inputs_missing_show_not_produced(inputs):
    cfg, paths, _, out = inputs
    for role in ("predictions", "fixes", "quarantine", "train_state", "audit_samples", "val_metrics"):
        Path(paths[role]).unlink()
    shutil.rmtree(paths["audio"])
    html = build_report(cfg, paths, out).read_text()
    for what in ("train/predictions.jsonl missing", "audit/samples.parquet missing", "train/state.json missing",
                 "train/val_metrics.jsonl missing"):
        assert what in html, what
    assert "<audio" in html  # the reference clip (outside eval/audio) is still embedded
    assert "generated: <span" in html or "not produced" in html


@pytest.mark.parametrize("role,rule", [("metrics", "train"), ("audit_summary", "audit"),
                                       ("eval_metrics", "evaluate")])
def test_missing_required_input_names_the_rule(inputs, role, rule):
    cfg, paths, _, out = inputs
    Path(paths[role]).unlink()
    with pytest.raises(FileNotFoundError) as err:
        build_report(cfg, paths, out)
    msg = str(err.value)
    assert paths[role] in msg and f"written by the '{rule}' rule" in msg
    assert "python -m higgs_tune" not in msg  # it names the rule to run, not a module


def test_git_revision_outside_repo(tmp_path):
    assert "not a git repository" in git_revision(tmp_path)
