"""Fault-injection tests of the label audit gate (higgs_tune.audit).

The data are the 40 real demo samples (32 TTS + 8 voice cloning, real LJSpeech transcripts, the real
Llama-3.2 text tokenizer). Two short clips are encoded with the demo random-init Higgs audio
tokenizer; the others get random codes in [0, 1023] of the clip's real length (25 frames/s): the
codec content is irrelevant to label layout. Every fault builds the faulty pipeline for real (a
collator, a loss wiring, a model wrapper, cached codes) and asserts the gate fails with the named rule.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from higgs_tune import audit as A
from higgs_tune import data as D
from higgs_tune import loss as L

ENCODED = ("LJ001-0008.wav", "LJ001-0002.wav")  # the two shortest clips go through the real audio tokenizer


# ------------------------------------------------------------------------------------------ fixtures
def _url_sha(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


@pytest.fixture(scope="module")
def demo_rows(repo_root) -> list[dict]:
    """The demo manifest's 40 ChatML rows, with misc.audio_sha256 (url -> content key) filled in."""
    rows = D.read_jsonl(repo_root / "data" / "demo" / "manifest.jsonl")
    for r in rows:
        r["misc"]["audio_sha256"] = {c["audio_url"]: _url_sha(c["audio_url"]) for _, _, c in D.audio_items(r)}
    return rows


@pytest.fixture(scope="module")
def demo_codes(repo_root, demo_rows, audio_tokenizer) -> dict[str, np.ndarray]:
    """sha -> (8, T) int64 codes: real codec output for ENCODED, random codes of the real length otherwise."""
    rng = np.random.default_rng(0)
    codes = {}
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny codec on a shared 2-core box: thread sync dominates
    try:
        for r in demo_rows:
            for _, _, c in D.audio_items(r):
                url, sha = c["audio_url"], r["misc"]["audio_sha256"][c["audio_url"]]
                if sha in codes:
                    continue
                path = repo_root / "data" / "demo" / url
                if path.name in ENCODED:
                    wv, sr = sf.read(str(path), dtype="float32")
                    codes[sha] = audio_tokenizer.encode(wv, sr=sr).cpu().numpy().astype(np.int64)
                else:
                    n = max(1, int(round(sf.info(str(path)).duration * 25)))
                    codes[sha] = rng.integers(0, 1024, size=(8, n), dtype=np.int64)
    finally:
        torch.set_num_threads(saved)
    assert sum(1 for c in codes.values() if c.shape[0] == 8) == 32
    return codes


@dataclasses.dataclass
class Experiment:
    """A config and the files of one experiment under ``root`` (what the audit rule renders as paths)."""

    cfg: dict
    root: Path

    @property
    def train(self) -> Path:
        return self.root / "manifest" / "train.jsonl"

    @property
    def val(self) -> Path:
        return self.root / "manifest" / "val.jsonl"

    @property
    def index(self) -> Path:
        return self.root / "tokens" / "index.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "audit" / "summary.json"

    @property
    def samples(self) -> Path:
        return self.root / "audit" / "samples.parquet"

    def with_audit(self, **audit) -> "Experiment":
        """The same files with other ``audit:`` keys."""
        cfg = copy.deepcopy(self.cfg)
        cfg["audit"].update(audit)
        return Experiment(cfg, self.root)

    def cli_paths(self) -> list[str]:
        return ["--train", str(self.train), "--val", str(self.val), "--index", str(self.index),
                "--summary", str(self.summary), "--samples", str(self.samples)]


def run_audit(exp: Experiment, *, write: bool = False, **kw) -> dict:
    """``A.run_audit`` on the experiment's files; ``write`` also writes its summary and samples."""
    out = {"summary_path": exp.summary, "samples_path": exp.samples} if write else {}
    return A.run_audit(exp.cfg, train_manifest=exp.train, val_manifest=exp.val, tokens_index=exp.index, **out, **kw)


@pytest.fixture(scope="module")
def base_cfg(demo_config) -> dict:
    return copy.deepcopy(demo_config)


@pytest.fixture(scope="module")
def exp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit")


def make_experiment(cfg: dict, root: Path, rows: list[dict], codes: dict[str, np.ndarray], *, n_val: int = 5,
                    **audit) -> Experiment:
    """Write kept manifests + a tokens index (audio_sha256, codes_path) under ``root``; the experiment."""
    cfg = copy.deepcopy(cfg)
    cfg["audit"] = {**cfg.get("audit", {}), **audit}
    exp = Experiment(cfg, root)
    D.write_jsonl(exp.train, rows[:-n_val] if n_val else rows)
    D.write_jsonl(exp.val, rows[-n_val:] if n_val else [])
    code_dir = exp.index.parent / "codes"
    code_dir.mkdir(parents=True, exist_ok=True)
    recs = []
    for sha, c in codes.items():
        p = code_dir / f"{sha}.npy"
        np.save(p, c)
        recs.append({"audio_sha256": sha, "codes_path": str(p), "n_frames": int(c.shape[1])})
    import pandas as pd

    pd.DataFrame(recs).to_parquet(exp.index, index=False)
    return exp


@pytest.fixture(scope="module")
def demo_cfg(base_cfg, exp_root, demo_rows, demo_codes) -> Experiment:
    return make_experiment(base_cfg, exp_root / "demo", demo_rows, demo_codes)


@pytest.fixture(scope="module")
def data_cfg(demo_cfg) -> Experiment:
    """The demo experiment with the leak probe off: for faults in the data tensors (the probe is tested apart)."""
    return demo_cfg.with_audit(leak_probe=False)


@pytest.fixture(scope="module")
def shared_model(demo_config):
    """One tiny random-init Higgs model for the tests that inject a loss wiring or a collator."""
    from higgs_tune.model import build_model

    return build_model(demo_config["model"], torch.float32, "cpu")


def failed_rules(summary: dict) -> set[str]:
    return {r["name"] for r in summary["rules"] if not r["passed"]}


def assert_fires(summary: dict, rule: str, cause_contains: str | None = None) -> None:
    assert not summary["passed"], "the gate passed a faulty pipeline"
    assert rule in failed_rules(summary), f"{rule} did not fire; failed: {sorted(failed_rules(summary))}"
    fs = [f for f in summary["failures"] if f["rule"] == rule]
    assert fs and all(f["sample_id"] and f["message"] and f["likely_cause"] for f in fs)
    if cause_contains:
        assert any(cause_contains in f["likely_cause"] for f in fs), [f["likely_cause"] for f in fs]


class FaultyCollator:
    """The production collator with a fault applied to each batch it returns (attributes delegate)."""

    def __init__(self, inner, fault):
        self.inner, self.fault = inner, fault

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, samples):
        batch = self.inner(samples)
        self.fault(batch)
        return batch


def collator_with(model_config, fault, **overrides):
    return FaultyCollator(D.make_collator(model_config, **overrides), fault)


def audit_with_fault(data_cfg, model, text_tokenizer, fault) -> dict:
    """The audit summary when the collated batches pass through ``fault`` (no files written)."""
    return run_audit(data_cfg, collator=collator_with(model.config, fault), model=model, text_tokenizer=text_tokenizer)


def _segments(batch):
    n = batch.label_audio_ids.shape[1]
    st = batch.audio_out_ids_start.tolist() + [n]
    return list(zip(st[:-1], st[1:]))


# ----------------------------------------------------------------------------------- loss wirings
def make_wiring(text_shift: int, audio_shift: int, respect_segments: bool = True):
    """A loss wiring with the signature of loss.higgs_loss; shift 1 is correct, 0 leaks, 2 is a double shift."""

    def wiring(logits, expanded_labels, audio_logits, label_audio_ids, audio_out_ids_start, **_):
        b, t, v = logits.shape
        if text_shift:
            lg, lb = logits[:, :-text_shift], expanded_labels[:, text_shift:]
        else:
            lg, lb = logits, expanded_labels
        lg, lb = lg.reshape(-1, v), lb.reshape(-1)
        ok = lb != -100
        n_text = int(ok.sum())
        text = F.cross_entropy(lg[ok], lb[ok], reduction="sum") / max(n_text, 1) if n_text else logits.new_zeros(())
        k = label_audio_ids.shape[0]
        cb = torch.zeros(k)
        n_cb = torch.zeros(k, dtype=torch.long)
        n = label_audio_ids.shape[1]
        if n:
            tgt = torch.full((n, k), -100, dtype=torch.long)
            s = audio_shift
            if n > s:
                tgt[: n - s] = label_audio_ids[:, s:].t()
            if respect_segments and s:
                seg = torch.zeros(n, dtype=torch.long)
                seg[audio_out_ids_start[audio_out_ids_start > 0]] = 1
                seg = seg.cumsum(0)
                same = torch.zeros(n, dtype=torch.bool)
                same[: n - s] = seg[: n - s] == seg[s:]
                tgt[~same] = -100
            for kk in range(k):
                m = tgt[:, kk] != -100
                n_cb[kk] = int(m.sum())
                if n_cb[kk]:
                    cb[kk] = F.cross_entropy(audio_logits[m, kk].float(), tgt[m, kk])
        return L.HiggsLoss(loss=text + cb.mean(), text_loss=text, audio_loss=cb.mean(), codebook_losses=cb,
                           codebook_correct=torch.zeros(k, dtype=torch.long), text_correct=0, n_text_targets=n_text,
                           n_codebook_targets=n_cb, n_audio_targets=int(n_cb.sum()))

    return wiring


# ---------------------------------------------------------------------------------- the good path
@pytest.fixture(scope="module")
def good_summary(demo_cfg, text_tokenizer):
    """The production pipeline (model built and LoRA-wrapped by run_audit itself) on the demo data."""
    return run_audit(demo_cfg, text_tokenizer=text_tokenizer, write=True)


def test_correct_pipeline_passes_every_rule(good_summary, demo_cfg):
    s = good_summary
    assert s["passed"], s["failures"][:5]
    assert s["n_samples"] == 40 and s["n_samples_checked"] == 40
    assert s["n_samples_by_split"] == {"train": 35, "val": 5}
    assert all(r["passed"] for r in s["rules"])
    # the probe ran every check on the real model and loss
    probe_rules = {r["name"] for r in s["rules"] if r["scope"] == "probe"}
    assert probe_rules <= set(s["leak_probe"]["evaluated"]), probe_rules - set(s["leak_probe"]["evaluated"])
    assert s["leak_probe"]["passed"] and s["leak_probe"]["batch_size"] == 2
    assert s["leak_probe"]["model"] == "PeftModel"  # probed as training wraps it
    for rec in s["leak_probe"]["text"]:
        assert rec["delta_target_t"] <= 1e-4 < rec["delta_target_t_plus_1"]
    # coverage: with the delay pattern codebook k labels T+1 of T+K+1 columns
    assert len(s["codebook_coverage"]) == 8 and all(0.9 < c < 1 for c in s["codebook_coverage"])
    assert max(s["codebook_coverage"]) - min(s["codebook_coverage"]) < 1e-9  # T+1 labels per codebook
    fr = s["fractions"]["by_role"]
    assert fr["system"]["text"]["targets"] == 0 and fr["user"]["text"]["targets"] == 0
    assert fr["assistant"]["text"]["targets"] > 0 and fr["assistant"]["audio"]["targets"] > 0
    assert s["collator_settings"]["mismatches"] == []
    assert s["model_settings"]["use_delay_pattern"] is True
    assert set(s["timing"]) >= {"build_samples_s", "tensor_checks_s", "tensor_checks_samples_per_s", "leak_probe_s"}
    assert s["config"] == demo_cfg.cfg["audit"]  # the schema's audit keys, as used
    assert s["inputs"] == {"train_manifest": str(demo_cfg.train), "val_manifest": str(demo_cfg.val),
                           "tokens_index": str(demo_cfg.index)}
    # outputs on disk, at the paths given
    on_disk = json.loads(demo_cfg.summary.read_text())
    assert on_disk["passed"] is True and on_disk["n_samples"] == 40
    import pandas as pd

    df = pd.read_parquet(demo_cfg.samples)
    assert len(df) == 40 and df["passed"].all() and df["bos_eos_ok"].all() and df["codes_in_range"].all()
    clone = df[df["id"].str.startswith("clone-")]
    assert len(clone) == 8 and (clone["n_audio_segments"] == 2).all() and (clone["n_reference_segments"] == 1).all()
    tts = df[df["id"].str.startswith("tts-")]
    assert (tts["n_text_targets"] == 3).all()  # <|audio_out_bos|>, <|audio_eos|>, <|eot_id|>
    assert (df["n_text_targets"] == df["n_text_targets_expanded"]).all()


def test_per_codebook_target_counts(good_summary, demo_cfg, demo_codes, demo_rows):
    import pandas as pd

    df = pd.read_parquet(demo_cfg.samples).set_index("id")
    for r in demo_rows:
        sid = r["misc"]["id"]
        items = D.audio_items(r)
        tgt = items[-1][2]  # the last assistant audio is the target; a clone's first one is reference
        T = demo_codes[r["misc"]["audio_sha256"][tgt["audio_url"]]].shape[1]
        for k in range(8):  # T codes + one EOS per codebook, all predictable from the previous column
            assert df.loc[sid, f"n_audio_targets_cb{k}"] == T + 1


def test_cli_writes_outputs_and_exit_code(data_cfg, tmp_path, capsys):
    import pandas as pd
    import yaml

    # as the rule calls it: only the sections it passes (model, audit, lora), every path explicit
    exp = Experiment(data_cfg.cfg, tmp_path / "ok")
    sections = json.dumps({k: exp.cfg[k] for k in ("model", "audit", "lora")})
    cli_paths = ["--train", str(data_cfg.train), "--val", str(data_cfg.val), "--index", str(data_cfg.index),
                 "--summary", str(exp.summary), "--samples", str(exp.samples)]
    assert A.main(["--config-json", sections, *cli_paths]) == 0
    assert json.loads(exp.summary.read_text())["passed"] is True
    assert len(pd.read_parquet(exp.samples)) == 40
    assert "audit PASSED" in capsys.readouterr().out
    # a failing gate exits 1 after writing the summary and the samples (run by hand: --configfile)
    rows = D.read_jsonl(data_cfg.train)
    rows[0]["start_index"] = 99  # every turn becomes prompt: no targets
    fail = Experiment(data_cfg.cfg, tmp_path / "cli_fail")
    D.write_jsonl(fail.train, rows)
    D.write_jsonl(fail.val, [])
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data_cfg.cfg))
    argv = ["--configfile", str(f), *fail.cli_paths()]
    argv[argv.index("--index") + 1] = str(data_cfg.index)
    assert A.main(argv) == 1
    s = json.loads(fail.summary.read_text())
    assert s["passed"] is False and "has_targets" in failed_rules(s)
    assert fail.samples.exists()
    err = capsys.readouterr().err
    assert "audit FAILED" in err and f"audit gate FAILED: training must not start; see {fail.summary}" in err


def test_module_entry_point(repo_root):
    """``python -m higgs_tune.audit`` (as the rule runs it) reaches main: its usage names the rule's options."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(repo_root / "workflow")}
    proc = subprocess.run([sys.executable, "-m", "higgs_tune.audit", "--help"], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m higgs_tune.audit")
    for opt in ("--config-json", "--configfile", "--train", "--val", "--index", "--summary", "--samples"):
        assert opt in proc.stdout, opt


def test_cli_requires_every_path(capsys):
    with pytest.raises(SystemExit):
        A.main(["--config-json", "{}", "--train", "a.jsonl"])
    err = capsys.readouterr().err
    assert all(opt in err for opt in ("--val", "--index", "--summary", "--samples"))


# ------------------------------------------------------------------------------- text label faults
def test_over_masked_assistant_text(data_cfg, shared_model, text_tokenizer):
    def fault(batch):  # mask every text label (audio labels intact)
        batch.label_ids[:] = -100

    s = audit_with_fault(data_cfg, shared_model, text_tokenizer, fault)
    assert_fires(s, "text_labels_assistant_targets")


def test_all_labels_masked(data_cfg, shared_model, text_tokenizer):
    def fault(batch):
        batch.label_ids[:] = -100
        batch.label_audio_ids[:] = -100

    s = audit_with_fault(data_cfg, shared_model, text_tokenizer, fault)
    for rule in ("has_targets", "masked_fraction", "audio_labels_present", "codebook_coverage"):
        assert_fires(s, rule)
    assert s["failures"][0]["sample_id"] != "*"


def test_text_labels_on_user_turn(data_cfg, shared_model, text_tokenizer):
    user_tok = text_tokenizer.encode("user", add_special_tokens=False)[0]
    hdr = text_tokenizer.convert_tokens_to_ids("<|start_header_id|>")

    def fault(batch):  # label the user's transcript tokens (teacher forcing on the prompt)
        ids = batch.input_ids
        for b in range(ids.shape[0]):
            h = ((ids[b, :-1] == hdr) & (ids[b, 1:] == user_tok)).nonzero().flatten()
            j = int(h[0]) + 4
            batch.label_ids[b, j:j + 5] = ids[b, j:j + 5]

    s = audit_with_fault(data_cfg, shared_model, text_tokenizer, fault)
    assert_fires(s, "text_labels_only_assistant", cause_contains="user turn")
    assert {f["rule"] for f in s["failures"]} == {"text_labels_only_assistant"}


def test_pre_shifted_text_labels(data_cfg, shared_model, text_tokenizer):
    def fault(batch):  # labels shifted in the data pipeline: label[t] = token[t+1]
        lab = batch.label_ids
        lab[:, :-1] = lab[:, 1:].clone()
        lab[:, -1] = -100

    s = audit_with_fault(data_cfg, shared_model, text_tokenizer, fault)
    assert_fires(s, "text_label_values")


# ------------------------------------------------------------------------------ audio label faults
def test_all_audio_labels_masked(data_cfg, shared_model, text_tokenizer):
    def fault(batch):
        batch.label_audio_ids[:] = -100

    s = audit_with_fault(data_cfg, shared_model, text_tokenizer, fault)
    assert_fires(s, "audio_labels_present")
    assert_fires(s, "codebook_coverage")
    assert "has_targets" not in failed_rules(s)  # text targets remain


def test_missing_eos(data_cfg, shared_model, text_tokenizer):
    def fault(batch):
        la = batch.label_audio_ids
        la[la == 1025] = -100

    s = audit_with_fault(data_cfg, shared_model, text_tokenizer, fault)
    assert_fires(s, "audio_label_eos")
    assert {f["rule"] for f in s["failures"]} == {"audio_label_eos"}


def test_wrong_delay_offsets(data_cfg, shared_model, text_tokenizer):
    def fault(batch):  # delay applied in reverse codebook order: row k gets K-k leading -100
        la = batch.label_audio_ids
        K = la.shape[0]
        for s0, s1 in _segments(batch):
            seg = la[:, s0:s1]
            if (seg == -100).all():
                continue
            T = s1 - s0 - K - 1
            for k in range(K):
                codes = seg[k, k + 1:k + 1 + T].clone()
                row = torch.full((s1 - s0,), -100, dtype=torch.long)
                row[K - k:K - k + T] = codes
                row[K - k + T] = 1025
                seg[k] = row

    s = audit_with_fault(data_cfg, shared_model, text_tokenizer, fault)
    assert_fires(s, "audio_label_delay_offsets")


@pytest.mark.parametrize("bad_code", [1024, 2000])
def test_codes_out_of_range(base_cfg, exp_root, demo_rows, demo_codes, shared_model, text_tokenizer, bad_code):
    codes = {k: v.copy() for k, v in demo_codes.items()}
    target = demo_rows[0]["misc"]["audio_sha256"][D.audio_items(demo_rows[0])[-1][2]["audio_url"]]
    codes[target][3, 5] = bad_code
    exp = make_experiment(base_cfg, exp_root / f"oob{bad_code}", demo_rows, codes, leak_probe=False)
    s = run_audit(exp, model=shared_model, text_tokenizer=text_tokenizer)
    assert_fires(s, "audio_codes_in_range")
    assert_fires(s, "audio_label_codes_in_range")
    users = {r["misc"]["id"] for r in demo_rows if D.audio_items(r)[-1][2]["audio_url"] ==
             D.audio_items(demo_rows[0])[-1][2]["audio_url"]}  # rows whose target audio is that clip
    assert {f["sample_id"] for f in s["failures"] if f["rule"] == "audio_label_codes_in_range"} == users


def test_reference_audio_trained(data_cfg, shared_model, text_tokenizer):
    def fault(batch):  # the collator's no-train flag ignored: reference audio gets labels
        la, ao = batch.label_audio_ids, batch.audio_out_ids
        for s0, s1 in _segments(batch):
            if (la[:, s0:s1] == -100).all():
                codes = ao[:, s0:s1].clone()
                codes[codes == 1024] = -100
                la[:, s0:s1] = codes

    s = audit_with_fault(data_cfg, shared_model, text_tokenizer, fault)
    assert_fires(s, "audio_label_reference_masked")
    assert {f["sample_id"] for f in s["failures"] if f["rule"] == "audio_label_reference_masked"} == {
        r["misc"]["id"] for r in D.read_jsonl(data_cfg.train) + D.read_jsonl(data_cfg.val) if r.get("start_index")}


def test_collator_model_delay_mismatch(data_cfg, shared_model, text_tokenizer):
    collator = D.make_collator(shared_model.config, use_delay_pattern=False)
    s = run_audit(data_cfg, collator=collator, model=shared_model, text_tokenizer=text_tokenizer)
    assert_fires(s, "collator_settings", cause_contains="delay pattern")
    assert "use_delay_pattern" in s["collator_settings"]["mismatches"]
    assert_fires(s, "audio_segment_length")


def test_audio_out_bos_misplaced(data_cfg, shared_model, text_tokenizer):
    def fault(batch):  # the first delay column of codebook 3 carries a code instead of the stream BOS
        for s0, _ in _segments(batch):
            batch.audio_out_ids[3, s0] = 7

    s = audit_with_fault(data_cfg, shared_model, text_tokenizer, fault)
    assert_fires(s, "audio_out_bos_eos")


def _no_delay_model(model):
    """Only the config matters with the probe off: a copy of the tiny model's with the delay pattern off."""
    import types

    cfg = copy.deepcopy(model.config)
    cfg.use_delay_pattern = False
    return types.SimpleNamespace(config=cfg)


def test_no_delay_pattern_layout(data_cfg, shared_model, text_tokenizer):
    """Without the delay pattern: labels -100, T codes, EOS; inputs BOS, T codes, EOS."""
    model = _no_delay_model(shared_model)
    s = run_audit(data_cfg, model=model, text_tokenizer=text_tokenizer)
    assert s["passed"], s["failures"][:3]
    assert s["model_settings"]["use_delay_pattern"] is False

    def fault(batch):
        la = batch.label_audio_ids
        la[la == 1025] = -100

    s = run_audit(data_cfg, model=model, collator=collator_with(model.config, fault), text_tokenizer=text_tokenizer)
    assert_fires(s, "audio_label_eos")
    # a delay-pattern collator against this model
    s = run_audit(data_cfg, model=model, collator=D.make_collator(shared_model.config), text_tokenizer=text_tokenizer)
    assert_fires(s, "collator_settings")
    assert_fires(s, "audio_segment_length")


# --------------------------------------------------------------------------------- loss wiring faults
@pytest.mark.parametrize("wiring,rules", [
    (make_wiring(0, 0), {"probe_text_no_leak", "probe_audio_no_leak"}),  # unshifted: copies its input
    (make_wiring(2, 2), {"probe_text_next_token", "probe_audio_next_code"}),  # double shift (i+2)
    (make_wiring(1, 1, respect_segments=False), {"probe_audio_segment_boundary"}),  # cross-segment shift
], ids=["unshifted", "double_shift", "cross_segment"])
def test_faulty_loss_wiring(demo_cfg, shared_model, text_tokenizer, wiring, rules):
    s = run_audit(demo_cfg, loss_wiring=wiring, model=shared_model, text_tokenizer=text_tokenizer)
    for rule in rules:
        assert_fires(s, rule)
    assert all(r["scope"] == "probe" for r in s["rules"] if not r["passed"])  # the data are fine


def test_reference_wiring_of_this_file_is_correct(demo_cfg, shared_model, text_tokenizer):
    """The fault wirings above differ from a correct one only by their shift."""
    s = run_audit(demo_cfg, loss_wiring=make_wiring(1, 1), model=shared_model, text_tokenizer=text_tokenizer)
    assert s["passed"], s["failures"][:3]


# ------------------------------------------------------------------------------------ model wrappers
class DropAudioKwargs(torch.nn.Module):
    """A forward wrapper that forgets Higgs' audio kwargs (as a generic trainer/kwargs filter would)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, **kw):
        kw.pop("audio_out_ids", None)
        kw.pop("label_audio_ids", None)
        return self.model(**kw)


def test_wrapper_dropping_audio_kwargs(demo_cfg, shared_model, text_tokenizer):
    s = run_audit(demo_cfg, model=DropAudioKwargs(shared_model), text_tokenizer=text_tokenizer)
    assert_fires(s, "shapes_audio")
    assert not any(c["rule"] == "probe_audio_no_leak" and c["passed"] for c in s["leak_probe"]["checks"])


def test_peft_causal_lm_task_type(demo_cfg, demo_config, text_tokenizer):
    from peft import LoraConfig, get_peft_model

    from higgs_tune.model import build_model

    model = get_peft_model(build_model(demo_config["model"], torch.float32, "cpu"),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                      target_modules=["self_attn.q_proj", "self_attn.v_proj"]))
    s = run_audit(demo_cfg, model=model, text_tokenizer=text_tokenizer)
    assert not s["passed"]
    fired = failed_rules(s) & {"probe_model_forward", "shapes_audio"}
    assert fired, failed_rules(s)
    causes = [f["likely_cause"] for f in s["failures"] if f["rule"] in fired]
    assert any("CAUSAL_LM" in c for c in causes), causes


def test_packed_rows_without_the_block_mask_fire(demo_cfg, shared_model, text_tokenizer, monkeypatch):
    """train.packing's isolation, probed on the real model: a packed row whose mask lets samples see
    each other (the plain causal mask) fails probe_packed_isolation; the correct one passes both rules."""
    from higgs_tune import packing

    s = run_audit(demo_cfg, model=shared_model, text_tokenizer=text_tokenizer)
    packed = {c["rule"]: c for c in s["leak_probe"]["checks"] if c["rule"].startswith("probe_packed")}
    assert set(packed) == {"probe_packed_equivalence", "probe_packed_isolation"} and all(
        c["passed"] for c in packed.values()), packed
    assert packed["probe_packed_equivalence"]["padding_efficiency"] > 0.95
    assert packed["probe_packed_isolation"]["others_change"] <= 1e-4 < packed["probe_packed_isolation"]["own_change"]

    original = packing.block_causal_mask  # every real position one segment: the plain causal mask
    monkeypatch.setattr(packing, "block_causal_mask", lambda seg, dtype: original((seg > 0).long(), dtype))
    s = run_audit(demo_cfg, model=shared_model, text_tokenizer=text_tokenizer)
    assert_fires(s, "probe_packed_isolation")


def test_probe_handles_batch_of_one(demo_cfg, shared_model, text_tokenizer):
    """forward left-pads a batch of 1; the probe maps positions through the model's own expansion."""
    exp = demo_cfg.with_audit(leak_probe_samples=1)
    s = run_audit(exp, model=shared_model, text_tokenizer=text_tokenizer)
    assert s["passed"], s["failures"][:3]
    assert s["leak_probe"]["batch_size"] == 1
    s = run_audit(exp, model=shared_model, text_tokenizer=text_tokenizer, loss_wiring=make_wiring(0, 0))
    assert_fires(s, "probe_text_no_leak")


def test_missing_codes_is_a_named_failure(base_cfg, exp_root, demo_rows, demo_codes, shared_model, text_tokenizer):
    codes = dict(demo_codes)
    gone = demo_rows[3]["misc"]["audio_sha256"][D.audio_items(demo_rows[3])[-1][2]["audio_url"]]
    del codes[gone]
    exp = make_experiment(base_cfg, exp_root / "nocodes", demo_rows, codes, leak_probe=False)
    s = run_audit(exp, model=shared_model, text_tokenizer=text_tokenizer)
    assert_fires(s, "sample_build", cause_contains="tokenize")
    users = {r["misc"]["id"] for r in demo_rows if gone in r["misc"]["audio_sha256"].values()}
    assert demo_rows[3]["misc"]["id"] in users
    assert {f["sample_id"] for f in s["failures"]} == users
    assert s["n_samples_checked"] == 40 - len(users)


def test_the_audit_streams_one_batch_at_a_time_with_the_eager_checks_results(base_cfg, exp_root, demo_rows,
                                                                             demo_codes, shared_model,
                                                                             text_tokenizer, monkeypatch):
    """The audit builds each sample when its batch is due and drops it after: at most one batch of
    samples is alive at a time, and its failures, sample rows and probe pick are those of building
    every sample first and checking the batches after (build_samples + run_tensor_checks)."""
    import weakref

    import pandas as pd

    from higgs_tune.audit import expect as E

    codes = dict(demo_codes)
    del codes[demo_rows[3]["misc"]["audio_sha256"][D.audio_items(demo_rows[3])[-1][2]["audio_url"]]]
    bs = 4
    exp = make_experiment(base_cfg, exp_root / "stream", demo_rows, codes, batch_size=bs, leak_probe_samples=3)
    alive, live = [0], []  # samples alive now; alive at each collation
    real_build = E.build_dataset_sample

    def freed() -> None:
        alive[0] -= 1

    def observed_build(*a, **kw):
        s = real_build(*a, **kw)
        alive[0] += 1
        weakref.finalize(s, freed)
        return s

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, samples):
            live.append(alive[0])
            return self.inner(samples)

    monkeypatch.setattr(E, "build_dataset_sample", observed_build)
    s = run_audit(exp, write=True, model=shared_model, text_tokenizer=text_tokenizer,
                  collator=Counting(D.make_collator(shared_model.config)))
    monkeypatch.undo()
    assert len(live) > 40 // bs and max(live) <= bs + 1, (live, s["failures"][:3])  # + the sample in hand
    assert s["n_samples_checked"] < 40 and any(f["rule"] == "sample_build" for f in s["failures"])

    rows = D.read_jsonl(exp.train) + D.read_jsonl(exp.val)
    split = ["train"] * (len(rows) - 5) + ["val"] * 5
    expect = A.Expect.from_model(shared_model.config, text_tokenizer)
    collator = D.make_collator(shared_model.config)
    samples, metas, f_build = A.build_samples(rows, split, text_tokenizer, D.CodesIndex(exp.index).get, expect)
    results, f_collate, n = A.run_tensor_checks(samples, metas, collator, expect, bs)
    fails = f_build + f_collate + [f for r in results for f in r.failures]
    assert [(f["rule"], f["sample_id"], f["message"]) for f in s["failures"]] == \
        [(f.rule, f.sample_id, f.message) for f in fails][:len(s["failures"])]
    assert s["n_failures"] == len(fails) and s["n_samples_checked"] == n
    table = pd.read_parquet(exp.samples)
    per = {i: {c: r.rows[c][j] for c in r.rows if c != "_index"}
           for r in results for j, i in enumerate(r.rows["_index"])}
    for i in range(len(rows)):
        got = table.iloc[i]
        if i not in per:
            assert pd.isna(got["n_text_tokens"])
            continue
        assert {c: got[c] for c in per[i]} == pytest.approx(per[i])
    clean = [bool(per.get(i)) and per[i]["text_labels_ok"] and per[i]["audio_labels_ok"] for i in range(len(rows))]
    pick = A.probe_indices(samples, metas, clean, 3)
    assert s["leak_probe"]["sample_ids"] == [D.sample_id(rows[i]) for i in pick]
