"""Sequence packing: several samples share one row of the decoder's sequence, none attends to another.

A padded micro-batch of B samples costs ``B x`` (its longest sample) positions; packed, the same
samples lie end to end in as few rows as fit ``capacity`` positions, and only the rows' ends are
padding. The math does not change (tested: loss, every metric and every gradient equal the padded
batch's to float precision), because three things keep each sample alone in its row:

1. **Attention**: a block-diagonal causal mask. Position i of sample s attends to positions j <= i
   of sample s only (``(R, 1, L, L)`` additive mask, 0 allowed / dtype min masked; a padding
   position attends to itself, so no row of the mask is empty).
2. **Positions**: rotary position ids restart at 0 at each sample's first position, as in its own
   row (RoPE scores depend on distance only, but the sin/cos of large angles round differently).
3. **Labels**: a sample's first token is never a target (in a padded row it is column 0, which the
   teacher-forcing shift never predicts); packed behind another sample it would be predicted from
   that sample's last position, so its label is set to the ignore index. Audio targets never
   cross a segment (:func:`higgs_tune.labels.shifted_audio_targets`), so they need nothing.

The rows are built as ordinary ``ChatMLDatasetSample`` objects (token ids, labels and audio codes
concatenated) and go through the upstream collator unchanged (audio-stream BOS/EOS and the delay
pattern are per audio segment). ``HiggsAudioModel.forward`` (boson-multimodal 0.1.1) builds its
own 2D mask and position ids after merging the audio columns into the text row, so
:func:`packed_attention` replaces, for the duration of one forward, the model's
``_update_causal_mask`` (which turns that 2D mask into the 4D one the layers read) and the position
ids handed to ``_forward_core``. It first checks that the model's merged mask equals the layout
computed here (:func:`higgs_tune.data.sample_length`), and raises otherwise.

Supported: ``eager`` and ``sdpa`` attention. Not supported (``ValueError``): ``flash_attention_2``
(upstream's mask path returns no 4D mask for it) and ``audio_decoder_proj_num_layers > 0`` (those
layers take the model's own position ids). Cost: attention runs over the whole packed row with the
cross-sample blocks masked, not skipped: ``L^2`` per row instead of ``sum of l_i^2``. Projections and
FFNs (most of the FLOPs at these lengths) run on real positions only. ``train.pack_positions``
caps a row's length.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from .data import MODEL_ROUND_TO, SampleLength
from .labels import IGNORE_INDEX

__all__ = ["PackedBatch", "block_causal_mask", "pack_rows", "packed_attention", "packed_collate", "packed_sample",
           "unsupported"]


def pack_rows(positions: Sequence[int], capacity: int | None = None) -> list[list[int]]:
    """First-fit decreasing: indices of ``positions`` grouped into rows of at most ``capacity``.

    Args:
        positions: each sample's positions in the merged sequence (``SampleLength.positions``).
        capacity: most positions per row; ``None``: one row for all. A sample longer than
            ``capacity`` gets a row of its own.

    Returns:
        Rows of indices, each row in ascending index order; every index exactly once;
        deterministic (ties broken by index).

    Raises:
        ValueError: ``capacity`` below 1.
    """
    if capacity is not None and capacity < 1:
        raise ValueError(f"pack capacity must be >= 1 position, got {capacity}")
    rows: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(positions)), key=lambda k: (-positions[k], k)):
        for r in range(len(rows)):
            if capacity is None or loads[r] + positions[i] <= capacity:
                rows[r].append(i)
                loads[r] += positions[i]
                break
        else:
            rows.append([i])
            loads.append(positions[i])
    return [sorted(r) for r in rows]


def packed_sample(samples: list):
    """Concatenate ``ChatMLDatasetSample`` objects (from :func:`higgs_tune.data.build_dataset_sample`)
    into one: ``input_ids``/``label_ids`` end to end, audio codes ``(K, sum T)`` with their segment
    starts shifted, and the first token of every sample labelled ``IGNORE_INDEX``.

    Raises:
        ValueError: a sample carries waveforms (Whisper features are not packed) or audio labels
            separate from its codes (``audio_label_ids_concat``).
    """
    from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

    for s in samples:
        if s.audio_waveforms_concat.numel() or s.audio_label_ids_concat is not None:
            raise ValueError("packing takes samples of token ids and audio codes only (no waveforms, no "
                             "audio_label_ids_concat); set train.packing: false for this data")
    labels = []
    for s in samples:
        lab = s.label_ids.clone()
        lab[:1] = IGNORE_INDEX
        labels.append(lab)
    code_offsets = [0]
    for s in samples[:-1]:
        code_offsets.append(code_offsets[-1] + int(s.audio_ids_concat.shape[-1]))
    return ChatMLDatasetSample(
        input_ids=torch.cat([s.input_ids for s in samples]),
        label_ids=torch.cat(labels),
        audio_ids_concat=torch.cat([s.audio_ids_concat for s in samples], dim=1),
        audio_ids_start=torch.cat([s.audio_ids_start + o for s, o in zip(samples, code_offsets)]).long(),
        audio_waveforms_concat=torch.zeros(0),
        audio_waveforms_start=torch.zeros(0, dtype=torch.long),
        audio_sample_rate=torch.zeros(0),
        audio_speaker_indices=torch.cat([s.audio_speaker_indices for s in samples]).long(),
    )


@dataclass
class PackedBatch:
    """A collated micro-batch of packed rows and where each sample lies in the merged sequence.

    Attributes:
        batch: the collator's ``HiggsAudioBatchInput`` of the ``R`` packed rows.
        rows: for each row, the indices (into the samples given) packed into it, in row order.
        segment_ids: long ``(R, L)``: 1 + the sample's place in its row at each merged position,
            0 at padding. ``L`` = the longest row rounded up to :data:`higgs_tune.data.MODEL_ROUND_TO`;
            padding at the end of each row, or at the start when there is one row (as the model
            pads its merged sequence).
        position_ids: long ``(R, L)``: 0, 1, ... from each sample's first position; 1 at padding
            (as upstream's ``merge_input_ids_with_audio_features``).
    """

    batch: object
    rows: list[list[int]]
    segment_ids: torch.Tensor
    position_ids: torch.Tensor

    @property
    def real_positions(self) -> int:
        return int((self.segment_ids > 0).sum())

    @property
    def padded_positions(self) -> int:
        return self.segment_ids.numel()


def packed_collate(samples: list, lengths: Sequence[SampleLength], collator, capacity: int | None = None,
                   round_to: int = MODEL_ROUND_TO) -> PackedBatch:
    """Pack ``samples`` into rows (:func:`pack_rows` on their ``lengths``) and collate them.

    Args:
        samples: ``ChatMLDatasetSample`` objects of one micro-batch.
        lengths: their :func:`higgs_tune.data.sample_length`, in the same order.
        collator: :func:`higgs_tune.data.make_collator`'s collator.
        capacity: most positions per row (``train.pack_positions``); ``None``: one row.
        round_to: the model's padding multiple of the merged sequence.

    Raises:
        ValueError: ``samples`` is empty, or ``samples`` and ``lengths`` differ in number.
    """
    if not samples:
        raise ValueError("packed_collate got no samples: a micro-batch holds at least one")
    if len(samples) != len(lengths):
        raise ValueError(f"packed_collate needs one length per sample (got {len(samples)} samples, "
                         f"{len(lengths)} lengths)")
    rows = pack_rows([x.positions for x in lengths], capacity)
    loads = [sum(lengths[i].positions for i in r) for r in rows]
    width = -(-max(loads) // round_to) * round_to
    segment_ids = torch.zeros(len(rows), width, dtype=torch.long)
    position_ids = torch.ones(len(rows), width, dtype=torch.long)
    # HiggsAudioModel.forward pads a batch of one row on the left, more rows on the right
    # (``left_padding = use_cache or input_ids.shape[0] == 1``), merged length rounded to round_to
    left = len(rows) == 1
    for r, row in enumerate(rows):
        offset = width - loads[r] if left else 0
        for k, i in enumerate(row):
            n = lengths[i].positions
            segment_ids[r, offset:offset + n] = k + 1
            position_ids[r, offset:offset + n] = torch.arange(n)
            offset += n
    batch = collator([packed_sample([samples[i] for i in row]) for row in rows])
    return PackedBatch(batch=batch, rows=rows, segment_ids=segment_ids, position_ids=position_ids)


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``(R, 1, L, L)`` in ``dtype``: 0 where query i may attend key j (same sample,
    ``j <= i``; and ``i == j`` everywhere), ``torch.finfo(dtype).min`` elsewhere."""
    seg = segment_ids
    width = seg.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0) & causal
    allowed |= torch.eye(width, dtype=torch.bool, device=seg.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def higgs_model(model):
    """The :class:`HiggsAudioModel` inside ``model`` (through DDP and peft wrappers); ``None`` if none."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    for m in model.modules():  # through DDP and peft wrappers
        if isinstance(m, HiggsAudioModel):
            return m
    raise TypeError(f"{type(model).__name__} holds no HiggsAudioModel")


def unsupported(model) -> str | None:
    """Why ``model`` (a ``HiggsAudioModel``, also inside peft/DDP wrappers) cannot run packed rows, or
    ``None`` when it can.

    Raises:
        TypeError: ``model`` holds no ``HiggsAudioModel``.
    """
    inner = higgs_model(model)
    impl = {inner.config._attn_implementation, getattr(inner.config.text_config, "_attn_implementation", None)}
    if "flash_attention_2" in impl:
        return ("packing needs eager or sdpa attention (flash_attention_2 gets no 4D mask in HiggsAudioModel "
                "0.1.1); set train.packing: false or model.attn_implementation: sdpa")
    if inner.config.audio_decoder_proj_num_layers > 0:
        return "packing does not support audio_decoder_proj_num_layers > 0; set train.packing: false"
    return None


@contextlib.contextmanager
def packed_attention(model, packed: PackedBatch):
    """While active, forwards of ``model`` (a ``HiggsAudioModel``, also inside peft/DDP wrappers) on
    ``packed.batch`` keep each packed sample alone: block-diagonal causal mask
    (:func:`block_causal_mask`) and per-sample position ids. Restored on exit, even on an error.

    Raises:
        ValueError: ``flash_attention_2`` attention, or ``audio_decoder_proj_num_layers > 0``
            (:func:`unsupported`).
        RuntimeError: already active on this model; or, inside the forward, when the model's
            merged sequence does not have the layout of ``packed`` (its 2D mask differs from
            ``segment_ids > 0``): a length count out of step with the model's merge.
    """
    inner = higgs_model(model)
    reason = unsupported(inner)  # one walk of the wrappers: inner finds itself first
    if reason:
        raise ValueError(reason)
    if "_update_causal_mask" in vars(inner) or "_forward_core" in vars(inner):
        raise RuntimeError("packed_attention is already active on this model (it does not nest)")
    expected = packed.segment_ids > 0

    def update_causal_mask(attention_mask, input_tensor, cache_position, past_key_values, output_attentions):
        if attention_mask is None or attention_mask.shape != expected.shape or not torch.equal(
                attention_mask.bool().cpu(), expected):
            got = None if attention_mask is None else tuple(attention_mask.shape)
            raise RuntimeError(f"packed layout {tuple(expected.shape)} does not match the model's merged "
                               f"sequence (mask {got}): the batch must come from packed_collate with the "
                               f"collator of data.make_collator (round_to 1, right-padded text rows) and run "
                               f"without KV cache; otherwise data.sample_length is out of step with the model")
        return block_causal_mask(packed.segment_ids.to(input_tensor.device), input_tensor.dtype)

    original_core = inner._forward_core

    def forward_core(*args, **kwargs):
        kwargs["position_ids"] = packed.position_ids.to(kwargs["position_ids"].device)
        return original_core(*args, **kwargs)

    inner._update_causal_mask = update_causal_mask  # instance attributes shadow the class's methods
    inner._forward_core = forward_core
    try:
        yield inner
    finally:
        del inner._update_causal_mask
        del inner._forward_core

