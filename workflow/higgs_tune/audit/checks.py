"""The tensor checks: every per-sample rule on collated batches, vectorised over tokens, columns and segments.

:func:`check_batch` collates one batch of built samples and runs :func:`audit_batch` on it
(:func:`run_tensor_checks`: every batch of a list of samples, in order). :func:`audit_batch` is a
sequence of named steps:

1. :func:`role_spans` re-derives each token's turn and role from the headers in the token stream;
2. :func:`check_text_labels`: text labels only on assistant targets, all of them, unshifted;
3. :func:`check_audio_sources` and :func:`checkable_audio_stream`: codebooks, code ranges, one
   segment per ``<|AUDIO_OUT|>``;
4. :func:`check_audio_segments`: each segment's labels and inputs against the delay-pattern layout of
   :meth:`Expect.layout <higgs_tune.audit.expect.Expect.layout>` (``labels.delay_pattern``);
5. :func:`check_train_counts`: ``loss.count_targets`` against the model's own expansion;
6. :func:`sample_rows`: the per-sample columns of ``samples.parquet``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..loss import count_targets
from ..labels import IGNORE_INDEX, ROLES
from .expect import ASSISTANT, NO_ROLE, Expect, SampleMeta, dry_expand
from .rules import Failure

_SYSTEM, _USER = ROLES.index("system"), ROLES.index("user")


@dataclass
class BatchResult:
    """Output of :func:`audit_batch`.

    Attributes:
        rows: per-sample columns (lists, one entry per sample; see :func:`sample_rows`).
        failures: the batch's :class:`Failure` records.
        role_text / role_audio: long ``(NO_ROLE + 1, 2)``: per role code, ``[positions, targets]``
            (audio: K x columns).
        cov_valid: long ``(K,)`` labeled columns of assistant-target segments per codebook;
            cov_cols: columns of those segments.
        text_targets: shifted text targets (``label_ids[:, 1:]``); audio_targets: long ``(K,)``
            shifted audio targets (within a segment).
    """

    rows: dict[str, list] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    role_text: torch.Tensor = field(default_factory=lambda: torch.zeros(NO_ROLE + 1, 2, dtype=torch.long))
    role_audio: torch.Tensor = field(default_factory=lambda: torch.zeros(NO_ROLE + 1, 2, dtype=torch.long))
    cov_valid: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    cov_cols: int = 0
    text_targets: int = 0
    audio_targets: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @classmethod
    def empty(cls, K: int) -> "BatchResult":
        """A result with zero counts for ``K`` codebooks."""
        return cls(cov_valid=torch.zeros(K, dtype=torch.long), audio_targets=torch.zeros(K, dtype=torch.long))


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim (0 when none)."""
    return mask.to(torch.uint8).argmax(-1)


def _each(mask: torch.Tensor) -> list[int]:
    """Indices where a 1-d bool tensor is True."""
    return mask.nonzero().flatten().tolist()


# ------------------------------------------------------------------------------------ 1. role spans
@dataclass
class TextLayout:
    """Turns and roles of a batch's tokens, re-derived from the header tokens (B samples, L tokens).

    Per token (``(B, L)``): ``turn`` (long, -1 before the first header), ``role`` (long role code),
    ``offset`` (long, position minus its turn's header position), ``after_start`` (bool, the turn is
    at/after ``start_index``), ``prefix`` (bool, attended header tokens or before the first header),
    ``is_aout`` (bool, ``<|AUDIO_OUT|>``), ``expect_learn`` (bool, must be a text target), ``am``
    (bool attention mask). Per sample (``(B,)``): ``n_turns``, ``n_msgs``, ``bad_hdr`` (malformed
    headers), ``role_mismatch`` (turns whose role differs from the message's), ``span_bad`` (bool).
    """

    turn: torch.Tensor
    role: torch.Tensor
    offset: torch.Tensor
    after_start: torch.Tensor
    prefix: torch.Tensor
    is_aout: torch.Tensor
    expect_learn: torch.Tensor
    am: torch.Tensor
    n_turns: torch.Tensor
    n_msgs: torch.Tensor
    bad_hdr: torch.Tensor
    role_mismatch: torch.Tensor
    span_bad: torch.Tensor


def role_spans(ids: torch.Tensor, am: torch.Tensor, metas: list[SampleMeta], expect: Expect) -> TextLayout:
    """Re-derive each token's turn and role from the ``<|start_header_id|>role<|end_header_id|>\\n\\n``
    headers of ``ids`` (long ``(B, L)``; ``am`` bool ``(B, L)``) and compare them with the ChatML
    messages' roles (``metas``)."""
    B, Lt = ids.shape
    is_hdr = ids == expect.start_header
    turn = is_hdr.long().cumsum(1) - 1  # -1 before the first header
    n_turns = is_hdr.sum(1)
    nt = int(n_turns.max()) if B else 0
    bh, ph = is_hdr.nonzero(as_tuple=True)
    th = turn[bh, ph]
    role_tab = torch.full((B, nt + 1), -1, dtype=torch.long)
    hdr_pos = torch.zeros((B, nt + 1), dtype=torch.long)
    role_tab[bh, th] = ids[bh, (ph + 1).clamp(max=Lt - 1)]
    hdr_pos[bh, th] = ph
    hdr_ok = ((ids[bh, (ph + 2).clamp(max=Lt - 1)] == expect.end_header)
              & (ids[bh, (ph + 3).clamp(max=Lt - 1)] == expect.nl))
    role_code_tab = torch.full_like(role_tab, NO_ROLE)
    for tok, code in expect.role_tokens.items():
        role_code_tab[role_tab == tok] = code
    tcl = turn.clamp(min=0)
    role = torch.where(turn >= 0, role_code_tab.gather(1, tcl), torch.full_like(turn, NO_ROLE))
    offset = torch.arange(Lt) - hdr_pos.gather(1, tcl)
    si = torch.tensor([m.start_index for m in metas], dtype=torch.long)
    after_start = (si[:, None] < 0) | (turn >= si[:, None])
    content = (turn >= 0) & (offset >= expect.prefix_len) & am
    is_aout = ids == expect.audio_out
    # role spans vs the ChatML messages
    exp_roles = torch.full((B, nt + 1), -1, dtype=torch.long)
    for b, m in enumerate(metas):
        if m.roles:
            exp_roles[b, : min(len(m.roles), nt + 1)] = torch.tensor(m.roles[: nt + 1])
    n_msgs = torch.tensor([len(m.roles) for m in metas], dtype=torch.long)
    bad_hdr = torch.zeros(B, dtype=torch.long).index_add_(0, bh, (~hdr_ok).long())
    valid_turn = torch.arange(nt + 1)[None, :] < n_turns[:, None]
    role_mismatch = ((role_code_tab != exp_roles) & valid_turn).sum(1)
    return TextLayout(
        turn=turn, role=role, offset=offset, after_start=after_start,
        prefix=am & ((turn < 0) | (offset < expect.prefix_len)), is_aout=is_aout,
        expect_learn=content & (role == ASSISTANT) & after_start & ~is_aout, am=am, n_turns=n_turns, n_msgs=n_msgs,
        bad_hdr=bad_hdr, role_mismatch=role_mismatch,
        span_bad=(n_turns != n_msgs) | (bad_hdr > 0) | (role_mismatch > 0))


# ------------------------------------------------------------------------------------ 2. text labels
_PLACE_NAMES = ("a system turn", "a user turn", "an assistant turn before start_index", "an unknown-role turn",
                "header tokens", "padding")
_PLACE_CAUSES = {
    "a system turn": "text labels on a system turn: the role mask was not applied (prompt tokens become targets)",
    "a user turn": "text labels on a user turn: the role mask was not applied (prompt tokens become targets)",
    "an assistant turn before start_index": "start_index ignored: the reference/prompt assistant turns are trained",
    "header tokens": "labels on <|start_header_id|>role<|end_header_id|> prefixes: labels copied from input_ids",
    "padding": f"padding labeled: pad labels must be {IGNORE_INDEX} (the collator pads labels with {IGNORE_INDEX})",
}


def check_text_labels(ids: torch.Tensor, lab: torch.Tensor, lay: TextLayout, sids: list[str],
                      res: BatchResult) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-label rules (``text_role_spans``, ``text_labels_only_assistant``,
    ``text_labels_assistant_targets``, ``text_label_values``, ``audio_out_token_label_masked``).

    Appends failures to ``res.failures`` and per-role text counts to ``res.role_text``.

    Args:
        ids / lab: long ``(B, L)`` ``input_ids`` / ``label_ids``.

    Returns:
        ``(text_ok, text_targets)``: bool ``(B,)`` every text rule passed; long ``(B,)`` shifted
        text targets (``lab[:, 1:]`` not ignored).
    """
    am, role = lay.am, lay.role
    labeled = lab != IGNORE_INDEX
    wrong_place = labeled & ~lay.expect_learn & ~lay.is_aout
    missing = lay.expect_learn & ~labeled
    wrong_value = labeled & (lab != ids)
    n_wrong_place, n_missing = wrong_place.sum(1), missing.sum(1)
    n_wrong_value, n_aout_lab = wrong_value.sum(1), (labeled & lay.is_aout).sum(1)
    body = wrong_place & ~lay.prefix
    place_counts = torch.stack([
        (body & (role == _SYSTEM)).sum(1), (body & (role == _USER)).sum(1), (body & (role == ASSISTANT)).sum(1),
        (body & (role == NO_ROLE)).sum(1), (wrong_place & lay.prefix).sum(1), (wrong_place & ~am).sum(1),
    ], 1)  # (B, 6) in _PLACE_NAMES order
    for rc in range(NO_ROLE + 1):
        sel = (role == rc) & am
        res.role_text[rc, 0] += int(sel.sum())
        res.role_text[rc, 1] += int((sel & labeled).sum())

    fails, turn = res.failures, lay.turn
    bad = lay.span_bad | (n_wrong_place > 0) | (n_missing > 0) | (n_wrong_value > 0) | (n_aout_lab > 0)
    for b in _each(bad):
        sid = sids[b]
        if lay.span_bad[b]:
            fails.append(Failure("text_role_spans", sid,
                                 f"{int(lay.n_turns[b])} headers in the token stream for {int(lay.n_msgs[b])} messages"
                                 f"{'' if not lay.bad_hdr[b] else f', {int(lay.bad_hdr[b])} malformed headers'}"
                                 f"{'' if not lay.role_mismatch[b] else ', roles differ from the ChatML messages'}"))
        if n_wrong_place[b]:
            j = int(_first_true(wrong_place[b]))
            cats = {name: int(n) for name, n in zip(_PLACE_NAMES, place_counts[b].tolist()) if n}
            causes = [c for name, c in _PLACE_CAUSES.items() if name in cats]
            fails.append(Failure("text_labels_only_assistant", sid,
                                 f"{int(n_wrong_place[b])} text labels outside assistant targets "
                                 f"({', '.join(f'{n} on {name}' for name, n in cats.items())}); first at token {j}, "
                                 f"turn {int(turn[b, j])}", "; ".join(causes) or None))
        if n_missing[b]:
            j = int(_first_true(missing[b]))
            fails.append(Failure("text_labels_assistant_targets", sid,
                                 f"{int(n_missing[b])} of {int(lay.expect_learn[b].sum())} assistant target tokens "
                                 f"are {IGNORE_INDEX} (first at token {j}, turn {int(turn[b, j])})"))
        if n_wrong_value[b]:
            j = int(_first_true(wrong_value[b]))
            fails.append(Failure("text_label_values", sid,
                                 f"{int(n_wrong_value[b])} labels differ from the input token at their position "
                                 f"(first at {j}: label {int(lab[b, j])}, input {int(ids[b, j])})"))
        if n_aout_lab[b]:
            fails.append(Failure("audio_out_token_label_masked", sid,
                                 f"{int(n_aout_lab[b])} <|AUDIO_OUT|> labels are not {IGNORE_INDEX}"))
    return ~bad, labeled[:, 1:].sum(1)


# ------------------------------------------------------------------------------ 3. audio sources
@dataclass
class AudioTally:
    """Per-sample audio outcomes of a batch (B samples, K codebooks), filled by the audio steps.

    ``audio_ok`` / ``codes_ok`` / ``bos_eos_ok``: bool ``(B,)``; ``targets``: long ``(B, K)`` shifted
    audio targets; ``cols``: long ``(B,)`` audio-out columns; ``n_ref``: long ``(B,)`` reference
    (non-target) segments; ``segments``: long ``(B,)`` expected audio-out segments.
    """

    audio_ok: torch.Tensor
    codes_ok: torch.Tensor
    bos_eos_ok: torch.Tensor
    targets: torch.Tensor
    cols: torch.Tensor
    n_ref: torch.Tensor
    segments: torch.Tensor

    @classmethod
    def start(cls, metas: list[SampleMeta], K: int) -> "AudioTally":
        B = len(metas)
        return cls(audio_ok=torch.ones(B, dtype=torch.bool), codes_ok=torch.tensor([m.src_in_range for m in metas]),
                   bos_eos_ok=torch.ones(B, dtype=torch.bool), targets=torch.zeros((B, K), dtype=torch.long),
                   cols=torch.zeros(B, dtype=torch.long), n_ref=torch.zeros(B, dtype=torch.long),
                   segments=torch.tensor([int(m.out_T.numel()) for m in metas], dtype=torch.long))


def check_audio_sources(metas: list[SampleMeta], lay: TextLayout, expect: Expect, tally: AudioTally,
                        fails: list[Failure]) -> None:
    """Per-sample source checks: cached codes in range (``audio_codes_in_range``), at least K codebooks
    (``audio_codebooks``), one ``<|AUDIO_OUT|>`` per audio-out content (``audio_segment_count``)."""
    n_tok, n_seg = lay.is_aout.sum(1).tolist(), tally.segments.tolist()
    for b, m in enumerate(metas):
        if not m.src_in_range:
            fails.append(Failure("audio_codes_in_range", m.id,
                                 f"cached source codes outside [0, {expect.codebook_size})"))
        if m.src_rows < expect.K and m.out_T.numel():
            fails.append(Failure("audio_codebooks", m.id,
                                 f"source codes have {m.src_rows} codebooks, model expects {expect.K}"))
            tally.audio_ok[b] = False
        if not m.n_audio_tokens_ok or n_tok[b] != n_seg[b]:
            fails.append(Failure("audio_segment_count", m.id,
                                 f"{n_tok[b]} <|AUDIO_OUT|> tokens for {n_seg[b]} audio-out contents"))
            tally.audio_ok[b] = False


def checkable_audio_stream(batch, metas: list[SampleMeta], lay: TextLayout, expect: Expect, tally: AudioTally,
                           fails: list[Failure]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The batch's audio-out stream when its shapes allow the per-column checks, else ``None``.

    ``None`` without a failure when the batch has no audio-out at all or a sample lacks codebooks
    (reported by :func:`check_audio_sources`); with ``audio_codebooks`` failures when
    ``label_audio_ids`` / ``audio_out_ids`` are not both ``(K, N)``; with ``audio_segment_count``
    failures when the segments, the placeholders and the contents disagree in number.

    Returns:
        ``(label_audio_ids, audio_out_ids, audio_out_ids_start)`` on CPU, long ``(K, N)``, ``(K, N)``, ``(S,)``.
    """
    K = expect.K
    aout_ids, lab_a, starts = batch.audio_out_ids, batch.label_audio_ids, batch.audio_out_ids_start
    n_cols = int(lab_a.shape[1]) if lab_a is not None and lab_a.dim() == 2 else 0
    S = int(starts.numel()) if starts is not None else 0
    S_exp = int(tally.segments.sum())
    with_audio = _each(tally.segments > 0)
    if S_exp == 0 and n_cols == 0:
        return None
    if lab_a is None or aout_ids is None or lab_a.dim() != 2 or aout_ids.shape != lab_a.shape or lab_a.shape[0] != K:
        got = None if lab_a is None else tuple(lab_a.shape)
        for b in with_audio:
            fails.append(Failure("audio_codebooks", metas[b].id,
                                 f"label_audio_ids {got} / audio_out_ids "
                                 f"{None if aout_ids is None else tuple(aout_ids.shape)}: expected ({K}, N) both"))
            tally.audio_ok[b] = False
        return None
    if any(m.src_rows < K for m in metas if m.out_T.numel()):
        return None  # reported per sample (audio_codebooks)
    if S != S_exp or int(lay.is_aout.sum()) != S:
        for b in with_audio:
            fails.append(Failure("audio_segment_count", metas[b].id,
                                 f"the batch has {S} audio-out segments for {S_exp} audio-out contents"))
            tally.audio_ok[b] = False
        return None
    return lab_a.cpu().long(), aout_ids.cpu().long(), starts.cpu().long()


# ----------------------------------------------------------------------------- 4. audio segments
@dataclass
class SegmentLayout:
    """The expected layout of a batch's audio-out stream (K codebooks, N columns, S segments).

    Per segment (``(S,)``): ``T`` source frames, ``length`` columns, ``sample`` index, ``target``
    (bool: in an assistant turn at/after ``start_index``), ``role`` code, ``len_ok`` (bool: length
    ``T + segment_extra``). Per column (``(N,)``): ``seg`` index, ``j`` offset in its segment. Zones
    (bool ``(K, N)``, from ``Expect.layout``): ``lead`` (BOS input, ignored label), ``code``,
    ``eos`` (the EOS label column), ``tail`` (after it). ``exp_in``: long ``(K, N)`` expected
    ``audio_out_ids`` (BOS / the cached source code / EOS).
    """

    T: torch.Tensor
    length: torch.Tensor
    sample: torch.Tensor
    target: torch.Tensor
    role: torch.Tensor
    len_ok: torch.Tensor
    seg: torch.Tensor
    j: torch.Tensor
    lead: torch.Tensor
    code: torch.Tensor
    eos: torch.Tensor
    tail: torch.Tensor
    exp_in: torch.Tensor


def segment_layout(starts: torch.Tensor, n_cols: int, metas: list[SampleMeta], lay: TextLayout, tally: AudioTally,
                   expect: Expect) -> SegmentLayout:
    """Lay each segment's :meth:`Expect.layout` (``labels.delay_pattern`` of its T frames) over its
    columns; columns past the expected width read the layout's tail column, so a segment of the
    wrong length is still checked column by column."""
    seg_T = torch.cat([m.out_T for m in metas])
    S = int(seg_T.numel())
    seg_len = torch.diff(torch.cat([starts, torch.tensor([n_cols])]))
    width = seg_T + expect.segment_extra()
    seg_col = torch.repeat_interleave(torch.arange(S), seg_len)
    j = torch.arange(n_cols) - starts[seg_col]
    tmpl = torch.cat([expect.layout(t) for t in seg_T.tolist()], 2)  # (2, K, sum(width + 1))
    tmpl_off = torch.cumsum(width + 1, 0) - (width + 1)
    tcol = tmpl_off[seg_col] + torch.minimum(j, width[seg_col])
    t_in, t_lab = tmpl[0].index_select(1, tcol), tmpl[1].index_select(1, tcol)
    base = expect.marker_base
    lead, code, eos = t_in == expect.bos, t_in >= base, t_lab == expect.eos
    src = torch.cat([m.out_src for m in metas if m.out_T.numel()], 1)
    tot = int(src.shape[1])
    if tot:
        src_off = torch.cumsum(seg_T, 0) - seg_T
        exp_code = src.gather(1, (src_off[seg_col][None] + t_in - base).clamp(0, tot - 1))
    else:
        exp_code = torch.zeros_like(t_in)
    ab, aj = lay.is_aout.nonzero(as_tuple=True)  # the placeholder of each segment, in order
    return SegmentLayout(
        T=seg_T, length=seg_len, sample=torch.repeat_interleave(torch.arange(len(metas)), tally.segments),
        target=lay.after_start[ab, aj] & (lay.role[ab, aj] == ASSISTANT), role=lay.role[ab, aj],
        len_ok=seg_len == width, seg=seg_col, j=j, lead=lead, code=code, eos=eos, tail=~(lead | code | eos),
        exp_in=torch.where(code, exp_code, t_in))


#: Per-column features counted per (codebook, segment) by :func:`segment_counts`.
_FEATURES = ("valid", "n_eos", "n_bos", "code_oob", "code_missing", "code_mismatch", "lead_labeled",
             "tail_labeled", "eos_missing", "in_bos_eos_bad", "in_code_bad", "in_code_oob", "shifted_target")


def _segment_sums(x: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Sums of bool ``x`` (``(..., N)``) over consecutive segments of ``length`` (long ``(S,)``, summing
    to N): long ``(..., S)``. An int32 cumulative sum read at the segment ends: 3x faster here than
    ``index_add_`` of int64 (N < 2**31 columns)."""
    if not length.numel():
        return torch.zeros((*x.shape[:-1], 0), dtype=torch.long)
    at_end = x.cumsum(-1, dtype=torch.int32)[..., torch.cumsum(length, 0) - 1].long()
    return torch.cat([at_end[..., :1], at_end[..., 1:] - at_end[..., :-1]], -1)


def segment_counts(lab_a: torch.Tensor, aout_ids: torch.Tensor, sl: SegmentLayout,
                   expect: Expect) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Count :data:`_FEATURES` per codebook and segment.

    Returns:
        ``(counts, first_valid)``: name -> long ``(K, S)``; long ``(K, S)`` offset of the first
        labeled column of each row of each segment (``iinfo(long).max`` when none).
    """
    K, S = expect.K, int(sl.T.numel())
    valid = lab_a != IGNORE_INDEX
    in_range = (lab_a >= 0) & (lab_a < expect.codebook_size)
    col_ok = sl.len_ok[sl.seg][None]
    bad_in = (aout_ids != sl.exp_in) & col_ok
    feats = torch.stack([
        valid, lab_a == expect.eos, lab_a == expect.bos,
        sl.code & valid & ~in_range,  # code_oob
        sl.code & ~valid,  # code_missing
        sl.code & valid & in_range & (lab_a != aout_ids),  # code_mismatch
        sl.lead & valid, sl.tail & valid,
        sl.eos & (lab_a != expect.eos),  # eos_missing (at its place)
        bad_in & ~sl.code, bad_in & sl.code,
        sl.code & col_ok & ((aout_ids < 0) | (aout_ids >= expect.codebook_size)),  # in_code_oob
        valid & (sl.j[None] >= 1),  # shifted_target
    ])  # (F, K, N) bool
    cnt = _segment_sums(feats, sl.length)  # (F, K, S)
    big = torch.iinfo(torch.long).max
    flat = (torch.arange(K)[:, None] * S + sl.seg[None]).flatten()
    first_valid = torch.full((K * S,), big, dtype=torch.long).scatter_reduce_(
        0, flat, torch.where(valid, sl.j[None], big).flatten(), "amin").view(K, S)
    return dict(zip(_FEATURES, cnt)), first_valid


def _target_label_detail(rule: str, k: int, s: int, c: dict[str, torch.Tensor], first_valid: torch.Tensor,
                         sl: SegmentLayout, expect: Expect) -> str:
    """The message of a target-segment label failure, for its first failing codebook ``k``."""
    if rule == "audio_label_delay_offsets":
        fv = int(first_valid[k, s])
        n_lead = fv if fv < torch.iinfo(torch.long).max else int(sl.length[s])
        return f"codebook {k} has {n_lead} leading {IGNORE_INDEX}, expected {int(expect.lead_columns()[k])}"
    if rule == "audio_label_codes_in_range":
        n_bos = int(c["n_bos"][k, s])
        return (f"codebook {k}: {int(c['code_oob'][k, s])} label codes outside [0, {expect.codebook_size})"
                + (f", {n_bos} BOS {expect.bos}" if n_bos else ""))
    if rule == "audio_label_eos":
        return (f"codebook {k}: {int(c['n_eos'][k, s])} EOS {expect.eos} (expected 1 at column "
                f"{int(expect.lead_columns()[k]) + int(sl.T[s])}), {int(c['tail_labeled'][k, s])} labels after it")
    return (f"codebook {k}: {int(c['code_mismatch'][k, s])} label codes differ from audio_out_ids at the same "
            f"column, {int(c['code_missing'][k, s])} code columns masked")


def check_audio_segments(lab_a: torch.Tensor, aout_ids: torch.Tensor, starts: torch.Tensor, metas: list[SampleMeta],
                         lay: TextLayout, expect: Expect, tally: AudioTally, res: BatchResult) -> None:
    """Per-segment audio rules against the delay-pattern layout.

    Rules: ``audio_segment_length``; ``audio_label_reference_masked`` (reference segments);
    ``audio_labels_present``, ``audio_label_delay_offsets``, ``audio_label_codes_in_range``,
    ``audio_label_eos``, ``audio_label_values`` (assistant-target segments of the right length);
    ``audio_out_bos_eos``, ``audio_out_codes``, ``audio_codes_in_range`` (inputs of every segment of
    the right length). Updates ``tally`` and ``res`` (coverage, per-role audio counts).

    Args:
        lab_a / aout_ids: long ``(K, N)`` ``label_audio_ids`` / ``audio_out_ids``; starts: long ``(S,)``.
    """
    K, fails = expect.K, res.failures
    sids = [m.id for m in metas]
    sl = segment_layout(starts, int(lab_a.shape[1]), metas, lay, tally, expect)
    c, first_valid = segment_counts(lab_a, aout_ids, sl, expect)
    n_valid = c["valid"]
    seg_any = n_valid.sum(0) > 0
    is_tgt_ok = sl.target & sl.len_ok

    def fail(rule: str, s: int, message: str, *flags: torch.Tensor) -> None:
        b = int(sl.sample[s])
        for flag in flags:
            flag[b] = False
        fails.append(Failure(rule, sids[b], message))

    for s in _each(~sl.len_ok):
        fail("audio_segment_length", s, f"segment {s}: {int(sl.length[s])} columns for T={int(sl.T[s])} frames, "
             f"expected {int(sl.T[s]) + expect.segment_extra()} (delay pattern {'on' if expect.delay else 'off'}, "
             f"K={K})", tally.audio_ok, tally.bos_eos_ok)
    for s in _each(~sl.target & seg_any):
        fail("audio_label_reference_masked", s, f"reference segment {s} (turn before start_index="
             f"{metas[int(sl.sample[s])].start_index}) has {int(n_valid[:, s].sum())} labels", tally.audio_ok)
    for s in _each(is_tgt_ok & ~seg_any):
        fail("audio_labels_present", s, f"target segment {s} ({int(sl.T[s])} frames): all {K} x "
             f"{int(sl.length[s])} labels are {IGNORE_INDEX}", tally.audio_ok)

    chk = (is_tgt_ok & seg_any)[None]  # (1, S)
    label_rules = (
        ("audio_label_delay_offsets", chk & (first_valid != expect.lead_columns()[:, None]), ()),
        ("audio_label_codes_in_range", chk & ((c["code_oob"] > 0) | (c["n_bos"] > 0)), (tally.codes_ok,)),
        ("audio_label_eos", chk & ((c["n_eos"] != 1) | (c["eos_missing"] > 0) | (c["tail_labeled"] > 0)),
         (tally.bos_eos_ok,)),
        ("audio_label_values", chk & ((c["code_mismatch"] > 0) | (c["code_missing"] > 0)), ()),
    )
    for rule, bad, flags in label_rules:  # bad: (K, S)
        for s in _each(bad.any(0)):
            ks = _each(bad[:, s])
            fail(rule, s, f"target segment {s}, codebooks {ks}: "
                 f"{_target_label_detail(rule, ks[0], s, c, first_valid, sl, expect)}", tally.audio_ok, *flags)

    in_oob = (c["in_code_oob"].sum(0) > 0) & sl.len_ok
    for s in _each((c["in_bos_eos_bad"].sum(0) > 0) & sl.len_ok):
        ks = _each(c["in_bos_eos_bad"][:, s] > 0)
        fail("audio_out_bos_eos", s, f"segment {s}, codebooks {ks}: {int(c['in_bos_eos_bad'][:, s].sum())} BOS/EOS "
             f"entries of audio_out_ids off the delay pattern (BOS {expect.bos} x (k+1), EOS {expect.eos} after the "
             f"codes)", tally.bos_eos_ok)
    for s in _each((c["in_code_bad"].sum(0) > 0) & sl.len_ok & ~in_oob):
        fail("audio_out_codes", s, f"segment {s}: {int(c['in_code_bad'][:, s].sum())} audio_out_ids codes differ "
             f"from the cached codes")
    for s in _each(in_oob):
        fail("audio_codes_in_range", s, f"segment {s}: {int(c['in_code_oob'][:, s].sum())} audio_out_ids codes "
             f"outside [0, {expect.codebook_size})", tally.codes_ok)

    # counts and coverage
    tally.targets.index_add_(0, sl.sample, c["shifted_target"].t())
    tally.cols.index_add_(0, sl.sample, sl.length)
    tally.n_ref.index_add_(0, sl.sample, (~sl.target).long())
    res.cov_valid += (n_valid * is_tgt_ok[None]).sum(1)
    res.cov_cols += int((sl.length * is_tgt_ok).sum())
    for rc in range(NO_ROLE + 1):
        sel = sl.role == rc
        res.role_audio[rc, 0] += int((sl.length * sel).sum()) * K
        res.role_audio[rc, 1] += int((n_valid.sum(0) * sel).sum())


def count_audio_in(batch, ids: torch.Tensor, lay: TextLayout, expect: Expect, res: BatchResult) -> None:
    """Add the audio-in positions (prompt audio: never targets) to ``res.role_audio`` by role."""
    a_in, ist = batch.audio_in_ids, batch.audio_in_ids_start
    if a_in is None or ist is None or not ist.numel():
        return
    in_len = torch.diff(torch.cat([ist.cpu().long(), torch.tensor([int(a_in.shape[1])])]))
    ib, ij = (ids == expect.audio_in).nonzero(as_tuple=True)
    if ib.numel() == in_len.numel():
        res.role_audio[:, 0].index_add_(0, lay.role[ib, ij], in_len * int(a_in.shape[0]))


# ------------------------------------------------------------------------------- 5. target counts
def check_train_counts(batch, lab: torch.Tensor, stream: tuple | None, sids: list[str], expect: Expect,
                       text_tgt: torch.Tensor, tally: AudioTally, fails: list[Failure]) -> torch.Tensor:
    """``train_target_counts``: the audit's counts against the model's expansion (:func:`dry_expand`;
    skipped with Whisper features, whose expansion needs the audio tower) and ``loss.count_targets``
    (when the audio stream was checked: ``stream`` from :func:`checkable_audio_stream`).

    Returns:
        long ``(B,)`` text targets of the expanded labels (-1 where not computed).
    """
    B = int(lab.shape[0])
    exp_text = torch.full((B,), -1, dtype=torch.long)
    if expect.skip_audio_tower:
        try:
            exp_labels, exp_aout = dry_expand(batch, expect)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            fails += [Failure("train_target_counts", s, f"merge_input_ids_with_audio_features raised "
                              f"{type(exc).__name__}: {exc}") for s in sids]
        else:
            exp_text = (exp_labels[:, 1:] != IGNORE_INDEX).sum(1)
            exp_aud_pos = exp_aout.sum(1)
            for b in _each((exp_text != text_tgt) | ((exp_aud_pos != tally.cols) & tally.audio_ok)):
                fails.append(Failure("train_target_counts", sids[b],
                                     f"count_targets counts {int(text_tgt[b])} text targets, expanded_labels "
                                     f"{int(exp_text[b])}; {int(exp_aud_pos[b])} audio-out positions for "
                                     f"{int(tally.cols[b])} label columns"))
    if stream is not None:
        lab_a, _, starts = stream
        ct = count_targets(lab, lab_a, starts, num_codebooks=expect.K)
        audio = tally.targets.sum(0)
        if ct.text != int(text_tgt.sum()) or not torch.equal(ct.codebooks.cpu(), audio):
            fails += [Failure("train_target_counts", s, f"loss.count_targets {ct.text}/{ct.codebooks.tolist()} "
                              f"differs from the audit's per-segment counts {int(text_tgt.sum())}/"
                              f"{audio.tolist()}") for s in sids]
    return exp_text


# ------------------------------------------------------------------------------------ 6. sample rows
def sample_rows(metas: list[SampleMeta], lay: TextLayout, text_ok: torch.Tensor, text_tgt: torch.Tensor,
                exp_text: torch.Tensor, tally: AudioTally, K: int, fails: list[Failure]) -> dict[str, list]:
    """The per-sample columns of ``samples.parquet`` (one list entry per sample) and ``has_targets``.

    Columns: ``n_text_tokens``, ``n_text_targets``, ``n_text_targets_expanded``, ``n_audio_segments``,
    ``n_reference_segments``, ``n_audio_columns``, ``n_audio_frames``, ``n_audio_targets``,
    ``n_audio_targets_cb{k}``, ``masked_fraction`` (1 - targets / (text positions + K x audio
    columns)), ``bos_eos_ok``, ``codes_in_range``, ``text_labels_ok``, ``audio_labels_ok``.
    """
    n_text_tok = lay.am.sum(1)
    n_aud_t = tally.targets.sum(1)
    slots = n_text_tok + tally.cols * K
    learn = text_tgt + n_aud_t
    for b in _each(learn == 0):
        fails.append(Failure("has_targets", metas[b].id, f"no learnable target: {int(n_text_tok[b])} text positions "
                             f"and {int(tally.cols[b])} audio columns are all {IGNORE_INDEX}"))
    return {
        "n_text_tokens": n_text_tok.tolist(), "n_text_targets": text_tgt.tolist(),
        "n_text_targets_expanded": exp_text.tolist(), "n_audio_segments": tally.segments.tolist(),
        "n_reference_segments": tally.n_ref.tolist(), "n_audio_columns": tally.cols.tolist(),
        "n_audio_frames": [int(m.out_T.sum()) for m in metas], "n_audio_targets": n_aud_t.tolist(),
        **{f"n_audio_targets_cb{k}": tally.targets[:, k].tolist() for k in range(K)},
        "masked_fraction": (1.0 - learn.double() / slots.clamp(min=1).double()).tolist(),
        "bos_eos_ok": tally.bos_eos_ok.tolist(), "codes_in_range": tally.codes_ok.tolist(),
        "text_labels_ok": text_ok.tolist(), "audio_labels_ok": tally.audio_ok.tolist(),
    }


# ------------------------------------------------------------------------------------------ batches
def audit_batch(batch, metas: list[SampleMeta], expect: Expect) -> BatchResult:
    """Check one collated batch against every per-sample rule (steps 1-6 of the module docstring).

    Args:
        batch: ``HiggsAudioBatchInput`` from the collator under audit (``input_ids``/``label_ids``/
            ``attention_mask`` ``(B, L)``, ``audio_out_ids``/``label_audio_ids`` long ``(K, N)``,
            ``audio_out_ids_start`` long ``(S,)``); tensors may be on any device.
        metas: the batch's :class:`SampleMeta`, in order.
        expect: :class:`Expect` from the model config.

    Returns:
        :class:`BatchResult` with one entry per sample in every ``rows`` column (``rows`` is empty
        and every sample has a ``collate`` failure when ``label_ids`` is None). Nothing is raised
        for a faulty batch: every fault is a :class:`Failure`.
    """
    res = BatchResult.empty(expect.K)
    sids = [m.id for m in metas]
    if batch.label_ids is None:
        res.failures += [Failure("collate", s, "collator returned label_ids=None") for s in sids]
        return res
    ids, lab, am = batch.input_ids.cpu(), batch.label_ids.cpu(), batch.attention_mask.cpu().bool()
    lay = role_spans(ids, am, metas, expect)
    text_ok, text_tgt = check_text_labels(ids, lab, lay, sids, res)
    tally = AudioTally.start(metas, expect.K)
    check_audio_sources(metas, lay, expect, tally, res.failures)
    stream = checkable_audio_stream(batch, metas, lay, expect, tally, res.failures)
    if stream is not None and stream[2].numel():
        check_audio_segments(*stream, metas, lay, expect, tally, res)
    count_audio_in(batch, ids, lay, expect, res)
    exp_text = check_train_counts(batch, lab, stream, sids, expect, text_tgt, tally, res.failures)
    res.text_targets = int(text_tgt.sum())
    res.audio_targets = tally.targets.sum(0)
    res.rows = sample_rows(metas, lay, text_ok, text_tgt, exp_text, tally, expect.K, res.failures)
    return res


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (unchanged when ``n`` is falsy), then restore."""
    if not n:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_tensor_checks(samples: list, metas: list[SampleMeta | None], collator, expect: Expect,
                      batch_size: int) -> tuple[list[BatchResult | None], list[Failure], int]:
    """Collate the built samples in order, ``batch_size`` at a time, and :func:`audit_batch` each batch.

    Args:
        samples / metas: from :func:`~higgs_tune.audit.expect.build_samples` (``None`` entries skipped).

    Returns:
        ``(results, collate failures, n samples checked)``: one :class:`BatchResult` per batch, its
        ``rows["_index"]`` holding the batch's positions in ``samples``; ``None`` for a batch whose
        collation raised (each of its samples gets a ``collate`` failure).
    """
    idx = [i for i, s in enumerate(samples) if s is not None]
    results, fails = [], []
    for j in range(0, len(idx), batch_size):
        chunk = idx[j:j + batch_size]
        r, f = check_batch([samples[i] for i in chunk], [metas[i] for i in chunk], collator, expect)
        fails += f
        if r is not None:
            r.rows["_index"] = chunk
        results.append(r)
    return results, fails, len(idx)


def check_batch(samples: list, metas: list[SampleMeta], collator, expect: Expect) -> tuple[BatchResult | None,
                                                                                             list[Failure]]:
    """Collate one batch of built samples and :func:`audit_batch` it.

    Returns:
        ``(result, [])``; or ``(None, failures)`` when collation raised (one ``collate`` failure per
        sample). Nothing is raised.
    """
    try:
        batch = collator(samples)
    except Exception as exc:  # noqa: BLE001
        return None, [Failure("collate", m.id, f"collator raised {type(exc).__name__}: {exc}") for m in metas]
    return audit_batch(batch, metas, expect), []
