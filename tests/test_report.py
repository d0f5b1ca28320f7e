"""Report stage: one self-contained HTML file with captions naming each input by the md5 DVC records for it.

Its inputs are produced by the real stages on real clips (the manifest stage on the bad-input
corpus, the audit gate passing and failing, training, evaluation), so a renamed audit rule, fix
kind or quarantine reason, or a changed metrics key, shows up here. The val transcript carries an
HTML/JS payload through every stage; the report is opened in headless Chromium (tests/browser.py)
where it is installed (.ci/chromium-up), and that test is skipped, saying why, where it is not.
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

from browser import chromium_path, html_tables, inspect_page, table_by_id
from conftest import stage_train_inputs
from higgs_tune import data as D
from higgs_tune.fileio import git_revision
from higgs_tune.report import build_report

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "bad_inputs"
#: prefixed to the val transcript: it must show as text in the report and run nothing
PAYLOAD = "<img src=x onerror=alert(1)><script>document.title='pwned'</script>"
needs_chromium = pytest.mark.skipif(chromium_path() is None,
                                    reason="no Chromium on PATH: run .ci/chromium-up (root, Debian) to install it")


def _md5(path) -> str:
    """The md5 of a file's bytes: what DVC records for a file in dvc.lock."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


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
    val_rows = D.read_jsonl(io.val)  # the held-out transcript carries the payload through every stage
    val_rows[0]["messages"][1]["content"] = f"{PAYLOAD} {val_rows[0]['messages'][1]['content']}"
    D.write_jsonl(io.val, val_rows)
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
    ev, base = root / "exp" / "eval", root / "exp" / "eval_base"
    run_evaluate(cfg, adapter=None, val=io.val, index=io.index, metrics_out=base / "metrics.json",
                 generated_out=base / "generated.jsonl", audio_dir=base / "audio")
    run_evaluate(cfg, adapter=io.adapter, val=io.val, index=io.index, metrics_out=ev / "metrics.json",
                 generated_out=ev / "generated.jsonl", audio_dir=ev / "audio", base_generated=base / "generated.jsonl",
                 paired_out=ev / "paired.jsonl", paired_summary_out=ev / "paired.json")
    from higgs_tune import select as S  # eval.checkpoints null: the final adapter is the selection

    S.main(["--config-json", json.dumps({"eval": cfg["eval"]}), "--final", str(ev / "metrics.json"), "--state",
            str(io.state), "--steps", "--selection", str(ev / "selection.json")])
    paths = {"manifest": CORPUS / "manifest.jsonl", "train_manifest": io.train, "val_manifest": io.val,
             "fixes": m / "fixes.json", "quarantine": m / "quarantine.jsonl", "tokens_index": io.index,
             "audit_summary": audit["summary"], "audit_samples": audit["samples"], "metrics": io.metrics,
             "val_metrics": io.val_metrics, "predictions": io.predictions, "train_state": io.state,
             "adapter": io.adapter, "eval_metrics": ev / "metrics.json", "generated": ev / "generated.jsonl",
             "audio": ev / "audio", "paired": ev / "paired.jsonl", "paired_summary": ev / "paired.json",
             "base_eval_metrics": base / "metrics.json", "base_generated": base / "generated.jsonl",
             "base_audio": base / "audio", "selection": ev / "selection.json"}
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
    for role, audio in (("generated", "audio"), ("eval_metrics", "audio"), ("base_generated", "base_audio")):
        text = Path(copied[role]).read_text().replace(paths[audio], copied[audio])  # rows name the WAVs: the copy's
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
    # eval.checkpoints null: the selection is the final adapter, named with its reason
    assert "<b>Selected: step 3</b>" in html and "of 1 checkpoint: step 3" in html
    for role in ("metrics", "val_metrics", "predictions", "audit_summary", "audit_samples", "eval_metrics",
                 "fixes", "quarantine"):
        assert f"(md5 {_md5(paths[role])})" in html, role
    assert _md5(Path(paths["adapter"]) / "adapter_config.json") in html
    assert f"{paths['metrics']} (md5 {_md5(paths['metrics'])})" in re.search(r"<figcaption>.*?</figcaption>", html,
                                                                           re.S).group(0)
    # a folder is named by DVC's folder hash (<md5>.dir), as dvc.lock records it
    from higgs_tune.fileio import dvc_md5

    files = {r[0]: r for r in html_tables(html)["input-files"]["body"]}
    for role in ("adapter", "audio", "base_audio"):
        assert files[role][3] == f"{dvc_md5(paths[role])['md5']} ({dvc_md5(paths[role])['nfiles']} files)", role
        assert files[role][3].split()[0].endswith(".dir")
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
    # tables read as tables: learnable fractions as role x modality, eval scores grouped
    tables = html_tables(html)
    fr = tables["fractions"]
    assert fr["head"][0] == ["role", "text", "audio"] and fr["head"][1] == ["positions", "targets", "fraction"] * 2
    by_role = summary["fractions"]["by_role"]
    rows = {r[0]: r[1:] for r in fr["body"]}
    assert set(by_role) == {"system", "user", "assistant", "none"} <= set(rows)
    for role, per in by_role.items():
        assert rows[role] == [str(per[m][k]) if k != "fraction" else f"{per[m][k]:.4g}"
                              for m in ("text", "audio") for k in ("positions", "targets", "fraction")], role
    assert float(rows["assistant"][5]) > 0.5 and rows["user"][1] == rows["system"][1] == "0"  # audio learned
    ev = json.loads(Path(paths["eval_metrics"]).read_text())
    groups = {g: [r[0] for r in rows] for g, rows in tables["eval-scores"]["groups"]}
    assert list(groups)[:4] == ["losses", "accuracies", "generation", "calibration"], list(groups)
    assert {"loss", "text_loss", "audio_loss"} <= set(groups["losses"]) and "text_acc" in groups["accuracies"]
    assert {"generation.wer", "generation.sim", "generation.eos_rate"} <= set(groups["generation"])
    assert {"generation.gt_wer", "generation.codec_wer"} <= set(groups["calibration"])
    flat = {r[0]: r[1] for _, rows in tables["eval-scores"]["groups"] for r in rows}
    assert flat["loss"] == f"{ev['loss']:.4g}" and flat["generation.wer"] == f"{ev['generation']['wer']:.4g}"
    # the payload in the transcript is text: escaped wherever it appears, never markup
    assert PAYLOAD not in html and "<script" not in html.lower()
    assert html.count("&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;") >= 1
    # the report opens with base -> fine-tuned: one row per score, means, delta and its interval
    paired = json.loads(Path(paths["paired_summary"]).read_text())
    assert html.index('id="paired"') < html.index('id="training"')
    pt = tables["paired"]
    assert pt["head"][0][:5] == ["score", "base → fine-tuned", "Δ", "95 % CI", "verdict"], pt["head"]
    err = paired["scores"]["err"]
    assert pt["body"][0][0] == "WER / CER ↓" and pt["body"][0][2] == f"{err['delta']:.4g}"
    assert pt["body"][0][3] == f"[{err['ci_low']:.4g}, {err['ci_high']:.4g}]"
    assert pt["body"][0][-2] == f"{ev['generation']['gt_wer']:.4g}"  # the ground-truth ceiling beside it
    rows = [json.loads(line) for line in open(paths["paired"])]
    assert [r["id"] for r in rows] == [g["id"] for g in gen] and rows[0]["delta_err"] == err["delta"]
    # 1 s budget: the random-init model runs to max_seconds on both sides, flagged in the health table
    base_rows = [json.loads(line) for line in open(paths["base_generated"])]
    n_cut = sum(r["hit_max"] for r in gen + base_rows)
    assert len([r for r in tables.get("flagged", {"body": []})["body"] if "cut at max_seconds" in r[2]]) == n_cut
    assert html.count("base model: <br><audio") == 1  # the base model's clip beside the fine-tuned one


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


@needs_chromium
def test_report_in_a_browser(inputs):
    """Headless Chromium: every figure decodes, every player loads its clip, nothing is fetched, no
    console error, and the transcript's HTML/JS payload is shown as text and runs nothing."""
    cfg, paths, _, out = inputs
    page = inspect_page(build_report(cfg, paths, out))
    assert page["title"] == cfg["report"]["title"]  # not 'pwned'
    assert page["dialogs"] == [] and page["scripts"] == 0, (page["dialogs"], page["scripts"])
    assert page["console_errors"] == [] and page["exceptions"] == [], (page["console_errors"], page["exceptions"])
    assert page["requests"] == [], page["requests"]  # data: URIs only
    assert len(page["images"]) >= 5 and all(i["complete"] and i["naturalWidth"] > 0 for i in page["images"]), \
        page["images"]
    gen = [json.loads(line) for line in open(paths["generated"])]
    assert len(page["audio"]) >= 3 * len(gen) > 0  # generated, codec and reference clips
    for a in page["audio"]:
        assert a["error"] is None and a["readyState"] >= 1 and a["duration"] > 0, a
    assert PAYLOAD in page["text"]  # shown, as text
    fr = table_by_id(page, "fractions")
    assert [c["text"] for c in fr["head"][0]] == ["role", "text", "audio"]
    assert [c["colspan"] for c in fr["head"][0]] == [1, 3, 3] and fr["head"][0][0]["rowspan"] == 2
    assert [r[0] for r in fr["rows"]][:4] == ["system", "user", "assistant", "none"]
    groups = [r[0] for r in table_by_id(page, "eval-scores")["rows"] if len(r) == 1]
    assert groups[:4] == ["Losses", "Accuracies", "Generation", "Calibration"], groups  # CSS capitalizes


@needs_chromium
def test_browser_probe_sees_scripts_fetches_and_broken_media(tmp_path):
    """The probe itself can fail: a page that runs a script, fetches, logs an error and holds a
    broken image and a broken clip is reported as such."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><title>t</title></head><body>'
                   '<img src="data:image/png;base64,AAAA"><img src="x.png">'
                   '<audio controls preload="metadata" src="data:audio/wav;base64,AAAA"></audio>'
                   "<script>console.error('boom'); alert(1); document.title = 'pwned';</script></body></html>")
    page = inspect_page(bad, timeout=20)
    assert page["title"] == "pwned" and page["dialogs"] == ["1"] and page["scripts"] == 1
    assert any("boom" in e for e in page["console_errors"])
    assert any(r.endswith("/x.png") for r in page["requests"]), page["requests"]
    assert [i["naturalWidth"] for i in page["images"]] == [0, 0]
    assert page["audio"][0]["error"] is not None or page["audio"][0]["readyState"] == 0


def test_git_revision_outside_repo(tmp_path):
    assert "not a git repository" in git_revision(tmp_path)
