"""Which data, config and code produced a result: read back from ``dvc.yaml`` and ``dvc.lock``.

::

    python -m higgs_tune.lineage results/demo/train/adapter          # the chain, as text
    python -m higgs_tune.lineage results/demo/eval/metrics.json --json

For the stage that wrote ``PATH`` (an output, a metrics or plots file, or a file inside an output
folder) and, recursively, every stage upstream of it, prints:

* the stage (``<rule>-<experiment>``), the Snakemake rule and experiment, its command;
* its outputs, each with its role (:data:`higgs_tune.outputs.OUTPUTS`, the table of outputs) and the
  content hash DVC recorded (``md5``; folders: ``<md5>.dir`` with file count; the report and the
  comparison name their inputs by the same hashes);
* its dependencies with their recorded hashes, grouped: ``data`` (the manifest, the audio folders
  or files, other inputs), ``upstream`` (outputs of another stage, named), ``code`` (the rule file and
  the ``higgs_tune`` modules its code trigger hashes);
* its config sections (``params``): the recorded values and a sha256 of each (canonical JSON, first
  12 hex digits, as the comparison shows them; the same value gives the same hash in every experiment);
* the code revision: the git commit checked out, the last commit that changed ``dvc.lock``, and
  whether ``dvc.lock``, ``dvc.yaml``, ``params/`` or ``workflow/`` differ from it;
* whether the workspace still matches the record (DVC's own ``status`` of the stage and upstream).

The hashes are read from ``dvc.lock`` (the ones ``dvc status`` compares against). Where there is no
``dvc.lock``, or it has no entry for a stage (never run by ``dvc repro`` nor recorded by ``make
demo``'s ``dvc commit``), the output says so and lists the declared dependencies without hashes.

Exit status: 0, or 2 when ``PATH`` is written by no stage of ``dvc.yaml`` (the message lists the
experiments' output folders) or there is no ``dvc.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from higgs_tune.fileio import SHORT_HASH, canonical_sha256
from higgs_tune.outputs import role_of


class LineageError(RuntimeError):
    """The path cannot be traced (no dvc.yaml, or no stage writes it)."""


def _entries(stage: dict, key: str) -> list[str]:
    """Paths of a dvc.yaml stage's ``deps``/``outs``/``metrics``/``plots`` (entries may be ``{path: opts}``)."""
    out = []
    for e in stage.get(key) or []:
        out.append(next(iter(e)) if isinstance(e, dict) else str(e))
    return out


def _outputs(stage: dict) -> list[str]:
    return _entries(stage, "outs") + _entries(stage, "metrics") + _entries(stage, "plots")


def value_hash(value: Any) -> str:
    """sha256 (first :data:`~higgs_tune.fileio.SHORT_HASH` hex digits) of ``value`` as canonical JSON
    (:func:`higgs_tune.fileio.canonical_sha256`: the comparison's config-section hashes are the same)."""
    return canonical_sha256(value, SHORT_HASH)


def _rel(path: str, root: Path) -> str:
    p = Path(os.path.abspath(path))
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def _git(root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.rstrip() if res.returncode == 0 else None


def code_revision(root: Path) -> dict[str, Any]:
    """``{"head", "lock_commit", "modified"}``: the checked-out commit, the last commit touching
    ``dvc.lock``, and the files of ``dvc.lock``/``dvc.yaml``/``params``/``workflow``/``config`` that
    differ from HEAD (``None`` values where git is unavailable)."""
    head = (_git(root, "rev-parse", "HEAD") or "").strip() or None
    lock_commit = (_git(root, "log", "-1", "--format=%H", "--", "dvc.lock") or "").strip() or None
    status = _git(root, "status", "--porcelain", "--", "dvc.lock", "dvc.yaml", "params", "workflow", "config")
    modified = [line[3:] for line in status.splitlines()] if status else ([] if status is not None else None)
    return {"head": head, "lock_commit": lock_commit, "modified": modified}


_MISSING = object()


def _dotted(tree: dict, key: str):
    """``tree["train"]["max_steps"]`` for ``key="train.max_steps"`` (DVC's dotted param keys); ``_MISSING`` if absent."""
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _hash_of(rec: dict | None) -> dict[str, Any] | None:
    if not rec:
        return None
    out = {"md5": rec.get("md5")}
    for k in ("size", "nfiles"):
        if k in rec:
            out[k] = rec[k]
    return out


class Lineage:
    """``dvc.yaml`` and ``dvc.lock`` of a repository, indexed by output path."""

    def __init__(self, root: str | Path = "."):
        self.root = Path(os.path.abspath(root))
        dvc_yaml = self.root / "dvc.yaml"
        if not dvc_yaml.is_file():
            raise LineageError(f"{dvc_yaml} does not exist; generate it with `make dvc.yaml` "
                               "(python -m higgs_tune.dvc_stages)")
        doc = yaml.safe_load(dvc_yaml.read_text()) or {}
        self.stages: dict[str, dict] = doc.get("stages") or {}
        self.vars: dict[str, Any] = {}
        for v in doc.get("vars") or []:
            if isinstance(v, dict):
                self.vars.update(v)
        lock = self.root / "dvc.lock"
        self.lock_exists = lock.is_file()
        self.lock: dict[str, dict] = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if self.lock_exists else {}
        self.writer = {out: name for name, st in self.stages.items() for out in _outputs(st)}

    def stage_of(self, path: str | Path) -> tuple[str, str]:
        """``(stage name, output path)`` of the output that is ``path`` or holds it.

        Raises:
            LineageError: no stage writes it.
        """
        rel = _rel(str(path), self.root)
        for out, name in self.writer.items():
            if rel == out or rel.startswith(out.rstrip("/") + "/"):
                return name, out
        folders = sorted({str(Path(o).parent.parent) if o.count("/") > 1 else o for o in self.writer})
        raise LineageError(f"no stage of {self.root / 'dvc.yaml'} writes {rel}; outputs lie under "
                           f"{', '.join(folders[:8])}. Pass an output file or folder (e.g. results/<experiment>/"
                           "train/adapter); regenerate dvc.yaml if this experiment is missing")

    def stage(self, name: str) -> dict[str, Any]:
        """Everything recorded about one stage (see the module docstring); no recursion."""
        st = self.stages[name]
        rec = self.lock.get(name)
        deps_rec = {d["path"]: d for d in (rec or {}).get("deps", [])}
        outs_rec = {o["path"]: o for o in (rec or {}).get("outs", [])}
        meta = st.get("meta") or {}
        cmd = str(st.get("cmd", ""))
        for k, v in self.vars.items():
            cmd = cmd.replace("${" + k + "}", str(v))
        deps: dict[str, list[dict]] = {"data": [], "upstream": [], "code": []}
        for path in _entries(st, "deps"):
            entry = {"path": path, "hash": _hash_of(deps_rec.get(path))}
            if path in self.writer:
                deps["upstream"].append({**entry, "stage": self.writer[path]})
            elif path.startswith("workflow/"):
                deps["code"].append(entry)
            else:
                deps["data"].append(entry)
        params: dict[str, dict] = {}
        for item in st.get("params") or []:
            for pfile, keys in (item.items() if isinstance(item, dict) else [("params.yaml", [item])]):
                recorded = ((rec or {}).get("params") or {}).get(pfile, {})
                current = self._current_params(pfile)
                for key in keys:
                    value = recorded.get(key) if key in recorded else None
                    now = _dotted(current, key)
                    params[key] = {"file": pfile, "recorded": key in recorded, "value": value,
                                   "sha256": value_hash(value) if key in recorded else None,
                                   "matches_file": (key in recorded and now is not _MISSING
                                                    and value_hash(now) == value_hash(value))}
        return {
            "stage": name, "rule": meta.get("rule"), "experiment": meta.get("experiment"),
            "configfiles": meta.get("configfiles"), "cmd": cmd, "recorded": rec is not None,
            "outs": [{"path": p, "role": role_of(meta.get("rule") or "", p), "hash": _hash_of(outs_rec.get(p))}
                     for p in _outputs(st)],
            "deps": deps, "params": params,
        }

    def _current_params(self, pfile: str) -> dict:
        p = self.root / pfile
        try:
            return yaml.safe_load(p.read_text()) or {}
        except OSError:
            return {}

    def upstream(self, name: str) -> list[str]:
        """Stages whose outputs ``name`` reads, transitively, nearest first (each once)."""
        order, todo = [], [name]
        while todo:
            cur = todo.pop(0)
            for dep in _entries(self.stages[cur], "deps"):
                up = self.writer.get(dep)
                if up and up not in order and up != name:
                    order.append(up)
                    todo.append(up)
        return order

    def dvc_status(self, name: str) -> dict[str, Any] | None:
        """DVC's own ``status`` of ``name`` and its upstream stages (``{}`` = matches dvc.lock);
        ``None`` when DVC cannot be asked."""
        try:
            from dvc.repo import Repo
        except ImportError:
            return None
        cwd = os.getcwd()
        try:
            with Repo(str(self.root)) as repo:
                return repo.status(targets=[f"{self.root / 'dvc.yaml'}:{name}"], with_deps=True)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            os.chdir(cwd)

    def trace(self, path: str | Path, status: bool = True) -> dict[str, Any]:
        """The chain that produced ``path``: ``{"path", "output", "stage": {...}, "upstream": [{...}],
        "lock": "dvc.lock" or None, "git": {...}, "status": ...}``.

        Raises:
            LineageError: see :meth:`stage_of`.
        """
        name, out = self.stage_of(path)
        return {
            "path": _rel(str(path), self.root), "output": out,
            "lock": str(self.root / "dvc.lock") if self.lock_exists else None,
            "stage": self.stage(name), "upstream": [self.stage(u) for u in self.upstream(name)],
            "git": code_revision(self.root), "status": self.dvc_status(name) if status else None,
        }


def _fmt_hash(h: dict | None) -> str:
    if not h:
        return "(no hash recorded)"
    extra = ", ".join(f"{k} {h[k]}" for k in ("nfiles", "size") if k in h)
    return f"md5 {h['md5']}" + (f" ({extra})" if extra else "")


def format_text(t: dict[str, Any]) -> str:
    """The trace as readable text (what the CLI prints)."""
    lines = [f"{t['path']}"]
    if t["output"] != t["path"]:
        lines[0] += f"  (inside output {t['output']})"
    if t["lock"] is None:
        lines.append("NOTE: there is no dvc.lock: nothing has been recorded yet (run `dvc repro`, or `make demo`, "
                     "which records its run with `dvc commit`); declared dependencies follow, without hashes")

    def stage_block(s: dict, full: bool) -> None:
        lines.append(f"\nstage {s['stage']}  (Snakemake rule {s['rule']}, experiment {s['experiment']}, "
                     f"config {' + '.join(s['configfiles'] or [])})")
        if not s["recorded"] and t["lock"] is not None:
            lines.append("  NOTE: dvc.lock has no entry for this stage (never run by dvc repro / recorded by dvc commit)")
        if full:
            lines.append(f"  cmd: {s['cmd']}")
            lines.append("  outputs:")
            lines.extend(f"    {o['path']}" + (f"  [{o['role']}]" if o.get("role") else "") + f"  {_fmt_hash(o['hash'])}"
                         for o in s["outs"])
        lines.append("  data:")
        lines.extend([f"    {d['path']}  {_fmt_hash(d['hash'])}" for d in s["deps"]["data"]] or ["    (none)"])
        if s["deps"]["upstream"]:
            lines.append("  from upstream stages:")
            lines.extend(f"    {d['path']}  {_fmt_hash(d['hash'])}  <- {d['stage']}" for d in s["deps"]["upstream"])
        lines.append("  config sections:")
        for key, p in s["params"].items():
            if not p["recorded"]:
                lines.append(f"    {key}  (not recorded)  [{p['file']}]")
                continue
            flag = "" if p["matches_file"] else f"  (differs from {p['file']} now)"
            lines.append(f"    {key}  sha256 {p['sha256']}{flag}: {json.dumps(p['value'], sort_keys=True)}")
        lines.append("  code:")
        lines.extend(f"    {d['path']}  {_fmt_hash(d['hash'])}" for d in s["deps"]["code"])

    stage_block(t["stage"], True)
    for s in t["upstream"]:
        stage_block(s, False)
    g = t["git"]
    lines.append("\ncode revision:")
    if g["head"] is None:
        lines.append("  not a git checkout (git unavailable)")
    else:
        lines.append(f"  HEAD {g['head']}; dvc.lock last committed in {g['lock_commit'] or '(never committed)'}")
        if g["modified"]:
            lines.append(f"  uncommitted changes: {', '.join(g['modified'])}")
        else:
            lines.append("  no uncommitted changes to dvc.lock, dvc.yaml, params/, workflow/, config/")
    st = t["status"]
    if st is None:
        lines.append("workspace: not checked")
    elif "error" in st:
        lines.append(f"workspace: DVC status failed: {st['error']}")
    elif not st:
        lines.append("workspace: matches dvc.lock (dvc status: nothing changed)")
    else:
        lines.append("workspace: differs from dvc.lock (dvc status):")
        for name, changes in st.items():
            lines.append(f"  {name}: {json.dumps(changes, sort_keys=True)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; 0, or 2 when the path cannot be traced."""
    parser = argparse.ArgumentParser(prog="python -m higgs_tune.lineage", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="an output (file or folder) or a file inside one, e.g. results/demo/train/adapter")
    parser.add_argument("--root", default=".", help="repository root (holds dvc.yaml, dvc.lock); default: .")
    parser.add_argument("--json", action="store_true", help="print the trace as JSON")
    parser.add_argument("--no-status", action="store_true", help="skip DVC's workspace status check (faster)")
    args = parser.parse_args(argv)
    try:
        trace = Lineage(args.root).trace(args.path, status=not args.no_status)
    except LineageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        print(json.dumps(trace, indent=2, default=str) if args.json else format_text(trace))
    except BrokenPipeError:  # `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
