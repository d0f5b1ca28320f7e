# Shared by every rule: config validation, where outputs live, what each job is passed, and the
# code trigger. The rules are the one I/O contract: a stage reads and writes exactly the paths its
# rule renders on its command line, and gets the config sections its rule names (nothing else).
import ast
import hashlib
import json
import os
import sys
from pathlib import Path

from snakemake.utils import validate


envvars:
    "PATH",


validate(config, schema="../schemas/config.schema.yaml")

PKG = Path(workflow.basedir) / "workflow" / "higgs_tune"
#: every output of one experiment lies under OUT (the output contract in README.md)
OUT = Path(config["results_dir"]) / config["experiment"]
LOGS = OUT / "logs"
#: where training keeps its resume checkpoints: NOT a declared output (Snakemake deletes a job's
#: outputs before rerunning it, and resuming must survive exactly that); see README "Training".
RESUME = Path(config["train"]["resume_dir"]) / config["experiment"]

# Rules call `python` / `accelerate`: use the interpreter running Snakemake (the project's .venv).
_venv_bin = str(Path(sys.executable).parent)
os.environ["PATH"] = _venv_bin + os.pathsep + os.getenv("PATH", "")


def stage_config(*keys):
    """The named config sections (top-level keys) as JSON: the rule's params (a change reruns the
    job: Snakemake's params trigger) and the stage's --config-json (it sees nothing else)."""
    return json.dumps({k: config.get(k) for k in keys}, sort_keys=True)


def processes_per_node(resources):
    """Training processes per node: the GPUs granted (``gpu``: GPUs of a one-node job; ``gres``
    ``gpu[:type]:N``: GPUs per node), else ``train.processes`` (CPU processes, gloo)."""
    gres = str(resources.get("gres", "") or "")
    if gres.startswith("gpu"):
        return int(gres.rsplit(":", 1)[-1]) if gres.count(":") else 1
    nodes = int(resources.get("nodes", 1) or 1)
    return max(1, int(resources.get("gpu", 0) or 0) // nodes) if resources.get("gpu") else config["train"]["processes"]


def _imports(path):
    """higgs_tune modules a module imports (anywhere in it, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from . import x / from .x import y
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif node.level == 2:  # inside a subpackage: from ..x import y / from .. import x
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif (node.module or "").startswith("higgs_tune."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("higgs_tune."))
    return found


def _module_files(name):
    p = PKG / name
    return sorted(p.rglob("*.py")) if p.is_dir() else [PKG / f"{name}.py"] if (PKG / f"{name}.py").exists() else []


def code_sig(*modules):
    """sha256 of the source of ``modules`` and every higgs_tune module they import, transitively:
    editing any of them reruns the job (params trigger); undoing the edit makes it a no-op again."""
    seen, todo = set(), list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for f in _module_files(name):
            todo.extend(_imports(f) - seen)
    h = hashlib.sha256()
    for name in sorted(seen):
        for f in _module_files(name):
            h.update(f"{f.relative_to(PKG)}\0".encode() + f.read_bytes())
    return h.hexdigest()[:16]
