"""From a kept manifest row to the exact tensors the model trains on.

A manifest row is a Higgs ``ChatMLSample`` as JSON, whose ``misc.audio_sha256`` maps every
``audio_url`` to the content hash the tokenize stage keyed its codes by. The path to a batch is
the upstream one, unchanged: ``prepare_chatml_sample`` (text tokens and text labels: only
assistant turns at/after ``start_index`` are learnable) -> ``ChatMLDatasetSample`` with the cached
codes -> ``HiggsAudioSampleCollator`` (audio-stream BOS/EOS, delay pattern, audio labels).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .fileio import read_jsonl, write_jsonl  # noqa: F401  (re-exported: stages read manifests via data)


def iter_contents(sample: dict) -> Iterator[tuple[int, str, dict | str]]:
    """Yield ``(turn, role, content)`` for every content item of every message, in order."""
    for turn, msg in enumerate(sample["messages"]):
        content = msg["content"]
        items = content if isinstance(content, list) else [content]
        for item in items:
            yield turn, msg["role"], item


def audio_items(sample: dict) -> list[tuple[int, str, dict]]:
    """``(turn, role, AudioContent dict)`` for each audio content, in order of appearance."""
    return [(t, r, c) for t, r, c in iter_contents(sample) if isinstance(c, dict) and c.get("type") == "audio"]


class CodesIndex:
    """Lookup of cached audio codes by content hash (the tokenize stage's ``index.parquet``), read on demand.

    Holds, per clip, only its hash, its codes path and its frame count (sorted numpy arrays: about
    ``64 + len(path) + 8`` bytes a clip); codes are read from their ``.npy`` file at each call, never
    cached, so a process holds the codes of the samples it builds and no others.
    ``codes_path`` entries may be absolute or relative to ``root`` (the workflow root).

    Raises:
        ValueError: (constructor) the index lacks ``audio_sha256`` or ``codes_path``.
    """

    def __init__(self, index_path: str | Path, root: str | Path = "."):
        import pandas as pd

        self.path = Path(index_path)
        df = pd.read_parquet(self.path)
        missing = {"audio_sha256", "codes_path"} - set(df.columns)
        if missing:
            raise ValueError(f"{self.path} lacks column(s) {sorted(missing)}: rerun the tokenize stage")
        root = Path(root)
        shas = np.array([str(h).encode() for h in df["audio_sha256"]], dtype=bytes)
        order = np.argsort(shas, kind="stable")
        self._shas = shas[order]
        self._paths = np.array([str(Path(p) if Path(p).is_absolute() else root / p).encode()
                                for p in df["codes_path"]], dtype=bytes)[order]
        self._frames = (np.asarray(df["n_frames"], dtype=np.int64)[order] if "n_frames" in df.columns else None)

    def __len__(self) -> int:
        return len(self._shas)

    def _row(self, sha: str) -> int | None:
        key = sha.encode()
        i = int(np.searchsorted(self._shas, key))
        return i if i < len(self._shas) and self._shas[i] == key else None

    def __contains__(self, sha: str) -> bool:
        return self._row(sha) is not None

    def _find(self, sha: str) -> int:
        i = self._row(sha)
        if i is None:
            raise KeyError(f"audio {sha[:12]}… has no codes in {self.path}: rerun the tokenize stage")
        return i

    def n_frames(self, sha: str) -> int:
        """T, the codec frames of ``sha``'s codes, from the index alone (no file read).

        Raises:
            KeyError: naming the hash when the index does not hold it.
            ValueError: the index has no ``n_frames`` column (rerun the tokenize stage).
        """
        i = self._find(sha)
        if self._frames is None:
            raise ValueError(f"{self.path} has no n_frames column: rerun the tokenize stage")
        return int(self._frames[i])

    def load(self, sha: str) -> torch.Tensor:
        """The codes of ``sha`` as stored: int16 ``(K, T)`` (values < 1026 fit), read from disk now.

        Raises:
            KeyError: naming the hash when the index does not hold it.
            ValueError: naming the file when its values do not fit int16.
        """
        path = self._paths[self._find(sha)].decode()
        arr = np.load(path)
        if arr.dtype != np.int16:
            if arr.size and (int(arr.min()) < -(2 ** 15) or int(arr.max()) >= 2 ** 15):
                raise ValueError(f"{path}: codes outside int16 ({arr.min()}..{arr.max()}): rerun the tokenize stage")
            arr = arr.astype(np.int16)
        return torch.from_numpy(arr)

    def get(self, sha: str) -> torch.Tensor:
        """The codes of ``sha`` as a long ``(K, T)`` tensor (:meth:`load` widened; not cached).

        Raises:
            KeyError: naming the hash when the index does not hold it.
        """
        return self.load(sha).long()


def _prepare(sample: dict, text_tokenizer):
    """``prepare_chatml_sample`` of a kept row: ``(input_tokens, label_tokens, audio_contents, hashes)``."""
    from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample

    chatml = {k: sample[k] for k in ("messages", "start_index", "misc", "speaker") if k in sample}
    input_tokens, label_tokens, audio_contents, _ = prepare_chatml_sample(json.loads(json.dumps(chatml)), text_tokenizer)
    if input_tokens is None:
        raise ValueError(f"sample {sample_id(sample)}: prepare_chatml_sample rejected it (see the log above)")
    return input_tokens, label_tokens, audio_contents, sample.get("misc", {}).get("audio_sha256", {})


def build_dataset_sample(sample: dict, text_tokenizer, codes_of: Callable[[str], torch.Tensor]):
    """One ChatML row -> ``ChatMLDatasetSample`` (input_ids, label_ids, concatenated codes).

    Args:
        sample: a kept manifest row (``ChatMLSample`` JSON with ``misc.audio_sha256``).
        text_tokenizer: the Higgs text tokenizer.
        codes_of: ``sha256 -> (K, T)`` integer codes (``CodesIndex.load``: int16, or ``CodesIndex.get``:
            long); ``audio_ids_concat`` keeps their dtype (the collator of :func:`make_collator` widens
            it to long).

    Raises:
        ValueError: naming the sample id when ``prepare_chatml_sample`` rejects the row.
    """
    from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

    input_tokens, label_tokens, audio_contents, hashes = _prepare(sample, text_tokenizer)
    codes = [codes_of(hashes[c.audio_url]) for c in audio_contents]
    if codes:
        starts = torch.tensor(np.cumsum([0] + [c.shape[1] for c in codes[:-1]]), dtype=torch.long)
        concat = torch.cat(codes, dim=1)
    else:
        starts = torch.zeros(0, dtype=torch.long)
        concat = torch.zeros((8, 0), dtype=torch.long)
    return ChatMLDatasetSample(
        input_ids=torch.tensor(input_tokens, dtype=torch.long),
        label_ids=torch.tensor(label_tokens, dtype=torch.long),
        audio_ids_concat=concat,
        audio_ids_start=starts,
        audio_waveforms_concat=torch.zeros(0),
        audio_waveforms_start=torch.zeros(0, dtype=torch.long),
        audio_sample_rate=torch.zeros(0),
        audio_speaker_indices=torch.zeros(0, dtype=torch.long),
    )


class ManifestSamples:
    """The training samples of a kept manifest, each built when it is asked for.

    Holds the byte offset of each row in the file (8 bytes a row) and nothing else: ``samples[i]``
    reads row ``i``, tokenizes it and loads its codes (int16, :meth:`CodesIndex.load`) into a
    ``ChatMLDatasetSample`` (:func:`build_dataset_sample`), every time (no cache). A training
    process thus holds the codes of the micro-batches in flight, the samples of its own share, and
    never reads the codes of samples it does not train. :meth:`lengths` counts every row's positions
    from its tokens and the index's frame counts, without reading any codes.

    Raises:
        ValueError: (constructor) naming the file and line of a row that is not JSON.
    """

    def __init__(self, path: str | Path, text_tokenizer, codes: CodesIndex):
        self.path, self.text_tokenizer, self.codes = Path(path), text_tokenizer, codes
        offsets, at = [], 0
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{self.path}:{n}: not JSON ({exc.msg}); fix or remove that line") from exc
                    offsets.append(at)
                at += len(line)
        self._offsets = np.array(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def row(self, i: int) -> dict:
        """Row ``i`` (0-based, blank lines not counted) as read from the file now."""
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[i]))
            return json.loads(f.readline())

    def __getitem__(self, i: int):
        return build_dataset_sample(self.row(i), self.text_tokenizer, self.codes.load)

    def rows(self) -> Iterator[dict]:
        """Every row, in order, read from the file as it goes (one row in memory at a time)."""
        with open(self.path, "rb") as f:
            for at in self._offsets:
                f.seek(int(at))
                yield json.loads(f.readline())

    def lengths(self, model_config) -> tuple[SampleLength, ...]:
        """:class:`SampleLength` of every row, in order: :func:`row_length` (tokens + index frame counts)."""
        return tuple(row_length(r, self.text_tokenizer, self.codes.n_frames, model_config) for r in self.rows())


def sample_id(sample: dict) -> str:
    """The row's id (``misc.id``), or ``?`` when it has none."""
    return str((sample.get("misc") or {}).get("id", "?"))


def collator_settings(model_config) -> dict[str, Any]:
    """Collator keyword arguments implied by a ``HiggsAudioConfig``.

    Derived as upstream ``HiggsAudioServeEngine.__init__`` does for inference (boson-multimodal
    0.1.1 ``serve/serve_engine.py``), so training and inference build the same streams; the one
    training difference is ``return_audio_in_tokens``, which follows ``encode_audio_in_tokens``.
    """
    return dict(
        encode_whisper_embed=model_config.encode_whisper_embed,
        audio_in_token_id=model_config.audio_in_token_idx,
        audio_out_token_id=model_config.audio_out_token_idx,
        audio_stream_bos_id=model_config.audio_stream_bos_id,
        audio_stream_eos_id=model_config.audio_stream_eos_id,
        pad_token_id=model_config.pad_token_id,
        return_audio_in_tokens=model_config.encode_audio_in_tokens,
        use_delay_pattern=model_config.use_delay_pattern,
        audio_num_codebooks=model_config.audio_num_codebooks,
        round_to=1,
    )


def make_collator(model_config, whisper_processor=None, **overrides):
    """``HiggsAudioSampleCollator`` with :func:`collator_settings` (``overrides`` replace keys).

    Raises:
        ValueError: when the config asks for Whisper embeddings but no processor is given.
    """
    from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator

    kwargs = {**collator_settings(model_config), **overrides}
    if kwargs["encode_whisper_embed"] and whisper_processor is None:
        raise ValueError("this model encodes Whisper embeddings: pass a WhisperProcessor to make_collator")
    return NonMutatingCollator(HiggsAudioSampleCollator(whisper_processor=whisper_processor, **kwargs))


class NonMutatingCollator:
    """Calls the upstream collator on copies of the samples' ``label_ids``.

    ``HiggsAudioSampleCollator.__call__`` (boson-multimodal 0.1.1) masks the ``<|AUDIO_OUT|>`` label
    **in place** in each sample's ``label_ids``, then derives "this audio segment is not trained"
    from that same label being -100. Collating the same sample a second time (epoch 2, or eval
    after train) therefore turns every audio label into -100: training silently stops learning audio.
    It also widens each sample's codes to long (samples hold them in their stored int16).
    """

    def __init__(self, collator):
        self.collator = collator

    def __getattr__(self, name):
        return getattr(self.collator, name)

    def __call__(self, samples):
        import dataclasses

        return self.collator([dataclasses.replace(s, audio_ids_concat=s.audio_ids_concat.long(),
                                                  **({"label_ids": s.label_ids.clone()} if s.label_ids is not None
                                                     else {})) for s in samples])


def batch_to_model_kwargs(batch, device: torch.device | str) -> dict[str, Any]:
    """The collator's ``HiggsAudioBatchInput`` as keyword arguments of ``HiggsAudioModel.forward``, its
    tensors moved to ``device`` (the model's)."""
    names = ("input_ids", "attention_mask", "audio_features", "audio_feature_attention_mask", "audio_out_ids",
             "audio_out_ids_start", "audio_out_ids_start_group_loc", "audio_in_ids", "audio_in_ids_start",
             "label_ids", "label_audio_ids")
    out = {}
    for name in names:
        value = getattr(batch, name)
        out[name] = value.to(device) if isinstance(value, torch.Tensor) else value
    return out


#: ``HiggsAudioModel.forward`` (boson-multimodal 0.1.1, ``modeling_higgs_audio.py``) pads the merged
#: text+audio sequence to a multiple of 8 positions whenever the KV cache is off (``round_to = 1 if
#: use_cache else 8``), i.e. in every training and teacher-forced forward.
MODEL_ROUND_TO = 8


@dataclass(frozen=True)
class SampleLength:
    """The length of one ``ChatMLDatasetSample`` in the two sequences a batch pads.

    Attributes:
        tokens: ``len(input_ids)``: its row of the collated ``input_ids`` (text tokens; each audio
            segment is one placeholder, ``<|AUDIO|>`` or ``<|AUDIO_OUT|>``).
        positions: the positions it occupies in the sequence the decoder layers run on, after the
            model replaces each placeholder by its audio columns: ``tokens - placeholders +
            sum of segment columns``; a segment of T frames has ``T + 2`` columns (audio-stream BOS and
            EOS) plus ``K - 1`` with the delay pattern (K codebooks): ``T + K + 1`` for Higgs v2.
            An ``<|AUDIO|>`` placeholder stays one position when audio-in codes are not returned.
    """

    tokens: int
    positions: int


def sample_length(sample, model_config) -> SampleLength:
    """:class:`SampleLength` of a ``ChatMLDatasetSample`` (from :func:`build_dataset_sample`), from its
    ``input_ids`` and ``audio_ids_start`` / ``audio_ids_concat`` alone (no collation, no forward).

    Follows ``HiggsAudioSampleCollator`` (audio-stream BOS/EOS, ``build_delay_pattern_mask``) and
    ``merge_input_ids_with_audio_features`` (one embedding per audio column) of boson-multimodal
    0.1.1, with the collator settings :func:`collator_settings` derives from ``model_config``.

    Raises:
        ValueError: for a model that encodes Whisper embeddings (their length depends on the mel
            frames, which this count does not model), or when the sample has fewer audio segments
            than placeholders.
    """
    ids = sample.input_ids
    starts = [int(x) for x in sample.audio_ids_start]
    ends = starts[1:] + [int(sample.audio_ids_concat.shape[-1])]
    return _length(ids, [b - a for a, b in zip(starts, ends)], model_config)


def row_length(row: dict, text_tokenizer, n_frames_of: Callable[[str], int], model_config) -> SampleLength:
    """:class:`SampleLength` of a kept manifest row without its codes: its tokens
    (``prepare_chatml_sample``, as :func:`build_dataset_sample`) and each audio segment's frame count
    (``n_frames_of``, e.g. :meth:`CodesIndex.n_frames`). Equals :func:`sample_length` of the built
    sample (tested).

    Raises:
        ValueError: as :func:`sample_length`, or when ``prepare_chatml_sample`` rejects the row.
        KeyError: an audio segment's hash is not in the index.
    """
    input_tokens, _, audio_contents, hashes = _prepare(row, text_tokenizer)
    return _length(torch.tensor(input_tokens, dtype=torch.long),
                   [n_frames_of(hashes[c.audio_url]) for c in audio_contents], model_config)


def _length(ids: torch.Tensor, segment_frames: list[int], model_config) -> SampleLength:
    """:class:`SampleLength` of ``input_ids`` whose audio segments have ``segment_frames`` frames, in order."""
    s = collator_settings(model_config)
    if s["encode_whisper_embed"]:
        raise ValueError("sample_length does not count Whisper embeddings (encode_whisper_embed: true)")
    is_in, is_out = ids == s["audio_in_token_id"], ids == s["audio_out_token_id"]
    placeholders = is_in | is_out
    n_seg = int(placeholders.sum())
    if n_seg > len(segment_frames):
        raise ValueError(f"sample has {n_seg} audio placeholders but {len(segment_frames)} audio segments")
    extra = 2 + (s["audio_num_codebooks"] - 1 if s["use_delay_pattern"] else 0)
    # the collator numbers audio segments in order of appearance over both kinds of placeholder
    kinds = ["in" if bool(x) else "out" for x in is_in[placeholders]]
    positions = int(ids.shape[0]) - n_seg
    for kind, t in zip(kinds, segment_frames):
        positions += 1 if kind == "in" and not s["return_audio_in_tokens"] else t + extra
    return SampleLength(tokens=int(ids.shape[0]), positions=positions)


def batch_positions(lengths: list[SampleLength], round_to: int = MODEL_ROUND_TO) -> tuple[int, int]:
    """``(real, padded)`` positions of one collated micro-batch as the model runs it.

    ``real`` is the sum of ``positions``; ``padded`` is ``B x L'`` with ``L' = ceil(max_i positions_i /
    round_to) x round_to`` (:data:`MODEL_ROUND_TO`). (The collator right-pads the text rows; the
    model expands each row's placeholders, pads every row to the longest, then trims the columns
    after the last real position of any row and rounds up to ``round_to``:
    ``merge_input_ids_with_audio_features``.) The model's merged ``attention_mask`` sums to ``real``
    and has ``padded`` entries (tested). Padding efficiency = ``real / padded``. An empty list
    gives ``(0, 0)``.
    """
    if not lengths:
        return 0, 0
    longest = max(x.positions for x in lengths)
    return sum(x.positions for x in lengths), len(lengths) * (-(-longest // round_to) * round_to)


def val_subset(n_rows: int, n: int | None, seed: int) -> list[int]:
    """The rows of a fixed val subset (``train.val_samples``): ``n`` of ``range(n_rows)`` drawn by ``seed``,
    in ascending order; every row when ``n`` is None or at least ``n_rows``.

    A function of ``(n_rows, n, seed)`` alone: every process and every resume of a run draws the same rows.

    Raises:
        ValueError: ``n`` below 1 or ``n_rows`` negative.
    """
    if n_rows < 0 or (n is not None and n < 1):
        raise ValueError(f"val subset of {n} from {n_rows} rows: give n >= 1 (train.val_samples) or null for all")
    if n is None or n >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), n))


class LazyBatches:
    """Collated batches of chosen samples, each built and collated when it is indexed (nothing cached).

    ``LazyBatches(samples, indices, batch_size, collator)[j]`` is ``collator([samples[i] for i in
    chunk_j])`` with ``chunk_j = indices[j * batch_size:(j + 1) * batch_size]`` (the batches of
    :func:`batches` without shuffle); a slice gives the lazy batches of those chunks. Holds the
    index lists only: memory does not grow with the number of rows, and a process that iterates
    ``batches[rank::world]`` builds only its own share.

    Args:
        samples: anything indexable by row, e.g. :class:`ManifestSamples` (built on each access).
        indices: the rows to batch, in order. batch_size: >= 1. collator: :func:`make_collator`'s.
    """

    def __init__(self, samples, indices: list[int], batch_size: int, collator, _chunks: list | None = None):
        self.samples, self.collator = samples, collator
        self._chunks = _chunks if _chunks is not None else \
            [list(indices[j:j + batch_size]) for j in range(0, len(indices), batch_size)]

    def __len__(self) -> int:
        return len(self._chunks)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return LazyBatches(self.samples, [], 1, self.collator, _chunks=self._chunks[j])
        return self.collator([self.samples[i] for i in self._chunks[j]])

    def __iter__(self):
        return (self[j] for j in range(len(self)))


def batches(items: list, batch_size: int, *, shuffle: bool, seed: int, epoch: int = 0) -> list[list]:
    """Split ``items`` into batches; with ``shuffle`` the order is a function of ``(seed, epoch)``."""
    order = list(range(len(items)))
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    return [[items[i] for i in order[j:j + batch_size]] for j in range(0, len(order), batch_size)]


__all__ = [
    "MODEL_ROUND_TO", "CodesIndex", "LazyBatches", "ManifestSamples", "SampleLength", "audio_items", "batch_positions",
    "batch_to_model_kwargs", "batches", "build_dataset_sample", "collator_settings", "iter_contents", "make_collator",
    "read_jsonl", "row_length", "sample_id", "sample_length", "val_subset", "write_jsonl",
]
