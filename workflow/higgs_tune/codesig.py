"""Which code a stage runs, and its hash: the code trigger of the Snakemake rules and the code
dependencies of the generated ``dvc.yaml``, computed one way for both.

A stage's code is its module (``higgs_tune/<name>.py`` or the package ``higgs_tune/<name>/``), every
``higgs_tune`` module it imports (anywhere in the file, lazy imports included), transitively, and the
non-Python files listed in :data:`DATA_FILES` for a module in that closure (the report template,
the manifest row schema).

Pure standard library: ``workflow/rules/common.smk`` loads this file by path, before any of the
package's heavy dependencies are importable.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

#: the higgs_tune package folder
PKG = Path(__file__).resolve().parent

#: rule -> the modules whose code is the rule's code trigger (its ``params.code``, :func:`rule_sig`) and
#: its DVC stage's code deps: the module its command runs (``python -m higgs_tune.X``) and, for train, the
#: launcher it runs through. The Snakemake rules, the compare's lineage and ``dvc_stages`` all read this.
RULE_MODULES: dict[str, tuple[str, ...]] = {
    "manifest": ("manifest",),
    "tokenize": ("audio_tokens",), "tokenize_shard": ("audio_tokens",), "tokenize_gather": ("audio_tokens",),
    "audit": ("audit",),
    "train": ("train", "launch"),
    "evaluate_base": ("evaluate_base",), "evaluate": ("evaluate",), "evaluate_step": ("evaluate",),
    "select": ("select",),
    "curves": ("curves",),
    "report": ("report",),
    "compare": ("compare",),
    "export_model": ("export",),
}

#: non-Python files a module reads at run time, relative to the package folder (folders: every file in them)
DATA_FILES: dict[str, tuple[str, ...]] = {"report": ("../report",), "manifest": ("../schemas/chatml_row.schema.yaml",)}


def _imports(path: Path) -> set[str]:
    """higgs_tune modules a module imports (anywhere in it, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level in (1, 2):  # from . import x / from .x import y; in a subpackage: from ..x import y
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif (node.module or "").startswith("higgs_tune."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("higgs_tune."))
    return found


def _module_files(name: str, pkg: Path) -> list[Path]:
    p = pkg / name
    if p.is_dir():
        return sorted(p.rglob("*.py"))
    return [pkg / f"{name}.py"] if (pkg / f"{name}.py").exists() else []


def _data_files(name: str, pkg: Path) -> list[Path]:
    out = []
    for rel in DATA_FILES.get(name, ()):
        p = (pkg / rel).resolve()
        out += sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts) if p.is_dir() else [p]
    return out


def modules(*names: str, pkg: Path = PKG) -> list[str]:
    """``names`` and every higgs_tune module they import, transitively (sorted)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for f in _module_files(name, pkg):
            todo.extend(_imports(f) - seen)
    return sorted(seen)


def code_files(*names: str, pkg: Path = PKG) -> list[Path]:
    """The files :func:`code_sig` hashes for ``names``: absolute paths, sorted, distinct.

    Raises:
        FileNotFoundError: a name in ``names`` is no module of ``pkg`` (a typo in a rule).
    """
    for name in names:
        if not _module_files(name, pkg):
            raise FileNotFoundError(f"higgs_tune has no module {name!r} ({pkg}/{name}.py or {pkg}/{name}/)")
    files = []
    for name in modules(*names, pkg=pkg):
        files += _module_files(name, pkg) + _data_files(name, pkg)
    return sorted(set(files))


def code_sig(*names: str, pkg: Path = PKG) -> str:
    """First 16 hex digits of the sha256 over :func:`code_files` (path relative to the package's
    parent, NUL, bytes): a rule's ``params.code``. Editing any of those files reruns the job;
    undoing the edit makes it a no-op again."""
    h = hashlib.sha256()
    for f in code_files(*names, pkg=pkg):
        h.update(f"{f.relative_to(pkg.parent).as_posix()}\0".encode() + f.read_bytes())
    return h.hexdigest()[:16]


def rule_sig(rule: str, pkg: Path = PKG) -> str:
    """:func:`code_sig` of ``rule``'s modules (:data:`RULE_MODULES`): the rule's ``params.code``.

    Raises:
        KeyError: ``rule`` is not in :data:`RULE_MODULES` (a new rule must be added there).
    """
    return code_sig(*RULE_MODULES[rule], pkg=pkg)


def rule_files(rule: str, pkg: Path = PKG) -> list[Path]:
    """:func:`code_files` of ``rule``'s modules (:data:`RULE_MODULES`): its DVC stage's code deps.

    Raises:
        KeyError: ``rule`` is not in :data:`RULE_MODULES`.
    """
    return code_files(*RULE_MODULES[rule], pkg=pkg)
