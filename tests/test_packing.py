"""Sequence packing (train.packing): samples end to end in one row change the layout, never the math.

The packed forward must give the padded batch's loss, metrics and gradients (eager and sdpa
attention, one row or several), and no sample may see another: both fail without the block-diagonal
mask and per-sample positions of ``packing.packed_attention``."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from higgs_tune import data as D
from higgs_tune import packing as P
from higgs_tune.labels import IGNORE_INDEX
from higgs_tune.loss import count_targets, forward_loss

from conftest import SHORT, tts_row


# ------------------------------------------------------------------------------------- pack_rows
def test_pack_rows_first_fit_decreasing():
    rng = random.Random(0)
    for _ in range(300):
        pos = [rng.randint(1, 600) for _ in range(rng.randint(1, 12))]
        cap = rng.choice([None, rng.randint(1, 1500)])
        rows = P.pack_rows(pos, cap)
        assert sorted(i for r in rows for i in r) == list(range(len(pos)))
        assert all(r == sorted(r) for r in rows) and rows == P.pack_rows(pos, cap)
        if cap is None:
            assert len(rows) == 1
        else:
            # a row over capacity holds one sample that alone exceeds it
            assert all(sum(pos[i] for i in r) <= cap or len(r) == 1 for r in rows)
            # first fit: no two rows could be merged (else FFD would have placed the later one)
            loads = sorted(sum(pos[i] for i in r) for r in rows)
            assert len(loads) < 2 or loads[0] + loads[1] > cap
    assert P.pack_rows([5, 3, 4, 2], 7) == [[0, 3], [1, 2]]
    with pytest.raises(ValueError, match="capacity"):
        P.pack_rows([1], 0)


# ------------------------------------------------------------------------------ real samples
def clone_row(target: str, ref: str, transcripts, short_codes, lj_dir) -> dict:
    url = {c: str(lj_dir / "wavs" / f"{c}.wav") for c in (target, ref)}
    return {"messages": [{"role": "system", "content": "Generate audio following instruction."},
                         {"role": "user", "content": transcripts[ref]},
                         {"role": "assistant", "content": {"type": "audio", "audio_url": url[ref]}},
                         {"role": "user", "content": transcripts[target]},
                         {"role": "assistant", "content": {"type": "audio", "audio_url": url[target]}}],
            "start_index": 4, "misc": {"id": f"clone-{target}-ref-{ref}",
                                       "audio_sha256": {url[c]: short_codes[c][0] for c in url}}}


@pytest.fixture
def mixed_samples(short_codes, transcripts, text_tokenizer, lj_dir):
    """Five real samples of different lengths: three TTS rows and two voice-cloning rows (reference
    audio in the context, trained target after it)."""
    by_sha = {sha: codes for sha, codes in short_codes.values()}
    rows = [tts_row(c, transcripts[c], short_codes[c][0], lj_dir) for c in SHORT]
    rows += [clone_row(SHORT[0], SHORT[2], transcripts, short_codes, lj_dir),
             clone_row(SHORT[1], SHORT[0], transcripts, short_codes, lj_dir)]
    return [D.build_dataset_sample(r, text_tokenizer, by_sha.__getitem__) for r in rows]


def lora_model(demo_config, impl: str):
    """The demo's random-init model built with attention kernel ``impl``, LoRA-wrapped, B != 0."""
    from higgs_tune.model import apply_lora, build_model
    from higgs_tune.train import trainable_to_fp32

    model = build_model({**demo_config["model"], "attn_implementation": impl}, torch.float32, "cpu")
    expected = {"eager": "LlamaAttention", "sdpa": "LlamaSdpaAttention"}[impl]
    assert type(model.layers[0].self_attn).__name__ == expected  # the kernel itself, not only the mask path
    torch.manual_seed(1)
    model = apply_lora(model, demo_config["lora"])
    for name, p in model.named_parameters():  # LoRA B starts at 0: give the adapters a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    trainable_to_fp32(model)
    return model.train()


def loss_and_grads(model, batch, packed=None):
    model.zero_grad(set_to_none=True)
    with P.packed_attention(model, packed) if packed is not None else torch.enable_grad():
        out, loss = forward_loss(model, batch, "cpu", text_weight=1.0, audio_weight=1.0, text_logits_at_targets=True)
    loss.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss, grads


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_batch_has_the_padded_batch_loss_and_gradients(impl, demo_config, mixed_samples):
    model = lora_model(demo_config, impl)
    collator = D.make_collator(model.config)
    lengths = [D.sample_length(s, model.config) for s in mixed_samples]
    ref_out, ref, ref_grads = loss_and_grads(model, collator(mixed_samples))
    assert ref.n_text_targets > 0 and ref.n_audio_targets > 0 and len(ref_grads) > 20
    longest = max(x.positions for x in lengths)
    for capacity in (None, longest + 60):  # one row; several rows (right-padded)
        packed = P.packed_collate(mixed_samples, lengths, collator, capacity)
        assert (len(packed.rows) == 1) == (capacity is None)
        out, got, grads = loss_and_grads(model, packed.batch, packed)
        # the model's own merged mask is the layout (packed_attention checks it, too)
        assert torch.equal(out.attention_mask.bool(), packed.segment_ids > 0)
        assert packed.real_positions == sum(x.positions for x in lengths) == int(ref_out.attention_mask.sum())
        for key in ("text_loss", "audio_loss", "loss"):
            torch.testing.assert_close(getattr(got, key), getattr(ref, key), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.codebook_losses, ref.codebook_losses, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.codebook_correct, ref.codebook_correct) and got.text_correct == ref.text_correct
        assert got.n_text_targets == ref.n_text_targets and torch.equal(got.n_codebook_targets, ref.n_codebook_targets)
        c_ref = count_targets(collator(mixed_samples).label_ids, None, None)
        assert count_targets(packed.batch.label_ids, None, None).text == c_ref.text
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # packing pads (almost) nothing: the padded batch has 5 rows of the longest sample
    one_row = P.packed_collate(mixed_samples, lengths, collator)
    assert one_row.real_positions / one_row.padded_positions > 0.98
    assert one_row.real_positions / ref_out.attention_mask.numel() < 0.8

    # the same rows without the block-diagonal mask and positions: samples see each other
    model.zero_grad(set_to_none=True)
    _, leaky = forward_loss(model, one_row.batch, "cpu", text_weight=1.0, audio_weight=1.0, text_logits_at_targets=True)
    # (a random-init model's logits are near uniform, so the leak moves the loss by ~2e-4 only: still
    # 20x the 1e-5 the packed loss is held to above)
    assert abs(float(leaky.loss) - float(ref.loss)) > 1e-4 * float(ref.loss)


def test_no_sample_sees_another(demo_config, mixed_samples):
    """Changing every code of the first sample in a packed row leaves the others' audio logits as
    they were, bit for bit up to float noise; without packed_attention they change."""
    model = lora_model(demo_config, "eager").eval()
    collator = D.make_collator(model.config)
    lengths = [D.sample_length(s, model.config) for s in mixed_samples]
    packed = P.packed_collate(mixed_samples, lengths, collator)
    first = packed.rows[0][0]
    other = mixed_samples[first]
    altered = list(mixed_samples)
    altered[first] = dataclasses.replace(other, audio_ids_concat=(other.audio_ids_concat + 7) % 1024)
    packed2 = P.packed_collate(altered, lengths, collator)
    # audio_logits rows follow the audio-out columns in row order: the first sample's come first
    n_first = int((other.input_ids == model.config.audio_out_token_idx).sum())
    cut = int(packed.batch.audio_out_ids_start[n_first])
    with torch.no_grad():
        logits = []
        for pk in (packed, packed2):
            with P.packed_attention(model, pk):
                logits.append(model(**D.batch_to_model_kwargs(pk.batch, "cpu")).audio_logits)
        leaky = [model(**D.batch_to_model_kwargs(pk.batch, "cpu")).audio_logits for pk in (packed, packed2)]
    assert 0 < cut < logits[0].shape[0]
    assert not torch.allclose(logits[0][:cut], logits[1][:cut])  # the altered sample's own logits change
    torch.testing.assert_close(logits[0][cut:], logits[1][cut:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky[0][cut:], leaky[1][cut:], rtol=1e-5, atol=1e-5)


def test_packed_labels_and_errors(tiny_model, mixed_samples):
    collator = D.make_collator(tiny_model.config)
    lengths = [D.sample_length(s, tiny_model.config) for s in mixed_samples]
    row = P.packed_sample(mixed_samples)
    starts = [0]
    for s in mixed_samples[:-1]:
        starts.append(starts[-1] + len(s.input_ids))
    assert all(int(row.label_ids[i]) == IGNORE_INDEX for i in starts)
    assert torch.equal(row.input_ids, torch.cat([s.input_ids for s in mixed_samples]))
    assert row.audio_ids_start.tolist() == sorted(row.audio_ids_start.tolist())
    packed = P.packed_collate(mixed_samples, lengths, collator)
    # a layout that disagrees with the model's merge is refused, not silently used
    wrong = P.PackedBatch(batch=packed.batch, rows=packed.rows, segment_ids=torch.roll(packed.segment_ids, 8, 1),
                          position_ids=packed.position_ids)
    with pytest.raises(RuntimeError, match="does not match the model's merged sequence"):
        with P.packed_attention(tiny_model, wrong), torch.no_grad():
            tiny_model(**D.batch_to_model_kwargs(packed.batch, "cpu"))
    assert "_update_causal_mask" not in vars(tiny_model)  # restored after the error
    tiny_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        with P.packed_attention(tiny_model, packed):
            pass
    tiny_model.config._attn_implementation = "eager"
    with P.packed_attention(tiny_model, packed):
        with pytest.raises(RuntimeError, match="does not nest"):
            with P.packed_attention(tiny_model, packed):
                pass
    with pytest.raises(ValueError, match="one length per sample"):
        P.packed_collate(mixed_samples, lengths[:-1], collator)
    with pytest.raises(ValueError, match="no samples"):
        P.packed_collate([], [], collator)


def test_audit_packing_probe_with_a_text_only_sample_first(demo_config, mixed_samples, text_tokenizer):
    """The audit's packed-rows probe on a row that starts with a sample without audio: it changes the
    codes of the first sample that has audio-out columns, and both rules are evaluated and pass."""
    from higgs_tune.audit.leak_probe import packing_probe

    model = lora_model(demo_config, "eager")
    text_only = D.build_dataset_sample(
        {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello there."}], "misc": {"id": "text-only"}},
        text_tokenizer, lambda sha: None)
    samples = [text_only] + mixed_samples[:2]
    out = packing_probe(model, samples, ["text-only", "a", "b"], D.make_collator(model.config),
                        tol=1e-4, device="cpu")
    assert out["evaluated"] == ["probe_packed_equivalence", "probe_packed_isolation"], out
    assert not out["failures"] and "note" not in out
    iso = next(c for c in out["checks"] if c["rule"] == "probe_packed_isolation")
    assert "changed every audio code of a" in iso["message"] and iso["others_change"] <= 1e-4 < iso["own_change"]
    assert model.training  # restored
    one = packing_probe(model, samples[:1], ["text-only"], D.make_collator(model.config), tol=1e-4, device="cpu")
    assert one["evaluated"] == [] and "fewer than 2" in one["note"]


def test_rotary_positions_restart_at_each_sample(tiny_model, mixed_samples):
    """The position ids the rotary embedding receives: in a packed row, each sample's run is the
    0, 1, ... its own padded row gives it (RoPE depends on distance only, so a continued count would
    pass the loss test at these lengths while rounding differently on long rows)."""
    collator = D.make_collator(tiny_model.config)
    lengths = [D.sample_length(s, tiny_model.config) for s in mixed_samples]
    packed = P.packed_collate(mixed_samples, lengths, collator)
    seen = []
    hook = tiny_model.rotary_emb.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    try:
        with torch.no_grad():
            with P.packed_attention(tiny_model, packed):
                tiny_model(**D.batch_to_model_kwargs(packed.batch, "cpu"))
            in_row = seen[0]
            alone = []
            for s in mixed_samples:
                seen.clear()
                mask = tiny_model(**D.batch_to_model_kwargs(collator([s]), "cpu")).attention_mask.bool()
                alone.append(seen[0][mask])
    finally:
        hook.remove()
    seg = packed.segment_ids
    got = torch.cat([in_row[seg == k + 1] for k in range(len(mixed_samples))])
    assert torch.equal(got, torch.cat([alone[i] for i in packed.rows[0]]))
    assert all(int(a[0]) == 0 for a in alone)


def test_model_attn_implementation(demo_config):
    """model.attn_implementation picks the kernel packing runs on (eager by default for random init)."""
    from higgs_tune.model import build_model

    assert demo_config["model"]["attn_implementation"] is None
    assert build_model(demo_config["model"], torch.float32, "cpu").config._attn_implementation == "eager"
    cfg = {**demo_config["model"], "attn_implementation": "sdpa"}
    assert build_model(cfg, torch.float32, "cpu").config._attn_implementation == "sdpa"
