"""Small file I/O shared by every stage: JSON/JSONL, atomic writes, stale temp files, git revision,
and the project's two hash notions (one home each):

* content of a file or folder: :func:`dvc_md5`, the md5 DVC records in ``dvc.lock`` (so a hash the
  report or the comparison shows can be found in ``dvc.lock`` by eye);
* a value (a config section, a manifest row): :func:`canonical_sha256` of :func:`canonical_json`.

Shown shortened, hashes show :data:`SHORT_HASH` hex digits.

Named ``fileio``, not ``io``: no module of this project shadows the standard library.

Every writer here is atomic: it writes a temp file beside the target (named
``.<name>.<host>-<pid>.<random>.tmp``), fsyncs it and ``os.replace``-s it onto the target, so a
killed job leaves either the old file or the new one, never half of one. A temp file left by a
SIGKILL is removed by :func:`clean_stale_temps`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

TMP_SUFFIX = ".tmp"
#: A temp file older than this (seconds) is abandoned whoever wrote it (shared file systems).
STALE_TMP_S = 6 * 3600.0


def tmp_owner() -> str:
    """``<host>-<pid>`` of this process, as written into temp-file names."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename inside it survives a crash (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, prefix: str | None = None):
    """Yield a temp path beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    On any failure (or a kill before the replace) ``path`` is untouched and the temp file is removed
    (a SIGKILL can leave one, which :func:`clean_stale_temps` deletes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.{tmp_owner()}.", suffix=TMP_SUFFIX)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are shared (cluster groups, DVC)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def json_default(o: Any) -> Any:
    """``json.dumps`` fallback: tensors/arrays as lists, non-finite floats as null, sets/tuples as lists."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "as_dict"):
        return o.as_dict()
    return str(o)


def write_json(path: str | Path, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically (see :func:`json_default` for non-JSON values)."""
    write_text(path, json.dumps(obj, indent=indent, default=json_default, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (blank lines skipped).

    Raises:
        ValueError: naming the file and line of a row that is not JSON.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc.msg}); fix or remove that line") from exc
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write ``rows`` as JSONL atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=json_default) + "\n")


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one row to a JSONL file (flushed and fsynced: a row is either whole or absent after a kill)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False, default=json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


#: hex digits shown of a shortened hash (config hashes, the comparison's lineage cells)
SHORT_HASH = 12


def canonical_json(obj: Any) -> str:
    """``obj`` as canonical JSON: sorted keys, no spaces (``","``/``":"``), non-ASCII kept as is.

    The manifest's derived row ids hash exactly this text: never change its form.

    Raises:
        TypeError: ``obj`` holds a value JSON cannot represent.
    """
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def canonical_sha256(obj: Any, n: int | None = None) -> str:
    """sha256 hex of :func:`canonical_json` of ``obj`` (UTF-8), its first ``n`` digits (``None``: all 64).

    Raises:
        TypeError: as :func:`canonical_json`.
    """
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:n]


def dvc_md5(path: str | Path) -> dict[str, Any]:
    """The content hash DVC records for ``path`` in ``dvc.lock``, computed by DVC's own code
    (``dvc_data.hashfile.build``): a file: ``{"md5": <md5 of its bytes>, "size": bytes}``; a folder:
    ``{"md5": "<md5>.dir", "size": bytes of all files, "nfiles": n}``, the md5 of DVC's JSON list of
    ``{"md5", "relpath"}`` of every file under it (hidden ones too, e.g. Snakemake's
    ``.snakemake_timestamp``; the repository's ``.dvcignore`` names nothing under ``results/``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import MemoryFileSystem
    from dvc_objects.fs.local import LocalFileSystem

    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: nothing to hash")
    odb = HashFileDB(MemoryFileSystem(), "memory://higgs-tune-dvc-md5")  # staging only: nothing is stored
    _, meta, obj = build(odb, path, LocalFileSystem(), "md5", dry_run=True)
    out: dict[str, Any] = {"md5": obj.hash_info.value, "size": meta.size if meta.size is not None else
                           os.path.getsize(path)}
    if meta.isdir:
        out["nfiles"] = meta.nfiles
    return out


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clean_stale_temps(folder: str | Path) -> int:
    """Remove abandoned temp files (``.<name>.<host>-<pid>.<rand>.tmp``) in ``folder``; return how many.

    A temp file is abandoned when its writer ran on this host and that pid is gone (a killed run), or
    when it is older than :data:`STALE_TMP_S` (any host: shared file systems).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    host, removed, now = socket.gethostname().replace(".", "_"), 0, time.time()
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        parts = p.name.split(".")
        owner = parts[2] if len(parts) >= 4 else ""
        o_host, _, o_pid = owner.rpartition("-")
        dead = o_host == host and o_pid.isdigit() and not pid_alive(int(o_pid))
        try:
            old = now - p.stat().st_mtime > STALE_TMP_S
        except OSError:
            continue
        if dead or old:
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process on this host (a zombie, e.g. an unreaped killed writer, is not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: state field after the parenthesised command name
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def git_revision(cwd: str | Path | None = None) -> str:
    """``<sha>`` or ``<sha> (dirty)`` of the repository holding this package (or ``cwd``);
    ``unknown (...)`` with the reason when git or the repository is absent."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown (not a git repository)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + (" (dirty)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
