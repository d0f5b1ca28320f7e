# Shared by every stage: config validation, the output paths, and how stages get the config.
import hashlib
import json
import os
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from higgs_tune.config import ENV_VAR, Paths  # noqa: E402


envvars:
    "PATH",


validate(config, schema="../schemas/config.schema.yaml")
P = Paths(config)
LOGS = P.logs

# Stages (`python -m higgs_tune.<stage>`, the package installed by `make`) read Snakemake's merged
# config (all --configfile overlays) from this variable.
os.environ[ENV_VAR] = json.dumps(config)
# Rules call `python` / `accelerate`: use the interpreter running Snakemake (the project's .venv).
_venv_bin = str(Path(sys.executable).parent)
os.environ["PATH"] = _venv_bin + os.pathsep + os.getenv("PATH", "")


def section_sig(*sections):
    """Hash of the config sections a job depends on: a change reruns the job (params trigger)."""
    blob = json.dumps({s: config.get(s) for s in sections}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
