# Shared by every rule: config validation, where outputs live, what each job is passed, and the
# code trigger. The rules are the one I/O contract: a stage reads and writes exactly the paths its
# rule renders on its command line, and gets the config sections its rule names (nothing else).
#
# Experiments are a wildcard: every output of experiment E lies under results/E/ (OUT), and each
# job's config is E's (EXPERIMENTS[E]): the base experiment (config["experiment"]) and, with a
# `sweep:`, one experiment per run (higgs_tune.sweep.experiment_configs). A run reuses the base's
# outputs of every stage whose config sections (and its upstream stages') equal the base's
# (stage_owner): a learning-rate sweep shares one manifest, tokenize and audit.
import functools
import importlib.util
import json
import os
import re
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


envvars:
    "PATH",


validate(config, schema="../schemas/config.schema.yaml")

PKG = Path(workflow.basedir) / "workflow" / "higgs_tune"
sys.path.insert(0, str(PKG.parent))  # this checkout's higgs_tune, whatever the venv has installed
from higgs_tune import outputs as outputs_table  # noqa: E402
from higgs_tune.config import train_job_config  # noqa: E402
from higgs_tune.select import SelectionError, checkpoint_steps  # noqa: E402
from higgs_tune.sweep import experiment_configs, sweep_experiments  # noqa: E402

#: experiment name -> its resolved config (validated, defaults filled; no `sweep` key)
EXPERIMENTS = experiment_configs(config)
BASE = config["experiment"]
SWEEP = config.get("sweep")
#: the experiments the default target reports on: the sweep's runs, else the base experiment
TARGET_EXPERIMENTS = sweep_experiments(config)
RESULTS = Path(config["results_dir"])
#: every output of one experiment lies under OUT (the output contract in README.md)
OUT = RESULTS / "{experiment}"
LOGS = OUT / "logs"


def output_path(role):
    """OUT / the path of output ``role`` (the table of outputs: higgs_tune/outputs.py)."""
    return OUT / outputs_table.BY_ROLE[role].path


def rule_outputs(rule_name):
    """The named outputs of ``rule_name`` as the table of outputs (higgs_tune/outputs.py) lists them,
    ``{key: path}`` in its order, folders as ``directory()``: a rule's ``output: **rule_outputs(...)``."""
    return {o.key: directory(output_path(o.role)) if o.kind == "dir" else output_path(o.role)
            for o in outputs_table.of_rule(rule_name)}


wildcard_constraints:
    experiment="|".join(re.escape(e) for e in EXPERIMENTS),
    sweep="[A-Za-z0-9_.-]+",


# Rules call `python` / `accelerate`: use the interpreter running Snakemake (the project's .venv),
# and this checkout's higgs_tune package (not another checkout's editable install in a shared venv).
_venv_bin = str(Path(sys.executable).parent)
os.environ["PATH"] = _venv_bin + os.pathsep + os.getenv("PATH", "")
os.environ.update(PYTHONPATH=os.pathsep.join(
    [str(PKG.parent)] + [p for p in os.getenv("PYTHONPATH", "").split(os.pathsep) if p and p != str(PKG.parent)]))


def experiment_config(wildcards):
    """The resolved config of the job's ``{experiment}``."""
    return EXPERIMENTS[wildcards.experiment]


def stage_config(*keys, drop=None):
    """Params function: the named config sections (top-level keys; none: all of them) of the job's
    experiment as JSON: the rule's params (a change reruns the job: Snakemake's params trigger) and
    the stage's --config-json (it sees nothing else). ``drop``: ``{section: keys}`` left out of
    those sections (a change of them never reruns the job)."""

    def view(c):
        out = {k: c.get(k) for k in (keys or sorted(c))}
        for section, subkeys in (drop or {}).items():
            if isinstance(out.get(section), dict):
                out[section] = {k: v for k, v in out[section].items() if k not in subkeys}
        return out

    def cfg(wildcards):
        return json.dumps(view(experiment_config(wildcards)), sort_keys=True)

    cfg.sections = keys  # read by stage_owner
    if drop:
        cfg.view = view  # stage_owner compares this part of the sections
    return cfg


#: ``eval`` keys that choose among the scored checkpoints (which steps, by what metric): the rules that
#: evaluate never get them, so editing them reruns no generation (only `select` reads eval.select)
EVAL_CHOICE_KEYS = {"eval": ("checkpoints", "select")}


def scored_steps(experiment):
    """The steps ``evaluate_step`` scores for ``experiment`` (eval.checkpoints resolved against
    train.save_interval/max_steps: :func:`higgs_tune.select.checkpoint_steps`; the last step is the
    final adapter's, scored by ``evaluate``).

    Raises:
        WorkflowError: eval.checkpoints names no save step of the config, or is `every` without
            train.max_steps (the message names the keys).
    """
    try:
        return checkpoint_steps(EXPERIMENTS[experiment])
    except SelectionError as exc:
        raise WorkflowError(f"experiment {experiment}: {exc}") from exc


for _experiment in EXPERIMENTS:  # a bad eval.checkpoints fails when the workflow is planned
    scored_steps(_experiment)


class Untracked:
    """A param value the command line gets (``str``) but Snakemake does not record: it serializes
    only builtin values into its metadata, so a change of this one never reruns a job."""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


def train_config(wildcards):
    """The train rule's params.cfg (its rerun trigger): ``model``, ``lora`` and ``train`` without the
    logging/eval/checkpoint keys (higgs_tune.config.train_job_config). ``max_steps``/``epochs`` are
    in it: a change reruns the job, which continues from the latest checkpoint."""
    return json.dumps(train_job_config(experiment_config(wildcards))[0], sort_keys=True)


train_config.sections = ("model", "lora", "train")  # read by stage_owner
train_config.view = lambda c: train_job_config(c)[0]  # stage_owner compares this part of the sections


def train_monitor_config(wildcards):
    """The train rule's params.monitor: the logging/eval/checkpoint keys the trainer reads
    (``train.log_interval``... and ``eval.batch_size`` of the in-training val pass), :class:`Untracked`:
    editing them never reruns a train job; they apply the next time training runs."""
    return Untracked(json.dumps(train_job_config(experiment_config(wildcards))[1], sort_keys=True))


def resume_dir(wildcards):
    """Where training keeps the experiment's resume checkpoints: train.resume_dir/{experiment}. NOT a
    declared output (Snakemake deletes a job's outputs before rerunning it, and resuming must survive
    exactly that); see README "Training"."""
    return Path(experiment_config(wildcards)["train"]["resume_dir"]) / wildcards.experiment


@functools.cache
def stage_owner(experiment, rule_name):
    """The experiment whose ``rule_name`` outputs ``experiment`` reads: the base experiment
    when the rule's config sections (its params.cfg; the train rule: the part its params.cfg holds)
    and those of every rule upstream of it (its ``upstream`` inputs) are equal in both, else
    ``experiment`` itself. A rule passing every section
    (the report) is never shared."""
    if experiment == BASE:
        return BASE
    job_rule = workflow.get_rule(rule_name)
    sections = getattr(job_rule.params.cfg, "sections", ())
    view = getattr(job_rule.params.cfg, "view", None)  # the part of the sections the rule is rerun for
    if view is not None:
        differs = view(EXPERIMENTS[experiment]) != view(EXPERIMENTS[BASE])
    else:
        differs = any(EXPERIMENTS[experiment].get(k) != EXPERIMENTS[BASE].get(k) for k in sections)
    if not sections or differs:
        return experiment
    ups = {f.stage for f in job_rule.input if callable(f) and hasattr(f, "stage")}
    return BASE if all(stage_owner(experiment, u) == BASE for u in ups) else experiment


def upstream(rule_name, key):
    """Input function: output ``key`` of rule ``rule_name`` for the job's experiment, in the folder of
    the experiment that owns it (:func:`stage_owner`)."""

    def path(wildcards):
        pattern = getattr(getattr(rules, rule_name).output, key)
        return expand(pattern, experiment=stage_owner(wildcards.experiment, rule_name))[0]

    path.stage = rule_name  # read by stage_owner
    return path


def step_metrics(wildcards):
    """Input function: the metrics.json of every ``evaluate_step`` job of the experiment
    (:func:`scored_steps`), in the folder of the experiment that owns them (:func:`stage_owner`)."""
    owner = stage_owner(wildcards.experiment, "evaluate_step")
    return expand(rules.evaluate_step.output.metrics, experiment=owner, step=scored_steps(wildcards.experiment))


step_metrics.stage = "evaluate_step"  # read by stage_owner


def select_config(wildcards):
    """The select rule's params.cfg and --config-json: ``{"eval": {"select": ...}}``."""
    return json.dumps({"eval": {"select": experiment_config(wildcards)["eval"]["select"]}}, sort_keys=True)


select_config.sections = ("eval",)  # read by stage_owner
select_config.view = lambda c: c["eval"]["select"]


#: what the comparison reads of each run: role -> (rule, output key), from the table of outputs
#: (higgs_tune.outputs.COMPARE_ROLES)
COMPARE_ROLES = {r: (outputs_table.BY_ROLE[r].rule, outputs_table.BY_ROLE[r].key) for r in outputs_table.COMPARE_ROLES}


def report_inputs():
    """The report rule's named inputs but the data manifest: ``{role: upstream(rule, key)}`` for each
    role of higgs_tune.outputs.REPORT_ROLES, in that order."""
    return {r: upstream(outputs_table.BY_ROLE[r].rule, outputs_table.BY_ROLE[r].key)
            for r in outputs_table.REPORT_ROLES}


def role_args(roles, prefix=""):
    """``--input ROLE=PATH`` for each of ``roles`` (``{role: path}``), shell-quoted: the command line of
    a stage whose inputs are named roles (report; compare with ``prefix`` ``EXPERIMENT:``), as
    ``higgs_tune.stage_cli.input_roles`` reads it back."""
    return " ".join(f"--input {shlex.quote(f'{prefix}{role}={path}')}" for role, path in roles.items())


def sweep_inputs(wildcards):
    """{run experiment: {role: path}} for the sweep named ``{sweep}``: each run's data manifest and
    the :data:`COMPARE_ROLES` outputs, from the experiment that owns them (shared stages: the base).

    Raises:
        WorkflowError: no sweep of that name is declared in the config.
    """
    if not SWEEP or wildcards.sweep != SWEEP["name"]:
        raise WorkflowError(
            f"no sweep named {wildcards.sweep!r} in the config (declared: {SWEEP['name'] if SWEEP else 'none'}); "
            "declare `sweep: {name: ..., runs: {...}}` (README: Runs compared)")
    out = {}
    for exp in TARGET_EXPERIMENTS:
        wc = SimpleNamespace(experiment=exp)
        out[exp] = {outputs_table.DATA_MANIFEST_ROLE: EXPERIMENTS[exp]["data"]["manifest"]}
        out[exp].update({role: upstream(rule, key)(wc) for role, (rule, key) in COMPARE_ROLES.items()})
    return out


def sweep_config(wildcards):
    """The compare job's --config-json: the sweep (name, base experiment, each run's overlay, the
    runs' experiments in declared order), every run's resolved config, and the code signature of
    each stage (its part of the lineage)."""
    sweep_inputs(wildcards)  # raises for an undeclared sweep
    return json.dumps({"sweep": {"name": SWEEP["name"], "base": BASE, "runs": SWEEP["runs"],
                                 "order": TARGET_EXPERIMENTS},
                       "experiments": {e: EXPERIMENTS[e] for e in TARGET_EXPERIMENTS},
                       "code": {s: rule_code(s)
                                for s in ("manifest", "tokenize", "audit", "train", "evaluate_base", "evaluate")}},
                      sort_keys=True)


def processes_per_node(resources, cfg=None):
    """Training processes per node: the GPUs granted (``gpu``: GPUs of a one-node job; ``gres``
    ``gpu[:type]:N``: GPUs per node), else ``train.processes`` of ``cfg`` (default: the base
    config; CPU processes, gloo)."""
    gres = str(resources.get("gres", "") or "")
    if gres.startswith("gpu"):
        return int(gres.rsplit(":", 1)[-1]) if gres.count(":") else 1
    nodes = int(resources.get("nodes", 1) or 1)
    if resources.get("gpu"):
        return max(1, int(resources.get("gpu", 0) or 0) // nodes)
    return (cfg or config)["train"]["processes"]


def _load_codesig():
    """higgs_tune/codesig.py of this checkout, loaded by path (standard library only)."""
    spec = importlib.util.spec_from_file_location("_higgs_tune_codesig", PKG / "codesig.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_codesig = _load_codesig()


def rule_code(rule_name):
    """A rule's params.code: the sha256 of the source of its modules (higgs_tune.codesig.RULE_MODULES)
    and every higgs_tune module they import, transitively (and the files they read, e.g. the report
    template): editing any of them reruns the job (params trigger); undoing the edit makes it a no-op
    again. The generated dvc.yaml lists the same files as the stage's code dependencies."""
    return _codesig.rule_sig(rule_name, pkg=PKG)


#: experiments whose clips one tokenize job encodes (audio_tokenizer.shards: 1) / shard jobs and a gather
TOKENIZE_ONE_JOB = [e for e, c in EXPERIMENTS.items() if c["audio_tokenizer"]["shards"] == 1]
TOKENIZE_SHARDED = [e for e in EXPERIMENTS if e not in TOKENIZE_ONE_JOB]


def experiments_matching(names):
    """A wildcard constraint matching exactly these experiment names (none: nothing)."""
    return "|".join(re.escape(e) for e in names) or "(?!)"


def shard_arg(wildcards):
    """The tokenize_shard job's --shard value, ``{shard}``; its ``{nshards}`` must be the experiment's
    audio_tokenizer.shards (the shard a clip goes to depends on it)."""
    n = experiment_config(wildcards)["audio_tokenizer"]["shards"]
    if int(wildcards.nshards) != n or int(wildcards.shard) >= n:
        raise WorkflowError(f"tokens/shards/{wildcards.shard}-of-{wildcards.nshards}.parquet: experiment "
                            f"{wildcards.experiment} has audio_tokenizer.shards {n}: its shards are 0-of-{n} .. "
                            f"{n - 1}-of-{n}")
    return int(wildcards.shard)


def shard_outputs(key):
    """Input function of the gather: output ``key`` of every shard of the job's experiment, shard 0 first."""

    def paths(wildcards):
        n = experiment_config(wildcards)["audio_tokenizer"]["shards"]
        return expand(getattr(rules.tokenize_shard.output, key), experiment=wildcards.experiment, shard=range(n),
                      nshards=n)

    return paths
