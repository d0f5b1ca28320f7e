"""Report stage: one self-contained HTML file with captions naming each input's sha256."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess

import pandas as pd
import pytest

from higgs_tune.config import Paths
from higgs_tune.report import build_report, git_revision

N_CB = 8


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _losses(step: int, scale: float = 1.0) -> dict:
    cb = [scale * (7.0 - 0.3 * k) * math.exp(-step / 15) + 0.4 + 0.05 * k for k in range(N_CB)]
    acc = [min(1.0, 0.02 + 0.03 * step * (1 - 0.08 * k)) for k in range(N_CB)]
    text = scale * 11.0 * math.exp(-step / 10) + 0.2
    audio = sum(cb) / N_CB
    return {"loss": text + audio, "text_loss": text, "audio_loss": audio, "codebook_losses": cb,
            "codebook_acc": acc, "text_acc": min(1.0, 0.03 * step)}


def _audit(passed: bool) -> dict:
    rules = [
        {"name": "labels_not_all_masked", "passed": True, "n_failed": 0, "threshold": 0.999,
         "description": "fraction of masked label positions stays below the threshold"},
        {"name": "audio_label_coverage", "passed": passed, "n_failed": 0 if passed else 3, "threshold": 0.5,
         "description": "every codebook has learnable audio labels"},
        {"name": "no_future_leak", "passed": True, "n_failed": 0,
         "description": "changing a future token does not change earlier logits"},
    ]
    failures = [] if passed else [
        {"rule": "audio_label_coverage", "sample_id": f"LJ001-000{i}", "message": "codebook 7 coverage 0.12 < 0.5",
         "likely_cause": "delay pattern masks too many audio positions"} for i in range(1, 4)]
    return {"passed": passed, "n_samples": 28, "rules": rules, "failures": failures,
            "fractions": {"text": {"learnable": 0.31, "masked": 0.69}, "audio": {"learnable": 0.93, "masked": 0.07}},
            "codebook_coverage": [0.99 - 0.01 * k for k in range(N_CB)],
            "collator_settings": {"use_delay_pattern": True, "round_to": 8},
            "model_settings": {"audio_num_codebooks": N_CB, "use_audio_out_embed_projector": False},
            "leak_probe": {"checked": 2, "max_abs_diff": 0.0, "tolerance": 1e-4}}


@pytest.fixture
def inputs(tmp_config, lj_clips):
    """Realistic inputs for every stage the report reads (train/val/predictions/audit/eval/manifest/audio)."""
    cfg, p = tmp_config, Paths(tmp_config)
    steps = range(1, 31)
    _jsonl(p.metrics, [{"step": s, "epoch": s // 8, **_losses(s), "lr": 3e-3 * min(1.0, s / 10) * (1 - s / 40),
                        "grad_norm": 5.0 * math.exp(-s / 12) + 0.3, "n_text_targets": 40, "n_audio_targets": 1200,
                        "elapsed_s": 0.8 * s} for s in steps])
    _jsonl(p.train_dir / "val_metrics.jsonl",
           [{"step": s, **{k: v for k, v in _losses(s, 1.1).items()}} for s in (10, 20, 30)])
    preds = []
    for s in (10, 20, 30):
        lab = [" The", " Gutenberg", " Bible", ",", " printed"]
        pred = lab if s == 30 else [" The", " the", " Bible", ".", " printed"]
        preds.append({"step": s, "sample_id": "LJ001-0002", "text_acc": 1.0 if s == 30 else 0.6,
                      "codebook_acc": _losses(s)["codebook_acc"],
                      "text": {"positions": [3, 4, 5, 20, 21], "predicted": pred, "label": lab},
                      "codebooks": [{"codebook": k, "positions": [0, 1, 2, 50, 51],
                                     "predicted": [100 + k, 7, 1023, 5, 9 if s == 30 else 8],
                                     "label": [100 + k, 7, 1023, 5, 9]} for k in range(N_CB)]})
    _jsonl(p.predictions, preds)
    _json(p.train_state, {"model_source": cfg["model"]["source"], "git_revision": "abc123", "step": 30,
                          "started": "2026-01-01T00:00:00Z"})
    _json(p.audit_summary, _audit(True))
    pd.DataFrame([{"sample_id": f"LJ001-{i:04d}", "n_text_targets": 30 + i, "n_audio_targets": 900 + i,
                   "masked_fraction": 0.4, "passed": True} for i in range(1, 29)]).to_parquet(p.audit_samples)
    wav = p.root / "eval" / "samples" / "LJ001-0002.wav"
    wav.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(lj_clips[1], wav)
    _json(p.eval_metrics, {**_losses(30, 1.2), "n_samples": 4, "n_text_targets": 160, "n_audio_targets": 4800,
                           "generation": {"n_samples": 1, "wer": 0.2, "gt_wer": 0.0, "sim": 0.91},
                           "audio": [{"id": "LJ001-0002", "generated": str(wav), "reference": str(lj_clips[1]),
                                      "text": "in being comparatively modern.", "hypothesis": "in being modern",
                                      "wer": 0.2, "sim": 0.91, "gt_wer": 0.0}]})
    _json(p.fixes, {"rows_in": 40, "rows_kept": 32, "rows_quarantined": 8,
                    "fixes": {"strip_whitespace": 3, "resolve_relative_path": 32}, "reasons": {"missing_audio": 5,
                                                                                                 "too_short": 3}})
    _jsonl(p.quarantine, [{"line": 33 + i, "reason": "missing_audio", "message": "no such file <x.wav>",
                           "row": {"audio": "wavs/nope.wav", "text": "<script>alert(1)</script>"}} for i in range(5)])
    (p.adapter).mkdir(parents=True, exist_ok=True)
    (p.adapter / "adapter_config.json").write_text('{"r": 16}')
    return cfg


def _external_refs(html: str) -> list[str]:
    refs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', html)
    return [r for r in refs if not (r.startswith("data:") or r.startswith("#"))]


def test_report_self_contained_with_provenance(inputs, repo_root):
    out = build_report(inputs)
    p = Paths(inputs)
    assert out == p.report and out.is_file()
    assert [f.name for f in out.parent.iterdir() if f.suffix == ".html"] == ["report.html"]
    html = out.read_text()
    assert _external_refs(html) == []
    assert "url(" not in html and "@import" not in html
    assert html.count('src="data:image/png;base64,') >= 5
    assert re.search(r'<audio[^>]*src="data:audio/wav;base64,', html)
    assert "generation.wer" in html and "<th>hypothesis</th><td>in being modern</td>" in html
    assert "id=\"random-init-banner\"" in html and "not speech" in html
    assert inputs["report"]["title"] in html and "PASSED" in html
    for f in (p.metrics, p.train_dir / "val_metrics.jsonl", p.predictions, p.audit_summary, p.audit_samples,
              p.eval_metrics, p.fixes, p.quarantine, p.adapter / "adapter_config.json"):
        assert _sha(f)[:12] in html, f
    assert _sha(p.metrics)[:12] in re.search(r"<figcaption>.*?</figcaption>", html, re.S).group(0)
    assert str(p.metrics) in html
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True).stdout.strip()
    assert head and head in html
    assert "&lt;script&gt;" in html and "<script>alert" not in html  # autoescape
    assert "Gutenberg" in html and 'class="miss"' in html


def test_pretrained_has_no_banner_and_failed_audit(inputs):
    inputs["model"]["source"] = "pretrained"
    p = Paths(inputs)
    _json(p.train_state, {"model_source": "pretrained"})
    _json(p.audit_summary, _audit(False))
    html = build_report(inputs).read_text()
    assert "random-init-banner" not in html
    assert "FAILED" in html and "audio_label_coverage" in html and "likely_cause" in html


def test_optional_inputs_missing_show_not_produced(inputs):
    p = Paths(inputs)
    for f in (p.predictions, p.fixes, p.quarantine, p.train_state, p.audit_samples, p.train_dir / "val_metrics.jsonl"):
        f.unlink()
    shutil.rmtree(p.root / "eval" / "samples")
    html = build_report(inputs).read_text()
    assert "not produced" in html
    assert html.count("<audio") == 1  # the generated clip is gone, the reference is still embedded
    assert "generated: <span" in html


@pytest.mark.parametrize("attr,stage", [("metrics", "train"), ("audit_summary", "audit"), ("eval_metrics", "eval")])
def test_missing_required_input_raises(inputs, attr, stage):
    path = getattr(Paths(inputs), attr)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))) as err:
        build_report(inputs)
    assert stage in str(err.value)


def test_git_revision_outside_repo(tmp_path):
    assert "not a git repository" in git_revision(tmp_path)
