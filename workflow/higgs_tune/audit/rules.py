"""The audit's rules, stated once: name -> (description, likely cause), each rule's scope, and the
:class:`Failure` record every check emits.

The ids in the texts come from :mod:`higgs_tune.labels` (ignore index -100, audio-stream BOS 1024 and
EOS 1025 for Higgs Audio v2).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..labels import AUDIO_STREAM_BOS_ID as _BOS
from ..labels import AUDIO_STREAM_EOS_ID as _EOS
from ..labels import IGNORE_INDEX as _IGN

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
        f"assistant turns before start_index and padding are all {_IGN}",
        "labels built from input_ids without the role mask (prompt tokens become targets) or start_index ignored"),
    "text_labels_assistant_targets": (
        "every assistant token at/after start_index (after the header, except <|AUDIO_OUT|>) is a target",
        "over-masking: assistant text masked (a mask applied to all text, a wrong start_index, or a truncation)"),
    "text_label_values": (
        "each text label equals the input token at its own position (labels are unshifted; the loss shifts)",
        "labels were shifted in the data pipeline (the loss shifts again: double shift) or built from other text"),
    "audio_out_token_label_masked": (
        f"the <|AUDIO_OUT|> placeholder's text label is {_IGN}",
        "collator built with mask_audio_out_token_label=False"),
    "has_targets": (
        "every sample has at least one learnable target (text or audio)",
        f"a sample whose every label is {_IGN} (all turns before start_index, or audio labels wiped)"),
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
        f"assistant-target audio segments have labels (not all {_IGN})",
        "the target audio is treated as reference (start_index too large, or the collator's no-train flag set)"),
    "audio_label_delay_offsets": (
        f"label row k of a target segment starts with exactly k+1 {_IGN} with the delay pattern (1 without)",
        "the delay pattern was applied with wrong offsets (or twice / not at all) to the labels"),
    "audio_label_codes_in_range": (
        f"target label codes lie in [0, codebook_size); no audio-stream BOS ({_BOS}) in labels",
        "codes from a codec with a larger codebook, corrupted codes, or BOS written into labels"),
    "audio_label_eos": (
        f"label row k has exactly one EOS ({_EOS}) right after its T codes, then {_IGN} to the segment end",
        "EOS missing (no stop target: generation never ends) or the tail filled with EOS"),
    "audio_label_values": (
        "each target label code equals the audio_out_ids code at its own column (unshifted; the loss shifts)",
        "audio labels shifted in the data pipeline or taken from other audio"),
    "audio_label_reference_masked": (
        f"reference (prompt) audio segments before start_index have labels all {_IGN}",
        "the collator's audio_out_no_train_flag is not applied: the model would learn to copy the prompt"),
    "audio_out_bos_eos": (
        f"audio_out_ids row k has BOS {_BOS} exactly at its k+1 leading columns and EOS {_EOS} exactly after the codes",
        "delay pattern built with other ids or offsets; stream BOS/EOS ids differ from the model config"),
    "audio_out_codes": (
        "audio_out_ids carry the cached source codes at the delay-pattern columns",
        "codes were re-ordered, truncated or taken from another audio"),
    "audio_codes_in_range": (
        "source codes and audio_out_ids codes lie in [0, codebook_size)",
        "codes from a codec with another codebook size (they would index another codebook's embedding)"),
    "codebook_coverage": (
        "per codebook, the fraction of assistant-target audio columns with a label >= min_audio_label_coverage",
        f"audio labels masked (all {_IGN}) or codebooks dropped"),
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
    "probe_packed_equivalence": (
        "the probe samples packed into one row (train.packing) have the padded batch's target counts and losses",
        "the packed layout or its labels differ from the padded batch's (packing.py out of step with the "
        "collator or the model's merge, e.g. a sample's first token became a target)"),
    "probe_packed_isolation": (
        "in a packed row, changing one sample's audio codes leaves the other samples' audio logits unchanged",
        "the block-diagonal attention mask is not applied (packing.packed_attention bypassed, or a kernel "
        "that ignores the 4D mask): packed samples attend to each other"),
}

#: Where a rule is evaluated: ``sample`` (per sample; the default), ``aggregate`` (over all samples or
#: the collator) or ``probe`` (the leak probe, on one batch through the model).
SCOPES = ("sample", "aggregate", "probe")
_AGGREGATE = ("codebook_coverage", "samples_present", "collator_settings")


def scope_of(rule: str) -> str:
    """The scope (one of :data:`SCOPES`) of a rule in :data:`RULES`.

    Raises:
        KeyError: for a name not in :data:`RULES`.
    """
    if rule not in RULES:
        raise KeyError(f"unknown audit rule {rule!r}")
    if rule.startswith(("probe_", "shapes_")):
        return "probe"
    return "aggregate" if rule in _AGGREGATE else "sample"


@dataclass
class Failure:
    """One failed check: ``rule`` (a key of :data:`RULES`), ``sample_id`` (``"*"`` for batch-, aggregate-
    and probe-level failures), a ``message`` with the numbers, and a ``likely_cause`` (default: the
    rule's, from :data:`RULES`)."""

    rule: str
    sample_id: str
    message: str
    likely_cause: str | None = None

    def as_dict(self) -> dict[str, str]:
        """``{"rule", "sample_id", "message", "likely_cause"}`` as written to ``summary.json``."""
        return {"rule": self.rule, "sample_id": self.sample_id, "message": self.message,
                "likely_cause": self.likely_cause or RULES[self.rule][1]}
