"""ChatML normalization: a row as read -> the validated, fixed ChatMLSample dict (roles, content
items, text, language, id), each fix recorded."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import jsonschema

from ..fileio import canonical_json, canonical_sha256  # noqa: F401 - canonical_json: re-exported (manifest, run.py)
from .rows import AUDIO_KEYS, ROLES, ROW_SCHEMA, ROW_SCHEMA_PATH, Reject

#: checks a normalized row against :data:`higgs_tune.manifest.rows.ROW_SCHEMA`
ROW_VALIDATOR = jsonschema.Draft202012Validator(ROW_SCHEMA)


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


def add_fix(fixes: list[dict], kind: str, where: str, detail: str | None = None) -> None:
    entry = {"kind": kind, "where": where}
    if detail is not None:
        entry["detail"] = detail
    fixes.append(entry)


def schema_reject(where: str, what: str) -> Reject:
    return Reject("schema_violation", f"{where}: {what}", field=where)


def _normalize_item(item: Any, role: str, where: str, fixes: list[dict]) -> dict:
    if isinstance(item, str):
        item = {"type": "text", "text": item}
        add_fix(fixes, "string_content", where)
    if not isinstance(item, dict):
        raise schema_reject(where, f"content item is a {type(item).__name__}; use a string, "
                             '{"type": "text", "text": ...} or {"type": "audio", "audio_url": ...}')
    item = dict(item)
    if "type" not in item:
        if "audio_url" in item or "raw_audio" in item:
            item["type"] = "audio"
        elif "text" in item:
            item["type"] = "text"
        else:
            raise schema_reject(f"{where}.type", "content item has no type; add \"type\": \"text\" or \"audio\"")
        add_fix(fixes, "content_type_added", where, item["type"])
    kind = item["type"]
    if kind == "text":
        extra = set(item) - {"type", "text"}
        if extra:
            raise schema_reject(f"{where}.{sorted(extra)[0]}", "unknown key in a text item; TextContent has only type, text")
        if not isinstance(item.get("text"), str):
            raise schema_reject(f"{where}.text", "text item needs a string 'text'")
        text, kinds = normalize_text(item["text"])
        for k in kinds:
            add_fix(fixes, k, where)
        if not text:
            raise Reject("empty_transcript", f"{where} ({role}) has empty text; write the transcript or drop the row",
                         field=where)
        return {"type": "text", "text": text}
    if kind == "audio":
        extra = set(item) - AUDIO_KEYS
        if extra:
            raise schema_reject(f"{where}.{sorted(extra)[0]}", f"unknown key in an audio item; AudioContent has only "
                                                         f"{sorted(AUDIO_KEYS)}")
        if item.get("raw_audio") is None:
            if not isinstance(item.get("audio_url"), str) or not item["audio_url"].strip():
                raise schema_reject(f"{where}.audio_url", "audio item needs a non-empty string audio_url (or raw_audio)")
        elif not isinstance(item["raw_audio"], str):
            raise schema_reject(f"{where}.raw_audio", "raw_audio must be a base64 string")
        elif item.get("audio_url") is not None and not isinstance(item["audio_url"], str):
            raise schema_reject(f"{where}.audio_url", "audio_url must be a string")
        if item.get("offset") not in (None, 0, 0.0):
            raise schema_reject(f"{where}.offset", "clip segments (offset) are not supported; cut the segment into its "
                                             "own file and point audio_url at it")
        dur = item.get("duration")
        if dur is not None and (isinstance(dur, bool) or not isinstance(dur, (int, float))):
            raise schema_reject(f"{where}.duration", "duration must be a number of seconds")
        rid = item.get("row_id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, int)):
            raise schema_reject(f"{where}.row_id", "row_id must be an integer")
        return item
    raise schema_reject(f"{where}.type", f"unknown content type {kind!r}; use \"text\" or \"audio\"")


def normalize_structure(obj: Any, fixes: list[dict]) -> dict:
    """Check one ChatML row's shape and normalize it (roles, content items, text); audio not touched.

    Returns a new row dict whose content items are all dicts, valid against
    ``workflow/schemas/chatml_row.schema.yaml`` (checked last). Appends fixes to ``fixes``.

    Raises:
        Reject: ``schema_violation`` (``field`` names where), ``unsupported_role``,
            ``empty_transcript`` or ``no_assistant_audio``.
    """
    if not isinstance(obj, dict):
        raise schema_reject("<row>", f"the row is a JSON {type(obj).__name__}; each row must be a ChatMLSample object")
    if "messages" not in obj:
        raise schema_reject("messages", "missing; a ChatMLSample needs a list of {role, content} messages")
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise schema_reject("messages", f"must be a list of {{role, content}} objects, got a {type(messages).__name__}")
    if not messages:
        raise schema_reject("messages", "is empty")
    start = obj.get("start_index")
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < len(messages)):
        raise schema_reject("start_index", f"{start!r} is not a message index in [0, {len(messages)})")
    if obj.get("speaker") is not None and not isinstance(obj["speaker"], str):
        raise schema_reject("speaker", "must be a string or null")
    if obj.get("misc") is not None and not isinstance(obj["misc"], dict):
        raise schema_reject("misc", "must be an object or null")
    out_messages = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise schema_reject(where, f"is a {type(msg).__name__}; each message must be a {{role, content}} object")
        extra = set(msg) - {"role", "content", "recipient"}
        if extra:
            raise schema_reject(f"{where}.{sorted(extra)[0]}", "unknown key; a message has only role, content, recipient")
        role = msg.get("role")
        if not isinstance(role, str):
            raise schema_reject(f"{where}.role", "missing or not a string")
        norm = role.strip().lower()
        if norm != role:
            add_fix(fixes, "role_normalized", f"{where}.role", f"{role!r} -> {norm!r}")
        if norm not in ROLES:
            raise Reject("unsupported_role", f"{where}.role is {role!r}; Higgs ChatML rows use only "
                                             f"{', '.join(ROLES)}: rename or drop that message", field=f"{where}.role")
        recipient = msg.get("recipient")
        if recipient is not None and (not isinstance(recipient, str) or norm != "assistant"):
            raise schema_reject(f"{where}.recipient", "only assistant messages may have a (string) recipient")
        if msg.get("content") is None:
            raise schema_reject(f"{where}.content", "missing; give a string, a content object or a list of them")
        content = msg["content"]
        if isinstance(content, list):
            if not content:
                raise schema_reject(f"{where}.content", "is an empty list")
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
                 and any(it["type"] == "audio" for it in content_items(m))]
    if not learnable:
        raise Reject("no_assistant_audio", "no assistant audio at or after start_index "
                     f"({start or 0}): nothing to learn; add the target audio or lower start_index")
    error = next(ROW_VALIDATOR.iter_errors(out), None)  # what the checks above leave: the file is the contract
    if error is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        raise schema_reject(where or "<row>", f"{error.message} ({ROW_SCHEMA_PATH.name})")
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
        raise schema_reject(where, f"{lang!r} is not an ISO 639 language code; write e.g. \"en\", \"zh\" or \"zh-TW\" "
                             "(or drop it: data.language is the default)")
    sample["misc"]["language"] = lang.strip()


def content_items(msg: dict) -> list[dict]:
    return msg["content"] if isinstance(msg["content"], list) else [msg["content"]]


def audio_refs(sample: dict) -> list[tuple[str, dict]]:
    """``(where, item)`` for each audio item of a normalized row (items are mutable in place)."""
    refs = []
    for i, msg in enumerate(sample["messages"]):
        if isinstance(msg["content"], list):
            refs += [(f"messages[{i}].content[{j}]", it) for j, it in enumerate(msg["content"])
                     if it["type"] == "audio"]
        elif msg["content"]["type"] == "audio":
            refs.append((f"messages[{i}].content", msg["content"]))
    return refs

#: hex digits of a derived row id (part of the id: never the display length)
DERIVED_ID_HEX = 16


def derived_id(original: Any) -> str:
    """Stable id of a row without one: ``row-`` + 16 hex of sha256 of its canonical JSON as read
    (:func:`higgs_tune.fileio.canonical_sha256`)."""
    return "row-" + canonical_sha256(original, DERIVED_ID_HEX)


def resolve_id(sample: dict, original: Any, fixes: list[dict]) -> str:
    """The row's id: ``misc.id``, else a top-level ``id`` (moved), else :func:`derived_id`; numbers
    become strings. Pops a top-level ``id`` from ``sample``; appends fixes.

    Raises:
        Reject: ``schema_violation`` when the id is neither a string nor a number.
    """
    sid = sample["misc"].get("id")
    if sid is None and "id" in sample:
        sid = sample.pop("id")
        add_fix(fixes, "id_from_top_level", "id")
    if isinstance(sid, str) and not sid.strip():
        sid = None
    if sid is None:
        sid = derived_id(original)
        add_fix(fixes, "derived_id", "misc.id", sid)
    elif isinstance(sid, (int, float)) and not isinstance(sid, bool):
        sid = str(sid)
        add_fix(fixes, "id_stringified", "misc.id", sid)
    elif not isinstance(sid, str):
        raise schema_reject("misc.id", "must be a string (or a number)")
    return sid
