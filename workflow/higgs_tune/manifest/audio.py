"""Audio of a row: paths resolved (and confined to ``data.data_root``), each clip probed once,
base64 ``raw_audio`` extracted; the audio files a manifest references (for DVC)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from ..audio_io import AudioDecodeError, audio_sha256, load_audio
from .chatml import audio_refs, add_fix, schema_reject, normalize_structure
from .readers import detect_format, manifest_folder, read_rows
from .rows import Reject, WINDOWS_ABSOLUTE


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
        raise schema_reject(f"{where}.audio_url", f"{orig!r} is a remote URL; download it and point audio_url at the file")
    if WINDOWS_ABSOLUTE.match(url):
        if root is None:
            raise Reject("missing_file", f"{where}.audio_url {orig!r} is an absolute Windows path from another "
                         "machine; make it relative to the manifest folder or absolute on this machine", field=where)
        raise Reject("path_escapes_root", f"{where}.audio_url {orig!r} is an absolute Windows path from another "
                     f"machine; make it relative to the manifest folder or to data_root {root}", field=where)
    if "\\" in url:
        url = url.replace("\\", "/")
        add_fix(fixes, "windows_path", where, f"{orig!r} -> {url!r}")
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
                add_fix(fixes, "path_resolved", where, f"{orig!r} -> {lex!r}")
            return lex
    if not tried:
        raise Reject("path_escapes_root", f"{where}.audio_url {orig!r} resolves outside data_root {root}; "
                     "move the audio under data_root (or set data.data_root: null) and use a path inside it",
                     field=where)
    raise Reject("missing_file", f"{where}.audio_url {orig!r} not found (tried {', '.join(tried)}); fix the path "
                 "or add the file", field=where)


def data_root(data: dict[str, Any]) -> Path | None:
    """``data.data_root`` as an absolute path, or ``None`` (the default: audio paths are not confined)."""
    root = data["data_root"]
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
    for src in read_rows(manifest, detect_format(manifest, data["format"])):
        if src.error:
            continue
        try:
            sample = normalize_structure(src.sample, [])
            for where, item in audio_refs(sample):
                if item.get("raw_audio") is None:
                    found.add(resolve_audio_path(item["audio_url"], manifest_dir, root, [], where))
        except Reject:
            continue
    return [Path(p) for p in sorted(found)]


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
