"""Readers: each supported input format -> :class:`SourceRow`s of Higgs ChatML samples; the format told
from the input (:func:`detect_format`)."""

from __future__ import annotations

import logging
import csv
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from .chatml import schema_reject
from .rows import CLONE_SYSTEM_PROMPT, ManifestError, Reject, SourceRow, TTS_SYSTEM_PROMPT

log = logging.getLogger("higgs_tune.manifest")


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
        raise schema_reject("<row>", f"line {line} is a JSON {type(obj).__name__}; each line must be an object "
                      '{"audio": ..., "text": ...}')
    for key in PAIR_KEYS:
        value = obj.get(key)
        if value is not None and not isinstance(value, str) and not (key in ("id", "speaker") and isinstance(
                value, int) and not isinstance(value, bool)):
            raise schema_reject(key, f"line {line}: {key} must be a string, got a JSON {type(value).__name__}")
    if not isinstance(obj.get("text"), str):
        raise schema_reject("text", f"line {line}: no text; give the transcript of the audio")
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
        raise schema_reject("<row>", f"line {line} is a JSON {type(obj).__name__}; each line must be an ms-swift object "
                      '{"messages": [...], "audios": [...]}')
    messages, audios = obj.get("messages"), obj.get("audios")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise schema_reject("messages", f"line {line}: ms-swift messages must be a non-empty list of "
                      '{"role": ..., "content": "<text>"} objects')
    if not isinstance(audios, list) or not all(isinstance(a, str) and a.strip() for a in audios):
        raise schema_reject("audios", f"line {line}: audios must be a list of audio paths")
    tags = sum(m["content"].count(SWIFT_AUDIO_TAG) for m in messages)
    if tags and tags != len(audios):
        raise schema_reject("audios", f"line {line}: {tags} {SWIFT_AUDIO_TAG} tag(s) in the messages but {len(audios)} "
                      "entries in audios; ms-swift pairs each tag with one entry")
    if len(audios) != 1:
        raise schema_reject("audios", f"line {line}: {len(audios)} audios; a TTS row has exactly one (the speech of the "
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
            raise schema_reject(key, f"line {line}: {key} must be a string")
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
        raise schema_reject("<row>", f"{where} is a JSON {type(obj).__name__}; each sample must be an object")
    for key in THA_KEYS:
        value = obj.get(key)
        if value is not None and not isinstance(value, str) and not (
                key in ("id", "audio_id", "speaker_id") and isinstance(value, int) and not isinstance(value, bool)):
            raise schema_reject(key, f"{where}.{key} must be a string")
    audio, tfile = (obj.get("audio_file") or "").strip(), (obj.get("transcript_file") or "").strip()
    if not audio:
        raise schema_reject("audio_file", f"{where} has no audio_file; give the clip's path (relative to {folder})")
    if not tfile:
        raise schema_reject("transcript_file", f"{where} has no transcript_file; give the path of a text file holding "
                      f"the transcript (relative to {folder})")
    tpath = Path(tfile) if os.path.isabs(tfile) else folder / tfile
    try:
        text = tpath.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise Reject("missing_file", f"{where}.transcript_file {tfile!r} not found ({tpath}); add the file or fix "
                     "the path", field="transcript_file") from None
    except UnicodeDecodeError:
        raise schema_reject("transcript_file", f"{where}.transcript_file {tpath} is not UTF-8; re-save it as UTF-8") from None
    except OSError as exc:
        raise Reject("missing_file", f"{where}.transcript_file {tpath} cannot be read ({exc})",
                     field="transcript_file") from None
    ref_audio, ref_text = (obj.get("ref_audio_file") or "").strip(), obj.get("ref_transcript") or ""
    if bool(ref_audio) != bool(ref_text.strip()):
        which = "ref_transcript" if ref_audio else "ref_audio_file"
        raise schema_reject(which, f"{where}: voice cloning needs both ref_audio_file and ref_transcript; {which} is "
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
