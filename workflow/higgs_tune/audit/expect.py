"""What the tensors must look like, derived without the collator under audit.

:class:`Expect` holds what the model config and the text tokenizer imply (ids, delay pattern, header
tokens) and the expected audio-out layout of a segment (from :func:`higgs_tune.labels.delay_pattern`);
:func:`build_sample` tokenizes a kept row once with the function training uses and records the
per-sample facts (:class:`SampleMeta`) the checks compare against; :func:`dry_expand` runs the
model's own text/audio merge without the model; :func:`check_collator` compares the collator's
settings with the model config's.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..data import build_dataset_sample, collator_settings, sample_id
from ..labels import HEADER, IGNORE_INDEX, ROLES, delay_pattern
from .rules import Failure

#: Role code of tokens before the first header (``<|begin_of_text|>``) or of an unknown role; the
#: codes of :data:`higgs_tune.labels.ROLES` are their indices (system 0, user 1, assistant 2).
NO_ROLE = len(ROLES)
#: Names of the role codes ``0 .. NO_ROLE``, as keyed in ``summary["fractions"]["by_role"]``.
ROLE_NAMES = (*ROLES, "none")
ASSISTANT = ROLES.index("assistant")


def role_code(role: str | None) -> int:
    """The role code of a ChatML role name (:data:`NO_ROLE` when it is not one of ``ROLES``)."""
    return ROLES.index(role) if role in ROLES else NO_ROLE


@functools.lru_cache(maxsize=4096)
def _segment_layout(n_frames: int, K: int, delay: bool, bos: int, eos: int) -> torch.Tensor:
    """Cached body of :meth:`Expect.layout` (one entry per distinct segment length)."""
    base = max(bos, eos) + 1
    markers = (base + torch.arange(n_frames, dtype=torch.long)).expand(K, n_frames)
    ids, labels = delay_pattern(markers, delay=delay, bos=bos, eos=eos)
    tail = torch.tensor([eos, IGNORE_INDEX], dtype=torch.long).view(2, 1, 1).expand(2, K, 1)
    return torch.cat([torch.stack([ids, labels]), tail], 2)


@dataclass
class Expect:
    """What the model config and the text tokenizer imply for the tensors (independent of the collator).

    Attributes:
        K: ``audio_num_codebooks``. codebook_size: ``audio_codebook_size`` (1024). bos / eos:
        ``audio_stream_bos_id`` / ``audio_stream_eos_id`` (1024 / 1025). delay: ``use_delay_pattern``.
        audio_in / audio_out: ``<|AUDIO|>`` / ``<|AUDIO_OUT|>`` ids. pad: ``pad_token_id``.
        start_header / end_header / nl: the header's token ids. role_tokens: role token id -> role code
        (the index in ``labels.ROLES``). prefix_len: tokens of a turn header (4).
        encode_audio_in_tokens / skip_audio_tower: how forward embeds audio-in (for :func:`dry_expand`).
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

        Each role's header ``labels.HEADER`` must tokenize as Llama-3 headers do:
        ``<|start_header_id|>``, the role, ``<|end_header_id|>``, ``\\n\\n``.

        Raises:
            ValueError: when a role's header does not tokenize to those 4 tokens.
        """
        start_tok, _, rest = HEADER.partition("{role}")
        end_tok = rest.rstrip("\n")
        sh = text_tokenizer.convert_tokens_to_ids(start_tok)
        eh = text_tokenizer.convert_tokens_to_ids(end_tok)
        role_tokens: dict[int, int] = {}
        prefix_len, nl = None, None
        for code, role in enumerate(ROLES):
            ids = text_tokenizer.encode(HEADER.format(role=role), add_special_tokens=False)
            if len(ids) != 4 or ids[0] != sh or ids[2] != eh:
                raise ValueError(f"header of role {role!r} tokenizes to {ids}: expected 4 tokens "
                                 f"{start_tok} role {end_tok} \\n\\n")
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

    @property
    def marker_base(self) -> int:
        """First code-marker value of :meth:`layout` (above both stream ids)."""
        return max(self.bos, self.eos) + 1

    def layout(self, n_frames: int) -> torch.Tensor:
        """The expected layout of one audio-out segment of ``n_frames`` source frames.

        ``labels.delay_pattern`` applied to marker codes ``marker_base + f`` (frame ``f``), plus one
        tail column: long ``(2, K, n_frames + segment_extra() + 1)``; ``[0]`` is the expected
        ``audio_out_ids`` (BOS / marker / EOS), ``[1]`` the expected ``label_audio_ids`` (ignore
        index / marker / EOS). The last column (EOS input, ignored label) stands for any column past
        the expected width. Cached per length; do not modify the returned tensor.
        """
        return _segment_layout(int(n_frames), self.K, self.delay, self.bos, self.eos)

    def lead_columns(self) -> torch.Tensor:
        """long ``(K,)``: the leading BOS input / ignored label columns of each codebook row of a
        segment (``k + 1`` with the delay pattern, else 1), read off :meth:`layout`."""
        return (self.layout(0)[0] == self.bos).sum(1)


@dataclass
class SampleMeta:
    """Per-sample facts computed once, when the sample is built (tokenization is cached with it).

    Attributes:
        id / split: ``misc.id`` and ``"train"`` / ``"val"``.
        start_index: the row's ``start_index`` (-1 when None).
        roles: role code per ChatML message (:func:`role_code`).
        out_T: long ``(S_b,)``, the source frames of each audio-out segment.
        out_src: long ``(min(K, src_rows), sum(out_T))``, their source codes (first K codebooks).
        src_in_range: every cached code lies in ``[0, codebook_size)``.
        src_rows: codebooks of the cached codes.
        n_audio_tokens_ok: one ``<|AUDIO|>``/``<|AUDIO_OUT|>`` token per audio content.
    """

    id: str
    split: str
    start_index: int
    roles: list[int]
    out_T: torch.Tensor
    out_src: torch.Tensor
    src_in_range: bool
    src_rows: int
    n_audio_tokens_ok: bool


def model_config_of(model):
    """The ``HiggsAudioConfig`` of a model, a peft wrapper of one, or any object with ``.config``.

    Raises:
        TypeError: when neither the base model nor the model has a config with ``audio_num_codebooks``.
    """
    base = model
    with contextlib.suppress(Exception):
        base = model.get_base_model()
    cfg = getattr(base, "config", None) or getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "audio_num_codebooks"):
        raise TypeError(f"{type(model).__name__} has no HiggsAudioConfig (.config)")
    return cfg


def config_only(model_cfg: dict[str, Any]):
    """``HiggsAudioConfig`` from the ``model`` config section without loading weights
    (``model.tiny_higgs_config(arch)`` for ``source: random_init``, else ``HiggsAudioConfig.from_pretrained(path)``).

    Raises:
        OSError: when ``path`` holds no ``config.json`` (from ``from_pretrained``).
    """
    from ..model import tiny_higgs_config

    if model_cfg["source"] == "random_init":
        return tiny_higgs_config(model_cfg["arch"])
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    return HiggsAudioConfig.from_pretrained(model_cfg["path"])


def _sample_meta(row: dict, split: str, s, expect: Expect) -> SampleMeta:
    """The :class:`SampleMeta` of a built ``ChatMLDatasetSample`` ``s`` of ``row``."""
    ids = s.input_ids
    aud = ids[(ids == expect.audio_in) | (ids == expect.audio_out)]
    n_aud = int(s.audio_ids_start.numel())
    concat = s.audio_ids_concat
    out_idx = (aud == expect.audio_out).nonzero().flatten().tolist()
    ends = torch.cat([s.audio_ids_start, torch.tensor([concat.shape[1]])]) if n_aud else None
    segs = [concat[:, int(ends[i]):int(ends[i + 1])] for i in out_idx if i < n_aud]
    src_rows = int(concat.shape[0])
    in_range = bool(((concat >= 0) & (concat < expect.codebook_size)).all()) if concat.numel() else True
    out_T = torch.tensor([c.shape[1] for c in segs], dtype=torch.long)
    out_src = (torch.cat([c[: expect.K] for c in segs], 1) if segs
               else torch.zeros((min(src_rows, expect.K), 0), dtype=torch.long))
    si = row.get("start_index")
    return SampleMeta(sample_id(row), split, -1 if si is None else int(si),
                      [role_code(m.get("role")) for m in row.get("messages", [])], out_T, out_src.long(), in_range,
                      src_rows, len(aud) == n_aud)


def build_sample(row: dict, split: str, text_tokenizer, codes_of: Callable[[str], torch.Tensor],
                 expect: Expect) -> tuple[Any, SampleMeta | None, Failure | None]:
    """Tokenize one row with ``data.build_dataset_sample`` (as training does) and record its facts.

    Args:
        row: a ChatML row of a kept manifest. split: ``"train"``/``"val"``.
        codes_of: ``audio_sha256 -> long (n_codebooks, T)`` codes (``data.CodesIndex.get``); raises
            ``KeyError`` for a hash that was not cached.

    Returns:
        ``(sample, meta, None)``: a ``ChatMLDatasetSample`` and its :class:`SampleMeta`; or ``(None,
        None, failure)`` for a row that failed to build (a ``sample_build`` failure names it: missing
        codes, or what ``prepare_chatml_sample``/dacite raised). Nothing is raised.
    """
    try:
        s = build_dataset_sample(row, text_tokenizer, codes_of)
    except KeyError as exc:
        return None, None, Failure("sample_build", sample_id(row),
                                   f"no cached codes: {exc.args[0] if exc.args else exc}")
    except Exception as exc:  # noqa: BLE001 - ValueError from prepare_chatml_sample, dacite, ...
        return None, None, Failure("sample_build", sample_id(row), f"{type(exc).__name__}: {exc}")
    return s, _sample_meta(row, split, s, expect), None


def build_samples(rows: list[dict], split: list[str], text_tokenizer, codes_of: Callable[[str], torch.Tensor],
                  expect: Expect) -> tuple[list, list[SampleMeta | None], list[Failure]]:
    """:func:`build_sample` of every row, all held at once (the audit itself streams: :mod:`.run`).

    Returns:
        ``(samples, metas, failures)``: one ``ChatMLDatasetSample`` and one :class:`SampleMeta` per
        row, both ``None`` for a row that failed to build (its ``sample_build`` failure in
        ``failures``, in row order). Nothing is raised.
    """
    samples, metas, failures = [], [], []
    for row, sp in zip(rows, split):
        s, m, f = build_sample(row, sp, text_tokenizer, codes_of, expect)
        samples.append(s)
        metas.append(m)
        if f is not None:
            failures.append(f)
    return samples, metas, failures


def dry_expand(batch, expect: Expect) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expanded_labels, audio_out_mask)`` as ``HiggsAudioModel.forward`` builds them, without the model.

    Runs boson_multimodal's ``merge_input_ids_with_audio_features`` with 1-d zero embeddings and
    forward's arguments (``round_to=8``; left padding when the batch has one sample).

    Returns:
        ``expanded_labels`` long ``(B, L')`` and ``audio_out_mask`` bool ``(B, L')``.

    Raises:
        Whatever the merge raises when placeholders and audio segments disagree.
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


def jsonable(v: Any) -> Any:
    """``v`` with tensors (at any list/tuple depth) as lists, for comparing and writing settings."""
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


_COLLATOR_KEYS = ("encode_whisper_embed", "audio_in_token_id", "audio_out_token_id", "audio_stream_bos_id",
                  "audio_stream_eos_id", "pad_token_id", "return_audio_in_tokens", "use_delay_pattern",
                  "audio_num_codebooks")
_COLLATOR_FIXED = {"disable_audio_codes_transform": False, "mask_audio_out_token_label": True}


def check_collator(collator, model_config) -> tuple[dict[str, Any], list[Failure]]:
    """Compare the collator's settings with :func:`higgs_tune.data.collator_settings` of the model config.

    Returns:
        ``({"actual", "expected", "mismatches"}, failures)``: one ``collator_settings`` failure naming
        every mismatch; ``round_to``/``pad_left`` are recorded in ``actual`` only.
    """
    expected = {k: v for k, v in collator_settings(model_config).items() if k in _COLLATOR_KEYS}
    expected.update(_COLLATOR_FIXED)
    actual = {k: jsonable(getattr(collator, k, None)) for k in (*expected, "round_to", "pad_left")}
    mism = [k for k in expected if actual.get(k) != jsonable(expected[k])]
    fails = []
    if mism:
        detail = ", ".join(f"{k}: collator {actual.get(k)!r} vs model {expected[k]!r}" for k in mism)
        cause = None
        if "use_delay_pattern" in mism:
            cause = ("delay pattern differs between collator and model: training would teach one layout and "
                     "inference decode another; build the collator with data.make_collator(model.config)")
        fails.append(Failure("collator_settings", "*", detail, cause))
    return {"actual": actual, "expected": {k: jsonable(v) for k, v in expected.items()}, "mismatches": mism}, fails
