"""Training: health alarms fire with their named cause; the model learns next-token targets (not
copies); the training entry point runs, logs the output contract and refuses a failed audit."""

from __future__ import annotations

import json

import pytest
import torch

from higgs_tune import health
from higgs_tune import data as D
from higgs_tune.loss import count_targets, forward_loss, higgs_loss, shifted_audio_targets
from higgs_tune.model import apply_lora

from conftest import ROOT, SHORT, stage_train_inputs, tts_row


@pytest.fixture
def real_batch(short_codes, transcripts, text_tokenizer, tiny_model, lj_dir):
    rows = [tts_row(c, transcripts[c], short_codes[c][0], lj_dir) for c in SHORT[:2]]
    by_sha = {sha: codes for sha, codes in short_codes.values()}
    collator = D.make_collator(tiny_model.config)
    return collator([D.build_dataset_sample(r, text_tokenizer, by_sha.__getitem__) for r in rows])


def test_collating_twice_keeps_audio_labels(real_batch, short_codes, transcripts, text_tokenizer, tiny_model, lj_dir):
    """Upstream's collator masks label_ids in place; re-collating (epoch 2) must not erase audio labels."""
    by_sha = {sha: codes for sha, codes in short_codes.values()}
    samples = [D.build_dataset_sample(tts_row(c, transcripts[c], short_codes[c][0], lj_dir), text_tokenizer,
                                      by_sha.__getitem__) for c in SHORT[:2]]
    collator = D.make_collator(tiny_model.config)
    first, second = collator(samples), collator(samples)
    assert torch.equal(first.label_audio_ids, second.label_audio_ids)
    assert int((second.label_audio_ids != -100).sum()) > 0


def test_alarm_non_finite_loss():
    with pytest.raises(health.NonFiniteLoss, match="non-finite"):
        health.check_loss(torch.tensor(float("nan"), requires_grad=True) * 1.0)


def test_alarm_loss_rebuilt_from_item(real_batch, tiny_model):
    model = apply_lora(tiny_model, {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"],
                                    "modules_to_save": []})
    _, loss = forward_loss(model, real_batch, "cpu", text_weight=1.0, audio_weight=1.0)
    health.check_loss(loss.loss)  # the real loss is fine
    with pytest.raises(health.LossWithoutGrad, match=r"\.item\(\)"):
        health.check_loss(torch.tensor(loss.loss.item()))


def test_alarm_zero_targets(real_batch):
    real_batch.label_ids[:] = -100
    real_batch.label_audio_ids[:] = -100
    c = count_targets(real_batch.label_ids, real_batch.label_audio_ids, real_batch.audio_out_ids_start)
    with pytest.raises(health.NoLearnableTargets, match="over-masked"):
        health.check_targets(c.text, c.audio, step=1)


def test_alarm_wrapper_dropping_audio_kwargs(real_batch, tiny_model):
    """A wrapper that forwards only text kwargs leaves audio_logits empty: named cause + fix."""
    kwargs = D.batch_to_model_kwargs(real_batch, "cpu")
    out = tiny_model(input_ids=kwargs["input_ids"], attention_mask=kwargs["attention_mask"],
                     label_ids=kwargs["label_ids"])
    with pytest.raises(health.AudioInputsDropped, match="task_type"):
        health.check_audio_outputs(out.audio_logits, real_batch.label_audio_ids)


def test_peft_causal_lm_task_type_breaks_forward(real_batch, tiny_model):
    """The fact apply_lora relies on: peft's CAUSAL_LM wrapper does not pass Higgs' kwargs through."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(TypeError):
        forward_loss(wrapped, real_batch, "cpu", text_weight=1.0, audio_weight=1.0)


def test_alarm_audio_loss_floor():
    health.check_audio_floor(2.3, step=10, floor=0.01, check_steps=50)
    health.check_audio_floor(0.001, step=80, floor=0.01, check_steps=50)  # late: allowed
    with pytest.raises(health.AudioLossBelowFloor, match="leak"):
        health.check_audio_floor(0.004, step=10, floor=0.01, check_steps=50)


def test_alarm_zero_lora_gradient(real_batch, tiny_model):
    model = apply_lora(tiny_model, {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"],
                                    "modules_to_save": []})
    out, loss = forward_loss(model, real_batch, "cpu", text_weight=1.0, audio_weight=1.0)
    (out.logits.sum() * 0.0).backward()  # a loss that does not depend on the adapters
    with pytest.raises(health.ZeroLoraGradient, match="target_modules"):
        health.check_lora_grad(model, step=1)
    model.zero_grad()
    _, loss = forward_loss(model, real_batch, "cpu", text_weight=1.0, audio_weight=1.0)
    loss.loss.backward()
    assert health.check_lora_grad(model, step=1) > 0


def test_overfit_one_sample_learns_next_code_not_copy(short_codes, transcripts, text_tokenizer, tiny_model, lj_dir):
    """Overfit one real clip: teacher-forced top-1 of audio_logits[i] against the label at i+1
    reaches >= 0.95, while against the label at i (a copy of the input) it stays near chance."""
    cid = SHORT[0]
    sha, codes = short_codes[cid]
    sample = D.build_dataset_sample(tts_row(cid, transcripts[cid], sha, lj_dir), text_tokenizer, lambda h: codes)
    batch = D.make_collator(tiny_model.config)([sample, sample])
    model = apply_lora(tiny_model, {"rank": 16, "alpha": 32, "dropout": 0.0, "modules_to_save": ["audio_lm_head"],
                                    "target_modules": ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj",
                                                       "audio_mlp.up_proj"]})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(60):
        _, loss = forward_loss(model, batch, "cpu", text_weight=1.0, audio_weight=1.0)
        opt.zero_grad()
        loss.loss.backward()
        opt.step()
        if float(loss.codebook_correct.sum()) / loss.n_audio_targets > 0.99:
            break
    model.eval()
    with torch.no_grad():
        out, _ = forward_loss(model, batch, "cpu", text_weight=1.0, audio_weight=1.0)
    pred = out.audio_logits.argmax(-1)  # (N, K)
    nxt = shifted_audio_targets(batch.label_audio_ids, batch.audio_out_ids_start)
    same = batch.label_audio_ids.t()
    acc_next = (pred[nxt != -100] == nxt[nxt != -100]).float().mean().item()
    acc_same = (pred[same != -100] == same[same != -100]).float().mean().item()
    values, counts = torch.unique(codes, return_counts=True)
    majority = counts.max().item() / codes.numel()
    assert acc_next >= 0.95
    assert acc_same <= max(0.1, 2 * majority), (acc_same, majority)


# ------------------------------------------------------------------------------ the entry point
@pytest.fixture
def staged(tmp_config, tmp_path, short_codes, transcripts, lj_dir):
    """Manifest + tokens outputs for 3 short clips (train 2, val 1), written where train() reads."""
    cfg = tmp_config
    cfg["train"].update(max_steps=4, batch_size=1, grad_accum_steps=2, warmup_steps=1, eval_interval=2,
                        predictions_interval=2, save_interval=2, log_interval=1)
    return cfg, stage_train_inputs(tmp_path / "exp", short_codes, transcripts, lj_dir)


def test_train_refuses_failed_or_missing_audit(staged):
    from higgs_tune.train import AuditNotPassed, train

    cfg, io = staged
    with pytest.raises(AuditNotPassed, match="run the audit stage"):
        train(cfg, io)
    io.audit.write_text(json.dumps({"passed": False, "rules": [{"name": "text_labels_roles", "passed": False}]}))
    with pytest.raises(AuditNotPassed, match="text_labels_roles"):
        train(cfg, io)
    assert not io.metrics.exists()


def test_train_writes_the_output_contract(staged):
    from higgs_tune.train import train

    cfg, io = staged
    io.audit.write_text(json.dumps({"passed": True}))
    train(cfg, io)
    rows = D.read_jsonl(io.metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"loss", "text_loss", "audio_loss", "lr", "codebook_acc"} <= r.keys()
        assert len(r["codebook_losses"]) == 8 and r["n_audio_targets"] > 0
        # audio_loss is the mean of the per-codebook means (not a pooled mean over all audio targets)
        assert r["audio_loss"] == pytest.approx(sum(r["codebook_losses"]) / 8, rel=1e-9)
        assert 0 < r["text_loss"] < 20 and 0 < r["audio_loss"] < 20
        assert 0 < r["n_positions"] <= r["n_padded_positions"] and r["n_padded_positions"] % 8 == 0
        assert r["padding_efficiency"] == pytest.approx(r["n_positions"] / r["n_padded_positions"])
    assert rows[0]["lr"] > 0 and rows[-1]["lr"] < rows[1]["lr"]  # warmup 1 step, then cosine decay
    assert (io.adapter / "adapter_model.safetensors").exists()
    assert (io.adapter / "adapter_config.json").exists()
    state = json.loads(io.state.read_text())
    assert state["step"] == 4 and state["model_source"] == "random_init" and state["finished"]
    preds = D.read_jsonl(io.predictions)
    assert [p["step"] for p in preds] == [1, 2, 4]
    assert preds[0]["sample_id"] == f"tts-{SHORT[2]}" and len(preds[0]["codebooks"]) == 8
    assert preds[0]["text"]["label"][0] == "<|audio_out_bos|>"
    assert [v["step"] for v in D.read_jsonl(io.val_metrics)] == [2, 4]


# --------------------------------------------------------- the LR schedule, resuming, checkpoints
def _passed(staged):
    cfg, io = staged
    io.audit.write_text(json.dumps({"passed": True}))
    return cfg, io


def _lora_b(path):
    from safetensors.torch import load_file

    return {n: t for n, t in load_file(str(path / "trainable.safetensors")).items() if "lora_B" in n}


def test_first_step_with_warmup_moves_lora_b_and_rows_log_the_lr_used(staged):
    """LoRA B starts at zero: step 1 must be applied with lr > 0 (not the warmup's lr 0) to move it;
    each row's lr is the lr its step ran at: peak x k / (warmup + 1) in the warmup, the peak, the cosine."""
    from higgs_tune.train import train

    cfg, io = _passed(staged)
    cfg["train"].update(max_steps=4, warmup_steps=2, save_interval=1, keep_checkpoints=4)
    train(cfg, io)
    root = __import__("pathlib").Path(json.loads(io.state.read_text())["resume_dir"])
    first = _lora_b(root / "step-00000001")
    assert first and any(bool(t.abs().sum() > 0) for t in first.values())
    peak, rows = cfg["train"]["learning_rate"], D.read_jsonl(io.metrics)
    assert [r["lr"] for r in rows[:3]] == pytest.approx([peak / 3, 2 * peak / 3, peak])
    assert peak > rows[3]["lr"] > 0


def test_warmup_as_long_as_the_run_is_refused_naming_both(staged):
    from higgs_tune.train import ScheduleError, train

    cfg, io = _passed(staged)
    cfg["train"].update(max_steps=3, warmup_steps=7)
    with pytest.raises(ScheduleError, match=r"warmup_steps \(7\) >= the run's optimizer steps \(3\)"):
        train(cfg, io)
    # by epochs: 2 samples, batch 1 x accumulation 2 = 1 step per epoch; 2 epochs = 2 steps
    cfg["train"].update(max_steps=None, epochs=2, warmup_steps=2)
    with pytest.raises(ScheduleError, match=r"\(2\) >= the run's optimizer steps \(2\)"):
        train(cfg, io)
    assert not io.metrics.exists()


def test_float16_training_is_refused_clearly(staged):
    from higgs_tune.train import UnsupportedDtype, main

    cfg, io = _passed(staged)
    cfg["model"]["dtype"] = "float16"
    args = ["--config-json", json.dumps(cfg)] + [a for f, p in vars(io).items()
                                                  for a in ("--" + f.replace("_", "-"), str(p))]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2  # EXIT_REFUSED
    from higgs_tune.train import train

    with pytest.raises(UnsupportedDtype, match="float16.*loss scaling.*bfloat16"):
        train(cfg, io)
    assert not io.metrics.exists()


def test_raising_max_steps_continues_from_the_checkpoint(staged, caplog):
    """A finished 2-step run made 4 steps long (and its logging/eval/checkpoint intervals edited, which
    do not identify the trajectory) resumes at step 2: the first rows stay as they were, the LR plan
    is re-planned from there and recorded in state.json. Shorter than the checkpoint: a clear error."""
    import logging

    from higgs_tune.train import ScheduleError, train

    cfg, io = _passed(staged)
    cfg["train"].update(max_steps=2, warmup_steps=1, save_interval=2, eval_interval=2)
    train(cfg, io)
    before = D.read_jsonl(io.metrics)
    first_state = json.loads(io.state.read_text())
    assert [r["step"] for r in before] == [1, 2] and len(first_state["schedule"]["segments"]) == 1
    cfg["train"].update(max_steps=4, log_interval=3, eval_interval=1, predictions_interval=3, keep_checkpoints=3)
    cfg["eval"]["batch_size"] = 1
    with caplog.at_level(logging.INFO, logger="higgs_tune.train"):
        train(cfg, io)
    assert "resumed from" in caplog.text and "re-planned from step 2" in caplog.text
    rows = D.read_jsonl(io.metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[:2] == before
    state = json.loads(io.state.read_text())
    assert state["resumed_at_step"] == 2 and state["finished"] and state["max_steps"] == 4
    assert state["resume_dir"] == first_state["resume_dir"]  # the same trajectory, the same checkpoints
    segs = state["schedule"]["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segs] == [(0, 2), (2, 4)]
    # the LR continues from the one step 2 ran at and decays, never back up to the peak
    assert rows[1]["lr"] >= rows[2]["lr"] > rows[3]["lr"] > 0
    assert [v["step"] for v in D.read_jsonl(io.val_metrics)] == [2, 3, 4]
    cfg["train"]["max_steps"] = 3
    with pytest.raises(ScheduleError, match="run is now 3 optimizer steps.*checkpoint is at step 4"):
        train(cfg, io)


def test_resume_fingerprint_hashes_the_train_rules_code_signature(tmp_config, tmp_path, monkeypatch):
    """The resume fingerprint's code is the train rule's code signature (codesig.code_sig of the train
    package's import closure; the rule adds only launch.py, which starts the processes and is not in the
    closure): a code edit that reruns the rule also starts training from step 0."""
    import types

    from higgs_tune import codesig
    from higgs_tune.train import run_fingerprint

    io = types.SimpleNamespace(**{k: tmp_path / k for k in ("train", "val", "index")})
    for p in vars(io).values():
        p.write_text(p.name)
    calls, real = [], codesig.code_sig
    monkeypatch.setattr(codesig, "code_sig", lambda *m, **kw: calls.append(m) or real(*m, **kw))
    fp = run_fingerprint(tmp_config, io, 1)
    assert calls == [("train",)]
    monkeypatch.setattr(codesig, "code_sig", lambda *m, **kw: real(*m, **kw)[::-1])
    assert run_fingerprint(tmp_config, io, 1) != fp
    assert 'code=rule_code("train")' in (ROOT / "workflow" / "rules" / "train.smk").read_text()
    assert codesig.RULE_MODULES["train"] == ("train", "launch")
    assert "launch" not in codesig.modules("train")


def test_torn_newest_checkpoint_falls_back_to_the_previous(staged, caplog):
    """A save killed mid-write leaves a temp folder (removed on the next run) and a newest checkpoint
    with a truncated file: the rerun says so, resumes from the previous checkpoint, drops the torn one
    when it saves and ends with the same curve."""
    import logging
    from pathlib import Path

    from higgs_tune.train import train
    from higgs_tune.train.checkpoint import MANIFEST, verify

    cfg, io = _passed(staged)
    cfg["train"].update(max_steps=4, save_interval=2, keep_checkpoints=2)
    train(cfg, io)
    before = D.read_jsonl(io.metrics)
    root = Path(json.loads(io.state.read_text())["resume_dir"])
    assert sorted(p.name for p in root.iterdir() if p.name != "adapters") == ["step-00000002", "step-00000004"]  # adapters/: the snapshots
    newest = root / "step-00000004"
    assert verify(newest) is None and (newest / MANIFEST).is_file()
    weights = newest / "trainable.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert "trainable.safetensors has" in verify(newest)
    stale = root / ".step-00000006.tmp"
    (stale / "logs").mkdir(parents=True)
    cfg["train"]["save_interval"] = 1  # a checkpointing key: the same checkpoints resume
    with caplog.at_level(logging.INFO, logger="higgs_tune.train"):
        train(cfg, io)
    assert f"checkpoint {newest} is incomplete (trainable.safetensors has" in caplog.text
    assert f"resumed from {root / 'step-00000002'} at step 2" in caplog.text
    assert not stale.exists() and verify(newest) is None  # step 4 written again, whole
    # the save at step 3 dropped the torn step 4 (past it) and kept the newest 2
    assert sorted(p.name for p in root.iterdir() if p.name != "adapters") == ["step-00000003", "step-00000004"]
    rows = D.read_jsonl(io.metrics)
    drop = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    assert drop(rows) == drop(before)
