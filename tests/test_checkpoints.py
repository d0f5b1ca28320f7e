"""Checkpoints compared (issue 18 item 2): the adapter snapshots training writes, the steps
eval.checkpoints resolves to, the selection (eval.select), the export of the selected checkpoint,
and early stopping (train.patience)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_tune import data as D
from higgs_tune.select import SelectionError, checkpoint_steps, select, selection_rows

from conftest import stage_train_inputs

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ selection, planted
def _row(step, loss, wer=None, final=False):
    m = {"loss": loss, "text_loss": loss / 2, "n_samples": 4, "elapsed_s": 1.0, "codebook_acc": [0.1] * 8}
    if wer is not None:
        m["generation"] = {"wer": wer, "sim": 1 - wer, "cer": None, "flagged": []}
    return {"step": step, "final": final, "metrics": m}


def test_selection_min_max_ties_earliest_skipped_ignored():
    rows = [_row(2, 3.0, 0.5), _row(4, 2.31, 0.4), {"step": 6, "final": False, "skipped": "not saved"},
            _row(8, 2.31, 0.3, final=True)]
    got = select(rows, "loss", "min")
    assert got["selected_step"] == 4 and not got["final"] and got["value"] == 2.31  # tie with 8: the earlier
    assert got["reason"].startswith("lowest val loss (2.31) of 3 checkpoints: steps 2, 4, 8")
    assert "skipped: step 6 (not saved)" in got["reason"]
    assert [r["step"] for r in got["steps"]] == [2, 4, 6, 8] and got["steps"][2] == {"step": 6, "final": False,
                                                                                      "skipped": "not saved"}
    assert got["steps"][1]["generation.wer"] == 0.4 and "n_samples" not in got["steps"][1]
    best_wer = select(rows, "generation.wer", "min")
    assert best_wer["selected_step"] == 8 and best_wer["final"]
    assert select(rows, "generation.sim", "max")["selected_step"] == 8
    assert select(rows, "loss", "max")["selected_step"] == 2
    # a skipped row whose step is the best by its own (absent) scores is never selected
    assert select([_row(2, 1.0), {"step": 4, "skipped": "x"}], "loss", "min")["selected_step"] == 2


def test_selection_errors_name_the_metric_and_the_keys():
    rows = [_row(2, 3.0), _row(4, 2.0, final=True)]
    with pytest.raises(SelectionError, match=r"'generation.wer' is not a number.*keys that are: audio_loss|"
                                             r"'generation.wer' is not a number.*loss, text_loss"):
        select(rows, "generation.wer", "min")
    with pytest.raises(SelectionError, match="mode is 'lowest': use min or max"):
        select(rows, "loss", "lowest")
    with pytest.raises(SelectionError, match="every step skipped"):
        select([{"step": 2, "skipped": "x"}], "loss", "min")


def test_selection_rows_take_the_final_step_from_state():
    final = {"loss": 1.0}
    rows = selection_rows(final, {"step": 6, "stopped_early": {"step": 6}},
                          [{"step": 2, "loss": 2.0}, {"step": 6, "loss": 9.0}, {"step": 8, "skipped": "not saved"}])
    assert rows == [{"step": 6, "final": True, "metrics": final}, {"step": 2, "final": False, "metrics":
                                                                    {"step": 2, "loss": 2.0}},
                    {"step": 8, "final": False, "skipped": "not saved"}]


def test_checkpoint_steps_every_list_and_errors():
    def cfg(checkpoints, max_steps=8, save_interval=2):
        return {"eval": {"checkpoints": checkpoints}, "train": {"save_interval": save_interval, "max_steps": max_steps}}

    assert checkpoint_steps(cfg(None)) == []
    assert checkpoint_steps(cfg("every")) == [2, 4, 6]  # the last step is the final adapter's
    assert checkpoint_steps(cfg("every", max_steps=7)) == [2, 4, 6]
    assert checkpoint_steps(cfg([6, 2, 8])) == [2, 6]
    assert checkpoint_steps(cfg([7], max_steps=7)) == []
    with pytest.raises(SelectionError, match="every needs train.max_steps.*train.epochs"):
        checkpoint_steps(cfg("every", max_steps=None))
    assert checkpoint_steps(cfg([4, 10], max_steps=None)) == [4, 10]  # epochs: known when training runs
    with pytest.raises(SelectionError, match=r"step\(s\) \[3\] that are not save steps.*save_interval = 2"):
        checkpoint_steps(cfg([2, 3]))
    with pytest.raises(SelectionError, match=r"\[10\] past train.max_steps \(8\)"):
        checkpoint_steps(cfg([10]))


def _snakemake_n(tmp_path, *overlay_lines, target="export"):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("\n".join(overlay_lines) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "workflow")}
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", target, "--configfile", "config/demo.yaml",
                           str(overlay), "--config", f"results_dir={tmp_path}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_dry_run_plans_one_evaluate_step_job_per_save_step(tmp_path):
    """eval.checkpoints every, 8 steps saved every 2: evaluate_step jobs for 2, 4, 6 (8 is the final
    adapter's, scored by evaluate), select reads them, export merges its choice. A listed step that is
    no save step fails the plan, naming the keys."""
    run = _snakemake_n(tmp_path, "eval: {checkpoints: every}", "train: {max_steps: 8, save_interval: 2}")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    steps = sorted(int(line.split("--step ")[1].split()[0]) for line in out.splitlines() if "--step " in line)
    assert steps == [2, 4, 6]
    for s in (2, 4, 6):
        assert f"--adapter {tmp_path}/demo/train/steps/step-{s:08d} --step {s}" in out
        assert f"--metrics {tmp_path}/demo/eval/steps/{s}/metrics.json" in out
    assert (f"--steps {tmp_path}/demo/eval/steps/2/metrics.json {tmp_path}/demo/eval/steps/4/metrics.json "
            f"{tmp_path}/demo/eval/steps/6/metrics.json --selection {tmp_path}/demo/eval/selection.json") in out
    assert f"--selection {tmp_path}/demo/eval/selection.json --steps {tmp_path}/demo/train/steps" in out
    bad = _snakemake_n(tmp_path, "eval: {checkpoints: [3]}", "train: {max_steps: 8, save_interval: 2}")
    assert bad.returncode != 0 and "not save steps" in bad.stderr + bad.stdout


# ------------------------------------------------------------------- a real run, selected, exported
@pytest.mark.slow
def test_a_middle_checkpoint_with_the_lowest_val_loss_is_selected_and_exported(tmp_config, tmp_path, short_codes,
                                                                                transcripts, lj_dir):
    """6 real steps on real clips, the learning rate rising to a peak so high at the end (warmup 5)
    that the val loss is lowest at step 4 of the snapshots 2, 4, 6. The stage CLIs run as the rules
    render them: evaluate_base, evaluate of the final adapter, evaluate --step for 2 and 4 (and for
    a step never saved: skipped), select, export. The merged weights are base + step 4's adapter."""
    import torch
    from safetensors.torch import load_file

    from higgs_tune import evaluate, evaluate_base, export
    from higgs_tune import select as S
    from higgs_tune.model import build_model
    from higgs_tune.train import train

    cfg = tmp_config
    cfg["train"].update(max_steps=6, batch_size=1, grad_accum_steps=1, warmup_steps=5, learning_rate=0.3,
                        eval_interval=2, save_interval=2, predictions_interval=100, keep_checkpoints=1)
    cfg["eval"].update(checkpoints="every", generate={**cfg["eval"]["generate"], "n_samples": 0})
    io = stage_train_inputs(tmp_path / "exp", short_codes, transcripts, lj_dir, audit_passed=True)
    train(cfg, io)
    # the snapshots of every save step survive keep_checkpoints=1; the last one is the final adapter
    assert sorted(p.name for p in io.steps.iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]
    assert load_file(str(io.steps / "step-00000006" / "adapter_model.safetensors")).keys() == \
        load_file(str(io.adapter / "adapter_model.safetensors")).keys()

    ev, cj = tmp_path / "exp" / "eval", ["--config-json", json.dumps(cfg)]
    common = ["--val", str(io.val), "--index", str(io.index)]
    evaluate_base.main(cj + common + ["--metrics", str(ev / "base/metrics.json"), "--generated",
                                      str(ev / "base/generated.jsonl"), "--audio", str(ev / "base/audio")])

    def outs(d):
        return ["--base-generated", str(ev / "base/generated.jsonl"), "--metrics", str(d / "metrics.json"),
                "--generated", str(d / "generated.jsonl"), "--audio", str(d / "audio"), "--paired",
                str(d / "paired.jsonl"), "--paired-summary", str(d / "paired.json")]

    evaluate.main(cj + common + ["--adapter", str(io.adapter)] + outs(ev))
    steps = S.checkpoint_steps(cfg)
    assert steps == [2, 4]
    for s in steps + [5]:  # 5: no snapshot (not a save step of this run): its metrics say skipped
        evaluate.main(cj + common + ["--adapter", str(io.steps / f"step-{s:08d}"), "--step", str(s)]
                      + outs(ev / "steps" / str(s)))
    skipped = json.loads((ev / "steps/5/metrics.json").read_text())
    assert skipped["step"] == 5 and "not saved" in skipped["skipped"]

    losses = {s: json.loads((ev / "steps" / str(s) / "metrics.json").read_text())["loss"] for s in steps}
    losses[6] = json.loads((ev / "metrics.json").read_text())["loss"]
    # the precondition, from the scores the selection reads: lowest at the middle checkpoint
    assert min(losses, key=losses.get) == 4, losses
    # the in-training val pass agrees with the evaluate stage on the same val set
    val = {r["step"]: r["loss"] for r in D.read_jsonl(io.val_metrics)}
    assert val[4] == pytest.approx(losses[4], rel=1e-4) and val[6] == pytest.approx(losses[6], rel=1e-4)

    selection = ev / "selection.json"
    S.main(["--config-json", json.dumps({"eval": {"select": cfg["eval"]["select"]}}), "--final",
            str(ev / "metrics.json"), "--state", str(io.state), "--steps"]
           + [str(ev / "steps" / str(s) / "metrics.json") for s in steps + [5]] + ["--selection", str(selection)])
    sel = json.loads(selection.read_text())
    assert sel["selected_step"] == 4 and not sel["final"] and sel["metric"] == "loss"
    assert sel["value"] == losses[4] and sel["reason"].startswith(
        f"lowest val loss ({losses[4]:.4g}) of 3 checkpoints: steps 2, 4, 6; skipped: step 5")

    merged = tmp_path / "merged"
    export.main(["--config-json", json.dumps({"model": cfg["model"]}), "--selection", str(selection), "--steps",
                 str(io.steps), "--adapter", str(io.adapter), "--merged", str(merged)])
    record = json.loads((merged / "higgs_tune_export.json").read_text())
    assert record["step"] == 4 and record["adapter"] == str(io.steps / "step-00000004")
    assert record["selection"] == sel["reason"]

    # the merged weights, computed here from the base and step 4's snapshot: W + B A alpha / r, the head copied
    weights = load_file(str(merged / "model.safetensors"))
    base = dict(build_model(cfg["model"], torch.float32, "cpu").named_parameters())
    scale = cfg["lora"]["alpha"] / cfg["lora"]["rank"]

    def merged_by_hand(snapshot):
        ad = load_file(str(snapshot / "adapter_model.safetensors"))
        prefix = "base_model.model."
        name = "layers.0.self_attn.q_proj"
        a, b = ad[f"{prefix}{name}.lora_A.weight"], ad[f"{prefix}{name}.lora_B.weight"]
        head = next(v for k, v in ad.items() if k.endswith("audio_lm_head.weight"))
        return base[f"{name}.weight"].detach() + scale * b @ a, head

    q4, head4 = merged_by_hand(io.steps / "step-00000004")
    q6, head6 = merged_by_hand(io.adapter)
    head_key = next(k for k in weights if k.endswith("audio_lm_head.weight"))
    assert (weights["layers.0.self_attn.q_proj.weight"] - q4).abs().max() < 1e-5
    assert (weights[head_key] == head4).all()
    assert (q6 - q4).abs().max() > 1e-3 and not (head6 == head4).all()  # the final adapter would differ


# ------------------------------------------------------------------------------ early stopping
def test_patience_stops_where_val_loss_stops_improving_and_a_resume_keeps_the_counter(tmp_config, tmp_path,
                                                                                       short_codes, transcripts,
                                                                                       lj_dir):
    """A learning rate rising to 1.0 (warmup 5 of 6 steps) makes the val loss worse at every pass
    after step 1. patience 1 stops at step 2; raised to 3 (a length key: it continues from the
    checkpoint of step 2, the same trajectory), the run stops at step 4: two more passes without
    improvement, which stop it only because the counter (1 at step 2) was kept. Its adapter and
    the last snapshot are step 4's."""
    from higgs_tune.train import train

    cfg = tmp_config
    cfg["train"].update(max_steps=6, batch_size=1, grad_accum_steps=1, warmup_steps=5, learning_rate=1.0,
                        eval_interval=1, save_interval=2, predictions_interval=100, patience=1)
    io = stage_train_inputs(tmp_path / "exp", short_codes, transcripts, lj_dir, audit_passed=True)
    train(cfg, io)
    val = [r["loss"] for r in D.read_jsonl(io.val_metrics)]
    state = json.loads(io.state.read_text())
    assert len(val) == 2 and val[1] >= val[0], val  # the precondition: step 2 did not improve on step 1
    assert state["step"] == 2 and state["finished"]
    assert state["stopped_early"] == {"step": 2, "best_step": 1, "best_val_loss": val[0], "patience": 1}
    assert [r["step"] for r in D.read_jsonl(io.metrics)] == [1, 2]
    assert sorted(p.name for p in io.steps.iterdir()) == ["step-00000002"]

    cfg["train"]["patience"] = 3
    train(cfg, io)
    val = {r["step"]: r["loss"] for r in D.read_jsonl(io.val_metrics)}
    state = json.loads(io.state.read_text())
    assert state["resumed_at_step"] == 2
    assert list(val) == [1, 2, 3, 4] and min(val, key=val.get) == 1, val  # no pass improved on step 1
    assert state["stopped_early"] == {"step": 4, "best_step": 1, "best_val_loss": val[1], "patience": 3}
    assert state["step"] == 4 and [r["step"] for r in D.read_jsonl(io.metrics)] == [1, 2, 3, 4]
    assert sorted(p.name for p in io.steps.iterdir()) == ["step-00000002", "step-00000004"]


def test_report_names_the_selected_checkpoint_and_draws_the_steps(tmp_path, demo_config):
    """The report's checkpoint section from a selection.json: the reason, one table row per step
    (the skipped one with why), the figure; nothing without a selection."""
    from higgs_tune import report as R

    rows = [_row(2, 3.0, 0.5), _row(4, 2.31, 0.4), {"step": 6, "final": False, "skipped": "not saved"},
            _row(8, 2.6, 0.3, final=True)]
    path = tmp_path / "selection.json"
    path.write_text(json.dumps(select(rows, "loss", "min")))
    inputs = R.Inputs(demo_config)
    inputs.add("selection", path)
    got = R.checkpoints_section(json.loads(path.read_text()), inputs)
    assert got["selected_step"] == 4 and got["reason"].startswith("lowest val loss (2.31) of 3 checkpoints")
    table = got["table"]
    assert [r[table["columns"].index("step")] for r in table["rows"]] == ["2", "4", "6", "8"]
    assert table["rows"][1][table["columns"].index("selected")] == "◀ selected"
    assert table["rows"][2][table["columns"].index("skipped")] == "not saved"
    assert {"loss", "generation.wer", "generation.sim"} <= set(table["columns"])
    assert got["figure"]["uri"].startswith("data:image/png;base64,") and "selection.json" in got["figure"]["caption"]
    assert R.checkpoints_section(None, inputs) is None
