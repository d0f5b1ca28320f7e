"""higgs_loss against an independent reference (a plain per-sample, per-segment loop), property-based."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from higgs_tune.labels import IGNORE_INDEX, shifted_audio_targets
from higgs_tune.loss import count_targets, higgs_loss


def ref_ce(logit_row: torch.Tensor, target: int) -> float:
    """-log softmax(logit_row)[target], in float64 with an explicit log-sum-exp."""
    row = logit_row.double()
    m = float(row.max())
    return m + math.log(float(torch.exp(row - m).sum())) - float(row[target])


def reference_loss(logits, labels, audio_logits, label_audio, starts, tw=1.0, aw=1.0):
    """Loop version: text target of position t is labels[b, t+1]; audio row i of segment s predicts
    label_audio[:, i+1] only if i+1 is still inside s. Also counts argmax hits (text, per codebook)."""
    text, text_hits = [], 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != IGNORE_INDEX:
                text.append(ref_ce(logits[b, t], y))
                text_hits += int(logits[b, t].argmax()) == y
    k = label_audio.shape[0]
    per_cb = [[] for _ in range(k)]
    cb_hits = [0] * k
    n = label_audio.shape[1]
    bounds = [int(s) for s in starts] + [n]
    for s in range(len(bounds) - 1):
        for i in range(bounds[s], bounds[s + 1] - 1):
            for c in range(k):
                y = int(label_audio[c, i + 1])
                if y != IGNORE_INDEX:
                    per_cb[c].append(ref_ce(audio_logits[i, c], y))
                    cb_hits[c] += int(audio_logits[i, c].argmax()) == y
    text_loss = sum(text) / len(text) if text else 0.0
    cb = [sum(v) / len(v) if v else 0.0 for v in per_cb]
    audio_loss = sum(cb) / k if n else 0.0
    return (tw * text_loss + aw * audio_loss, text_loss, audio_loss, cb, len(text), [len(v) for v in per_cb],
            text_hits, cb_hits)


def delay_labels(codes: torch.Tensor) -> torch.Tensor:
    """Labels of one segment as the collator builds them with the delay pattern: row k has k+1
    leading -100, the codes, one EOS 1025 (here: C-1), then -100."""
    from boson_multimodal.model.higgs_audio.utils import build_delay_pattern_mask

    k = codes.shape[0]
    lab = torch.cat([torch.full((k, 1), IGNORE_INDEX), codes, torch.full((k, 1), 5)], dim=1)
    return build_delay_pattern_mask(lab[None], bos_token_id=IGNORE_INDEX, pad_token_id=IGNORE_INDEX)[0][0]


def draw_batch(draw, g, *, b, length, k, v=7, c=6, no_text=False, no_audio=None):
    """One collated batch: text ``(B, L)`` logits/labels and K-codebook audio segments.

    ``no_text``: every text label is -100. ``no_audio``: None (random), "none" (no segment at all) or
    "ignored" (segments whose labels are all -100)."""
    delay = draw(st.booleans())
    logits = torch.randn(b, length, v, generator=g) * 3
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[torch.rand(b, length, generator=g) < draw(st.floats(0, 1))] = IGNORE_INDEX
    if no_text:
        labels[:] = IGNORE_INDEX
    seg_lens = [] if no_audio == "none" else draw(
        st.lists(st.integers(1, 6), min_size=1 if no_audio == "ignored" else 0, max_size=4))
    segs = []
    for n in seg_lens:
        codes = torch.randint(0, c - 2, (k, n), generator=g)
        if delay:
            seg = delay_labels(codes)
        else:
            seg = torch.cat([torch.full((k, 1), IGNORE_INDEX), codes], dim=1)
            seg[torch.rand(seg.shape, generator=g) < 0.3] = IGNORE_INDEX
        if draw(st.booleans()):  # whatever the first column holds, nothing crosses a boundary
            seg[:, 0] = torch.randint(0, c, (k,), generator=g)
        if no_audio == "ignored":
            seg[:] = IGNORE_INDEX
        segs.append(seg)
    label_audio = torch.cat(segs, dim=1) if segs else torch.zeros((k, 0), dtype=torch.long)
    starts = torch.tensor([0] + [s.shape[1] for s in segs[:-1]]).cumsum(0) if segs else torch.zeros(0, dtype=torch.long)
    audio_logits = torch.randn(label_audio.shape[1], k, c, generator=g) * 3
    return logits, labels, audio_logits, label_audio, starts


@st.composite
def batches(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    return draw_batch(draw, g, b=draw(st.integers(1, 3)), length=draw(st.integers(2, 12)), k=draw(st.integers(1, 4)))


@st.composite
def windows(draw):
    """A gradient-accumulation window: 2-4 micro-batches sharing K, each with its own batch size,
    sequence length and segments (so their target counts differ); one micro-batch has no text
    targets and one (possibly the same) has no audio targets."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    k, n_micro = draw(st.integers(1, 4)), draw(st.integers(2, 4))
    empty_text = draw(st.integers(0, n_micro - 1))
    empty_audio = draw(st.integers(0, n_micro - 1))
    return [draw_batch(draw, g, b=draw(st.integers(1, 3)), length=draw(st.integers(2, 12)), k=k,
                       no_text=i == empty_text,
                       no_audio=draw(st.sampled_from(["none", "ignored"])) if i == empty_audio else None)
            for i in range(n_micro)]


@settings(max_examples=150, deadline=None)
@given(batches(), st.floats(0.1, 2.0), st.floats(0.1, 2.0))
def test_matches_reference(batch, tw, aw):
    logits, labels, audio_logits, label_audio, starts = batch
    out = higgs_loss(logits, labels, audio_logits, label_audio, starts, text_weight=tw, audio_weight=aw)
    loss, text_loss, audio_loss, cb, n_text, n_cb, text_hits, cb_hits = reference_loss(
        logits, labels, audio_logits, label_audio, starts, tw, aw)
    assert float(out.loss) == pytest.approx(loss, abs=1e-5, rel=1e-5)
    assert float(out.text_loss) == pytest.approx(text_loss, abs=1e-5, rel=1e-5)
    assert float(out.audio_loss) == pytest.approx(audio_loss, abs=1e-5, rel=1e-5)
    assert out.codebook_losses.tolist() == pytest.approx(cb, abs=1e-5, rel=1e-5)
    assert out.n_text_targets == n_text and out.n_codebook_targets.tolist() == n_cb
    assert out.text_correct == text_hits and out.codebook_correct.tolist() == cb_hits
    counts = count_targets(labels, label_audio, starts, num_codebooks=label_audio.shape[0])
    assert counts.text == n_text and counts.codebooks.tolist() == n_cb


def join(micro, logits_list, audio_list, pad_value=0.0):
    """The window as one batch: text rows stacked (right-padded to the longest with -100 labels),
    audio streams concatenated with shifted segment starts."""
    length = max(m[1].shape[1] for m in micro)
    logits = torch.cat([F.pad(lg, (0, 0, 0, length - lg.shape[1]), value=pad_value) for lg in logits_list])
    labels = torch.cat([F.pad(m[1], (0, length - m[1].shape[1]), value=IGNORE_INDEX) for m in micro])
    audio = torch.cat(audio_list)
    la = torch.cat([m[3] for m in micro], dim=1)
    offsets = torch.tensor([0] + [m[3].shape[1] for m in micro[:-1]]).cumsum(0)
    starts = torch.cat([m[4] + o for m, o in zip(micro, offsets)])
    return logits, labels, audio, la, starts


@settings(max_examples=60, deadline=None)
@given(windows(), st.floats(0.1, 2.0), st.floats(0.1, 2.0))
def test_grad_accumulation_equals_one_batch(micro, tw, aw):
    """Micro-batch losses normalized by the window's counts sum to the loss of the joined batch,
    and so do their gradients (n x 1 == 1 x n), whatever the micro-batches' sizes and counts."""
    k = micro[0][3].shape[0]
    per_micro = [count_targets(m[1], m[3], m[4], num_codebooks=k) for m in micro]
    assert min(c.text for c in per_micro) == 0 and min(c.audio for c in per_micro) == 0  # the strategy's promise
    counts = per_micro[0]
    for c in per_micro[1:]:
        counts = counts + c
    leaves = [(m[0].clone().requires_grad_(), m[2].clone().requires_grad_()) for m in micro]
    total = sum(higgs_loss(lg, m[1], al, m[3], m[4], text_weight=tw, audio_weight=aw, normalizer=counts).loss
                for (lg, al), m in zip(leaves, micro))
    total.backward()
    logits, labels, audio, la, starts = join(micro, [lg.detach() for lg, _ in leaves], [al.detach() for _, al in leaves])
    logits.requires_grad_()
    audio.requires_grad_()
    joined_counts = count_targets(labels, la, starts, num_codebooks=k)
    assert counts.text == joined_counts.text and counts.codebooks.tolist() == joined_counts.codebooks.tolist()
    joined = higgs_loss(logits, labels, audio, la, starts, text_weight=tw, audio_weight=aw)
    joined.loss.backward()
    assert float(total) == pytest.approx(float(joined.loss), abs=1e-5, rel=1e-5)
    # each micro-batch's gradient is its slice of the joined batch's gradient (padding rows get none)
    text_grad = join(micro, [lg.grad for lg, _ in leaves], [al.grad for _, al in leaves])[0]
    assert torch.allclose(text_grad, logits.grad, atol=1e-6)
    assert torch.allclose(torch.cat([al.grad for _, al in leaves]), audio.grad, atol=1e-6)


def test_known_next_token_is_picked():
    """Logits that put all mass on the NEXT token give ~0 loss; on the CURRENT token, a large one."""
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, 4, 1, 5]])
    nxt = torch.full((1, 6, 8), -20.0)
    cur = torch.full((1, 6, 8), -20.0)
    for t in range(6):
        if t + 1 < 6:
            nxt[0, t, labels[0, t + 1]] = 20.0
        if labels[0, t] >= 0:
            cur[0, t, labels[0, t]] = 20.0
    empty = torch.zeros((0, 8, 1026))
    assert float(higgs_loss(nxt, labels, empty, None, None, text_weight=1.0, audio_weight=1.0).text_loss) < 1e-6
    assert float(higgs_loss(cur, labels, empty, None, None, text_weight=1.0, audio_weight=1.0).text_loss) > 10
    # audio: segment [BOS, a, b, EOS] -> row i predicts label i+1
    la = torch.tensor([[IGNORE_INDEX, 7, 9, 1025]])
    good = torch.full((4, 1, 1026), -20.0)
    for i, y in enumerate([7, 9, 1025]):
        good[i, 0, y] = 20.0
    out = higgs_loss(nxt, labels, good, la, torch.tensor([0]), text_weight=1.0, audio_weight=1.0)
    assert float(out.audio_loss) < 1e-6 and out.n_audio_targets == 3


def test_segment_boundary_is_never_crossed():
    """Two segments: the last row of segment 0 must not be scored against segment 1's first label."""
    la = torch.tensor([[IGNORE_INDEX, 2, 3, 4, 5]])
    tgt = shifted_audio_targets(la, torch.tensor([0, 3]))
    assert tgt[:, 0].tolist() == [2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]


def test_empty_modalities_are_zero_not_nan():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    out = higgs_loss(logits, labels, torch.zeros((0, 8, 1026)), torch.zeros((8, 0), dtype=torch.long),
                     torch.zeros(0, dtype=torch.long), text_weight=1.0, audio_weight=1.0)
    assert float(out.loss) == 0.0 and out.n_text_targets == 0 and out.n_audio_targets == 0
    assert out.codebook_losses.tolist() == [0.0] * 8 and out.n_codebook_targets.tolist() == [0] * 8
    # the zero loss stays connected to the graph (DDP and accumulation see every parameter): zero gradients
    out.loss.backward()
    assert logits.grad is not None and not logits.grad.any()


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="expanded_labels"):
        higgs_loss(torch.randn(1, 5, 7), torch.zeros(1, 4, dtype=torch.long), None, None, None,
                   text_weight=1.0, audio_weight=1.0)
    with pytest.raises(ValueError, match="one row per"):
        higgs_loss(torch.randn(1, 5, 7), torch.zeros(1, 5, dtype=torch.long), torch.zeros((0, 8, 1026)),
                   torch.zeros((8, 3), dtype=torch.long), torch.tensor([0]), text_weight=1.0, audio_weight=1.0)


def test_text_logits_at_targets_same_loss_and_gradients(demo_config, real_batch_factory):
    """forward_loss(text_logits_at_targets=True) (training) runs the text head on the target rows
    only: the same loss, metrics and gradients as the full B x L x V logits, with the head trained
    (modules_to_save) and LoRA-adapted layers; a batch without text targets still gives the head a
    (zero) gradient (DDP needs every parameter); the head's forward is back afterwards, also after
    an error."""
    from higgs_tune.loss import deferred_text_head, forward_loss, text_head_of
    from higgs_tune.model import apply_lora, build_model

    def run(at_targets: bool, no_text: bool = False):
        # text_lm_head trained
        model = apply_lora(build_model(demo_config["model"], torch.float32, "cpu"), demo_config["lora"])
        model.train()
        batch = real_batch_factory(model)
        if no_text:
            batch.label_ids[:] = IGNORE_INDEX
        out, loss = forward_loss(model, batch, "cpu", text_weight=1.0, audio_weight=1.0,
                                 text_logits_at_targets=at_targets)
        loss.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out, loss, grads

    out0, l0, g0 = run(False)
    out1, l1, g1 = run(True)
    assert out0.logits.shape[-1] == 128256 and out1.logits.shape[-1] == demo_config["model"]["arch"]["hidden_size"]
    assert l0.n_text_targets == l1.n_text_targets > 0 and l0.text_correct == l1.text_correct
    torch.testing.assert_close(l1.loss, l0.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l1.text_loss, l0.text_loss, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys() and any("text_lm_head" in n for n in g0) and any("lora_B" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-7, msg=n)
    head_grads = [g for n, g in g0.items() if "text_lm_head" in n]
    assert all(float(g.abs().sum()) > 0 for g in head_grads)

    _, l2, g2 = run(True, no_text=True)
    assert l2.n_text_targets == 0 and all(float(g2[n].abs().sum()) == 0 for n in g2 if "text_lm_head" in n)

    model = build_model(demo_config["model"], torch.float32, "cpu")
    head = text_head_of(model)
    with pytest.raises(RuntimeError, match="boom"):
        with deferred_text_head(model):
            assert head(torch.ones(2, 3)).shape == (2, 3)
            raise RuntimeError("boom")
    assert "forward" not in vars(head) and head(torch.ones(2, 64)).shape == (2, 128256)
