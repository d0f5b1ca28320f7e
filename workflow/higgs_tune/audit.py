"""The label audit gate: prove that the tensors training will see teach the model the right thing.

Training only starts when ``Paths.audit_summary`` says ``"passed": true``. The audit rebuilds the
**exact** training tensors from the kept manifests and the cached codes, with the functions training
uses (:func:`higgs_tune.data.build_dataset_sample` -> :func:`higgs_tune.data.make_collator` on the
model config), then checks them against rules derived independently of the collator:

* **text labels** (teacher forcing, unshifted: the label of position ``t`` is the token at ``t``,
  ignore index -100). Role spans are re-derived from the token stream
  (``<|start_header_id|>role<|end_header_id|>\\n\\n`` headers): only assistant turns at/after
  ``start_index`` carry labels; system and user turns, the header prefixes, the padding and the
  ``<|AUDIO_OUT|>`` placeholder are all -100; the assistant targets are all present; every sample
  has at least one learnable target and its masked fraction is under a threshold.
* **audio labels and inputs** per ``<|AUDIO_OUT|>`` segment and codebook ``k`` (K codebooks, T
  frames of source codes). With the delay pattern, label row k is ``(k+1) x -100``, the T codes of
  codebook k, one EOS (1025), ``(K-1-k) x -100``; ``audio_out_ids`` row k is ``(k+1) x BOS (1024)``,
  the T codes, ``(K-k) x EOS``. Without it: ``-100, codes, EOS`` / ``BOS, codes, EOS``. Reference
  (prompt) audio before ``start_index`` has labels all -100. Codes lie in ``[0, codebook_size)``.
* **collator settings** equal what the model config implies (:func:`higgs_tune.data.collator_settings`,
  as the upstream serve engine derives them): a train/inference mismatch fails.
* **train-time counts**: ``loss.count_targets`` on the collated batch equals the count of the
  model's ``expanded_labels`` (the model's own ``merge_input_ids_with_audio_features``, run with
  1-d dummy embeddings), and the expanded stream has one audio-out position per label column.
* **leak probe** through the real model and the real loss wiring (see :func:`leak_probe`).

A *loss wiring* is any callable with the signature of :func:`higgs_tune.loss.higgs_loss`
(``logits, expanded_labels, audio_logits, label_audio_ids, audio_out_ids_start``) returning an
object with ``text_loss``, ``codebook_losses`` ``(K,)``, ``n_text_targets`` and
``n_codebook_targets`` ``(K,)``. The probe gets the per-target view of a wiring without trusting
it: it keeps one label and sets every other label to the ignore index, so the wiring's loss *is* the
term of that single target, and its target count says whether the wiring counts it at all.

CLI::

    python -m higgs_tune.audit --configfile config/demo.yaml

writes ``Paths.audit_summary`` (JSON) and ``Paths.audit_samples`` (parquet, one row per sample), and
exits with status 1 when the gate fails (after writing both).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import data as D
from . import loss as L
from .config import Paths, add_config_args, config_from_args

IGNORE = L.IGNORE_INDEX
ROLES = ("system", "user", "assistant")
_ROLE_CODE = {r: i for i, r in enumerate(ROLES)}
_NO_ROLE = 3  # tokens before the first header (<|begin_of_text|>) or an unknown role

#: ``audit:`` config keys read by this stage and their defaults.
DEFAULTS: dict[str, Any] = {
    "max_masked_fraction": 0.999,  # per sample: 1 - learnable / label slots (text positions + K x audio columns)
    "min_audio_label_coverage": 0.5,  # per codebook, over assistant-target audio columns
    "leak_probe": True,
    "leak_probe_samples": 2,  # batch size of the probe (>= 2 avoids forward's batch-1 left padding)
    "leak_tolerance": 1.0e-4,  # |delta loss| / |delta logit| below this is "unchanged"
    "batch_size": 32,  # batch size of the tensor checks (labels do not depend on it; padding does)
    "num_threads": 1,  # torch threads for the tensor checks (tiny ops: thread sync dominates)
    "max_failures_per_rule": 50,  # failures listed per rule in summary.json (n_failed counts all)
    "probe_with_lora": True,  # probe the model as training wraps it (model.apply_lora)
}

#: rule name -> (description, likely cause). Order is the order of ``summary["rules"]``.
RULES: dict[str, tuple[str, str]] = {
    "samples_present": (
        "the kept train/val manifests hold at least one sample",
        "the manifest stage quarantined everything or wrote empty manifests"),
    "sample_build": (
        "every kept row becomes a ChatMLDatasetSample (prepare_chatml_sample accepts it, its audio has cached codes)",
        "the tokenize stage did not cache codes for this audio (misc.audio_sha256 points to a hash missing from the "
        "tokens index) or the ChatML row is malformed"),
    "collate": (
        "the collator turns every batch into HiggsAudioBatchInput with text and audio labels",
        "the collator raised or returned no labels (label_ids None)"),
    "collator_settings": (
        "collator settings (use_delay_pattern, audio_num_codebooks, encode_whisper_embed, return_audio_in_tokens, "
        "special ids) equal what the model config implies (data.collator_settings, as the serve engine derives them)",
        "the collator was built by hand or from another config: training tensors would differ from inference's"),
    "text_role_spans": (
        "the token stream has one <|start_header_id|>role<|end_header_id|>\\n\\n header per ChatML message, "
        "roles in order",
        "the text tokenizer does not match the model (header/special tokens split differently) or the chat "
        "template changed"),
    "text_labels_only_assistant": (
        "text labels only on assistant turns at/after start_index: system and user turns, header prefixes, "
        "assistant turns before start_index and padding are all -100",
        "labels built from input_ids without the role mask (prompt tokens become targets) or start_index ignored"),
    "text_labels_assistant_targets": (
        "every assistant token at/after start_index (after the header, except <|AUDIO_OUT|>) is a target",
        "over-masking: assistant text masked (a mask applied to all text, a wrong start_index, or a truncation)"),
    "text_label_values": (
        "each text label equals the input token at its own position (labels are unshifted; the loss shifts)",
        "labels were shifted in the data pipeline (the loss shifts again: double shift) or built from other text"),
    "audio_out_token_label_masked": (
        "the <|AUDIO_OUT|> placeholder's text label is -100",
        "collator built with mask_audio_out_token_label=False"),
    "has_targets": (
        "every sample has at least one learnable target (text or audio)",
        "a sample whose every label is -100 (all turns before start_index, or audio labels wiped)"),
    "masked_fraction": (
        "per sample, 1 - learnable targets / label slots (text positions + K x audio columns) <= max_masked_fraction",
        "most of the sample is prompt (a long reference) or labels were masked by mistake"),
    "audio_codebooks": (
        "audio_out_ids / label_audio_ids have audio_num_codebooks rows and the source codes at least as many",
        "the codec's number of codebooks differs from the model's audio_num_codebooks"),
    "audio_segment_count": (
        "one audio-out segment per <|AUDIO_OUT|> token, each in an assistant turn",
        "audio contents and placeholder tokens disagree (a broken ChatML row or collator)"),
    "audio_segment_length": (
        "each audio-out segment has T + K + 1 columns with the delay pattern (T + 2 without) for T source frames",
        "delay pattern on/off differs between collator and model, or codes truncated/padded"),
    "audio_labels_present": (
        "assistant-target audio segments have labels (not all -100)",
        "the target audio is treated as reference (start_index too large, or the collator's no-train flag set)"),
    "audio_label_delay_offsets": (
        "label row k of a target segment starts with exactly k+1 -100 with the delay pattern (1 without)",
        "the delay pattern was applied with wrong offsets (or twice / not at all) to the labels"),
    "audio_label_codes_in_range": (
        "target label codes lie in [0, codebook_size); no audio-stream BOS (1024) in labels",
        "codes from a codec with a larger codebook, corrupted codes, or BOS written into labels"),
    "audio_label_eos": (
        "label row k has exactly one EOS (1025) right after its T codes, then -100 to the segment end",
        "EOS missing (no stop target: generation never ends) or the tail filled with EOS"),
    "audio_label_values": (
        "each target label code equals the audio_out_ids code at its own column (unshifted; the loss shifts)",
        "audio labels shifted in the data pipeline or taken from other audio"),
    "audio_label_reference_masked": (
        "reference (prompt) audio segments before start_index have labels all -100",
        "the collator's audio_out_no_train_flag is not applied: the model would learn to copy the prompt"),
    "audio_out_bos_eos": (
        "audio_out_ids row k has BOS 1024 exactly at its k+1 leading columns and EOS 1025 exactly after the codes",
        "delay pattern built with other ids or offsets; stream BOS/EOS ids differ from the model config"),
    "audio_out_codes": (
        "audio_out_ids carry the cached source codes at the delay-pattern columns",
        "codes were re-ordered, truncated or taken from another audio"),
    "audio_codes_in_range": (
        "source codes and audio_out_ids codes lie in [0, codebook_size)",
        "codes from a codec with another codebook size (they would index another codebook's embedding)"),
    "codebook_coverage": (
        "per codebook, the fraction of assistant-target audio columns with a label >= min_audio_label_coverage",
        "audio labels masked (all -100) or codebooks dropped"),
    "train_target_counts": (
        "loss.count_targets on the collated batch equals the targets of the model's expanded_labels, and the "
        "expanded stream has one audio-out position per label_audio_ids column",
        "label_ids and input_ids disagree on audio placeholders, or the audio segments do not match the placeholders"),
    "probe_model_forward": (
        "the model forward runs on a real training batch and returns logits, expanded_labels, audio_logits",
        "a wrapper changed the forward's signature (peft task_type='CAUSAL_LM' passes labels=...)"),
    "shapes_text": (
        "expanded_labels has the shape of logits[:, :, 0]",
        "labels were not expanded by the model (passed under another name) or logits truncated"),
    "shapes_audio": (
        "audio_logits has one row per label_audio_ids column (> 0 when the batch has audio outputs), K codebooks, "
        "codebook_size + 2 classes",
        "a wrapper dropped audio_out_ids / label_audio_ids before HiggsAudioModel.forward (no audio loss at all)"),
    "probe_loss_runs": (
        "the loss wiring runs on the real batch and on single-target label sets",
        "the loss wiring raised (see message)"),
    "probe_target_counts": (
        "the loss wiring counts as many targets as loss.count_targets (the train-time normalizer)",
        "the wiring's shift or masking differs from count_targets (double shift, cross-segment targets)"),
    "probe_text_no_leak": (
        "changing the input token at t does not change the loss of the target at t",
        "unshifted text loss: logits at t (which saw token t) are scored against the label of t; use "
        "CE(logits[:, :-1], expanded_labels[:, 1:]) (loss.higgs_loss)"),
    "probe_text_next_token": (
        "changing the input token at t changes the loss of the target at t+1 (it is predicted from logits at t)",
        "double shift: labels shifted in the pipeline and again in the loss, or the loss skips a position"),
    "probe_audio_no_leak": (
        "changing audio_out_ids[:, i] does not change the loss of the label column i",
        "unshifted audio loss: audio_logits[i] scored against label_audio_ids[:, i]; pair row i with column i+1 "
        "inside the segment (loss.shifted_audio_targets)"),
    "probe_audio_next_code": (
        "changing audio_out_ids[:, i] changes the loss of label column i+1 (it is predicted from audio_logits[i])",
        "double shift (row i paired with column i+2) or the audio loss ignores audio_logits"),
    "probe_audio_segment_boundary": (
        "a label at the first column of a segment is never a target (nothing in the segment precedes it)",
        "cross-segment shift: the shift runs over the concatenated audio stream ignoring audio_out_ids_start"),
    "probe_causal_logits": (
        "changing an input at t leaves all logits before t (and other samples' logits) unchanged",
        "the attention is not causal (mask/padding handling) or samples of a batch interact"),
}

_RULE_SCOPE = {name: "probe" for name in RULES if name.startswith(("probe_", "shapes_"))}
_RULE_SCOPE.update(codebook_coverage="aggregate", samples_present="aggregate", collator_settings="aggregate")


# ------------------------------------------------------------------------------------ expectations
@dataclass
class Expect:
    """What the model config and the text tokenizer imply for the tensors (independent of the collator).

    Attributes:
        K: audio_num_codebooks. codebook_size: codes per codebook (1024). bos / eos: audio-stream BOS and
        EOS ids (1024 / 1025). delay: use_delay_pattern. audio_in / audio_out: ``<|AUDIO|>`` /
        ``<|AUDIO_OUT|>`` ids. pad: pad_token_id. start_header / end_header / nl: header token ids.
        role_tokens: role token id -> role code. prefix_len: tokens of a turn header (4).
        encode_audio_in_tokens / skip_audio_tower: how forward embeds audio-in (for the dry merge).
    """

    K: int
    codebook_size: int
    bos: int
    eos: int
    delay: bool
    audio_in: int
    audio_out: int
    pad: int
    start_header: int
    end_header: int
    nl: int
    role_tokens: dict[int, int]
    prefix_len: int
    encode_audio_in_tokens: bool
    skip_audio_tower: bool

    @classmethod
    def from_model(cls, model_config, text_tokenizer) -> "Expect":
        """Build from a ``HiggsAudioConfig`` and the Higgs text tokenizer.

        Raises:
            ValueError: when a role or the header prefix does not tokenize as Llama-3 headers do.
        """
        role_tokens: dict[int, int] = {}
        prefix_len, nl = None, None
        sh = text_tokenizer.convert_tokens_to_ids("<|start_header_id|>")
        eh = text_tokenizer.convert_tokens_to_ids("<|end_header_id|>")
        for role, code in _ROLE_CODE.items():
            ids = text_tokenizer.encode(f"<|start_header_id|>{role}<|end_header_id|>\n\n", add_special_tokens=False)
            if len(ids) != 4 or ids[0] != sh or ids[2] != eh:
                raise ValueError(f"header of role {role!r} tokenizes to {ids}: expected 4 tokens "
                                 f"<|start_header_id|> role <|end_header_id|> \\n\\n")
            role_tokens[ids[1]] = code
            prefix_len, nl = len(ids), ids[3]
        return cls(
            K=int(model_config.audio_num_codebooks), codebook_size=int(model_config.audio_codebook_size),
            bos=int(model_config.audio_stream_bos_id), eos=int(model_config.audio_stream_eos_id),
            delay=bool(model_config.use_delay_pattern), audio_in=int(model_config.audio_in_token_idx),
            audio_out=int(model_config.audio_out_token_idx), pad=int(model_config.pad_token_id),
            start_header=int(sh), end_header=int(eh), nl=int(nl), role_tokens=role_tokens, prefix_len=int(prefix_len),
            encode_audio_in_tokens=bool(model_config.encode_audio_in_tokens),
            skip_audio_tower=bool(model_config.skip_audio_tower),
        )

    def segment_extra(self) -> int:
        """Columns a segment adds to its T frames: K + 1 with the delay pattern, else 2 (BOS + EOS)."""
        return self.K + 1 if self.delay else 2


@dataclass
class SampleMeta:
    """Per-sample facts computed once, when the sample is built (tokenization is cached with it).

    ``out_T``: long ``(S_b,)`` frames of each audio-out segment; ``out_src``: long ``(K, sum(out_T))``
    their source codes (first K rows); ``roles``: role code per ChatML message.
    """

    id: str
    split: str
    start_index: int  # -1 when None
    roles: list[int]
    out_T: torch.Tensor
    out_src: torch.Tensor
    src_in_range: bool
    src_rows: int
    n_audio_tokens_ok: bool


@dataclass
class Failure:
    rule: str
    sample_id: str
    message: str
    likely_cause: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "sample_id": self.sample_id, "message": self.message,
                "likely_cause": self.likely_cause or RULES[self.rule][1]}


@dataclass
class BatchResult:
    """Output of :func:`audit_batch`: per-sample columns (lists, one entry per sample), failures, sums."""

    rows: dict[str, list] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    role_text: torch.Tensor = field(default_factory=lambda: torch.zeros(4, 2, dtype=torch.long))  # (role, [pos, tgt])
    role_audio: torch.Tensor = field(default_factory=lambda: torch.zeros(4, 2, dtype=torch.long))
    cov_valid: torch.Tensor | None = None  # (K,) labeled columns of target segments per codebook
    cov_cols: int = 0  # columns of target segments
    text_targets: int = 0
    audio_targets: torch.Tensor | None = None  # (K,)


# ------------------------------------------------------------------------------------------ building
def _model_config(model):
    """The ``HiggsAudioConfig`` of a model, a peft wrapper of one, or any object with ``.config``."""
    base = model
    with contextlib.suppress(Exception):
        base = model.get_base_model()
    cfg = getattr(base, "config", None) or getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "audio_num_codebooks"):
        raise TypeError(f"{type(model).__name__} has no HiggsAudioConfig (.config)")
    return cfg


def _config_only(model_cfg: dict[str, Any]):
    """``HiggsAudioConfig`` from the ``model`` config section without loading weights."""
    from .model import tiny_higgs_config

    if model_cfg["source"] == "random_init":
        return tiny_higgs_config(model_cfg["arch"])
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    return HiggsAudioConfig.from_pretrained(model_cfg["path"])


def build_samples(rows: list[dict], split: list[str], text_tokenizer, codes_of: Callable[[str], torch.Tensor],
                  expect: Expect) -> tuple[list, list[SampleMeta | None], list[Failure]]:
    """Tokenize each row once: ``(ChatMLDatasetSample | None, SampleMeta | None)`` per row, plus build failures.

    Rows that ``data.build_dataset_sample`` rejects (missing codes, malformed ChatML) get a
    ``sample_build`` failure and ``None``.
    """
    samples, metas, failures = [], [], []
    for row, sp in zip(rows, split):
        sid = D.sample_id(row)
        try:
            s = D.build_dataset_sample(row, text_tokenizer, codes_of)
        except KeyError as exc:
            failures.append(Failure("sample_build", sid, f"no cached codes: {exc.args[0] if exc.args else exc}"))
            samples.append(None), metas.append(None)
            continue
        except Exception as exc:  # ValueError from prepare_chatml_sample, dacite, ...
            failures.append(Failure("sample_build", sid, f"{type(exc).__name__}: {exc}"))
            samples.append(None), metas.append(None)
            continue
        ids = s.input_ids
        aud = ids[(ids == expect.audio_in) | (ids == expect.audio_out)]
        n_aud = int(s.audio_ids_start.numel())
        out_idx = (aud == expect.audio_out).nonzero().flatten().tolist()
        ends = torch.cat([s.audio_ids_start, torch.tensor([s.audio_ids_concat.shape[1]])]) if n_aud else None
        segs = [s.audio_ids_concat[:, int(ends[i]):int(ends[i + 1])] for i in out_idx if i < n_aud]
        concat = s.audio_ids_concat
        src_rows = int(concat.shape[0])
        in_range = bool(((concat >= 0) & (concat < expect.codebook_size)).all()) if concat.numel() else True
        out_T = torch.tensor([c.shape[1] for c in segs], dtype=torch.long)
        out_src = torch.cat([c[: expect.K] for c in segs], 1) if segs else torch.zeros((min(src_rows, expect.K), 0),
                                                                                         dtype=torch.long)
        roles = [_ROLE_CODE.get(m.get("role"), _NO_ROLE) for m in row.get("messages", [])]
        si = row.get("start_index")
        metas.append(SampleMeta(sid, sp, -1 if si is None else int(si), roles, out_T, out_src.long(), in_range,
                                src_rows, len(aud) == n_aud))
        samples.append(s)
    return samples, metas, failures


# ------------------------------------------------------------------------------------ tensor checks
_PLACE_NAMES = ("a system turn", "a user turn", "an assistant turn before start_index", "an unknown-role turn",
                "header tokens", "padding")
_PLACE_CAUSES = {
    "a system turn": "text labels on a system turn: the role mask was not applied (prompt tokens become targets)",
    "a user turn": "text labels on a user turn: the role mask was not applied (prompt tokens become targets)",
    "an assistant turn before start_index": "start_index ignored: the reference/prompt assistant turns are trained",
    "header tokens": "labels on <|start_header_id|>role<|end_header_id|> prefixes: labels copied from input_ids",
    "padding": "padding labeled: pad labels must be -100 (the collator pads labels with -100)",
}


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim (0 when none)."""
    return mask.to(torch.uint8).argmax(-1)


def audit_batch(batch, metas: list[SampleMeta], expect: Expect) -> BatchResult:
    """Check one collated batch against the rules; vectorized over tokens, columns and segments.

    Args:
        batch: ``HiggsAudioBatchInput`` from the collator under audit (``input_ids``/``label_ids``
            ``(B, L)``, ``audio_out_ids``/``label_audio_ids`` ``(K, N)``, ``audio_out_ids_start`` ``(S,)``).
        metas: the batch's :class:`SampleMeta`, in order.
        expect: :class:`Expect` from the model config.

    Returns:
        :class:`BatchResult` with one entry per sample in every ``rows`` column.
    """
    res = BatchResult()
    ids, lab = batch.input_ids.cpu(), batch.label_ids
    B, Lt = ids.shape
    sids = [m.id for m in metas]
    fails = res.failures
    if lab is None:
        fails += [Failure("collate", s, "collator returned label_ids=None") for s in sids]
        return res
    lab = lab.cpu()
    am = batch.attention_mask.cpu().bool()
    ar = torch.arange(Lt)

    # ---- role spans from the token stream
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
    role_code_tab = torch.full_like(role_tab, _NO_ROLE)
    for tok, code in expect.role_tokens.items():
        role_code_tab[role_tab == tok] = code
    tcl = turn.clamp(min=0)
    role = torch.where(turn >= 0, role_code_tab.gather(1, tcl), torch.full_like(turn, _NO_ROLE))
    offset = ar - hdr_pos.gather(1, tcl)
    si = torch.tensor([m.start_index for m in metas], dtype=torch.long)
    after_start = (si[:, None] < 0) | (turn >= si[:, None])
    content = (turn >= 0) & (offset >= expect.prefix_len) & am
    is_aout = ids == expect.audio_out
    expect_learn = content & (role == _ROLE_CODE["assistant"]) & after_start & ~is_aout
    labeled = lab != IGNORE

    # role spans vs the ChatML messages
    exp_roles = torch.full((B, nt + 1), -1, dtype=torch.long)
    n_msgs = torch.tensor([len(m.roles) for m in metas], dtype=torch.long)
    for b, m in enumerate(metas):
        if m.roles:
            exp_roles[b, : min(len(m.roles), nt + 1)] = torch.tensor(m.roles[: nt + 1])
    bad_hdr = torch.zeros(B, dtype=torch.long).index_add_(0, bh, (~hdr_ok).long())
    valid_turn = torch.arange(nt + 1)[None, :] < n_turns[:, None]
    role_mismatch = ((role_code_tab != exp_roles) & valid_turn).sum(1)
    span_bad = (n_turns != n_msgs) | (bad_hdr > 0) | (role_mismatch > 0)

    # text label rules
    wrong_place = labeled & ~expect_learn & ~is_aout
    missing = expect_learn & ~labeled
    wrong_value = labeled & (lab != ids)
    aout_labeled = labeled & is_aout
    n_wrong_place, n_missing = wrong_place.sum(1), missing.sum(1)
    prefix = am & ((turn < 0) | (offset < expect.prefix_len))
    place_counts = torch.stack([
        (wrong_place & ~prefix & (role == _ROLE_CODE["system"])).sum(1),
        (wrong_place & ~prefix & (role == _ROLE_CODE["user"])).sum(1),
        (wrong_place & ~prefix & (role == _ROLE_CODE["assistant"])).sum(1),
        (wrong_place & ~prefix & (role == _NO_ROLE)).sum(1),
        (wrong_place & prefix).sum(1),
        (wrong_place & ~am).sum(1),
    ], 1)  # (B, 6) in _PLACE_NAMES order
    n_wrong_value, n_aout_lab = wrong_value.sum(1), aout_labeled.sum(1)
    text_tgt = labeled[:, 1:].sum(1)
    n_text_tok = am.sum(1)

    # role/modality bookkeeping (text)
    for rc in range(4):
        sel = (role == rc) & am
        res.role_text[rc, 0] += int(sel.sum())
        res.role_text[rc, 1] += int((sel & labeled).sum())

    bad_rows = (span_bad | (n_wrong_place > 0) | (n_missing > 0) | (n_wrong_value > 0) | (n_aout_lab > 0)).nonzero()
    for b in bad_rows.flatten().tolist():
        sid = sids[b]
        if span_bad[b]:
            fails.append(Failure("text_role_spans", sid,
                                 f"{int(n_turns[b])} headers in the token stream for {int(n_msgs[b])} messages"
                                 f"{'' if not bad_hdr[b] else f', {int(bad_hdr[b])} malformed headers'}"
                                 f"{'' if not role_mismatch[b] else ', roles differ from the ChatML messages'}"))
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
                                 f"{int(n_missing[b])} of {int(expect_learn[b].sum())} assistant target tokens "
                                 f"are -100 "
                                 f"(first at token {j}, turn {int(turn[b, j])})"))
        if n_wrong_value[b]:
            j = int(_first_true(wrong_value[b]))
            fails.append(Failure("text_label_values", sid,
                                 f"{int(n_wrong_value[b])} labels differ from the input token at their position "
                                 f"(first at {j}: label {int(lab[b, j])}, input {int(ids[b, j])})"))
        if n_aout_lab[b]:
            fails.append(Failure("audio_out_token_label_masked", sid,
                                 f"{int(n_aout_lab[b])} <|AUDIO_OUT|> labels are not -100"))

    # ---- audio-out segments
    K = expect.K
    seg_per_sample = torch.tensor([int(m.out_T.numel()) for m in metas], dtype=torch.long)
    S_exp = int(seg_per_sample.sum())
    aout_ids, lab_a, starts = batch.audio_out_ids, batch.label_audio_ids, batch.audio_out_ids_start
    N = int(lab_a.shape[1]) if lab_a is not None and lab_a.dim() == 2 else 0
    S = int(starts.numel()) if starts is not None else 0
    n_aud_tok = is_aout.sum(1)
    aud_targets = torch.zeros((B, K), dtype=torch.long)
    aud_cols = torch.zeros(B, dtype=torch.long)
    n_ref = torch.zeros(B, dtype=torch.long)
    bos_eos_ok = torch.ones(B, dtype=torch.bool)
    codes_ok = torch.tensor([m.src_in_range for m in metas])
    audio_ok = torch.ones(B, dtype=torch.bool)
    res.cov_valid = torch.zeros(K, dtype=torch.long)
    res.audio_targets = torch.zeros(K, dtype=torch.long)
    n_aud_list, seg_list = n_aud_tok.tolist(), seg_per_sample.tolist()
    for b, m in enumerate(metas):
        if not m.src_in_range:
            fails.append(Failure("audio_codes_in_range", m.id,
                                 f"cached source codes outside [0, {expect.codebook_size})"))
        if m.src_rows < K and m.out_T.numel():
            fails.append(Failure("audio_codebooks", m.id,
                                 f"source codes have {m.src_rows} codebooks, model expects {K}"))
            audio_ok[b] = False
        if not m.n_audio_tokens_ok or n_aud_list[b] != seg_list[b]:
            fails.append(Failure("audio_segment_count", m.id,
                                 f"{n_aud_list[b]} <|AUDIO_OUT|> tokens for {seg_list[b]} audio-out contents"))
            audio_ok[b] = False

    audio_checked = False
    if S_exp == 0 and N == 0:
        pass
    elif lab_a is None or aout_ids is None or lab_a.dim() != 2 or aout_ids.shape != lab_a.shape or lab_a.shape[0] != K:
        got = None if lab_a is None else tuple(lab_a.shape)
        for b in seg_per_sample.nonzero().flatten().tolist():
            fails.append(Failure("audio_codebooks", sids[b],
                                 f"label_audio_ids {got} / audio_out_ids "
                                 f"{None if aout_ids is None else tuple(aout_ids.shape)}: expected ({K}, N) both"))
            audio_ok[b] = False
    elif any(m.src_rows < K for m in metas if m.out_T.numel()):
        pass  # reported per sample above (audio_codebooks)
    elif S != S_exp or int(n_aud_tok.sum()) != S:
        for b in seg_per_sample.nonzero().flatten().tolist():
            fails.append(Failure("audio_segment_count", sids[b],
                                 f"the batch has {S} audio-out segments for {S_exp} audio-out contents"))
            audio_ok[b] = False
    else:
        audio_checked = True
    if audio_checked and S:
        lab_a, aout_ids, starts = lab_a.cpu().long(), aout_ids.cpu().long(), starts.cpu().long()
        seg_T = torch.cat([m.out_T for m in metas])
        src = torch.cat([m.out_src for m in metas if m.out_T.numel()], 1)
        seg_sample = torch.repeat_interleave(torch.arange(B), seg_per_sample)
        seg_len = torch.diff(torch.cat([starts, torch.tensor([N])]))
        len_ok = seg_len == seg_T + expect.segment_extra()
        # target flag per segment from the token stream: the placeholder's turn and role
        ab, aj = is_aout.nonzero(as_tuple=True)
        seg_target = after_start[ab, aj] & (role[ab, aj] == _ROLE_CODE["assistant"])
        seg_role = role[ab, aj]
        seg_col = torch.repeat_interleave(torch.arange(S), seg_len)
        j = torch.arange(N) - starts[seg_col]
        Tcol = seg_T[seg_col]
        kk = torch.arange(K)[:, None]
        lead = kk + 1 if expect.delay else torch.ones((K, 1), dtype=torch.long)
        lead_zone = j[None] < lead
        code_zone = ~lead_zone & (j[None] < lead + Tcol[None])
        eos_col = j[None] == lead + Tcol[None]
        tail = j[None] > lead + Tcol[None]
        src_off = torch.cumsum(seg_T, 0) - seg_T
        tot = int(src.shape[1])
        src_idx = (src_off[seg_col][None] + j[None] - lead).clamp(0, max(tot - 1, 0))
        exp_code = src.gather(1, src_idx) if tot else torch.zeros((K, N), dtype=torch.long)
        col_ok = len_ok[seg_col][None]
        exp_in = torch.where(lead_zone, expect.bos, torch.where(code_zone, exp_code, expect.eos))
        bad_in = (aout_ids != exp_in) & col_ok
        in_oob = code_zone & col_ok & ((aout_ids < 0) | (aout_ids >= expect.codebook_size))
        valid = lab_a != IGNORE
        in_range = (lab_a >= 0) & (lab_a < expect.codebook_size)
        feats = torch.stack([
            valid,  # 0 n_valid
            lab_a == expect.eos,  # 1 n_eos
            lab_a == expect.bos,  # 2 n_bos
            code_zone & valid & ~in_range,  # 3 code_oob
            code_zone & ~valid,  # 4 code_missing
            code_zone & valid & in_range & (lab_a != aout_ids),  # 5 code_mismatch
            lead_zone & valid,  # 6 lead_bad
            tail & valid,  # 7 tail_bad
            eos_col & (lab_a != expect.eos),  # 8 eos_missing_at_place
            bad_in & ~code_zone,  # 9 in bos/eos misplaced
            bad_in & code_zone,  # 10 in codes differ
            in_oob,  # 11 in codes out of range
            valid & (j[None] >= 1),  # 12 shifted targets
        ]).long()  # (F, K, N)
        cnt = torch.zeros((feats.shape[0], K, S), dtype=torch.long).index_add_(2, seg_col, feats)  # (F, K, S)
        big = torch.iinfo(torch.long).max
        flat = (kk * S + seg_col[None]).flatten()
        first_valid = torch.full((K * S,), big, dtype=torch.long).scatter_reduce_(
            0, flat, torch.where(valid, j[None], big).flatten(), "amin").view(K, S)
        n_valid = cnt[0]
        seg_any = n_valid.sum(0) > 0
        is_tgt_ok = seg_target & len_ok
        # length
        for s in (~len_ok).nonzero().flatten().tolist():
            b = int(seg_sample[s])
            audio_ok[b] = False
            bos_eos_ok[b] = False
            fails.append(Failure("audio_segment_length", sids[b],
                                 f"segment {s}: {int(seg_len[s])} columns for T={int(seg_T[s])} frames, expected "
                                 f"{int(seg_T[s]) + expect.segment_extra()} (delay pattern "
                                 f"{'on' if expect.delay else 'off'}, K={K})"))
        # reference segments
        ref_bad = ~seg_target & seg_any
        for s in ref_bad.nonzero().flatten().tolist():
            b = int(seg_sample[s])
            audio_ok[b] = False
            fails.append(Failure("audio_label_reference_masked", sids[b],
                                 f"reference segment {s} (turn before start_index={int(si[b])}) has "
                                 f"{int(n_valid[:, s].sum())} labels"))
        # target segments
        absent = is_tgt_ok & ~seg_any
        for s in absent.nonzero().flatten().tolist():
            b = int(seg_sample[s])
            audio_ok[b] = False
            fails.append(Failure("audio_labels_present", sids[b], f"target segment {s} ({int(seg_T[s])} frames): "
                                 f"all {K} x {int(seg_len[s])} labels are -100"))
        chk = is_tgt_ok & seg_any  # (S,)
        exp_lead = lead.expand(K, S)
        off_bad = chk[None] & (first_valid != exp_lead)
        oob_bad = chk[None] & ((cnt[3] > 0) | (cnt[2] > 0))
        eos_bad = chk[None] & ((cnt[1] != 1) | (cnt[8] > 0) | (cnt[7] > 0))
        val_bad = chk[None] & ((cnt[5] > 0) | (cnt[4] > 0))
        for name, bad in (("audio_label_delay_offsets", off_bad), ("audio_label_codes_in_range", oob_bad),
                          ("audio_label_eos", eos_bad), ("audio_label_values", val_bad)):
            segs_bad = bad.any(0)
            for s in segs_bad.nonzero().flatten().tolist():
                b = int(seg_sample[s])
                ks = bad[:, s].nonzero().flatten().tolist()
                audio_ok[b] = False
                k0 = ks[0]
                if name == "audio_label_delay_offsets":
                    fv = int(first_valid[k0, s])
                    detail = (f"codebook {k0} has {fv if fv < big else int(seg_len[s])} leading -100, expected "
                              f"{int(exp_lead[k0, s])}")
                elif name == "audio_label_codes_in_range":
                    codes_ok[b] = False
                    detail = (f"codebook {k0}: {int(cnt[3, k0, s])} label codes outside [0, {expect.codebook_size})"
                              f"{f', {int(cnt[2, k0, s])} BOS {expect.bos}' if cnt[2, k0, s] else ''}")
                elif name == "audio_label_eos":
                    bos_eos_ok[b] = False
                    detail = (f"codebook {k0}: {int(cnt[1, k0, s])} EOS {expect.eos} (expected 1 at column "
                              f"{int(lead[min(k0, lead.shape[0] - 1), 0]) + int(seg_T[s])}), "
                              f"{int(cnt[7, k0, s])} labels after it")
                else:
                    detail = (f"codebook {k0}: {int(cnt[5, k0, s])} label codes differ from audio_out_ids at the same "
                              f"column, {int(cnt[4, k0, s])} code columns masked")
                fails.append(Failure(name, sids[b], f"target segment {s}, codebooks {ks}: {detail}"))
        # inputs (all segments)
        in_be = (cnt[9].sum(0) > 0) & len_ok
        in_code = (cnt[10].sum(0) > 0) & len_ok & ~(cnt[11].sum(0) > 0)
        in_oob_s = (cnt[11].sum(0) > 0) & len_ok
        for s in in_be.nonzero().flatten().tolist():
            b = int(seg_sample[s])
            bos_eos_ok[b] = False
            ks = (cnt[9, :, s] > 0).nonzero().flatten().tolist()
            fails.append(Failure("audio_out_bos_eos", sids[b],
                                 f"segment {s}, codebooks {ks}: {int(cnt[9, :, s].sum())} BOS/EOS entries of "
                                 f"audio_out_ids off the delay pattern (BOS {expect.bos} x (k+1), EOS {expect.eos} "
                                 f"after the codes)"))
        for s in in_code.nonzero().flatten().tolist():
            b = int(seg_sample[s])
            fails.append(Failure("audio_out_codes", sids[b],
                                 f"segment {s}: {int(cnt[10, :, s].sum())} audio_out_ids codes differ from the "
                                 f"cached codes"))
        for s in in_oob_s.nonzero().flatten().tolist():
            b = int(seg_sample[s])
            codes_ok[b] = False
            fails.append(Failure("audio_codes_in_range", sids[b],
                                 f"segment {s}: {int(cnt[11, :, s].sum())} audio_out_ids codes outside "
                                 f"[0, {expect.codebook_size})"))
        # counts and coverage
        aud_targets.index_add_(0, seg_sample, cnt[12].t())
        aud_cols.index_add_(0, seg_sample, seg_len)
        n_ref.index_add_(0, seg_sample, (~seg_target).long())
        res.cov_valid += (n_valid * is_tgt_ok[None]).sum(1)
        res.cov_cols += int((seg_len * is_tgt_ok).sum())
        for rc in range(4):
            sel = seg_role == rc
            res.role_audio[rc, 0] += int((seg_len * sel).sum()) * K
            res.role_audio[rc, 1] += int((n_valid.sum(0) * sel).sum())

    # audio-in (prompt audio in user/system turns): never targets
    if batch.audio_in_ids is not None and batch.audio_in_ids_start is not None and batch.audio_in_ids_start.numel():
        n_in = int(batch.audio_in_ids.shape[1])
        ist = batch.audio_in_ids_start.cpu().long()
        in_len = torch.diff(torch.cat([ist, torch.tensor([n_in])]))
        ib, ij = (ids == expect.audio_in).nonzero(as_tuple=True)
        if ib.numel() == in_len.numel():
            res.role_audio[:, 0].index_add_(0, role[ib, ij], in_len * int(batch.audio_in_ids.shape[0]))

    # ---- train-time counts vs the model's own expansion
    exp_text = torch.full((B,), -1, dtype=torch.long)
    if not expect.skip_audio_tower:
        pass  # whisper features: the expansion needs the audio tower's lengths; checked by the probe only
    else:
        try:
            exp_labels, exp_aout = _dry_expand(batch, expect)
            exp_text = (exp_labels[:, 1:] != IGNORE).sum(1)
            exp_aud_pos = exp_aout.sum(1)
            for b in ((exp_text != text_tgt) | ((exp_aud_pos != aud_cols) & audio_ok)).nonzero().flatten().tolist():
                fails.append(Failure("train_target_counts", sids[b],
                                     f"count_targets counts {int(text_tgt[b])} text targets, expanded_labels "
                                     f"{int(exp_text[b])}; {int(exp_aud_pos[b])} audio-out positions for "
                                     f"{int(aud_cols[b])} label columns"))
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            fails += [Failure("train_target_counts", s, f"merge_input_ids_with_audio_features raised "
                              f"{type(exc).__name__}: {exc}") for s in sids]
    if audio_checked:
        ct = L.count_targets(lab, lab_a, starts, num_codebooks=K)
        if ct.text != int(text_tgt.sum()) or not torch.equal(ct.codebooks.cpu(), aud_targets.sum(0)):
            fails += [Failure("train_target_counts", s, f"loss.count_targets {ct.text}/{ct.codebooks.tolist()} "
                              f"differs from the audit's per-segment counts {int(text_tgt.sum())}/"
                              f"{aud_targets.sum(0).tolist()}") for s in sids]
    res.text_targets = int(text_tgt.sum())
    res.audio_targets = aud_targets.sum(0)

    # ---- per-sample totals
    n_aud_t = aud_targets.sum(1)
    slots = n_text_tok + aud_cols * K
    learn = text_tgt + n_aud_t
    masked = 1.0 - learn.double() / slots.clamp(min=1).double()
    for b in (learn == 0).nonzero().flatten().tolist():
        fails.append(Failure("has_targets", sids[b], f"no learnable target: {int(n_text_tok[b])} text positions and "
                             f"{int(aud_cols[b])} audio columns are all -100"))
    res.rows = {
        "n_text_tokens": n_text_tok.tolist(), "n_text_targets": text_tgt.tolist(),
        "n_text_targets_expanded": exp_text.tolist(), "n_audio_segments": seg_per_sample.tolist(),
        "n_reference_segments": n_ref.tolist(), "n_audio_columns": aud_cols.tolist(),
        "n_audio_frames": [int(m.out_T.sum()) for m in metas], "n_audio_targets": n_aud_t.tolist(),
        **{f"n_audio_targets_cb{k}": aud_targets[:, k].tolist() for k in range(K)},
        "masked_fraction": masked.tolist(), "bos_eos_ok": bos_eos_ok.tolist(), "codes_in_range": codes_ok.tolist(),
        "text_labels_ok": ((n_wrong_place == 0) & (n_missing == 0) & (n_wrong_value == 0) & (n_aout_lab == 0)
                           & ~span_bad).tolist(),
        "audio_labels_ok": audio_ok.tolist(),
    }
    return res


def _dry_expand(batch, expect: Expect) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expanded_labels, audio_out_mask)`` as ``HiggsAudioModel.forward`` builds them, without the model.

    Runs the model's ``merge_input_ids_with_audio_features`` with 1-d zero embeddings, with forward's
    arguments (``round_to=8``; left padding when the batch has one sample).
    """
    from boson_multimodal.model.higgs_audio.utils import merge_input_ids_with_audio_features

    ids = batch.input_ids.cpu()
    B, Lt = ids.shape
    a_out = batch.audio_out_ids
    n_out = int(a_out.shape[-1]) if a_out is not None and a_out.dim() == 2 else 0
    out_embed = torch.zeros((n_out, 1)) if n_out else None
    in_embed = None
    a_in = batch.audio_in_ids
    if expect.encode_audio_in_tokens and a_in is not None and a_in.dim() == 2 and a_in.shape[-1] > 0:
        in_embed = torch.zeros((int(a_in.shape[-1]), 1))
    ist = batch.audio_in_ids_start.cpu() if batch.audio_in_ids_start is not None else None
    out = merge_input_ids_with_audio_features(
        None, None, in_embed, ist, out_embed, batch.audio_out_ids_start.cpu(), expect.audio_in, expect.audio_out,
        torch.zeros((B, Lt, 1)), ids, batch.attention_mask.cpu(), batch.label_ids.cpu(), pad_token_id=expect.pad,
        round_to=8, left_padding=B == 1)
    return out[2], out[7]


# ------------------------------------------------------------------------------------ collator check
_COLLATOR_KEYS = ("encode_whisper_embed", "audio_in_token_id", "audio_out_token_id", "audio_stream_bos_id",
                  "audio_stream_eos_id", "pad_token_id", "return_audio_in_tokens", "use_delay_pattern",
                  "audio_num_codebooks")
_COLLATOR_FIXED = {"disable_audio_codes_transform": False, "mask_audio_out_token_label": True}


def check_collator(collator, model_config) -> tuple[dict[str, Any], list[Failure]]:
    """Compare the collator's settings with :func:`higgs_tune.data.collator_settings` of the model config.

    Returns:
        ``({"actual", "expected", "mismatches"}, failures)``; ``round_to``/``pad_left`` are recorded only.
    """
    expected = {k: v for k, v in D.collator_settings(model_config).items() if k in _COLLATOR_KEYS}
    expected.update(_COLLATOR_FIXED)
    actual = {k: _jsonable(getattr(collator, k, None)) for k in (*expected, "round_to", "pad_left")}
    mism = [k for k in expected if actual.get(k) != _jsonable(expected[k])]
    fails = []
    if mism:
        detail = ", ".join(f"{k}: collator {actual.get(k)!r} vs model {expected[k]!r}" for k in mism)
        cause = None
        if "use_delay_pattern" in mism:
            cause = ("delay pattern differs between collator and model: training would teach one layout and "
                     "inference decode another; build the collator with data.make_collator(model.config)")
        fails.append(Failure("collator_settings", "*", detail, cause))
    return {"actual": actual, "expected": {k: _jsonable(v) for k, v in expected.items()}, "mismatches": mism}, fails


def model_settings(model_config) -> dict[str, Any]:
    """The model-config fields the tensors depend on (JSON-able)."""
    keys = ("use_delay_pattern", "audio_num_codebooks", "audio_codebook_size", "audio_stream_bos_id",
            "audio_stream_eos_id", "audio_in_token_idx", "audio_out_token_idx", "pad_token_id", "encode_whisper_embed",
            "encode_audio_in_tokens", "skip_audio_tower", "audio_adapter_type")
    return {k: _jsonable(getattr(model_config, k, None)) for k in keys}


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# --------------------------------------------------------------------------------------- leak probe
@dataclass
class _Probe:
    """Collects probe check outcomes (one entry per check) and failures."""

    failures: list[Failure] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    evaluated: set[str] = field(default_factory=set)

    def record(self, rule: str, ok: bool, sample_id: str, message: str, cause: str | None = None, **detail):
        self.evaluated.add(rule)
        self.checks.append({"rule": rule, "passed": bool(ok), "sample_id": sample_id, "message": message, **detail})
        if not ok:
            self.failures.append(Failure(rule, sample_id, message, cause))


def _forward(model, batch, device) -> Any:
    kw = D.batch_to_model_kwargs(batch, device)
    with torch.no_grad():
        return model(**kw)


def _wrapper_cause(model, exc: BaseException | None) -> str | None:
    names = [type(model).__name__]
    with contextlib.suppress(Exception):
        names.append(type(model.base_model).__name__)
    if "PeftModelForCausalLM" in names or (exc is not None and "labels" in str(exc)):
        return ("peft LoraConfig(task_type='CAUSAL_LM') wraps the model in PeftModelForCausalLM, whose forward passes "
                "labels=... and drops Higgs' audio_out_ids/label_audio_ids path; build LoraConfig without task_type "
                "(model.apply_lora)")
    return None


def _loss_of(result, kind: str, k: int = 0) -> tuple[float, int]:
    """``(loss, n_targets)`` of a wiring result for the text term or codebook ``k``."""
    if kind == "text":
        return float(result.text_loss), int(result.n_text_targets)
    return float(result.codebook_losses[k]), int(result.n_codebook_targets[k])


def leak_probe(model, batch, sample_ids: list[str], expect: Expect, *, wiring: Callable | None = None,
               tol: float = 1e-4, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Check the loss wiring and the model's causality on a real batch by perturbing one input.

    With a correct shift, the target at ``t`` is scored from the logits at ``t - 1``, which cannot
    see the input at ``t``: changing the input token at ``t`` (text) or the input code column
    ``audio_out_ids[:, i]`` (audio) must leave that target's loss unchanged (``no_leak``), must change
    the loss of the target at ``t + 1`` / column ``i + 1`` (``next_token`` / ``next_code``: scored from
    the perturbed position), and must leave every logit before ``t`` unchanged (``causal_logits``).
    A label planted at the first column of a segment must not be a target (``segment_boundary``).
    Per-target losses come from the wiring itself: every label but one is set to -100.

    Args:
        model: ``HiggsAudioModel`` or a wrapper (peft); put in eval mode for the probe, restored after.
        batch: collated ``HiggsAudioBatchInput`` (batch size 1 is handled: forward then left-pads).
        sample_ids: ids of the batch's samples, for messages.
        expect: :class:`Expect`.
        wiring: the loss wiring under test (signature of ``loss.higgs_loss``). ``None`` is production:
            ``loss.higgs_loss``, with the base forward run through ``loss.forward_loss`` (the entry
            point training and evaluation call), whose loss must equal the probed wiring's.
        tol: absolute tolerance on loss / logit changes.

    Returns:
        ``{"passed", "checks": [...], "failures": [Failure...], "evaluated": [rule...], ...}``.
    """
    P = _Probe()
    was_training = getattr(model, "training", False)
    with contextlib.suppress(Exception):
        model.eval()
    try:
        info = _leak_probe(model, batch, sample_ids, expect, wiring, tol, device, P)
    finally:
        if was_training:
            model.train()
    info.update(passed=not P.failures, checks=P.checks, failures=P.failures, evaluated=sorted(P.evaluated))
    return info


def _leak_probe(model, batch, sids, expect: Expect, wiring, tol, device, P: _Probe) -> dict[str, Any]:
    K = expect.K
    C = expect.codebook_size + 2
    production = wiring is None
    wiring = L.higgs_loss if production else wiring
    info: dict[str, Any] = {"batch_size": int(batch.input_ids.shape[0]), "sample_ids": list(sids), "tolerance": tol,
                            "wiring": getattr(wiring, "__qualname__", type(wiring).__name__),
                            "model": type(model).__name__}
    with contextlib.suppress(StopIteration, AttributeError, TypeError):
        info["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    label_a = batch.label_audio_ids
    has_audio = label_a is not None and label_a.numel() > 0
    starts = batch.audio_out_ids_start
    prod_loss, prod_exc, out0 = None, None, None
    if production and hasattr(L, "forward_loss"):
        try:
            with torch.no_grad():
                out0, prod_loss = L.forward_loss(model, batch, device)
        except Exception as exc:  # noqa: BLE001 - re-run the bare forward to tell model from loss failures
            prod_exc = exc
    try:
        if out0 is None:
            out0 = _forward(model, batch, device)
        logits, exp_labels, exp_ids = out0.logits, out0.expanded_labels, out0.expanded_input_ids
        a_logits, a_mask = out0.audio_logits, out0.audio_out_mask
        attended = out0.attention_mask.bool() if getattr(out0, "attention_mask", None) is not None else None
    except Exception as exc:  # noqa: BLE001 - the gate reports, never crashes
        P.record("probe_model_forward", False, "*", f"forward raised {type(exc).__name__}: {exc}",
                 _wrapper_cause(model, exc))
        return info
    P.record("probe_model_forward", True, "*", "forward ran")
    if prod_exc is not None:
        P.record("probe_loss_runs", False, "*", f"loss.forward_loss (the training entry point) raised "
                 f"{type(prod_exc).__name__}: {prod_exc}", _wrapper_cause(model, None))
    ok = exp_labels is not None and tuple(exp_labels.shape) == tuple(logits.shape[:2])
    P.record("shapes_text", ok, "*", f"expanded_labels {None if exp_labels is None else tuple(exp_labels.shape)}, "
             f"logits {tuple(logits.shape)}")
    if not ok:
        return info
    n_cols = int(label_a.shape[1]) if has_audio else 0
    a_rows = None if a_logits is None else tuple(a_logits.shape)
    audio_ok = (not has_audio) or (a_logits is not None and a_logits.dim() == 3 and a_logits.shape[0] == n_cols > 0
                                   and tuple(a_logits.shape[1:]) == (K, C))
    P.record("shapes_audio", audio_ok, "*", f"audio_logits {a_rows} for label_audio_ids "
             f"{None if label_a is None else tuple(label_a.shape)} (expected ({n_cols}, {K}, {C}))",
             _wrapper_cause(model, None) if not audio_ok else None)
    info["expanded_length"] = int(logits.shape[1])
    info["audio_rows"] = n_cols
    dev = logits.device
    lab_a = label_a.to(dev) if has_audio else None
    st = starts.to(dev) if starts is not None else torch.zeros(0, dtype=torch.long, device=dev)
    empty_al = torch.zeros((0, K, C), device=dev)
    empty_la = torch.zeros((K, 0), dtype=torch.long, device=dev)
    empty_st = torch.zeros(0, dtype=torch.long, device=dev)

    def call(*args, rule="probe_loss_runs"):
        try:
            return wiring(*args)
        except Exception as exc:  # noqa: BLE001
            P.record(rule, False, "*", f"loss wiring raised {type(exc).__name__}: {exc}")
            return None

    # full-batch counts vs count_targets
    ct = L.count_targets(batch.label_ids, label_a if has_audio else None, starts, num_codebooks=K)
    full = call(logits, exp_labels, a_logits if audio_ok and has_audio else empty_al,
                lab_a if audio_ok and has_audio else empty_la, st if audio_ok and has_audio else empty_st)
    if full is None:
        return info
    P.record("probe_loss_runs", True, "*", "wiring ran on the full batch")
    if prod_loss is not None:
        d = max(abs(float(prod_loss.text_loss) - float(full.text_loss)),
                float((prod_loss.codebook_losses.float() - full.codebook_losses.float()).abs().max()))
        P.record("probe_loss_runs", d <= tol, "*", f"loss.forward_loss (the training entry point) and the probed "
                 f"wiring differ by {d:.3g} on the same batch", "loss.forward_loss wires the model outputs into "
                 "higgs_loss differently from the probe (other outputs or label tensors)")
    n_expanded = int((exp_labels[:, 1:] != IGNORE).sum())
    P.record("probe_target_counts", n_expanded == ct.text, "*", f"the model's expanded_labels hold {n_expanded} text "
             f"targets, count_targets on the collated labels {ct.text}")
    if audio_ok:
        got_cb = [int(x) for x in full.n_codebook_targets]
        exp_cb = ct.codebooks.tolist() if has_audio else [0] * len(got_cb)
        ok = int(full.n_text_targets) == ct.text and got_cb == exp_cb
        P.record("probe_target_counts", ok, "*", f"wiring counts text {int(full.n_text_targets)}, codebooks {got_cb}; "
                 f"count_targets text {ct.text}, codebooks {exp_cb}")

    def text_term(lg_row, b, t, value):
        labels = torch.full((1, exp_labels.shape[1]), IGNORE, dtype=torch.long, device=dev)
        labels[0, t] = value
        r = call(lg_row, labels, empty_al, empty_la, empty_st)
        return None if r is None else _loss_of(r, "text")

    # ---- text probe: perturb one labeled text token per sample
    lab_c = batch.label_ids
    ids_c = batch.input_ids
    text_stats = []
    # one perturbed forward per modality: the text probe on row 0, the audio probe on row 1 (row 0 when B == 1);
    # each forward also checks that the other rows' logits do not move
    B = int(ids_c.shape[0])
    b_text, b_audio = 0, (1 if B > 1 else 0)
    for b in [b_text]:
        cand = ((lab_c[b] != IGNORE) & (ids_c[b] != expect.audio_out) & (ids_c[b] != expect.audio_in)
                & (torch.arange(ids_c.shape[1]) >= 1)).nonzero().flatten()
        if not cand.numel():
            continue
        # prefer a labeled token followed by another labeled text token (e.g. <|audio_eos|><|eot_id|>)
        nxt_lab = torch.zeros_like(cand, dtype=torch.bool)
        inb = cand + 1 < ids_c.shape[1]
        nxt_lab[inb] = lab_c[b, cand[inb] + 1] != IGNORE
        j = int(cand[nxt_lab][0]) if nxt_lab.any() else int(cand[-1])
        pert = _clone_batch(batch)
        old = int(ids_c[b, j])
        pert.input_ids[b, j] = 1000 if old != 1000 else 1001
        try:
            out1 = _forward(model, pert, device)
        except Exception as exc:  # noqa: BLE001
            P.record("probe_model_forward", False, sids[b], f"perturbed forward raised {type(exc).__name__}: {exc}")
            continue
        diff = (out1.expanded_input_ids != exp_ids).nonzero()
        if diff.shape[0] != 1 or int(diff[0, 0]) != b:
            P.record("probe_causal_logits", False, sids[b], f"changing token {j} changed {diff.shape[0]} expanded "
                     f"positions (expected 1): the merge of text and audio positions depends on the token")
            continue
        t = int(diff[0, 1])
        lg0, lg1 = logits[b:b + 1], out1.logits[b:b + 1]
        target = int(exp_labels[b, t])
        a0, a1 = text_term(lg0, b, t, target), text_term(lg1, b, t, target)
        if a0 is None or a1 is None:
            continue
        d_leak = abs(a1[0] - a0[0])
        rec = {"position": t, "collated_position": j, "target": target, "delta_target_t": d_leak}
        if a0[1] != 1:
            P.record("probe_target_counts", False, sids[b], f"one valid text label at position {t} gave "
                     f"{a0[1]} targets (expected 1)")
        else:
            P.record("probe_text_no_leak", d_leak <= tol, sids[b],
                     f"changing the input token at expanded position {t} moved the loss of the target at {t} by "
                     f"{d_leak:.3g} (tolerance {tol:g})")
        if t + 1 < exp_labels.shape[1]:
            nv = int(exp_labels[b, t + 1])
            nv = nv if nv != IGNORE else int(exp_ids[b, t + 1]) if int(exp_ids[b, t + 1]) < logits.shape[-1] else 0
            n0, n1 = text_term(lg0, b, t + 1, nv), text_term(lg1, b, t + 1, nv)
            if n0 is not None and n1 is not None:
                d_next = abs(n1[0] - n0[0])
                rec["delta_target_t_plus_1"] = d_next
                P.record("probe_text_next_token", n0[1] == 1 and d_next > tol, sids[b],
                         f"changing the input token at {t} moved the loss of the target at {t + 1} by {d_next:.3g} "
                         f"({n0[1]} targets counted; it must move: that target is predicted from position {t})")
        # causality: logits before t in row b and every other row unchanged
        d_prev = _max_change(out1.logits, logits, b, t, attended)
        others = [r for r in range(logits.shape[0]) if r != b]
        d_other = float((out1.logits[others] - logits[others]).abs().max()) if others else 0.0
        rec.update(delta_logits_before=d_prev, delta_logits_other_rows=d_other)
        P.record("probe_causal_logits", d_prev <= tol and d_other <= tol, sids[b],
                 f"text logits before {t} moved by {d_prev:.3g}, other samples' by {d_other:.3g}")
        text_stats.append(rec)
        del out1
    info["text"] = text_stats

    # ---- audio probe
    if not (has_audio and audio_ok):
        return info
    N = n_cols
    st_list = starts.tolist() + [N]
    tiny_logits = logits[:1, :2]
    tiny_labels = torch.full((1, 2), IGNORE, dtype=torch.long, device=dev)

    def audio_term(al, k, i, value):
        la = torch.full_like(lab_a, IGNORE)
        la[k, i] = value
        r = call(tiny_logits, tiny_labels, al, la, st)
        return None if r is None else _loss_of(r, "audio", k)

    # segment boundary: a label at a segment's first column is never a target
    for s, s0 in enumerate(st_list[:-1]):
        if st_list[s + 1] - s0 < 1:
            continue
        r = audio_term(a_logits, 0, s0, 0)
        if r is None:
            break
        P.record("probe_audio_segment_boundary", r[1] == 0, "*",
                 f"a label planted at the first column ({s0}) of segment {s} counted as {r[1]} target(s) (expected 0)")
    # one column i of a target segment (labels at i, room for i+1), preferably in row b_audio
    valid_col = (lab_a != IGNORE).any(0)
    a_pos = a_mask.nonzero()  # (N, 2) expanded (row, position) of each audio column, in order
    row_of = (lambda c: int(a_pos[c, 0])) if a_pos.shape[0] == N else (lambda c: 0)
    cands = [s for s in range(len(st_list) - 1)
             if st_list[s + 1] - st_list[s] >= 3 and bool(valid_col[st_list[s]:st_list[s + 1]].any())]
    cands = sorted(cands, key=lambda s: row_of(st_list[s]) != b_audio)[:1]
    audio_stats = []
    for s in cands:
        s0, s1 = st_list[s], st_list[s + 1]
        b = row_of(s0)
        i = s0 + min(K + 1, s1 - s0 - 2)
        pert = _clone_batch(batch)
        col = pert.audio_out_ids[:, i]
        pert.audio_out_ids[:, i] = (col % expect.codebook_size + expect.codebook_size // 2) % expect.codebook_size
        try:
            out1 = _forward(model, pert, device)
        except Exception as exc:  # noqa: BLE001
            P.record("probe_model_forward", False, sids[b], f"perturbed forward raised {type(exc).__name__}: {exc}")
            break
        al0, al1 = a_logits, out1.audio_logits
        rec = {"segment": s, "column": i, "sample": sids[b]}
        leak_d, next_d, counted = [], [], []
        for k in range(K):
            v = int(lab_a[k, i])
            if v != IGNORE:
                r0, r1 = audio_term(al0, k, i, v), audio_term(al1, k, i, v)
                if r0 is None or r1 is None:
                    return info
                counted.append(r0[1])
                leak_d.append(abs(r1[0] - r0[0]))
            nv = int(lab_a[k, i + 1])
            nv = nv if nv != IGNORE else 0
            r0, r1 = audio_term(al0, k, i + 1, nv), audio_term(al1, k, i + 1, nv)
            if r0 is None or r1 is None:
                return info
            next_d.append(abs(r1[0] - r0[0]) if r0[1] == 1 else 0.0)
        rec.update(delta_target_i=leak_d, delta_target_i_plus_1=next_d)
        if counted and min(counted) != 1:
            P.record("probe_target_counts", False, sids[b], f"one valid audio label at column {i} gave "
                     f"{counted} targets per codebook (expected 1)")
        if leak_d:
            P.record("probe_audio_no_leak", max(leak_d) <= tol, sids[b],
                     f"changing audio_out_ids[:, {i}] moved the loss of label column {i} by up to {max(leak_d):.3g} "
                     f"(tolerance {tol:g})")
        P.record("probe_audio_next_code", min(next_d) > tol, sids[b],
                 f"changing audio_out_ids[:, {i}] moved the loss of label column {i + 1} by at least {min(next_d):.3g} "
                 f"(it must move in every codebook: that column is predicted from audio_logits[{i}])")
        d_prev = float((al1[:i] - al0[:i]).abs().max()) if i > 0 else 0.0
        if a_pos.shape[0] == N and bool((a_pos[:, 0] != b).any()):  # other samples' audio rows
            other = a_pos[:, 0] != b
            d_prev = max(d_prev, float((al1[other] - al0[other]).abs().max()))
        if a_pos.shape[0] == N:
            t = int(a_pos[i, 1])
            d_text = _max_change(out1.logits, logits, b, t, attended)
        else:
            d_text = 0.0
        others = [r for r in range(logits.shape[0]) if r != b]
        d_other = float((out1.logits[others] - logits[others]).abs().max()) if others else 0.0
        rec.update(delta_audio_logits_before=d_prev, delta_text_logits_before=d_text, delta_logits_other_rows=d_other)
        P.record("probe_causal_logits", max(d_prev, d_text, d_other) <= tol, sids[b],
                 f"audio logits before column {i} (and other samples' audio logits) moved by {d_prev:.3g}, text "
                 f"logits before it by {d_text:.3g}, other samples' text logits by {d_other:.3g}")
        audio_stats.append(rec)
        del out1
    info["audio"] = audio_stats
    return info


def _max_change(new: torch.Tensor, old: torch.Tensor, b: int, t: int, attended: torch.Tensor | None) -> float:
    """Largest |change| of logits ``[b, :t]`` over attended positions.

    Left-padding positions (batch of 1) are skipped: their queries see no unmasked key, so eager
    attention spreads them uniformly over the whole row; they carry no label and no later query
    attends to them.
    """
    if t <= 0:
        return 0.0
    d = (new[b, :t] - old[b, :t]).abs().amax(-1)
    if attended is not None:
        d = d[attended[b, :t].to(d.device)]
    return float(d.max()) if d.numel() else 0.0


def _clone_batch(batch):
    """A copy of a ``HiggsAudioBatchInput`` whose tensors can be modified."""
    import dataclasses

    return dataclasses.replace(batch, **{f.name: (getattr(batch, f.name).clone()
                                                  if isinstance(getattr(batch, f.name), torch.Tensor) else
                                                  getattr(batch, f.name)) for f in dataclasses.fields(batch)})


def _probe_indices(samples: list, metas: list, ok: list[bool], n: int) -> list[int]:
    """Probe batch: the shortest clean train samples with target audio, plus a multi-segment one when n >= 3."""
    cand = [i for i, (s, m) in enumerate(zip(samples, metas)) if s is not None and ok[i] and m.out_T.numel()]
    if not cand:
        cand = [i for i, s in enumerate(samples) if s is not None]
    train = [i for i in cand if metas[i].split == "train"] or cand
    size = lambda i: int(samples[i].input_ids.numel()) + int(metas[i].out_T.sum())  # noqa: E731
    pick = sorted(train, key=size)[: max(n, 1)]
    if n >= 3:
        multi = sorted([i for i in train if metas[i].out_T.numel() > 1 and i not in pick], key=size)
        if multi and not any(metas[i].out_T.numel() > 1 for i in pick):
            pick[-1] = multi[0]
    return pick


# ------------------------------------------------------------------------------------------ run
@contextlib.contextmanager
def _threads(n: int | None):
    if not n:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_tensor_checks(samples: list, metas: list, collator, expect: Expect,
                      batch_size: int) -> tuple[list[BatchResult | None], list[Failure], int]:
    """Collate the built samples in order and :func:`audit_batch` each batch.

    Returns:
        ``(batch results, collate failures, n samples checked)``.
    """
    idx = [i for i, s in enumerate(samples) if s is not None]
    results, fails = [], []
    for j in range(0, len(idx), batch_size):
        chunk = idx[j:j + batch_size]
        ms = [metas[i] for i in chunk]
        try:
            batch = collator([samples[i] for i in chunk])
        except Exception as exc:  # noqa: BLE001
            fails += [Failure("collate", m.id, f"collator raised {type(exc).__name__}: {exc}") for m in ms]
            results.append(None)
            continue
        r = audit_batch(batch, ms, expect)
        r.rows["_index"] = chunk
        results.append(r)
    return results, fails, len(idx)


def run_audit(cfg: dict[str, Any], *, collator=None, loss_wiring: Callable | None = None, model=None,
              text_tokenizer=None, write: bool = True) -> dict[str, Any]:
    """Run the whole gate on an experiment's kept manifests and cached codes.

    Args:
        cfg: validated config (``audit:`` keys in :data:`DEFAULTS`).
        collator: the collator under audit (default ``data.make_collator(model config)``).
        loss_wiring: the loss under audit (default ``loss.higgs_loss``).
        model: the model under audit (default ``model.build_model(cfg["model"])``, LoRA-wrapped with
            ``model.apply_lora`` when ``audit.probe_with_lora``); only its config is used when the
            leak probe is off.
        text_tokenizer: default ``model.load_text_tokenizer(cfg["model"]["text_tokenizer"])``.
        write: write ``Paths.audit_summary`` and ``Paths.audit_samples``.

    Returns:
        The summary dict (also written as JSON); ``summary["passed"]`` is the gate.

    Raises:
        FileNotFoundError: when the manifests or the tokens index are missing (upstream stages not run).
    """
    t_all = time.perf_counter()
    acfg = {**DEFAULTS, **(cfg.get("audit") or {})}
    paths = Paths(cfg)
    for p in (paths.train_manifest, paths.val_manifest, paths.tokens_index):
        if not Path(p).exists():
            raise FileNotFoundError(f"{p} is missing: run the manifest and tokenize stages first")
    from .model import load_text_tokenizer

    rows, split = [], []
    for sp, p in (("train", paths.train_manifest), ("val", paths.val_manifest)):
        r = D.read_jsonl(p)
        rows += r
        split += [sp] * len(r)
    index = D.CodesIndex(paths.tokens_index)
    probe_on = bool(acfg["leak_probe"])
    device = "cpu"
    if model is None and probe_on:
        from .model import apply_lora, build_model, device_and_dtype

        dev, _ = device_and_dtype(cfg["model"].get("device"), "float32")
        model = build_model(cfg["model"], dtype=torch.float32).to(dev)
        if acfg["probe_with_lora"] and cfg.get("lora"):
            model = apply_lora(model, cfg["lora"])
        device = dev
    elif model is not None:
        with contextlib.suppress(StopIteration, AttributeError):
            device = next(model.parameters()).device
    model_config = _model_config(model) if model is not None else _config_only(cfg["model"])
    tok = text_tokenizer or load_text_tokenizer(cfg["model"].get("text_tokenizer"))
    expect = Expect.from_model(model_config, tok)
    if collator is None:
        collator = D.make_collator(model_config)

    failures: list[Failure] = []
    if not rows:
        failures.append(Failure("samples_present", "*", "no kept samples in the train/val manifests"))
    t0 = time.perf_counter()
    samples, metas, f_build = build_samples(rows, split, tok, index.get, expect)
    t_build = time.perf_counter() - t0
    failures += f_build
    coll_info, f_coll = check_collator(collator, model_config)
    failures += f_coll

    t0 = time.perf_counter()
    with _threads(int(acfg["num_threads"]) or None):
        results, f_collate, n_checked = run_tensor_checks(samples, metas, collator, expect, int(acfg["batch_size"]))
    t_checks = time.perf_counter() - t0
    failures += f_collate

    # per-sample table
    K = expect.K
    ids = [D.sample_id(r) for r in rows]
    table: dict[str, list] = {"id": [], "split": [], "passed": [], "n_failures": [], "failed_rules": []}
    base_cols = None
    for r in results:
        if r is None:
            continue
        failures += r.failures
        base_cols = base_cols or [c for c in r.rows if c != "_index"]
    per_sample: list[dict[str, Any]] = [{} for _ in rows]
    for r in results:
        if r is None:
            continue
        for pos, i in enumerate(r.rows["_index"]):
            per_sample[i] = {c: r.rows[c][pos] for c in base_cols}

    # thresholds
    max_masked = float(acfg["max_masked_fraction"])
    for i, row in enumerate(per_sample):
        if row and row["masked_fraction"] > max_masked:
            failures.append(Failure("masked_fraction", ids[i], f"masked fraction {row['masked_fraction']:.4f} > "
                                    f"{max_masked:g}"))
    cov_valid = sum((r.cov_valid for r in results if r is not None), torch.zeros(K, dtype=torch.long))
    cov_cols = sum(r.cov_cols for r in results if r is not None)
    coverage = [float(v) / cov_cols if cov_cols else 0.0 for v in cov_valid.tolist()]
    min_cov = float(acfg["min_audio_label_coverage"])
    n_target_audio = sum(1 for m in metas if m is not None and m.out_T.numel())
    if n_target_audio and any(c < min_cov for c in coverage):
        low = [k for k, c in enumerate(coverage) if c < min_cov]
        failures.append(Failure("codebook_coverage", "*", f"codebooks {low} have label coverage "
                                f"{[round(coverage[k], 4) for k in low]} < {min_cov:g} over {cov_cols} target columns"))

    # leak probe
    probe_info: dict[str, Any] = {"enabled": probe_on}
    t_probe = 0.0
    if probe_on and any(s is not None for s in samples):
        t0 = time.perf_counter()
        clean = [bool(p) and p.get("text_labels_ok", False) and p.get("audio_labels_ok", False) for p in per_sample]
        pick = _probe_indices(samples, metas, clean, int(acfg["leak_probe_samples"]))
        try:
            pbatch = collator([samples[i] for i in pick])
            info = leak_probe(model, pbatch, [ids[i] for i in pick], expect, wiring=loss_wiring,
                              tol=float(acfg["leak_tolerance"]), device=device)
            failures += info.pop("failures")
            probe_info.update(info)
        except Exception as exc:  # noqa: BLE001
            failures.append(Failure("probe_model_forward", "*", f"leak probe raised {type(exc).__name__}: {exc}"))
            probe_info.update(passed=False, error=str(exc))
        t_probe = time.perf_counter() - t0

    # failures per sample -> table
    by_sample: dict[str, list[str]] = {}
    for f in failures:
        by_sample.setdefault(f.sample_id, []).append(f.rule)
    for i, row in enumerate(per_sample):
        rules_i = sorted(set(by_sample.get(ids[i], [])))
        table.setdefault("id", []).append(ids[i])
        table.setdefault("split", []).append(split[i])
        table.setdefault("passed", []).append(not rules_i)
        table.setdefault("n_failures", []).append(len(by_sample.get(ids[i], [])))
        table.setdefault("failed_rules", []).append(",".join(rules_i))
        for c in base_cols or []:
            table.setdefault(c, []).append(row.get(c))

    summary = _summary(failures, acfg, expect, rows, split, per_sample, coverage, coll_info, model_config,
                       probe_info, results, n_checked,
                       timing={"build_samples_s": t_build, "tensor_checks_s": t_checks,
                               "tensor_checks_samples_per_s": n_checked / t_checks if t_checks > 0 else None,
                               "leak_probe_s": t_probe, "total_s": time.perf_counter() - t_all},
                       paths=paths, table=table)
    if write:
        _write(paths, summary, table)
    return summary


def _fraction(pos: int, tgt: int) -> dict[str, Any]:
    return {"positions": int(pos), "targets": int(tgt), "fraction": (tgt / pos) if pos else 0.0}


def _summary(failures, acfg, expect, rows, split, per_sample, coverage, coll_info, model_config, probe_info, results,
             n_checked, timing, paths, table) -> dict[str, Any]:
    """The ``summary.json`` document.

    Keys: ``passed`` (bool, the gate: no failure at all); ``n_samples``, ``n_samples_checked``,
    ``n_samples_by_split``, ``n_samples_failed``; ``rules`` [{``name``, ``passed``, ``n_failed``,
    ``description``, ``scope`` (sample | aggregate | probe), ``threshold``?, ``evaluated``/``note``
    for probe rules that did not run}]; ``failures`` [{``rule``, ``sample_id`` ("*" for batch-,
    aggregate- and probe-level), ``message``, ``likely_cause``}] (at most ``max_failures_per_rule``
    per rule; ``n_failures`` counts all, ``failures_not_listed`` the rest); ``fractions``
    {``by_role``: {system|user|assistant|none: {text|audio: {positions, targets, fraction}}},
    ``by_modality``: {text|audio: {...}}, ``target_share``: {text, audio}}; ``codebook_coverage``
    (K floats); ``target_counts`` {text, audio, audio_per_codebook} (the train-time normalizer);
    ``masked_fraction`` {max, mean}; ``collator_settings`` {actual, expected, mismatches};
    ``model_settings``; ``leak_probe`` {enabled, passed, batch_size, sample_ids, tolerance, wiring,
    model, dtype, expanded_length, audio_rows, evaluated, checks [...], text [...], audio [...]};
    ``timing`` (seconds; ``tensor_checks_samples_per_s``); ``config`` (the ``audit:`` keys used);
    ``inputs`` (paths).
    """
    cap = int(acfg["max_failures_per_rule"])
    n_by_rule: dict[str, int] = {}
    listed, dropped = [], 0
    for f in failures:
        n_by_rule[f.rule] = n_by_rule.get(f.rule, 0) + 1
        if n_by_rule[f.rule] <= cap:
            listed.append(f.as_dict())
        else:
            dropped += 1
    thresholds = {"masked_fraction": acfg["max_masked_fraction"], "codebook_coverage": acfg["min_audio_label_coverage"],
                  **{r: acfg["leak_tolerance"] for r in ("probe_text_no_leak", "probe_text_next_token",
                                                         "probe_audio_no_leak", "probe_audio_next_code",
                                                         "probe_causal_logits")}}
    evaluated = set(probe_info.get("evaluated", []))
    rules = []
    for name, (desc, _) in RULES.items():
        scope = _RULE_SCOPE.get(name, "sample")
        entry = {"name": name, "passed": n_by_rule.get(name, 0) == 0, "n_failed": n_by_rule.get(name, 0),
                 "description": desc, "scope": scope}
        if name in thresholds:
            entry["threshold"] = thresholds[name]
        if scope == "probe" and name not in evaluated and not n_by_rule.get(name):
            entry["evaluated"] = False
            entry["note"] = "leak probe disabled" if not probe_info.get("enabled") else "not reached"
        rules.append(entry)
    role_text = sum((r.role_text for r in results if r is not None), torch.zeros(4, 2, dtype=torch.long))
    role_audio = sum((r.role_audio for r in results if r is not None), torch.zeros(4, 2, dtype=torch.long))
    by_role = {}
    for rc, name in enumerate((*ROLES, "none")):
        by_role[name] = {"text": _fraction(*role_text[rc].tolist()), "audio": _fraction(*role_audio[rc].tolist())}
    tt, at = role_text.sum(0).tolist(), role_audio.sum(0).tolist()
    n_tgt = tt[1] + at[1]
    fractions = {"by_role": by_role, "by_modality": {"text": _fraction(*tt), "audio": _fraction(*at)},
                 "target_share": {"text": tt[1] / n_tgt if n_tgt else 0.0, "audio": at[1] / n_tgt if n_tgt else 0.0}}
    text_targets = sum(r.text_targets for r in results if r is not None)
    audio_targets = sum((r.audio_targets for r in results if r is not None), torch.zeros(expect.K, dtype=torch.long))
    passed = not failures
    return {
        "passed": passed,
        "n_samples": len(rows),
        "n_samples_checked": n_checked,
        "n_samples_by_split": {s: split.count(s) for s in ("train", "val")},
        "n_samples_failed": sum(1 for ok in table.get("passed", []) if not ok),
        "rules": rules,
        "failures": listed,
        "n_failures": len(failures),
        "failures_not_listed": dropped,
        "fractions": fractions,
        "codebook_coverage": coverage,
        "target_counts": {"text": int(text_targets), "audio_per_codebook": audio_targets.tolist(),
                          "audio": int(audio_targets.sum())},
        "masked_fraction": {"max": max((p["masked_fraction"] for p in per_sample if p), default=None),
                            "mean": (sum(p["masked_fraction"] for p in per_sample if p) /
                                     max(1, sum(1 for p in per_sample if p)))},
        "collator_settings": coll_info,
        "model_settings": model_settings(model_config),
        "leak_probe": probe_info,
        "timing": timing,
        "config": {k: acfg[k] for k in DEFAULTS},
        "inputs": {"train_manifest": str(paths.train_manifest), "val_manifest": str(paths.val_manifest),
                   "tokens_index": str(paths.tokens_index)},
    }


def _write(paths: Paths, summary: dict[str, Any], table: dict[str, list]) -> None:
    import pandas as pd

    out = Path(paths.audit_summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    tmp.replace(out)
    pq = Path(paths.audit_samples)
    tmp = pq.with_suffix(".parquet.tmp")
    pd.DataFrame(table).to_parquet(tmp, index=False)
    tmp.replace(pq)
    # a copy outside the declared outputs: Snakemake deletes the outputs of a job that exits non-zero
    with contextlib.suppress(OSError):
        Path(paths.logs).mkdir(parents=True, exist_ok=True)
        (Path(paths.logs) / "audit_summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Failure):
        return o.as_dict()
    return str(o)


def format_report(summary: dict[str, Any], summary_path: str | Path | None = None) -> str:
    """A few lines for the terminal: verdict, failed rules with counts, first failures, where the summary is."""
    lines = [f"audit {'PASSED' if summary['passed'] else 'FAILED'}: {summary['n_samples']} samples, "
             f"{summary['n_failures']} failures; tensor checks "
             f"{summary['timing'].get('tensor_checks_samples_per_s') or 0:.0f} samples/s"]
    for r in summary["rules"]:
        if not r["passed"]:
            lines.append(f"  FAILED {r['name']} ({r['n_failed']}): {r['description']}")
    for f in summary["failures"][:10]:
        lines.append(f"  - [{f['rule']}] {f['sample_id']}: {f['message']} -- likely cause: {f['likely_cause']}")
    if summary_path is not None:
        lines.append(f"  details: {summary_path}")
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m higgs_tune.audit", description=__doc__.split("\n")[0])
    add_config_args(parser)
    args = parser.parse_args(None if argv is None else list(argv))
    cfg = config_from_args(args)
    summary = run_audit(cfg)
    paths = Paths(cfg)
    text = format_report(summary, paths.audit_summary)
    if summary["passed"]:
        print(text)
        return 0
    print(text, file=sys.stderr)
    print(f"audit gate FAILED: training must not start; see {paths.audit_summary}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
