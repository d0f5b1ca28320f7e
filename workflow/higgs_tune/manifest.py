"""The manifest stage: any supported input -> one validated Higgs ChatML JSONL, split train/val.

Inputs (``data.manifest``, ``data.format: auto|chatml|ljspeech|csv``):

* Higgs ChatML: JSONL (one ``ChatMLSample`` per line) or a JSON list of them.
* LJSpeech ``metadata.csv``: ``id|text[|normalized]`` (no header, no quoting), audio at
  ``wavs/{id}.wav`` beside it. The ``normalized`` column wins when it is non-empty.
* CSV/TSV with a header ``audio,text[,speaker,ref_audio,ref_text,id]``: rows with ``ref_audio`` and
  ``ref_text`` become voice-cloning samples, the others plain TTS samples (the layouts and system
  prompts of ``data/demo/manifest.jsonl``).

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
def detect_format(path: Path, fmt: str = "auto") -> str:
    """``chatml``, ``ljspeech`` or ``csv`` for ``path`` (``fmt`` other than ``auto`` is returned as is).

    Raises:
        ManifestError: when ``auto`` cannot tell.
    """
    if fmt != "auto":
        return fmt
    if path.suffix.lower() in (".jsonl", ".json"):
        return "chatml"
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    if path.suffix.lower() not in (".csv", ".tsv", ".txt") and first.lstrip()[:1] in ("{", "["):
        return "chatml"
    header = {c.strip().lower() for c in re.split(r"[,\t]", first)}
    if {"audio", "text"} <= header:
        return "csv"
    if "|" in first:
        return "ljspeech"
    raise ManifestError(f"{path}: cannot tell its format from the first line; set data.format "
                        "(chatml, ljspeech or csv)")


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


def tts_sample(text: str, audio: str, speaker: str | None = None, sample_id: str | None = None) -> dict:
    """A plain TTS ChatML row: system -> user ``text`` -> assistant ``audio`` (as in the demo)."""
    row: dict[str, Any] = {"messages": [
        {"role": "system", "content": {"type": "text", "text": TTS_SYSTEM_PROMPT}},
        {"role": "user", "content": {"type": "text", "text": text}},
        {"role": "assistant", "content": {"type": "audio", "audio_url": audio}},
    ]}
    return _finish_converted(row, speaker, sample_id)


def clone_sample(text: str, audio: str, ref_text: str, ref_audio: str, speaker: str | None = None,
                 sample_id: str | None = None) -> dict:
    """A voice-cloning ChatML row: system -> user ``ref_text`` -> assistant ``ref_audio`` -> user
    ``text`` -> assistant ``audio`` with ``start_index=4`` (only the target turn is learned)."""
    row: dict[str, Any] = {"messages": [
        {"role": "system", "content": {"type": "text", "text": CLONE_SYSTEM_PROMPT}},
        {"role": "user", "content": {"type": "text", "text": ref_text}},
        {"role": "assistant", "content": {"type": "audio", "audio_url": ref_audio}},
        {"role": "user", "content": {"type": "text", "text": text}},
        {"role": "assistant", "content": {"type": "audio", "audio_url": audio}},
    ], "start_index": 4}
    return _finish_converted(row, speaker, sample_id)


def _finish_converted(row: dict, speaker: str | None, sample_id: str | None) -> dict:
    if speaker:
        row["speaker"] = speaker
    if sample_id:
        row["misc"] = {"id": sample_id}
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
            unknown = set(header) - {"audio", "text", "speaker", "ref_audio", "ref_text", "id"}
            if unknown:
                log.warning("%s: ignoring unknown column(s) %s", path, sorted(unknown))
            continue
        original = dict(zip(header, fields)) if len(fields) == len(header) else {"fields": fields}
        if len(fields) != len(header):
            rows.append(SourceRow(start, original=original, error=Reject(
                "schema_violation", f"line {start} has {len(fields)} fields but the header has {len(header)}; "
                "quote fields that contain the delimiter", field="<row>")))
            continue
        rows.append(_csv_row(start, original))
    return rows


def _csv_row(line: int, row: dict[str, str]) -> SourceRow:
    get = lambda k: (row.get(k) or "").strip()  # noqa: E731
    audio, ref_audio, ref_text = get("audio"), get("ref_audio"), row.get("ref_text") or ""
    if not audio:
        return SourceRow(line, original=row, error=Reject(
            "schema_violation", f"line {line}: the audio column is empty; give the clip's path", field="audio"))
    if bool(ref_audio) != bool(ref_text.strip()):
        which = "ref_text" if ref_audio else "ref_audio"
        return SourceRow(line, original=row, error=Reject(
            "schema_violation", f"line {line}: voice cloning needs both ref_audio and ref_text; {which} is empty: "
            "fill it or clear the other", field=which))
    text, speaker, sid = row.get("text") or "", get("speaker") or None, get("id") or None
    sample = (clone_sample(text, audio, ref_text, ref_audio, speaker, sid) if ref_audio
              else tts_sample(text, audio, speaker, sid))
    return SourceRow(line, original=row, sample=sample)


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
    if not manifest.is_file():
        raise FileNotFoundError(f"data.manifest {manifest} does not exist")
    manifest_dir = manifest.resolve().parent
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
        rest = [k for k in order if k not in set(val)]
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
    """Rows of ``path`` in format ``fmt`` (``chatml``, ``ljspeech`` or ``csv``)."""
    readers = {"chatml": read_chatml, "ljspeech": read_ljspeech, "csv": read_csv_manifest}
    return readers[fmt](path)


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
    if not manifest.is_file():
        raise FileNotFoundError(f"data.manifest {manifest} does not exist")
    manifest_dir = manifest.resolve().parent
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
    seen: dict[str, list[tuple[str, int]]] = {}
    kept: list[dict] = []
    for src, sample in checked:
        sid = sample["misc"]["id"]
        key = _canonical({k: v for k, v in sample.items() if k != "misc"})
        earlier = seen.setdefault(sid, [])
        dup = next((line for k, line in earlier if k == key), None)
        if dup is not None:
            quarantine.append(_quarantine_entry(src, Reject(
                "duplicate", f"exact duplicate of line {dup} (id {sid!r}); dropped, nothing lost: delete the repeat")))
            continue
        if earlier:
            n = 2
            while f"{sid}~{n}" in all_ids:
                n += 1
            new = f"{sid}~{n}"
            all_ids.add(new)
            _fix(src.fixes, "duplicate_id_renamed", "misc.id", f"{sid!r} (also line {earlier[0][1]}) -> {new!r}")
            sample["misc"]["id"] = new
        earlier.append((key, src.line))
        sample["misc"]["fixes"] = src.fixes
        kept.append(sample)

    # 5. split by connected clips (or speakers), write, check
    val_fraction = float(data.get("val_fraction", 0.1))
    split_by, groups, split_reason = split_groups(kept, str(data.get("split_by", "auto")))
    split = assign_splits({k: len(v) for k, v in groups.items()}, val_fraction, int(data.get("split_seed", 0)))
    for key, idx in groups.items():
        for i in idx:
            kept[i]["misc"]["split"] = split[key]
    split_record = split_summary(kept, split_by, groups, split, split_reason, val_fraction)
    train = [s for s in kept if s["misc"]["split"] == "train"]
    val = [s for s in kept if s["misc"]["split"] == "val"]
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
        "split_by": split_by, "split": split_record,
        "format": fmt, "input": str(manifest), "input_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
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
