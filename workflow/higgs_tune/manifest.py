"""The manifest stage: any supported input -> one validated Higgs ChatML JSONL, split train/val.

Inputs (``data.manifest``, ``data.format``: ``auto`` or one of :data:`FORMATS`, told by
:func:`detect_format`):

* ``chatml``: Higgs ChatML JSONL (one ``ChatMLSample`` per line) or a JSON list of them; content
  may be a string, an item or a list of text/audio items in any turn.
* ``ljspeech``: LJSpeech ``metadata.csv``: ``id|text[|normalized]`` (no header, no quoting), audio at
  ``wavs/{id}.wav`` beside it. The ``normalized`` column wins when it is non-empty.
* ``csv``: CSV/TSV with a header ``audio,text[,speaker,ref_audio,ref_text,id,language]``: rows with
  ``ref_audio`` and ``ref_text`` become voice-cloning samples, the others plain TTS samples (the
  layouts and system prompts of ``data/demo/manifest.jsonl``).
* ``train_higgs_audio``: a JimmyMa99/train-higgs-audio folder (``metadata.json`` or ``X.wav`` +
  ``X.txt`` pairs) or its ``metadata.json`` (:func:`read_train_higgs_audio`).
* ``ms_swift``: ms-swift JSONL ``{"messages": [...], "audios": [...]}`` (:func:`read_ms_swift`).
* ``raw_jsonl``: ``{"audio", "text"[, "ref_audio", "ref_text", "speaker", "language", "id"]}`` per
  line (:func:`read_raw_jsonl`).

Fields a reader does not map are kept in ``misc.extra``; a row's language (``language`` of any
format) is checked and kept in ``misc.language`` (:func:`carry_language`). With
``data.cloning.enabled``, voice-cloning pairs are built from the rows naming a speaker, within each
side of the split (:func:`build_cloning`; ``fixes.json`` ``cloning``).

Every row ends up in exactly one place: ``manifest/train.jsonl`` or ``manifest/val.jsonl`` (kept,
possibly fixed; each fix recorded in ``misc.fixes``) or ``manifest/quarantine.jsonl`` (with a
``reason`` code, a ``message`` saying what to do, the source ``line`` and the original ``row``).
``manifest/fixes.json`` counts rows, fixes, warnings and reasons. Blank lines are not rows.

Held out means held out: the train/val split never puts one audio clip (as target or as
voice-cloning reference) on both sides, nor, when the rows name two or more speakers, one speaker
(:func:`split_groups`, ``data.split_by``); val holds about ``data.val_fraction`` of the samples,
chosen from ``data.split_seed`` (:func:`assign_splits`). ``fixes.json`` records how (``split_by``,
``split``).
A quarantined ``row`` is the parsed JSON for ChatML, ``{column: value}`` for CSV and
``{"fields": [...]}`` for LJSpeech (or a CSV record whose field count is off); ``text`` replaces it
when the line did not parse.

Fix kinds (``misc.fixes[*].kind``): ``path_resolved``, ``windows_path``, ``role_normalized``,
``string_content``, ``content_type_added``, ``text_nfc``, ``text_whitespace``, ``derived_id``,
``id_from_top_level``, ``id_stringified``, ``duplicate_id_renamed``, ``duration_measured``,
``duration_corrected``, ``raw_audio_extracted``.

Quarantine reasons: see :data:`REASONS`. Warning kinds (kept rows, ``misc.warnings``):
``silent_audio`` (peak below -60 dBFS; kept because silence is valid audio, the audit decides).

CLI (as ``workflow/rules/manifest.smk`` renders it)::

    python -m higgs_tune.manifest --configfile config/demo.yaml --train T.jsonl --val V.jsonl \
        --quarantine Q.jsonl --fixes fixes.json

exits 1 when the quarantined fraction exceeds ``data.max_quarantine_fraction`` (all outputs are
written first).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import hashlib
import io
import json
import logging
import os
import random
import re
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from . import config as config_mod
from .audio_io import AudioDecodeError, audio_sha256, load_audio
from .fileio import write_json, write_jsonl

log = logging.getLogger("higgs_tune.manifest")

#: System prompts of ``data/demo/manifest.jsonl`` (TTS rows, voice-cloning rows).
TTS_SYSTEM_PROMPT = (
    "Generate audio following instruction.\n\n<|scene_desc_start|>\nAudio is recorded from a quiet room.\n"
    "<|scene_desc_end|>"
)
CLONE_SYSTEM_PROMPT = "Generate audio following instruction."

#: Quarantine reason codes and what they mean.
REASONS: dict[str, str] = {
    "malformed_json": "the line is not valid JSON (or not UTF-8)",
    "schema_violation": "the row does not have the ChatMLSample / CSV shape (the `field` key names where)",
    "missing_file": "an audio path resolves to no file",
    "undecodable_audio": "libsndfile cannot decode the audio, it is truncated, or holds NaN/inf",
    "zero_length_audio": "the audio file is empty or holds no samples",
    "duration_out_of_range": "an audio clip lasts less than data.min_duration_s or more than data.max_duration_s",
    "empty_transcript": "a text item is empty after whitespace normalization",
    "no_assistant_audio": "no assistant audio at/after start_index: nothing to learn",
    "path_escapes_root": "an audio path leaves data.data_root when it is set (.., absolute elsewhere, symlink out, Windows drive)",
    "invalid_base64": "raw_audio is not valid base64",
    "unsupported_role": "a role other than system/user/assistant",
    "duplicate": "exact duplicate (same id, same content) of an earlier kept row",
}
ROLES = ("system", "user", "assistant")
SILENCE_PEAK = 10 ** (-60 / 20)  # -60 dBFS
_AUDIO_KEYS = {"type", "audio_url", "raw_audio", "offset", "duration", "row_id"}
_WIN_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")


class ManifestError(ValueError):
    """The input as a whole is unusable (unknown format, CSV header lacks columns, no rows, ...)."""


class QuarantineTooLarge(ManifestError):
    """More than ``data.max_quarantine_fraction`` of the rows were quarantined (outputs are written)."""

    def __init__(self, message: str, fraction: float, quarantine_path: Path):
        super().__init__(message)
        self.fraction = fraction
        self.quarantine_path = quarantine_path


class Reject(Exception):
    """One row goes to quarantine: ``reason`` (a :data:`REASONS` key), ``message``, ``field``."""

    def __init__(self, reason: str, message: str, field: str | None = None):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason, self.message, self.field = reason, message, field


@dataclass
class SourceRow:
    """One input row: its 1-based ``line``, the ``original`` as read (or raw ``text`` when it did
    not parse), the ChatML ``sample`` built from it, or the ``error`` that already rejects it."""

    line: int
    original: Any = None
    text: str | None = None
    sample: Any = None
    error: Reject | None = None
    fixes: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ readers
#: ``data.format`` values besides ``auto`` (see :func:`read_rows`).
FORMATS = ("chatml", "ljspeech", "csv", "train_higgs_audio", "ms_swift", "raw_jsonl")


def _json_format(path: Path, first: str) -> str:
    """The format of a JSON/JSONL file from its first non-blank line (the whole file when that line
    alone is not JSON and opens an object: an indented ``metadata.json``)."""
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        obj = None
        if first.lstrip().startswith("{"):
            try:
                obj = json.loads(path.read_bytes().decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                obj = None
    if not isinstance(obj, dict):
        return "chatml"
    if isinstance(obj.get("samples"), list):
        return "train_higgs_audio"
    if "messages" in obj:
        return "ms_swift" if "audios" in obj else "chatml"
    if "audio" in obj and "text" in obj:
        return "raw_jsonl"
    return "chatml"


def detect_format(path: Path, fmt: str = "auto") -> str:
    """One of :data:`FORMATS` for ``path`` (``fmt`` other than ``auto`` is returned as is).

    ``auto``: a folder is ``train_higgs_audio``; a ``.json``/``.jsonl`` file (or one opening with
    ``{``/``[``) is told by its first row: ``{"samples": [...]}`` -> ``train_higgs_audio``,
    ``messages`` + ``audios`` -> ``ms_swift``, ``audio`` + ``text`` -> ``raw_jsonl``, else
    ``chatml``; other files by their first line (a header with ``audio`` and ``text`` -> ``csv``,
    ``|``-separated -> ``ljspeech``).

    Raises:
        ManifestError: when ``auto`` cannot tell, or a folder is given with a format other than
            ``train_higgs_audio``.
    """
    if path.is_dir():
        if fmt not in ("auto", "train_higgs_audio"):
            raise ManifestError(f"data.manifest {path} is a folder, which only data.format train_higgs_audio (or auto)"
                                f" reads; data.format is {fmt}: point data.manifest at the file")
        return "train_higgs_audio"
    if fmt != "auto":
        return fmt
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    if path.suffix.lower() in (".jsonl", ".json") or (
            path.suffix.lower() not in (".csv", ".tsv", ".txt") and first.lstrip()[:1] in ("{", "[")):
        return _json_format(path, first)
    header = {c.strip().lower() for c in re.split(r"[,\t]", first)}
    if {"audio", "text"} <= header:
        return "csv"
    if "|" in first:
        return "ljspeech"
    raise ManifestError(f"{path}: cannot tell its format from the first line; set data.format "
                        f"({', '.join(FORMATS)})")


def _malformed(line: int, text: str, why: str) -> SourceRow:
    return SourceRow(line, text=text, error=Reject(
        "malformed_json", f"line {line}: {why}; fix the JSON on that line (one ChatMLSample object per line)"))


def read_chatml(path: Path) -> list[SourceRow]:
    """Rows of a ChatML JSONL file (``line`` = 1-based line number) or JSON list (index + 1).

    Raises:
        ManifestError: a file starting with ``[`` that is not one valid JSON list.
    """
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if raw.lstrip()[:1] == b"[":
        try:
            items = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: starts with '[' but is not a valid JSON list ({exc}); "
                                "fix it or write one JSON object per line (JSONL)") from exc
        if not isinstance(items, list):
            raise ManifestError(f"{path}: top-level JSON is not a list")
        return [SourceRow(i + 1, original=obj, sample=obj) for i, obj in enumerate(items)]
    rows = []
    for lineno, bline in enumerate(raw.split(b"\n"), 1):
        if not bline.strip():
            continue
        try:
            text = bline.decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append(_malformed(lineno, bline.decode("utf-8", errors="replace"), f"not UTF-8 ({exc.reason})"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            rows.append(_malformed(lineno, text.rstrip("\r"), f"{exc.msg} at column {exc.colno}"))
            continue
        rows.append(SourceRow(lineno, original=obj, sample=obj))
    return rows


def tts_sample(text: str, audio: str, speaker: str | None = None, sample_id: str | None = None, *,
               system: str = TTS_SYSTEM_PROMPT, language: str | None = None, extra: dict | None = None) -> dict:
    """A plain TTS ChatML row: system -> user ``text`` -> assistant ``audio`` (as in the demo).
    ``language`` goes to ``misc.language``, ``extra`` (the input's unmapped fields) to ``misc.extra``."""
    row: dict[str, Any] = {"messages": [
        {"role": "system", "content": {"type": "text", "text": system}},
        {"role": "user", "content": {"type": "text", "text": text}},
        {"role": "assistant", "content": {"type": "audio", "audio_url": audio}},
    ]}
    return _finish_converted(row, speaker, sample_id, language, extra)


def clone_sample(text: str, audio: str, ref_text: str, ref_audio: str, speaker: str | None = None,
                 sample_id: str | None = None, *, system: str = CLONE_SYSTEM_PROMPT, language: str | None = None,
                 extra: dict | None = None) -> dict:
    """A voice-cloning ChatML row: system -> user ``ref_text`` -> assistant ``ref_audio`` -> user
    ``text`` -> assistant ``audio`` with ``start_index=4`` (only the target turn is learned)."""
    row: dict[str, Any] = {"messages": [
        {"role": "system", "content": {"type": "text", "text": system}},
        {"role": "user", "content": {"type": "text", "text": ref_text}},
        {"role": "assistant", "content": {"type": "audio", "audio_url": ref_audio}},
        {"role": "user", "content": {"type": "text", "text": text}},
        {"role": "assistant", "content": {"type": "audio", "audio_url": audio}},
    ], "start_index": 4}
    return _finish_converted(row, speaker, sample_id, language, extra)


def _finish_converted(row: dict, speaker: str | None, sample_id: str | None, language: str | None = None,
                      extra: dict | None = None) -> dict:
    if speaker:
        row["speaker"] = speaker
    misc = {}
    if sample_id:
        misc["id"] = sample_id
    if language:
        misc["language"] = language
    if extra:
        misc["extra"] = extra
    if misc:
        row["misc"] = misc
    return row


def read_ljspeech(path: Path) -> list[SourceRow]:
    """Rows of an LJSpeech ``metadata.csv``: ``id|text[|normalized]`` per line, no quoting (the
    format's definition, so a plain split on ``|``); audio ``wavs/{id}.wav`` beside the file."""
    rows = []
    raw = path.read_bytes()
    for lineno, bline in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        try:
            line = bline.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            rows.append(SourceRow(lineno, text=bline.decode("utf-8", errors="replace"), error=Reject(
                "schema_violation", f"line {lineno} is not UTF-8; re-save the file as UTF-8", field="<row>")))
            continue
        if not line.strip():
            continue
        fields = line.split("|")
        original = {"fields": fields}
        if len(fields) not in (2, 3):
            rows.append(SourceRow(lineno, original=original, error=Reject(
                "schema_violation", f"line {lineno} has {len(fields)} '|'-separated fields; LJSpeech rows are "
                "id|text[|normalized]: remove the extra '|' or fill the missing field", field="<row>")))
            continue
        sid = fields[0].strip()
        if not sid:
            rows.append(SourceRow(lineno, original=original, error=Reject(
                "schema_violation", f"line {lineno} has an empty id; give the clip's file stem", field="id")))
            continue
        text = fields[2] if len(fields) == 3 and fields[2].strip() else fields[1]
        rows.append(SourceRow(lineno, original=original, sample=tts_sample(text, f"wavs/{sid}.wav", None, sid)))
    return rows


def read_csv_manifest(path: Path) -> list[SourceRow]:
    """Rows of a CSV/TSV manifest with header ``audio,text[,speaker,ref_audio,ref_text,id]``.

    Parsed with the stdlib :mod:`csv` reader (quotes, embedded newlines) because it reports each
    record's source line, which quarantine entries need (pandas does not). The delimiter is a tab
    for ``.tsv`` files or tab-separated headers, else a comma. ``line`` is the record's first line.

    Raises:
        ManifestError: the header lacks ``audio`` or ``text``, the file has no header or is not UTF-8.
    """
    try:
        content = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path} is not UTF-8 ({exc}); re-save it as UTF-8") from exc
    first = next((ln for ln in content.split("\n") if ln.strip()), None)
    if first is None:
        raise ManifestError(f"{path}: empty CSV")
    delim = "\t" if path.suffix.lower() == ".tsv" or "\t" in first else ","
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delim)
    header: list[str] | None = None
    rows: list[SourceRow] = []
    end = 0
    for fields in reader:
        start, end = end + 1, reader.line_num
        if not any(c.strip() for c in fields):
            continue
        if header is None:
            header = [c.strip().lower() for c in fields]
            missing = {"audio", "text"} - set(header)
            if missing:
                raise ManifestError(f"{path}: header {fields} lacks column(s) {sorted(missing)}; "
                                    "expected audio,text[,speaker,ref_audio,ref_text]")
            unknown = set(header) - set(PAIR_KEYS)
            if unknown:
                log.warning("%s: column(s) %s are not read; each row keeps them in misc.extra", path, sorted(unknown))
            continue
        original = dict(zip(header, fields)) if len(fields) == len(header) else {"fields": fields}
        if len(fields) != len(header):
            rows.append(SourceRow(start, original=original, error=Reject(
                "schema_violation", f"line {start} has {len(fields)} fields but the header has {len(header)}; "
                "quote fields that contain the delimiter", field="<row>")))
            continue
        rows.append(_csv_row(start, original))
    return rows


#: Fields of a CSV/TSV header and of a raw JSONL row that the readers map; others go to ``misc.extra``.
PAIR_KEYS = ("audio", "text", "speaker", "ref_audio", "ref_text", "id", "language")


def _csv_row(line: int, row: dict[str, str], what: str = "column") -> SourceRow:
    get = lambda k: (row.get(k) or "").strip()  # noqa: E731
    audio, ref_audio, ref_text = get("audio"), get("ref_audio"), row.get("ref_text") or ""
    if not audio:
        return SourceRow(line, original=row, error=Reject(
            "schema_violation", f"line {line}: the audio {what} is empty; give the clip's path", field="audio"))
    if bool(ref_audio) != bool(ref_text.strip()):
        which = "ref_text" if ref_audio else "ref_audio"
        return SourceRow(line, original=row, error=Reject(
            "schema_violation", f"line {line}: voice cloning needs both ref_audio and ref_text; {which} is empty: "
            "fill it or clear the other", field=which))
    text, speaker, sid = row.get("text") or "", get("speaker") or None, get("id") or None
    language = get("language") or None
    extra = {k: v for k, v in row.items() if k not in PAIR_KEYS} or None
    sample = (clone_sample(text, audio, ref_text, ref_audio, speaker, sid, language=language, extra=extra)
              if ref_audio else tts_sample(text, audio, speaker, sid, language=language, extra=extra))
    return SourceRow(line, original=row, sample=sample)


def _from_json_rows(rows: list[SourceRow], convert) -> list[SourceRow]:
    """``rows`` as :func:`read_chatml` parsed them, each ``original`` turned into a ChatML ``sample``
    by ``convert(original, line)`` (a :class:`Reject` it raises becomes the row's error)."""
    for src in rows:
        if src.error is None:
            try:
                src.sample = convert(src.original, src.line)
            except Reject as rej:
                src.sample, src.error = None, rej
    return rows


def _raw_jsonl_sample(obj: Any, line: int) -> dict:
    if not isinstance(obj, dict):
        raise _schema("<row>", f"line {line} is a JSON {type(obj).__name__}; each line must be an object "
                      '{"audio": ..., "text": ...}')
    for key in PAIR_KEYS:
        value = obj.get(key)
        if value is not None and not isinstance(value, str) and not (key in ("id", "speaker") and isinstance(
                value, int) and not isinstance(value, bool)):
            raise _schema(key, f"line {line}: {key} must be a string, got a JSON {type(value).__name__}")
    if not isinstance(obj.get("text"), str):
        raise _schema("text", f"line {line}: no text; give the transcript of the audio")
    row = {k: (str(v) if k in ("id", "speaker") and v is not None else v) for k, v in obj.items()}
    src = _csv_row(line, row, what="field")
    if src.error:
        raise src.error
    return src.sample


def read_raw_jsonl(path: Path) -> list[SourceRow]:
    """Rows of a raw JSONL file: one ``{"audio", "text"[, "ref_audio", "ref_text", "speaker",
    "language", "id"]}`` object per line (string values; ``id`` and ``speaker`` may be integers). ``audio`` paths
    resolve like ChatML ``audio_url`` ones; a row with ``ref_audio`` and ``ref_text`` is a
    voice-cloning sample, else a plain TTS one; other fields are kept in ``misc.extra``."""
    return _from_json_rows(read_chatml(path), _raw_jsonl_sample)


#: ms-swift's placeholder for one entry of ``audios`` in a message's text.
SWIFT_AUDIO_TAG = "<audio>"


def _swift_sample(obj: Any, line: int) -> dict:
    if not isinstance(obj, dict):
        raise _schema("<row>", f"line {line} is a JSON {type(obj).__name__}; each line must be an ms-swift object "
                      '{"messages": [...], "audios": [...]}')
    messages, audios = obj.get("messages"), obj.get("audios")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise _schema("messages", f"line {line}: ms-swift messages must be a non-empty list of "
                      '{"role": ..., "content": "<text>"} objects')
    if not isinstance(audios, list) or not all(isinstance(a, str) and a.strip() for a in audios):
        raise _schema("audios", f"line {line}: audios must be a list of audio paths")
    tags = sum(m["content"].count(SWIFT_AUDIO_TAG) for m in messages)
    if tags and tags != len(audios):
        raise _schema("audios", f"line {line}: {tags} {SWIFT_AUDIO_TAG} tag(s) in the messages but {len(audios)} "
                      "entries in audios; ms-swift pairs each tag with one entry")
    if len(audios) != 1:
        raise _schema("audios", f"line {line}: {len(audios)} audios; a TTS row has exactly one (the speech of the "
                      "transcript): split the row")
    # the transcript: the last assistant text (TTS rows, ASR rows), else the last user text, tags removed
    picked = None
    for role in ("assistant", "user"):
        for i in range(len(messages) - 1, -1, -1):
            if messages[i]["role"].strip().lower() == role and messages[i]["content"].replace(
                    SWIFT_AUDIO_TAG, "").strip():
                picked = i
                break
        if picked is not None:
            break
    if picked is None:
        raise Reject("empty_transcript", f"line {line}: no assistant or user text besides {SWIFT_AUDIO_TAG} tags; "
                     "write the transcript in the assistant message", field="messages")
    text = messages[picked]["content"].replace(SWIFT_AUDIO_TAG, "")
    extra = {k: v for k, v in obj.items() if k not in ("messages", "audios", "speaker", "language", "id")}
    others = [m for i, m in enumerate(messages) if i != picked]
    if others:
        extra["messages"] = others
    for key in ("speaker", "language", "id"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise _schema(key, f"line {line}: {key} must be a string")
    return tts_sample(text, audios[0], obj.get("speaker"), obj.get("id"), language=obj.get("language"),
                      extra=extra or None)


def read_ms_swift(path: Path) -> list[SourceRow]:
    """Rows of an ms-swift JSONL file: ``{"messages": [{"role", "content": "<text>"}, ...],
    "audios": ["/x.wav"]}`` per line, one audio per row. The transcript is the last assistant text
    (ms-swift TTS and ASR rows alike), else the last user text, with ``<audio>`` tags removed; the
    audio is ``audios[0]`` (paths resolve like ChatML ``audio_url`` ones). When the text has
    ``<audio>`` tags their count must match ``audios``. The other messages and unknown keys are kept
    in ``misc.extra``; optional top-level ``speaker``, ``language`` and ``id`` are read."""
    return _from_json_rows(read_chatml(path), _swift_sample)


#: train-higgs-audio's fields; others are kept in ``misc.extra``. ``audio_id`` is its loader's id key.
THA_KEYS = ("id", "audio_id", "audio_file", "transcript_file", "speaker_id", "language", "scene",
            "ref_audio_file", "ref_transcript")
#: Audio suffixes of the folder of ``X.wav`` + ``X.txt`` pairs.
PAIR_AUDIO_SUFFIXES = (".wav", ".flac", ".mp3")


def scene_system_prompt(scene: str | None) -> str:
    """train-higgs-audio's system prompt for a ``scene``, underscores read as spaces (``phone_call``
    -> "Audio is recorded from phone call."); no scene is its default "a quiet room", which gives
    :data:`TTS_SYSTEM_PROMPT`."""
    scene = (scene or "a quiet room").replace("_", " ")
    return ("Generate audio following instruction.\n\n<|scene_desc_start|>\n"
            f"Audio is recorded from {scene}.\n<|scene_desc_end|>")


def _tha_sample(obj: Any, line: int, folder: Path) -> dict:
    where = f"samples[{line - 1}]"
    if not isinstance(obj, dict):
        raise _schema("<row>", f"{where} is a JSON {type(obj).__name__}; each sample must be an object")
    for key in THA_KEYS:
        value = obj.get(key)
        if value is not None and not isinstance(value, str) and not (
                key in ("id", "audio_id", "speaker_id") and isinstance(value, int) and not isinstance(value, bool)):
            raise _schema(key, f"{where}.{key} must be a string")
    audio, tfile = (obj.get("audio_file") or "").strip(), (obj.get("transcript_file") or "").strip()
    if not audio:
        raise _schema("audio_file", f"{where} has no audio_file; give the clip's path (relative to {folder})")
    if not tfile:
        raise _schema("transcript_file", f"{where} has no transcript_file; give the path of a text file holding "
                      f"the transcript (relative to {folder})")
    tpath = Path(tfile) if os.path.isabs(tfile) else folder / tfile
    try:
        text = tpath.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise Reject("missing_file", f"{where}.transcript_file {tfile!r} not found ({tpath}); add the file or fix "
                     "the path", field="transcript_file") from None
    except UnicodeDecodeError:
        raise _schema("transcript_file", f"{where}.transcript_file {tpath} is not UTF-8; re-save it as UTF-8") from None
    except OSError as exc:
        raise Reject("missing_file", f"{where}.transcript_file {tpath} cannot be read ({exc})",
                     field="transcript_file") from None
    ref_audio, ref_text = (obj.get("ref_audio_file") or "").strip(), obj.get("ref_transcript") or ""
    if bool(ref_audio) != bool(ref_text.strip()):
        which = "ref_transcript" if ref_audio else "ref_audio_file"
        raise _schema(which, f"{where}: voice cloning needs both ref_audio_file and ref_transcript; {which} is "
                      "empty: fill it or clear the other")
    sid = obj.get("id", obj.get("audio_id"))
    sid = None if sid is None else str(sid)
    speaker = None if obj.get("speaker_id") in (None, "") else str(obj["speaker_id"])
    language = obj.get("language") or None
    extra = {k: v for k, v in obj.items() if k not in THA_KEYS} or None
    system = scene_system_prompt(obj.get("scene"))
    if ref_audio:
        return clone_sample(text, audio, ref_text, ref_audio, speaker, sid, system=system, language=language,
                            extra=extra)
    return tts_sample(text, audio, speaker, sid, system=system, language=language, extra=extra)


def read_train_higgs_audio(path: Path) -> list[SourceRow]:
    """Rows of a train-higgs-audio (JimmyMa99) dataset folder, or of its ``metadata.json``.

    ``metadata.json`` is ``{"samples": [{"id" (or "audio_id"), "audio_file", "transcript_file",
    "speaker_id", "language", "scene", "ref_audio_file", "ref_transcript"}, ...]}`` (other top-level
    keys such as ``dataset_info`` are ignored): ``audio_file``, ``transcript_file`` and
    ``ref_audio_file`` are paths relative to the folder, ``transcript_file`` names a UTF-8 text file
    holding the transcript, ``ref_transcript`` is the reference's transcript itself, ``scene``
    (default ``quiet_room``) becomes the system prompt's scene (:func:`scene_system_prompt`). A
    sample with a reference is a voice-cloning row. Other sample fields are kept in ``misc.extra``.
    ``line`` is the sample's index + 1.

    A folder without ``metadata.json`` is read as that trainer reads it: every ``X.wav`` (``.flac``,
    ``.mp3``) with ``X.txt`` beside it, in name order, id ``X``; an audio file without its ``.txt``
    is quarantined (``missing_file``).

    Raises:
        ManifestError: ``metadata.json`` is not JSON or has no ``samples`` list; a folder holds
            neither ``metadata.json`` nor audio files.
    """
    folder = path if path.is_dir() else path.parent
    meta = folder / "metadata.json" if path.is_dir() else path
    if path.is_dir() and not meta.is_file():
        audio = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PAIR_AUDIO_SUFFIXES)
        if not audio:
            raise ManifestError(f"{folder} holds neither metadata.json nor audio files "
                                f"({', '.join(PAIR_AUDIO_SUFFIXES)}) with a .txt transcript beside each; point "
                                "data.manifest at the dataset")
        rows = []
        for i, clip in enumerate(audio, 1):
            original = {"audio_file": clip.name, "transcript_file": clip.with_suffix(".txt").name}
            if not clip.with_suffix(".txt").is_file():
                rows.append(SourceRow(i, original=original, error=Reject(
                    "missing_file", f"{clip} has no transcript {clip.with_suffix('.txt').name} beside it; add it",
                    field="transcript_file")))
                continue
            original["id"] = clip.stem
            rows.append(SourceRow(i, original=original))
        txt_alone = sorted(p.name for p in folder.glob("*.txt")
                           if not any(p.with_suffix(s).is_file() for s in PAIR_AUDIO_SUFFIXES))
        if txt_alone:
            log.warning("%s: %d .txt file(s) without audio beside them are not rows: %s", folder, len(txt_alone),
                        txt_alone[:5])
    else:
        try:
            doc = json.loads(meta.read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{meta} is not valid UTF-8 JSON ({exc}); fix it") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("samples"), list):
            raise ManifestError(f'{meta} has no "samples" list; train-higgs-audio metadata is '
                                '{"samples": [{"audio_file": ..., "transcript_file": ...}, ...]}')
        rows = [SourceRow(i + 1, original=obj) for i, obj in enumerate(doc["samples"])]
    return _from_json_rows(rows, lambda obj, line: _tha_sample(obj, line, folder))


# ------------------------------------------------------------------------------------- normalization
def normalize_text(text: str) -> tuple[str, list[str]]:
    """Unicode NFC, then whitespace: CR/CRLF -> LF, BOM/zero-width space removed, runs of other
    whitespace -> one space, spaces around newlines and at the ends stripped (newlines are kept:
    system prompts use them). Returns ``(text, fix kinds applied)``."""
    kinds = []
    nfc = unicodedata.normalize("NFC", text)
    if nfc != text:
        kinds.append("text_nfc")
    out = nfc.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "").replace("\u200b", "")
    out = re.sub(r"[^\S\n]+", " ", out)
    out = re.sub(r" *\n *", "\n", out).strip()
    if out != nfc:
        kinds.append("text_whitespace")
    return out, kinds


def _fix(fixes: list[dict], kind: str, where: str, detail: str | None = None) -> None:
    entry = {"kind": kind, "where": where}
    if detail is not None:
        entry["detail"] = detail
    fixes.append(entry)


def _schema(where: str, what: str) -> Reject:
    return Reject("schema_violation", f"{where}: {what}", field=where)


def _normalize_item(item: Any, role: str, where: str, fixes: list[dict]) -> dict:
    if isinstance(item, str):
        item = {"type": "text", "text": item}
        _fix(fixes, "string_content", where)
    if not isinstance(item, dict):
        raise _schema(where, f"content item is a {type(item).__name__}; use a string, "
                             '{"type": "text", "text": ...} or {"type": "audio", "audio_url": ...}')
    item = dict(item)
    if "type" not in item:
        if "audio_url" in item or "raw_audio" in item:
            item["type"] = "audio"
        elif "text" in item:
            item["type"] = "text"
        else:
            raise _schema(f"{where}.type", "content item has no type; add \"type\": \"text\" or \"audio\"")
        _fix(fixes, "content_type_added", where, item["type"])
    kind = item["type"]
    if kind == "text":
        extra = set(item) - {"type", "text"}
        if extra:
            raise _schema(f"{where}.{sorted(extra)[0]}", "unknown key in a text item; TextContent has only type, text")
        if not isinstance(item.get("text"), str):
            raise _schema(f"{where}.text", "text item needs a string 'text'")
        text, kinds = normalize_text(item["text"])
        for k in kinds:
            _fix(fixes, k, where)
        if not text:
            raise Reject("empty_transcript", f"{where} ({role}) has empty text; write the transcript or drop the row",
                         field=where)
        return {"type": "text", "text": text}
    if kind == "audio":
        extra = set(item) - _AUDIO_KEYS
        if extra:
            raise _schema(f"{where}.{sorted(extra)[0]}", f"unknown key in an audio item; AudioContent has only "
                                                         f"{sorted(_AUDIO_KEYS)}")
        if item.get("raw_audio") is None:
            if not isinstance(item.get("audio_url"), str) or not item["audio_url"].strip():
                raise _schema(f"{where}.audio_url", "audio item needs a non-empty string audio_url (or raw_audio)")
        elif not isinstance(item["raw_audio"], str):
            raise _schema(f"{where}.raw_audio", "raw_audio must be a base64 string")
        elif item.get("audio_url") is not None and not isinstance(item["audio_url"], str):
            raise _schema(f"{where}.audio_url", "audio_url must be a string")
        if item.get("offset") not in (None, 0, 0.0):
            raise _schema(f"{where}.offset", "clip segments (offset) are not supported; cut the segment into its "
                                             "own file and point audio_url at it")
        dur = item.get("duration")
        if dur is not None and (isinstance(dur, bool) or not isinstance(dur, (int, float))):
            raise _schema(f"{where}.duration", "duration must be a number of seconds")
        rid = item.get("row_id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, int)):
            raise _schema(f"{where}.row_id", "row_id must be an integer")
        return item
    raise _schema(f"{where}.type", f"unknown content type {kind!r}; use \"text\" or \"audio\"")


def normalize_structure(obj: Any, fixes: list[dict]) -> dict:
    """Check one ChatML row's shape and normalize it (roles, content items, text); audio not touched.

    Returns a new row dict whose content items are all dicts. Appends fixes to ``fixes``.

    Raises:
        Reject: ``schema_violation`` (``field`` names where), ``unsupported_role``,
            ``empty_transcript`` or ``no_assistant_audio``.
    """
    if not isinstance(obj, dict):
        raise _schema("<row>", f"the row is a JSON {type(obj).__name__}; each row must be a ChatMLSample object")
    if "messages" not in obj:
        raise _schema("messages", "missing; a ChatMLSample needs a list of {role, content} messages")
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise _schema("messages", f"must be a list of {{role, content}} objects, got a {type(messages).__name__}")
    if not messages:
        raise _schema("messages", "is empty")
    start = obj.get("start_index")
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < len(messages)):
        raise _schema("start_index", f"{start!r} is not a message index in [0, {len(messages)})")
    if obj.get("speaker") is not None and not isinstance(obj["speaker"], str):
        raise _schema("speaker", "must be a string or null")
    if obj.get("misc") is not None and not isinstance(obj["misc"], dict):
        raise _schema("misc", "must be an object or null")
    out_messages = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _schema(where, f"is a {type(msg).__name__}; each message must be a {{role, content}} object")
        extra = set(msg) - {"role", "content", "recipient"}
        if extra:
            raise _schema(f"{where}.{sorted(extra)[0]}", "unknown key; a message has only role, content, recipient")
        role = msg.get("role")
        if not isinstance(role, str):
            raise _schema(f"{where}.role", "missing or not a string")
        norm = role.strip().lower()
        if norm != role:
            _fix(fixes, "role_normalized", f"{where}.role", f"{role!r} -> {norm!r}")
        if norm not in ROLES:
            raise Reject("unsupported_role", f"{where}.role is {role!r}; Higgs ChatML rows use only "
                                             f"{', '.join(ROLES)}: rename or drop that message", field=f"{where}.role")
        recipient = msg.get("recipient")
        if recipient is not None and (not isinstance(recipient, str) or norm != "assistant"):
            raise _schema(f"{where}.recipient", "only assistant messages may have a (string) recipient")
        if msg.get("content") is None:
            raise _schema(f"{where}.content", "missing; give a string, a content object or a list of them")
        content = msg["content"]
        if isinstance(content, list):
            if not content:
                raise _schema(f"{where}.content", "is an empty list")
            new = [_normalize_item(it, norm, f"{where}.content[{j}]", fixes) for j, it in enumerate(content)]
        else:
            new = _normalize_item(content, norm, f"{where}.content", fixes)
        out_msg: dict[str, Any] = {"role": norm, "content": new}
        if recipient is not None:
            out_msg["recipient"] = recipient
        out_messages.append(out_msg)
    out: dict[str, Any] = {"messages": out_messages}
    out.update((k, v) for k, v in obj.items() if k not in ("messages", "misc"))
    out["misc"] = dict(obj.get("misc") or {})
    learnable = [t for t, m in enumerate(out_messages) if m["role"] == "assistant" and t >= (start or 0)
                 and any(it["type"] == "audio" for it in _items(m))]
    if not learnable:
        raise Reject("no_assistant_audio", "no assistant audio at or after start_index "
                     f"({start or 0}): nothing to learn; add the target audio or lower start_index")
    return out


#: What a row's ``language`` must look like (as ``data.language`` in the config schema).
LANGUAGE_RE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]+)?$")


def carry_language(sample: dict) -> None:
    """Put the row's language (top-level ``language``, else ``misc.language``) in ``misc.language``,
    where the evaluation reads it (``evaluate.row_language``) to choose WER or CER; rows naming none
    keep none (the evaluation then uses ``data.language``).

    Raises:
        Reject: ``schema_violation`` when it is not an ISO 639 code such as ``en``, ``zh`` or ``zh-TW``.
    """
    top, misc = sample.get("language"), sample["misc"].get("language")
    lang = top if top is not None else misc
    if lang is None:
        return
    where = "language" if top is not None else "misc.language"
    if not isinstance(lang, str) or not LANGUAGE_RE.match(lang.strip()):
        raise _schema(where, f"{lang!r} is not an ISO 639 language code; write e.g. \"en\", \"zh\" or \"zh-TW\" "
                             "(or drop it: data.language is the default)")
    sample["misc"]["language"] = lang.strip()


def _items(msg: dict) -> list[dict]:
    return msg["content"] if isinstance(msg["content"], list) else [msg["content"]]


def _audio_refs(sample: dict) -> list[tuple[str, dict]]:
    """``(where, item)`` for each audio item of a normalized row (items are mutable in place)."""
    refs = []
    for i, msg in enumerate(sample["messages"]):
        if isinstance(msg["content"], list):
            refs += [(f"messages[{i}].content[{j}]", it) for j, it in enumerate(msg["content"])
                     if it["type"] == "audio"]
        elif msg["content"]["type"] == "audio":
            refs.append((f"messages[{i}].content", msg["content"]))
    return refs


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_audio_path(url: str, manifest_dir: Path, root: Path | None, fixes: list[dict], where: str) -> str:
    """Absolute path of ``url`` (a row's ``audio_url``).

    * A relative path resolves against ``manifest_dir`` (the manifest's folder); when ``root``
      (``data.data_root``) is set and the file is not there, against ``root`` too.
    * An absolute path (or ``file://`` URL) is taken as it is.
    * With ``root`` set, the lexical path and its symlink-resolved real path must both lie inside
      ``root`` (traversal, absolute paths elsewhere and symlinks out are rejected); with ``root``
      ``None`` nothing is confined.

    Backslash separators (a Windows-made manifest) become ``/``.

    Raises:
        Reject: ``path_escapes_root`` (only with ``root``), ``missing_file`` or ``schema_violation``
            (remote URL).
    """
    orig = url
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url):
        raise _schema(f"{where}.audio_url", f"{orig!r} is a remote URL; download it and point audio_url at the file")
    if _WIN_ABSOLUTE.match(url):
        if root is None:
            raise Reject("missing_file", f"{where}.audio_url {orig!r} is an absolute Windows path from another "
                         "machine; make it relative to the manifest folder or absolute on this machine", field=where)
        raise Reject("path_escapes_root", f"{where}.audio_url {orig!r} is an absolute Windows path from another "
                     f"machine; make it relative to the manifest folder or to data_root {root}", field=where)
    if "\\" in url:
        url = url.replace("\\", "/")
        _fix(fixes, "windows_path", where, f"{orig!r} -> {url!r}")
    p = Path(url)
    root_abs = os.path.abspath(root) if root is not None else None
    root_real = os.path.realpath(root) if root is not None else None
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [manifest_dir / p] + ([root / p] if root is not None else [])
    tried = []
    for cand in candidates:
        lex = os.path.abspath(os.path.normpath(cand))
        if (root_abs is not None and not _inside(lex, root_abs)) or lex in tried:
            continue
        tried.append(lex)
        if os.path.lexists(lex):
            if root_real is not None and not _inside(os.path.realpath(lex), root_real):
                raise Reject("path_escapes_root", f"{where}.audio_url {orig!r} is a symlink to "
                             f"{os.path.realpath(lex)}, outside data_root {root}; copy the file into data_root",
                             field=where)
            if not os.path.isfile(lex):
                raise Reject("missing_file", f"{where}.audio_url {orig!r} -> {lex} is not a regular file; point it "
                             "at an audio file", field=where)
            if lex != orig:
                _fix(fixes, "path_resolved", where, f"{orig!r} -> {lex!r}")
            return lex
    if not tried:
        raise Reject("path_escapes_root", f"{where}.audio_url {orig!r} resolves outside data_root {root}; "
                     "move the audio under data_root (or set data.data_root: null) and use a path inside it",
                     field=where)
    raise Reject("missing_file", f"{where}.audio_url {orig!r} not found (tried {', '.join(tried)}); fix the path "
                 "or add the file", field=where)


def data_root(data: dict[str, Any]) -> Path | None:
    """``data.data_root`` as an absolute path, or ``None`` (the default: audio paths are not confined)."""
    root = data.get("data_root")
    return Path(os.path.abspath(root)) if root else None


def referenced_audio(manifest: str | Path, data: dict[str, Any]) -> list[Path]:
    """The audio files a manifest's rows reference, resolved as the stage resolves them.

    Used to declare the audio set as a dependency (``higgs_tune.dvc_stages``): rows the stage would
    quarantine before reading audio (bad JSON, bad shape, missing file, path outside data_root) and
    inline ``raw_audio`` (the manifest holds those bytes) contribute nothing.

    Args:
        manifest: the input manifest (any supported format).
        data: the ``data`` config section (``format``, ``data_root``).

    Returns:
        Sorted distinct absolute paths (lexical, symlinks not resolved).

    Raises:
        FileNotFoundError: ``manifest`` does not exist.
        ManifestError: the input as a whole is unusable (as in the stage).
    """
    manifest = Path(manifest)
    if not manifest.exists():
        raise FileNotFoundError(f"data.manifest {manifest} does not exist")
    manifest_dir = manifest_folder(manifest)
    root = data_root(data)
    found: set[str] = set()
    for src in read_rows(manifest, detect_format(manifest, data.get("format", "auto"))):
        if src.error:
            continue
        try:
            sample = normalize_structure(src.sample, [])
            for where, item in _audio_refs(sample):
                if item.get("raw_audio") is None:
                    found.add(resolve_audio_path(item["audio_url"], manifest_dir, root, [], where))
        except Reject:
            continue
    return [Path(p) for p in sorted(found)]


# ---------------------------------------------------------------------------------------------- audio
def _truncation(info) -> str | None:
    """A message when libsndfile's log says a WAV's data chunk is shorter than its header claims."""
    m = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", info.extra_info or "", re.MULTILINE)
    if m and int(m.group(2)) < int(m.group(1)) < 0x7FFFFFFF:  # 0xFFFFFFFF-ish sizes: streamed WAV
        return f"truncated: the header declares {m.group(1)} data bytes, the file holds {m.group(2)}"
    return None


def probe_audio(path: str) -> dict:
    """Decode ``path`` once (``audio_io.load_audio``) and describe it.

    Returns:
        ``{"sha256", "duration_s" (float seconds), "sample_rate" (Hz), "channels", "peak" (|x| max)}``
        or ``{"reason", "message"}`` (``zero_length_audio`` / ``undecodable_audio``); never raises
        for bad audio.
    """
    try:
        if os.path.getsize(path) == 0:
            return {"reason": "zero_length_audio", "message": f"{path} is an empty (0-byte) file; re-export the clip"}
        info = sf.info(path)
    except Exception as exc:  # LibsndfileError, RuntimeError, OSError
        return {"reason": "undecodable_audio", "message": f"{path} does not decode as audio ({exc}); re-export it "
                "as WAV/FLAC"}
    if info.frames == 0:
        return {"reason": "zero_length_audio", "message": f"{path} holds no samples; re-export the clip"}
    trunc = _truncation(info)
    if trunc:
        return {"reason": "undecodable_audio", "message": f"{path} is {trunc}; re-copy or re-export it"}
    try:
        samples, sr = load_audio(path)
    except (AudioDecodeError, OSError) as exc:
        return {"reason": "undecodable_audio", "message": f"{exc}; re-export the clip as WAV/FLAC"}
    if not np.isfinite(samples).all():
        return {"reason": "undecodable_audio", "message": f"{path} contains NaN/inf samples; re-export it"}
    return {"sha256": audio_sha256(samples, sr), "duration_s": samples.shape[1] / sr, "sample_rate": sr,
            "channels": int(samples.shape[0]), "peak": float(np.abs(samples).max())}


def extract_raw_audio(b64: str, cache_dir: Path, where: str) -> tuple[str, dict]:
    """Decode base64 ``raw_audio``, validate it, store it as ``{cache_dir}/raw_audio/<sha>.wav``.

    The file is the decoded float32 samples as WAV ``FLOAT`` (lossless, so its decoded hash is
    ``<sha>``, the :func:`audio_io.audio_sha256` of the input). Optional ``data:...;base64,``
    prefixes and whitespace are accepted.

    Returns:
        ``(absolute path, probe dict as from probe_audio)``.

    Raises:
        Reject: ``invalid_base64``, ``zero_length_audio`` or ``undecodable_audio``.
    """
    text = re.sub(r"\s+", "", b64.split(",", 1)[1] if b64.startswith("data:") else b64)
    try:
        blob = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Reject("invalid_base64", f"{where}.raw_audio is not valid base64 ({exc}); re-encode the audio bytes "
                     "with standard base64", field=where) from exc
    out_dir = cache_dir / "raw_audio"
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".incoming-{hashlib.sha256(blob).hexdigest()}-{os.getpid()}"
    tmp.write_bytes(blob)
    try:
        probe = probe_audio(str(tmp))
        if "reason" in probe:
            raise Reject(probe["reason"], f"{where}.raw_audio: " + probe["message"].replace(
                str(tmp), "the base64-decoded bytes"), field=where)
        samples, sr = load_audio(tmp)
    finally:
        tmp.unlink(missing_ok=True)
    dest = out_dir / f"{probe['sha256']}.wav"
    if not dest.exists():
        part = dest.with_suffix(f".wav.{os.getpid()}.tmp")
        sf.write(str(part), samples.T, sr, subtype="FLOAT", format="WAV")
        part.replace(dest)
    return str(dest.resolve()), probe


# ------------------------------------------------------------------------------------------ the stage
def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def derived_id(original: Any) -> str:
    """Stable id of a row without one: ``row-`` + 16 hex of sha256 of its canonical JSON as read."""
    return "row-" + hashlib.sha256(_canonical(original).encode()).hexdigest()[:16]


def resolve_id(sample: dict, original: Any, fixes: list[dict]) -> str:
    """The row's id: ``misc.id``, else a top-level ``id`` (moved), else :func:`derived_id`; numbers
    become strings. Pops a top-level ``id`` from ``sample``; appends fixes.

    Raises:
        Reject: ``schema_violation`` when the id is neither a string nor a number.
    """
    sid = sample["misc"].get("id")
    if sid is None and "id" in sample:
        sid = sample.pop("id")
        _fix(fixes, "id_from_top_level", "id")
    if isinstance(sid, str) and not sid.strip():
        sid = None
    if sid is None:
        sid = derived_id(original)
        _fix(fixes, "derived_id", "misc.id", sid)
    elif isinstance(sid, (int, float)) and not isinstance(sid, bool):
        sid = str(sid)
        _fix(fixes, "id_stringified", "misc.id", sid)
    elif not isinstance(sid, str):
        raise _schema("misc.id", "must be a string (or a number)")
    return sid


def split_value(key: str, seed: int) -> float:
    """``sha256(f"{seed}:{key}")`` as a uniform number in [0, 1)."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16) / 2**64


#: ``data.split_by`` values: what keeps train and val apart (see :func:`split_groups`).
SPLIT_BY = ("auto", "clip", "speaker")


def sample_speaker(sample: dict) -> str | None:
    """The row's speaker: the top-level ``speaker`` (ChatML; a CSV ``speaker`` column is put there),
    else ``misc.speaker``; ``None`` when neither is a non-empty string (LJSpeech rows name none)."""
    for value in (sample.get("speaker"), (sample.get("misc") or {}).get("speaker")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def split_groups(samples: list[dict], split_by: str = "auto") -> tuple[str, dict[str, list[int]], str]:
    """Partition ``samples`` into groups that must land in the same split.

    A sample touches every audio clip it holds (target and voice-cloning reference alike), a clip
    being its decoded audio's hash (``misc.audio_sha256`` values: the same recording under two
    paths is one clip). Samples touching a common clip are joined, transitively (connected
    components, union-find). With ``split_by="speaker"`` samples naming the same speaker
    (:func:`sample_speaker`) are joined as well, so no speaker, and still no clip, is on both sides;
    rows naming no speaker are then joined by their clips only. ``"auto"`` is ``"speaker"`` when the
    rows name at least two distinct speakers, else ``"clip"`` (a one-speaker corpus such as
    LJSpeech can only be held out by clip).

    Args:
        samples: kept rows (``misc.id`` and ``misc.audio_sha256`` set).
        split_by: one of :data:`SPLIT_BY`.

    Returns:
        ``(by, groups, reason)``: ``by`` is ``"clip"`` or ``"speaker"``; ``groups`` maps a group key
        (``"speaker:<smallest speaker name>"`` for a group naming speakers in speaker mode, else
        ``"clip:<smallest sample id>"``) to the group's sample indices (ascending); ``reason`` says
        why ``by`` was chosen.

    Raises:
        ManifestError: ``split_by`` is unknown, or ``"speaker"`` while fewer than two speakers are named.
    """
    if split_by not in SPLIT_BY:
        raise ManifestError(f"data.split_by={split_by!r}; use one of {list(SPLIT_BY)}")
    speakers = [sample_speaker(s) for s in samples]
    named = sorted({sp for sp in speakers if sp is not None})
    if split_by == "speaker" and len(named) < 2:
        raise ManifestError(f"data.split_by=speaker, but the rows name {len(named)} speaker(s) {named}: a split by "
                            "speaker needs at least 2; use split_by clip (or auto)")
    if split_by == "auto":
        by = "speaker" if len(named) >= 2 else "clip"
        reason = (f"auto: the rows name {len(named)} speakers" if by == "speaker" else
                  f"auto: the rows name {len(named)} speaker(s) {named[:1]}, too few to hold a speaker out")
    else:
        by, reason = split_by, f"data.split_by={split_by}"

    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, s in enumerate(samples):
        nodes = [("clip", sha) for sha in (s["misc"].get("audio_sha256") or {}).values()]
        if by == "speaker" and speakers[i] is not None:
            nodes.append(("speaker", speakers[i]))
        for node in nodes:
            j = first.setdefault(node, i)
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(len(samples)):
        members.setdefault(find(i), []).append(i)
    groups = {}
    for idx in members.values():
        names = sorted({speakers[i] for i in idx if speakers[i] is not None}) if by == "speaker" else []
        key = f"speaker:{names[0]}" if names else f"clip:{min(samples[i]['misc']['id'] for i in idx)}"
        groups[key] = idx
    return by, groups, reason


def assign_splits(sizes: dict[str, int], val_fraction: float, seed: int) -> dict[str, str]:
    """``group key -> "train" | "val"`` for groups of ``sizes[key]`` samples each.

    Val should hold ``target = val_fraction * total`` samples. Groups are visited in the order of
    :func:`split_value` of their key (ties by key); a group joins val when it fits,
    ``n_val + size <= target``. Then, of the groups left, the one (first in that order) that brings
    ``n_val`` nearest the target joins if it brings it nearer. So val holds about ``val_fraction`` of
    the samples, the more exactly the smaller the groups. The result depends on the set of groups and
    ``seed`` only, not on their order. With ``val_fraction > 0`` and at least 2 groups, if none
    joined val, the group whose size is nearest the target is val; with at least 1 group, if every
    group is val, the last one that joined goes back to train.
    """
    order = sorted(sizes, key=lambda k: (split_value(k, seed), k))
    target = val_fraction * sum(sizes.values())
    val: list[str] = []
    n_val = 0
    if val_fraction > 0:
        for key in order:
            if n_val + sizes[key] <= target:
                val.append(key)
                n_val += sizes[key]
        in_val = set(val)
        rest = [k for k in order if k not in in_val]
        best = min(rest, key=lambda k: abs(n_val + sizes[k] - target), default=None)
        if best is not None and abs(n_val + sizes[best] - target) < abs(n_val - target):
            val.append(best)
        if not val and len(order) >= 2:
            val.append(min(order, key=lambda k: abs(sizes[k] - target)))
    if order and len(val) == len(order):
        val.pop()
    chosen = set(val)
    return {k: "val" if k in chosen else "train" for k in sizes}


def split_summary(samples: list[dict], by: str, groups: dict[str, list[int]], split: dict[str, str], reason: str,
                  val_fraction: float) -> dict[str, Any]:
    """The ``split`` record of ``fixes.json`` for rows already marked ``misc.split``.

    Returns:
        ``by``, ``reason``, ``groups`` / ``groups_train`` / ``groups_val``, ``clips_train`` /
        ``clips_val`` (distinct audio hashes), ``speakers_train`` / ``speakers_val`` (distinct
        named speakers), ``val_fraction`` (asked) and ``val_fraction_samples`` (got).

    Raises:
        RuntimeError: a clip, or in speaker mode a speaker, is on both sides (a bug; never expected).
    """
    clips = {"train": set(), "val": set()}
    spk = {"train": set(), "val": set()}
    for s in samples:
        side = s["misc"]["split"]
        clips[side].update((s["misc"].get("audio_sha256") or {}).values())
        if sample_speaker(s) is not None:
            spk[side].add(sample_speaker(s))
    if clips["train"] & clips["val"] or (by == "speaker" and spk["train"] & spk["val"]):
        raise RuntimeError(f"split invariant broken: clips {len(clips['train'] & clips['val'])} / speakers "
                           f"{sorted(spk['train'] & spk['val'])} in both train and val")
    n_val = sum(s["misc"]["split"] == "val" for s in samples)
    return {"by": by, "reason": reason, "groups": len(groups),
            "groups_train": sum(v == "train" for v in split.values()),
            "groups_val": sum(v == "val" for v in split.values()),
            "clips_train": len(clips["train"]), "clips_val": len(clips["val"]),
            "speakers_train": len(spk["train"]), "speakers_val": len(spk["val"]),
            "val_fraction": val_fraction, "val_fraction_samples": n_val / len(samples) if samples else 0.0}


def _tts_parts(sample: dict) -> tuple[str, dict] | None:
    """``(text, audio item)`` of a plain TTS row (its only audio is the last message, an assistant
    one, right after a user message of one text item), else ``None``."""
    msgs = sample["messages"]
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user" or len(_audio_refs(sample)) != 1:
        return None
    target, user = _items(msgs[-1]), _items(msgs[-2])
    if len(target) != 1 or target[0]["type"] != "audio" or len(user) != 1 or user[0]["type"] != "text":
        return None
    return user[0]["text"], target[0]


def build_cloning(samples: list[dict], cloning: dict[str, Any]) -> tuple[list[dict], set[int], dict[str, Any]]:
    """Voice-cloning samples from the plain TTS rows that name a speaker (``data.cloning``).

    Each such row (the target) is paired with ``references_per_target`` other rows of the same
    speaker on the same side of the split (``misc.split``, already assigned) whose clip differs
    (another audio hash: never a clip with itself) and lasts ``min_ref_s`` to ``max_ref_s`` seconds
    (``null``: no upper bound); fewer when fewer exist. The references are drawn without repeats
    from the candidates in id order by ``random.Random(f"{seed}:{target id}")``: deterministic,
    independent of the row order, linear in the rows. Each pair becomes a :func:`clone_sample`
    (reference turn, then the target turn, ``start_index=4``) with ``misc.id``
    ``{target id}~ref~{reference id}``, ``misc.cloning`` ``{"target", "reference"}`` (ids), the
    target's ``split``, ``source_line`` and ``language``, both clips' ``audio_sha256`` / ``audio_info``
    and durations set.

    Args:
        samples: kept rows with ``misc.split``, ``misc.audio_sha256`` and audio ``duration`` set.
        cloning: the ``data.cloning`` section (``references_per_target``, ``min_ref_s``,
            ``max_ref_s``, ``seed``).

    Returns:
        ``(built, targets, record)``: the new samples (target order: side, speaker, id), the
        indices into ``samples`` of the targets that got at least one pair, and the ``cloning``
        record of ``fixes.json``: ``built`` / ``built_train`` / ``built_val``, ``eligible`` (plain
        TTS rows naming a speaker), ``targets``, ``targets_without_reference``, ``speakers``.
    """
    k, seed = int(cloning["references_per_target"]), int(cloning["seed"])
    lo, hi = float(cloning["min_ref_s"]), cloning["max_ref_s"]
    pools: dict[tuple[str, str], list[tuple[str, int, str, dict]]] = {}
    for i, s in enumerate(samples):
        speaker, parts = sample_speaker(s), _tts_parts(s)
        if speaker is None or parts is None:
            continue
        pools.setdefault((s["misc"]["split"], speaker), []).append((s["misc"]["id"], i, *parts))
    built: list[dict] = []
    targets: set[int] = set()
    without = 0
    for (side, speaker), pool in sorted(pools.items()):
        pool.sort()
        sha = {i: samples[i]["misc"]["audio_sha256"][item["audio_url"]] for _, i, _, item in pool}
        refs = [entry for entry in pool if lo <= entry[3]["duration"] and (hi is None or entry[3]["duration"] <= hi)]
        per_clip: dict[str, int] = {}
        for _, i, _, _ in refs:
            per_clip[sha[i]] = per_clip.get(sha[i], 0) + 1
        for tid, ti, text, item in pool:
            available = len(refs) - per_clip.get(sha[ti], 0)
            if available <= k:
                chosen = [r for r in refs if sha[r[1]] != sha[ti]]
            else:
                rng, picked, chosen = random.Random(f"{seed}:{tid}"), set(), []
                while len(chosen) < k:
                    j = rng.randrange(len(refs))
                    if j not in picked and sha[refs[j][1]] != sha[ti]:
                        picked.add(j)
                        chosen.append(refs[j])
            if not chosen:
                without += 1
                continue
            targets.add(ti)
            target = samples[ti]
            for rid, ri, ref_text, ref_item in chosen:
                ref = samples[ri]
                row = clone_sample(text, item["audio_url"], ref_text, ref_item["audio_url"], speaker,
                                   f"{tid}~ref~{rid}")
                row["messages"][2]["content"]["duration"] = ref_item["duration"]
                row["messages"][4]["content"]["duration"] = item["duration"]
                urls = (ref_item["audio_url"], item["audio_url"])
                misc = row["misc"]
                misc["cloning"] = {"target": tid, "reference": rid}
                if target["misc"].get("language"):
                    misc["language"] = target["misc"]["language"]
                misc["audio_sha256"] = {u: src["misc"]["audio_sha256"][u] for u, src in zip(urls, (ref, target))}
                misc["audio_info"] = {u: src["misc"]["audio_info"][u] for u, src in zip(urls, (ref, target))}
                misc["source_line"] = target["misc"]["source_line"]
                warnings = sorted(set(ref["misc"].get("warnings", [])) | set(target["misc"].get("warnings", [])))
                if warnings:
                    misc["warnings"] = warnings
                misc["fixes"] = []
                misc["split"] = side
                built.append(row)
    record = {"built": len(built), "built_train": sum(r["misc"]["split"] == "train" for r in built),
              "built_val": sum(r["misc"]["split"] == "val" for r in built),
              "eligible": sum(len(p) for p in pools.values()), "targets": len(targets),
              "targets_without_reference": without, "speakers": len({sp for _, sp in pools})}
    return built, targets, record


def _quarantine_entry(src: SourceRow, rej: Reject) -> dict:
    entry: dict[str, Any] = {"line": src.line, "reason": rej.reason, "message": rej.message}
    if rej.field:
        entry["field"] = rej.field
    if src.text is not None:
        entry["text"] = src.text
    else:
        entry["row"] = src.original
    return entry


def read_rows(path: Path, fmt: str) -> list[SourceRow]:
    """Rows of ``path`` in format ``fmt`` (one of :data:`FORMATS`)."""
    readers = {"chatml": read_chatml, "ljspeech": read_ljspeech, "csv": read_csv_manifest,
               "train_higgs_audio": read_train_higgs_audio, "ms_swift": read_ms_swift, "raw_jsonl": read_raw_jsonl}
    return readers[fmt](path)


def manifest_folder(manifest: Path) -> Path:
    """The folder relative audio paths resolve against: ``manifest`` itself when it is a folder
    (train-higgs-audio), else its parent."""
    return manifest.resolve() if manifest.is_dir() else manifest.resolve().parent


def input_digest(manifest: Path) -> str:
    """sha256 hex of the input as read: the file's bytes; for a folder its ``metadata.json``, or
    (``X.wav`` + ``X.txt`` pairs) the sorted file names and the ``.txt`` contents."""
    if not manifest.is_dir():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    if (manifest / "metadata.json").is_file():
        return hashlib.sha256((manifest / "metadata.json").read_bytes()).hexdigest()
    h = hashlib.sha256()
    for p in sorted(manifest.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0")
            if p.suffix.lower() == ".txt":
                h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def run_manifest(cfg: dict[str, Any], *, train_out: str | Path, val_out: str | Path, quarantine_out: str | Path,
                 fixes_out: str | Path, manifest: str | Path | None = None) -> dict[str, Any]:
    """Run the stage; write the four outputs (kept train/val rows, quarantine JSONL, ``fixes.json``).

    Args:
        cfg: config with the ``data`` section (and ``cache_dir``: base64 ``raw_audio`` is extracted
            to ``{cache_dir}/raw_audio``).
        train_out, val_out, quarantine_out, fixes_out: output paths (the manifest rule's outputs).
        manifest: the input manifest; default ``data.manifest``.

    Returns:
        The ``fixes.json`` dict: ``rows_in``, ``rows_kept``, ``rows_quarantined``, ``rows_train``,
        ``rows_val``, ``fixes`` / ``warnings`` / ``reasons`` (kind -> count), ``split_by`` (``"clip"``
        or ``"speaker"``) and ``split`` (:func:`split_summary`), ``format``, ``input``, ``input_sha256``.

    Raises:
        FileNotFoundError: ``data.manifest`` does not exist.
        ManifestError: the input as a whole is unusable, no row survives, or ``data.split_by`` is
            ``speaker`` while the rows name fewer than two speakers.
        QuarantineTooLarge: quarantined / rows_in > ``data.max_quarantine_fraction`` (after writing).
        RuntimeError: rows_in != kept + quarantined (a bug; never expected).
    """
    data = cfg["data"]
    cache = Path(cfg.get("cache_dir") or ".cache/higgs-tune")
    quarantine_out = Path(quarantine_out)
    manifest = Path(manifest or data["manifest"])
    if not manifest.exists():
        raise FileNotFoundError(f"data.manifest {manifest} does not exist")
    manifest_dir = manifest_folder(manifest)
    root = data_root(data)
    fmt = detect_format(manifest, data.get("format", "auto"))
    min_s, max_s = float(data.get("min_duration_s", 0.3)), float(data.get("max_duration_s", 30.0))
    log.info("reading %s as %s (data_root %s)", manifest, fmt, root or "not set: paths not confined")
    rows = read_rows(manifest, fmt)

    # 1. structure, text, roles; audio paths resolved, raw_audio extracted
    live: list[tuple[SourceRow, dict, list[tuple[str, dict, str]]]] = []
    quarantine: list[dict] = []
    probes: dict[str, dict] = {}
    raw_done: dict[str, tuple[str, dict]] = {}
    for src in rows:
        try:
            if src.error:
                raise src.error
            sample = normalize_structure(src.sample, src.fixes)
            sample["misc"]["id"] = resolve_id(sample, src.original, src.fixes)
            carry_language(sample)
            refs = []
            for where, item in _audio_refs(sample):
                if item.get("raw_audio") is not None:
                    b64 = item.pop("raw_audio")
                    key = hashlib.sha256(b64.encode()).hexdigest()
                    if key not in raw_done:  # the same inline bytes in several rows: decoded once
                        raw_done[key] = extract_raw_audio(b64, cache, where)
                    path, probe = raw_done[key]
                    probes[os.path.realpath(path)] = probe
                    _fix(src.fixes, "raw_audio_extracted", where, f"-> {path}")
                else:
                    path = resolve_audio_path(item["audio_url"], manifest_dir, root, src.fixes, where)
                item["audio_url"] = path
                item.pop("offset", None)
                refs.append((where, item, os.path.realpath(path)))
            live.append((src, sample, refs))
        except Reject as rej:
            quarantine.append(_quarantine_entry(src, rej))

    # 2. decode each distinct file once (threads: libsndfile and hashlib release the GIL)
    todo = sorted({real for _, _, refs in live for _, _, real in refs} - set(probes))
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        probes.update(zip(todo, pool.map(probe_audio, todo)))
    log.info("decoded %d distinct audio files", len(todo))

    # 3. audio checks; ids
    checked: list[tuple[SourceRow, dict]] = []
    for src, sample, refs in live:
        try:
            sha, info, warnings = {}, {}, []
            for where, item, real in refs:
                probe = probes[real]
                if "reason" in probe:
                    raise Reject(probe["reason"], f"{where}: {probe['message']}", field=where)
                dur = probe["duration_s"]
                if not min_s <= dur <= max_s:
                    raise Reject("duration_out_of_range", f"{where}: {item['audio_url']} lasts {dur:.3f} s, outside "
                                 f"[data.min_duration_s={min_s}, data.max_duration_s={max_s}]; trim/split the clip or "
                                 "change the limits", field=where)
                given = item.get("duration")
                if given is None:
                    _fix(src.fixes, "duration_measured", where, f"{dur:.6f} s")
                elif abs(float(given) - dur) > max(0.05, 0.01 * dur):
                    _fix(src.fixes, "duration_corrected", where, f"{given} -> {dur:.6f} s")
                item["duration"] = dur
                url = item["audio_url"]
                sha[url] = probe["sha256"]
                info[url] = {"duration_s": dur, "sample_rate": probe["sample_rate"], "channels": probe["channels"]}
                if probe["peak"] < SILENCE_PEAK and "silent_audio" not in warnings:
                    warnings.append("silent_audio")
            sample["misc"].update(audio_sha256=sha, audio_info=info, source_line=src.line)
            if warnings:
                sample["misc"]["warnings"] = warnings
            checked.append((src, sample))
        except Reject as rej:
            quarantine.append(_quarantine_entry(src, rej))

    # 4. duplicates: same id + same content -> dropped (quarantined); same id, other content -> renamed
    all_ids = {s["misc"]["id"] for _, s in checked}
    seen: dict[str, dict[str, int]] = {}  # id -> {content key -> first line}, in reading order
    next_suffix: dict[str, int] = {}
    kept: list[dict] = []
    for src, sample in checked:
        sid = sample["misc"]["id"]
        key = _canonical({k: v for k, v in sample.items() if k != "misc"})
        earlier = seen.setdefault(sid, {})
        dup = earlier.get(key)
        if dup is not None:
            quarantine.append(_quarantine_entry(src, Reject(
                "duplicate", f"exact duplicate of line {dup} (id {sid!r}); dropped, nothing lost: delete the repeat")))
            continue
        if earlier:
            n = next_suffix.get(sid, 2)  # ids only join all_ids, so the first free suffix never moves back
            while f"{sid}~{n}" in all_ids:
                n += 1
            next_suffix[sid] = n + 1
            new = f"{sid}~{n}"
            all_ids.add(new)
            first_line = next(iter(earlier.values()))
            _fix(src.fixes, "duplicate_id_renamed", "misc.id", f"{sid!r} (also line {first_line}) -> {new!r}")
            sample["misc"]["id"] = new
        earlier.setdefault(key, src.line)
        sample["misc"]["fixes"] = src.fixes
        kept.append(sample)

    # 5. split by connected clips (or speakers), write, check
    val_fraction = float(data.get("val_fraction", 0.1))
    split_by, groups, split_reason = split_groups(kept, str(data.get("split_by", "auto")))
    split = assign_splits({k: len(v) for k, v in groups.items()}, val_fraction, int(data.get("split_seed", 0)))
    for key, idx in groups.items():
        for i in idx:
            kept[i]["misc"]["split"] = split[key]
    out_rows, cloning_record = kept, None
    if data["cloning"]["enabled"]:  # pairs within each side, after the split: nothing crosses it
        built, targets, cloning_record = build_cloning(kept, data["cloning"])
        keep_tts = data["cloning"]["keep_tts"]
        out_rows = [s for i, s in enumerate(kept) if keep_tts or i not in targets] + built
        cloning_record["tts_replaced"] = 0 if keep_tts else len(targets)
    split_record = split_summary(out_rows, split_by, groups, split, split_reason, val_fraction)
    train = [s for s in out_rows if s["misc"]["split"] == "train"]
    val = [s for s in out_rows if s["misc"]["split"] == "val"]
    quarantine.sort(key=lambda q: q["line"])
    fix_counts: dict[str, int] = {}
    warn_counts: dict[str, int] = {}
    for s in kept:
        for f in s["misc"]["fixes"]:
            fix_counts[f["kind"]] = fix_counts.get(f["kind"], 0) + 1
        for w in s["misc"].get("warnings", []):
            warn_counts[w] = warn_counts.get(w, 0) + 1
    reason_counts: dict[str, int] = {}
    for q in quarantine:
        reason_counts[q["reason"]] = reason_counts.get(q["reason"], 0) + 1
    summary = {
        "rows_in": len(rows), "rows_kept": len(kept), "rows_quarantined": len(quarantine),
        "rows_train": len(train), "rows_val": len(val),
        "fixes": dict(sorted(fix_counts.items())), "warnings": dict(sorted(warn_counts.items())),
        "reasons": dict(sorted(reason_counts.items())),
        "split_by": split_by, "split": split_record, **({"cloning": cloning_record} if cloning_record else {}),
        "format": fmt, "input": str(manifest), "input_sha256": input_digest(manifest),
    }
    if summary["rows_in"] != summary["rows_kept"] + summary["rows_quarantined"]:
        raise RuntimeError(f"manifest invariant broken: {summary['rows_in']} rows in != {summary['rows_kept']} kept + "
                           f"{summary['rows_quarantined']} quarantined")
    write_jsonl(train_out, train)
    write_jsonl(val_out, val)
    write_jsonl(quarantine_out, quarantine)
    write_json(fixes_out, summary)

    log.info("%d rows in: %d kept (%d train, %d val), %d quarantined %s; fixes %s", len(rows), len(kept), len(train),
             len(val), len(quarantine), reason_counts, fix_counts)
    log.info("split by %s (%s): %d groups, %d val; val fraction %.3f of samples (asked %.3f)", split_by, split_reason,
             split_record["groups"], split_record["groups_val"], split_record["val_fraction_samples"], val_fraction)
    if kept and val_fraction > 0 and not val:
        log.warning("no val rows: all %d kept rows share clips%s, so none can be held out", len(kept),
                    " or speakers" if split_by == "speaker" else "")
    for q in quarantine[:20]:
        log.warning("line %d quarantined (%s): %s", q["line"], q["reason"], q["message"])
    if len(quarantine) > 20:
        log.warning("... and %d more in %s", len(quarantine) - 20, quarantine_out)
    if not rows:
        raise ManifestError(f"{manifest} has no rows")
    fraction = len(quarantine) / len(rows)
    limit = float(data.get("max_quarantine_fraction", 0.05))
    if fraction > limit:
        raise QuarantineTooLarge(
            f"{len(quarantine)} of {len(rows)} rows ({fraction:.1%}) quarantined, above data.max_quarantine_fraction="
            f"{limit}: read {quarantine_out} (each line has a reason and what to do), fix the data or raise the "
            "limit", fraction, quarantine_out)
    if not kept:
        raise ManifestError(f"no row of {manifest} survived; see {quarantine_out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 on a too-large quarantine or an unusable input)."""
    parser = argparse.ArgumentParser(prog="python -m higgs_tune.manifest", description=__doc__.split("\n\n")[0])
    config_mod.add_config_args(parser)
    parser.add_argument("--manifest", default=None, help="input manifest (default: data.manifest)")
    for name in ("train", "val", "quarantine", "fixes"):
        parser.add_argument(f"--{name}", required=True, help=f"output: the {name} file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_mod.config_from_args(args)
    try:
        run_manifest(cfg, manifest=args.manifest, train_out=args.train, val_out=args.val,
                     quarantine_out=args.quarantine, fixes_out=args.fixes)
    except (ManifestError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
