# Shared by every rule: config validation, where outputs live, what each job is passed, and the
# code trigger. The rules are the one I/O contract: a stage reads and writes exactly the paths its
# rule renders on its command line, and gets the config sections its rule names (nothing else).
import importlib.util
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

# Rules call `python` / `accelerate`: use the interpreter running Snakemake (the project's .venv),
# and this checkout's higgs_tune package (not another checkout's editable install in a shared venv).
_venv_bin = str(Path(sys.executable).parent)
os.environ["PATH"] = _venv_bin + os.pathsep + os.getenv("PATH", "")
os.environ.update(PYTHONPATH=os.pathsep.join(
    [str(PKG.parent)] + [p for p in os.getenv("PYTHONPATH", "").split(os.pathsep) if p and p != str(PKG.parent)]))


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


def _load_codesig():
    """higgs_tune/codesig.py of this checkout, loaded by path (standard library only)."""
    spec = importlib.util.spec_from_file_location("_higgs_tune_codesig", PKG / "codesig.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_codesig = _load_codesig()


def code_sig(*modules):
    """sha256 of the source of ``modules`` and every higgs_tune module they import, transitively
    (and the files they read, e.g. the report template: ``higgs_tune.codesig``): editing any of
    them reruns the job (params trigger); undoing the edit makes it a no-op again. The generated
    dvc.yaml lists the same files as the stage's code dependencies."""
    return _codesig.code_sig(*modules, pkg=PKG)
