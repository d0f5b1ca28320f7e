"""The label conventions of Higgs Audio v2, stated once: ids, the ChatML layout, the delay pattern and
the teacher-forcing shift. Loss, audit, health, train and generate import them from here.

Sources: boson-multimodal 0.1.1 (``model/higgs_audio/configuration_higgs_audio.py``,
``data_collator/higgs_audio_collator.py``, ``dataset/chatml_dataset.py``, ``serve/serve_engine.py``)
and the ``bosonai/higgs-audio-v2-generation-3B-base`` ``config.json`` / ``tokenizer_config.json``.

**Ignore index.** A label equal to :data:`IGNORE_INDEX` (-100, ``torch.nn.CrossEntropyLoss``'s
default ``ignore_index``) is not a target.

**ChatML layout.** Each message is ``<|start_header_id|>{role}<|end_header_id|>\\n\\n`` + content +
``<|eot_id|>``; roles are :data:`ROLES`. Text labels (``label_ids``, long ``(B, L)``) are the input
tokens on assistant turns at/after ``start_index`` and :data:`IGNORE_INDEX` elsewhere (system, user,
headers, earlier assistant turns, padding, the ``<|AUDIO_OUT|>`` placeholder). An audio answer
stands in the text as ``<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>``.

**Delay pattern** (``use_delay_pattern``, K codebooks, one segment of T frames): the audio-out
input ``audio_out_ids`` (long ``(K, T + K + 1)``) has, in row k, ``k + 1`` x :data:`AUDIO_STREAM_BOS_ID`,
the T codes of codebook k, then ``K - k`` x :data:`AUDIO_STREAM_EOS_ID`; the labels
``label_audio_ids`` (same shape) have, in row k, ``k + 1`` x :data:`IGNORE_INDEX`, the T codes, one
EOS, then ``K - 1 - k`` x :data:`IGNORE_INDEX`. Without the delay pattern the row is ``BOS, codes,
EOS`` (labels ``-100, codes, EOS``). See :func:`delay_pattern`.

**Teacher forcing: labels are unshifted; the loss shifts.** ``HiggsAudioModel.forward`` returns
``expanded_labels`` (long ``(B, L')``, the label **of** each position) and ``audio_logits``
(``(N, K, C)``, one row per audio-out column of the concatenated segments). Hence

* text: ``logits[:, t]`` predicts ``expanded_labels[:, t + 1]`` (:func:`shifted_text_labels`), i.e.
  ``CE(logits[:, :-1], expanded_labels[:, 1:])``;
* audio: ``audio_logits[i]`` predicts ``label_audio_ids[:, i + 1]``, only when column ``i + 1`` lies in
  the same segment as ``i`` (never across a segment or sample boundary; :func:`shifted_audio_targets`).
"""

from __future__ import annotations

import torch

#: Label value that is not a target (``torch.nn.CrossEntropyLoss`` default ``ignore_index``).
IGNORE_INDEX = -100

#: Codes per codebook of the Higgs audio tokenizer (``audio_codebook_size``).
CODEBOOK_SIZE = 1024
#: Audio-stream BOS/EOS ids (``audio_stream_bos_id`` / ``audio_stream_eos_id``): ``codebook_size`` and +1.
AUDIO_STREAM_BOS_ID = CODEBOOK_SIZE
AUDIO_STREAM_EOS_ID = CODEBOOK_SIZE + 1
#: Codebooks per frame (``audio_num_codebooks``); frames per second of audio at 24 kHz, hop 960.
NUM_CODEBOOKS = 8

#: Higgs special tokens and their ids in the Llama-3.2 vocabulary (Higgs Audio v2 tokenizer_config.json;
#: these ids are ``<|reserved_special_token_N|>`` slots in the stock Llama-3.2 tokenizer).
HIGGS_SPECIAL_TOKENS: dict[int, str] = {
    128011: "<|audio_bos|>",
    128012: "<|audio_eos|>",
    128013: "<|audio_out_bos|>",
    128015: "<|AUDIO|>",
    128016: "<|AUDIO_OUT|>",
    128017: "<|recipient|>",
    128018: "<|scene_desc_start|>",
    128019: "<|scene_desc_end|>",
}
PAD_TOKEN_ID = 128001  # <|end_of_text|>, Higgs' pad_token_id
VOCAB_SIZE = 128256  # Llama-3.2 vocabulary

#: ChatML roles, in the order the audit codes them (0, 1, 2; 3 = no role / before the first header).
ROLES = ("system", "user", "assistant")
HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
END_OF_TURN = "<|eot_id|>"
#: What the serve engine appends to a prompt to force an audio answer (``_prepare_inputs``).
ASSISTANT_AUDIO_PREFIX = HEADER.format(role="assistant") + "<|audio_out_bos|>"


def delay_pattern(codes: torch.Tensor, *, delay: bool = True, bos: int = AUDIO_STREAM_BOS_ID,
                  eos: int = AUDIO_STREAM_EOS_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """The expected audio-out input and labels of one learned segment (see the module docstring).

    Args:
        codes: long ``(K, T)`` source codes in ``[0, codebook_size)``.
        delay: ``use_delay_pattern``.

    Returns:
        ``(audio_out_ids, label_audio_ids)``, long ``(K, T + K + 1)`` with the delay pattern, else
        ``(K, T + 2)``.
    """
    k_n, t_n = codes.shape
    if not delay:
        ids = torch.cat([torch.full((k_n, 1), bos), codes, torch.full((k_n, 1), eos)], 1).long()
        labels = ids.clone()
        labels[:, 0] = IGNORE_INDEX
        return ids, labels
    width = t_n + k_n + 1
    ids = torch.full((k_n, width), eos, dtype=torch.long)
    labels = torch.full((k_n, width), IGNORE_INDEX, dtype=torch.long)
    for k in range(k_n):
        ids[k, :k + 1] = bos
        ids[k, k + 1:k + 1 + t_n] = codes[k]
        labels[k, k + 1:k + 1 + t_n] = codes[k]
        labels[k, k + 1 + t_n] = eos
    return ids, labels


def shifted_text_labels(expanded_labels: torch.Tensor) -> torch.Tensor:
    """Text targets aligned with ``logits[:, :-1]``: ``expanded_labels[:, 1:]`` (long ``(B, L' - 1)``)."""
    return expanded_labels[:, 1:]


def same_segment_mask(n_rows: int, audio_out_ids_start: torch.Tensor, device=None) -> torch.Tensor:
    """Bool ``(max(n_rows - 1, 0),)``: True at ``i`` when columns ``i`` and ``i + 1`` share a segment.

    Args:
        n_rows: length N of the concatenated audio-out stream.
        audio_out_ids_start: long ``(S,)``, the first column of each segment (sorted, starting at 0).
    """
    if n_rows <= 1:
        return torch.zeros(0, dtype=torch.bool, device=device)
    boundary = torch.zeros(n_rows, dtype=torch.bool, device=device)
    starts = audio_out_ids_start.to(device=device, dtype=torch.long)
    boundary[starts[(starts > 0) & (starts < n_rows)]] = True
    return ~boundary[1:]  # pair (i, i+1) is valid unless i+1 starts a new segment


def shifted_audio_targets(label_audio_ids: torch.Tensor, audio_out_ids_start: torch.Tensor) -> torch.Tensor:
    """Audio targets aligned with ``audio_logits`` rows: long ``(N, K)``, :data:`IGNORE_INDEX` where none.

    Row ``i`` holds ``label_audio_ids[:, i + 1]`` (``label_audio_ids``: long ``(K, N)``) when ``i + 1``
    is in ``i``'s segment; the last column of every segment has no target.
    """
    k, n = label_audio_ids.shape
    out = torch.full((n, k), IGNORE_INDEX, dtype=torch.long, device=label_audio_ids.device)
    if n > 1:
        keep = same_segment_mask(n, audio_out_ids_start, label_audio_ids.device)
        nxt = label_audio_ids[:, 1:].t()
        out[:-1] = torch.where(keep[:, None], nxt, torch.full_like(nxt, IGNORE_INDEX))
    return out


def has_audio_targets(label_audio_ids: torch.Tensor | None) -> bool:
    """Whether ``label_audio_ids`` (long ``(K, N)`` or None) holds any label other than :data:`IGNORE_INDEX`."""
    return label_audio_ids is not None and bool((label_audio_ids != IGNORE_INDEX).any())
