"""Generate ``dvc.yaml`` from the Snakemake graph: the chain is described once (the rules).

::

    python -m higgs_tune.dvc_stages                                   # refresh with the recorded arguments
    python -m higgs_tune.dvc_stages config/demo.yaml config/demo.yaml+my_data.yaml   # two experiments
    python -m higgs_tune.dvc_stages --profile profiles/slurm config/cluster.yaml     # on a cluster
    python -m higgs_tune.dvc_stages --check                           # exit 1 when the committed files are stale
    python -m higgs_tune.dvc_stages --list-stages demo                # the demo's stage names (for dvc commit)

Each positional argument is one experiment: the config files Snakemake gets for it, joined by ``+``
(``config/demo.yaml+my_data.yaml`` = ``--configfile config/demo.yaml my_data.yaml``).
Without arguments, the ones recorded in the existing ``dvc.yaml`` (its ``# generated-with:`` line)
are reused, else ``config/demo.yaml``.

For every experiment the Snakefile is planned with the Snakemake API's dry run (the whole DAG, as
``snakemake -n --forceall`` plans it; :func:`snakemake_graph`) and every job becomes one DVC stage
``<rule>-<experiment>`` (a job with other wildcards: their values appended, ``evaluate_step-<experiment>-<step>``):

* ``cmd`` runs that Snakemake rule for that experiment only:
  ``snakemake --profile ${profile} --configfile params/<exp>.yaml --allowed-rules R --forcerun R -- <output>``
  (a job of one shard, ``tokenize_shard``, is stage ``<rule>-<experiment>-<shard>``)
  (``profile`` is a ``vars`` entry: ``profiles/default``, or ``--profile profiles/slurm`` on a cluster).
* ``deps``: the rule's inputs, the audio the manifest references (for the job that reads the raw
  manifest and the jobs that open the clips, :data:`AUDIO_READERS`: the folders holding the
  referenced files, or the files themselves where a folder would hold the outputs), the rule's ``.smk`` file, and the code files its ``params.code`` hashes
  (:func:`higgs_tune.codesig.rule_files`: both come from the one table
  :data:`higgs_tune.codesig.RULE_MODULES`; the generator refuses a rule whose command runs a module the
  table does not name for it).
* ``params``: the config sections the rule passes (the keys of its ``params.cfg``), read from
  ``params/<exp>.yaml``: the experiment's merged, validated config (defaults filled), written by this
  command. The stages run Snakemake with that file, so what DVC records is what ran.
* ``outs``: the rule's outputs, all cached (``results/`` is git-ignored, so DVC's cache is where
  earlier versions live, and ``dvc metrics diff`` / ``dvc plots diff`` between commits read them
  there); ``eval/metrics.json`` (and each step's, ``eval/steps/N/metrics.json``), ``eval/selection.json`` and
  ``audit/summary.json`` are ``metrics``, the curves rule's
  ``train/curves.csv`` and ``train/val_curves.csv`` (``train/metrics.jsonl`` and
  ``val_metrics.jsonl`` as CSV: DVC does not read JSONL) are ``plots``, with top-level plot
  definitions ``loss-<experiment>`` and ``val_loss-<experiment>`` (x ``step``; y ``loss``,
  ``text_loss``, ``audio_loss``).

Errors: a missing config file, a config that fails the schema (Snakemake's message names the key),
an experiment named twice, a rule missing from ``RULE_MODULES`` or running a module it does not name,
outputs that are not the table of outputs' rows, or a job passed a config value the merged config does
not hold, exit with status 2 and the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import codesig

#: the line in dvc.yaml recording the generator's arguments (the refresh reuses them)
ARGS_MARK = "# generated-with:"
PARAMS_DIR = "params"
DEFAULT_EXPERIMENTS = ["config/demo.yaml"]
DEFAULT_PROFILE = "profiles/default"
#: named outputs that are DVC metrics: (rule, output name)
METRICS = {("evaluate", "metrics"), ("evaluate", "paired_summary"), ("evaluate_base", "metrics"), ("audit", "summary"),
           ("evaluate_step", "metrics"), ("evaluate_step", "paired_summary"), ("select", "selection")}
#: named outputs that are DVC plots -> the top-level plot definitions over them: (id, x, y columns).
#: DVC reads CSV, not JSONL: the curves rule writes train/metrics.jsonl and val_metrics.jsonl as CSV.
#: rules whose stage opens the clips themselves (beside the manifest's): tokenize encodes them,
#: evaluate (and evaluate_base) score the ground-truth and reference clips, the report embeds them; so a
#: changed clip names them in `dvc status` at once (audit and train read only codes: named once tokenize reran)
AUDIO_READERS = {"tokenize", "tokenize_shard", "evaluate", "evaluate_step", "evaluate_base", "report"}
PLOTS = {("curves", "train"): [("loss", "step", ["loss", "text_loss", "audio_loss"])],
         ("curves", "val"): [("val_loss", "step", ["loss", "text_loss", "audio_loss"])]}


class _Dumper(yaml.SafeDumper):
    """Plain YAML: no anchors/aliases for repeated lists."""

    def ignore_aliases(self, data):
        return True


def _dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=200, allow_unicode=True)


class GeneratorError(RuntimeError):
    """The graph cannot be written as DVC stages (the message says why and what to do)."""


@dataclass
class Job:
    """One Snakemake job as the generator needs it (paths as Snakemake renders them)."""

    rule: str
    rule_file: Path
    inputs: dict[str, str]
    outputs: dict[str, str]  # output name (the rule's key in the table of outputs) -> path
    cfg_keys: list[str]
    doc: str = ""
    wildcards: dict[str, str] = field(default_factory=dict)  # the job's wildcards but {experiment} (e.g. step)


@dataclass
class Experiment:
    """One experiment: its config files (as given), merged config and jobs."""

    configfiles: list[str]
    config: dict[str, Any]
    jobs: list[Job] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config["experiment"]


# ------------------------------------------------------------------------------------ the graph
def snakemake_graph(root: Path, configfiles: list[str]) -> Experiment:
    """Evaluate ``root/Snakefile`` with ``configfiles`` (Snakemake API, in process) and return the
    experiment's merged config and every job of its full DAG (``--forceall``), upstream first.

    Everything comes from documented interfaces, none from Snakemake's internals:

    * the jobs: the API's dry run
      (``SnakemakeApi().workflow().dag(DAGSettings(forceall=True)).execute_workflow(executor="dryrun")``,
      i.e. ``snakemake -n --forceall``) logs one ``job_info`` event per planned job, with the fields the
      logger-plugin interface documents for it (``jobid``, ``rule_name``, ``wildcards``, ``input``,
      ``output``, ``shellcmd``: the rendered command). A job's config sections are the ``--config-json``
      its rendered command passes.
    * the merged config: :func:`merged_config`, Snakemake's merge of the Snakefile's ``configfile:`` and
      ``configfiles``, validated as ``common.smk`` validates it; checked against every section a job passes
      (:func:`check_config`), so it is what the jobs run with.
    * each rule's ``.smk`` file and docstring: its declaration in the sources (:func:`rule_declarations`);
      its output names: the table of outputs (:func:`higgs_tune.outputs.of_rule`), in the order the rule
      declares them (``output: **rule_outputs(rule)``); its code: :data:`higgs_tune.codesig.RULE_MODULES`,
      the table its ``params.code`` (``rule_code(rule)``) is computed from.

    Raises:
        GeneratorError: the Snakefile or config does not evaluate (Snakemake's message included), or
            what the jobs were passed disagrees with the merged config.
    """
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, DAGSettings, ExecutionSettings, OutputSettings,
                                          Quietness, ResourceSettings)

    cwd = os.getcwd()
    files = [Path(os.path.abspath(f)) for f in configfiles]
    for f in files:
        if not f.is_file():
            raise GeneratorError(f"config file {f} does not exist (experiment {'+'.join(configfiles)})")
    events = _JobEvents()
    sm_logger = logging.getLogger("snakemake")
    sm_logger.addHandler(events)
    try:
        config = merged_config(root, files)
        if config.get("sweep"):
            raise GeneratorError(f"{'+'.join(configfiles)} declares a sweep ({config['sweep']['name']!r}): a DVC "
                                 "experiment is one config; pass each run as its own argument, its config files "
                                 "joined by '+' with an overlay giving it its own `experiment:`")
        with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            wapi = api.workflow(resource_settings=ResourceSettings(cores=1),
                                config_settings=ConfigSettings(configfiles=files),
                                snakefile=root / "Snakefile", workdir=root)
            # a dry run takes no lock and plans over incomplete outputs (a killed job's) like --forceall
            wapi.dag(DAGSettings(forceall=True)).execute_workflow(
                executor="dryrun", execution_settings=ExecutionSettings(lock=False, ignore_incomplete=True))
        declared = rule_declarations(root)
        # in job id order (Snakemake numbers the jobs as it builds the DAG): the tie order below
        jobs = [_job(ev, declared, config) for ev in sorted(events.jobs, key=lambda e: e["jobid"]) if ev["output"]]
    except GeneratorError:
        raise
    except Exception as exc:  # WorkflowError, validation errors, ...
        raise GeneratorError(f"Snakemake could not evaluate {root / 'Snakefile'} with {' '.join(configfiles)}: "
                             f"{exc}") from exc
    finally:
        sm_logger.removeHandler(events)
        os.chdir(cwd)
    # depth first, then shard, then job id (list.sort empties the list while it sorts: the depths are computed before)
    depth = {id(j): _order(j, jobs) for j in jobs}
    jobs.sort(key=lambda j: (depth[id(j)], int(j.wildcards.get("shard", -1))))
    return Experiment(configfiles=list(configfiles), config=config, jobs=jobs)


def merged_config(root: Path, configfiles: list[Path]) -> dict[str, Any]:
    """The config Snakemake runs ``root/Snakefile`` with under ``--configfile configfiles``: the
    Snakefile's own ``configfile:`` files, then ``configfiles``, merged key by key (later files win), then
    validated against the schema with its defaults filled (:func:`higgs_tune.config.load_config`, the
    validator ``common.smk`` calls); as plain JSON values. Like Snakemake, a ``configfile:`` that does
    not exist is skipped when ``configfiles`` are given. The ``configfile:`` directives are read as the
    Snakefile writes them: a quoted path at the start of a line.

    Raises:
        snakemake.exceptions.WorkflowError: the merged config fails the schema (naming the key).
        GeneratorError: a ``configfile:`` of the Snakefile is missing and no ``configfiles`` are given.
    """
    from .config import load_config

    text = (root / "Snakefile").read_text()
    own = [root / m for m in re.findall(r"""^configfile:\s*["']([^"']+)["']""", text, flags=re.M)]
    missing = [f for f in own if not f.is_file()]
    if missing and not configfiles:
        raise GeneratorError(f"the Snakefile's configfile {missing[0]} does not exist; create it or pass config files")
    return json.loads(json.dumps(load_config([f for f in own if f.is_file()] + list(configfiles))))


def rule_declarations(root: Path) -> dict[str, tuple[Path, str]]:
    """``rule name -> (the file declaring it, its docstring)`` from ``root/Snakefile`` and the files it
    ``include:``s (quoted paths relative to it, as Snakemake resolves them): each ``rule NAME:`` (or
    ``checkpoint NAME:``) line, indented or not, and the triple-quoted string (either quote, optionally
    ``r``/``u``-prefixed) that opens its body after any blank or comment lines ("" without one).

    Raises:
        GeneratorError: a rule declared twice, or an included file that does not exist.
    """
    snakefile = root / "Snakefile"
    files = [snakefile]
    for inc in re.findall(r"""^include:\s*["']([^"']+)["']""", snakefile.read_text(), flags=re.M):
        f = snakefile.parent / inc
        if not f.is_file():
            raise GeneratorError(f"{snakefile} includes {inc}, which does not exist")
        files.append(f)
    decl = re.compile(r'^[ \t]*(?:rule|checkpoint)[ \t]+(\w+)[ \t]*:[^\n]*\n'
                      r'(?:[ \t]*(?:#[^\n]*)?\n)*'  # blank or comment lines
                      r'(?:[ \t]+[rRuU]?(?:"{3}(.*?)"{3}|\'{3}(.*?)\'{3}))?', flags=re.M | re.S)
    out: dict[str, tuple[Path, str]] = {}
    for f in files:
        for m in decl.finditer(f.read_text()):
            if m.group(1) in out:
                raise GeneratorError(f"rule {m.group(1)!r} is declared in both {out[m.group(1)][0]} and {f}")
            out[m.group(1)] = (f, m.group(2) or m.group(3) or "")
    return out


def check_config(job: str, passed: dict[str, Any], config: dict[str, Any]) -> None:
    """Every section (or, for a section passed in part, every key) ``job``'s ``--config-json`` passes
    equals the merged config's.

    Raises:
        GeneratorError: naming the first key that differs (the params file would not be what ran).
    """
    for key, value in passed.items():
        full = config.get(key)
        pairs = ([(f"{key}.{k}", v, full.get(k)) for k, v in value.items()]
                 if isinstance(value, dict) and isinstance(full, dict) else [(key, value, full)])
        for name, got, want in pairs:
            if got != want:
                raise GeneratorError(f"job {job}: Snakemake passes {name}={got!r}, the merged config has {want!r}, so "
                                     "the params file would not be what ran: the rules must pass the validated "
                                     "config as it is (common.smk must not change `config` after validate())")


class _JobEvents(logging.Handler):
    """Collects the ``job_info`` events of a dry run (one per planned job): the fields Snakemake's
    logger-plugin interface documents for that event, as plain values."""

    FIELDS = ("jobid", "rule_name", "input", "output", "wildcards", "shellcmd")

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.jobs: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(getattr(record, "event", "")) == "job_info":
            self.jobs.append({k: getattr(record, k, None) for k in self.FIELDS})


def _job(event: dict[str, Any], declared: dict[str, tuple[Path, str]], config: dict) -> Job:
    """A :class:`Job` from a dry run's ``job_info`` event and the rules' declarations.

    Raises:
        GeneratorError: a file is annotated in the event (Snakemake marks pipe/service/storage files
            ``path (pipe)``...): not a path a DVC stage can track; the rule is not declared in the
            sources, or not in the code table; its outputs are not the table of outputs' rows; or a
            section it is passed differs from the merged config (:func:`check_config`).
    """
    from .outputs import of_rule

    rule = event["rule_name"]
    outputs = [str(o) for o in event["output"] or []]
    for p in [*outputs, *map(str, event["input"] or [])]:
        if p.endswith(")") and " (" in p:
            raise GeneratorError(f"rule {rule!r}: file {p!r} is annotated by Snakemake (pipe, service, "
                                 "storage, ...): a DVC stage tracks plain paths; declare it as a plain file")
    if rule not in declared:
        raise GeneratorError(f"rule {rule!r} is declared in neither Snakefile nor workflow/rules/*.smk")
    if rule not in codesig.RULE_MODULES:
        raise GeneratorError(f"rule {rule!r} is not in higgs_tune.codesig.RULE_MODULES: add the modules its "
                             "command runs, and give it `code=rule_code({rule!r})`")
    # the declared output names by position: the rule declares `output: **rule_outputs(rule)`; each path
    # must end with its row's path (wildcards filled), so that no two outputs can swap names
    rows = of_rule(rule)
    wildcards = {k: str(v) for k, v in (event["wildcards"] or {}).items()}
    names = [o.key for o in rows]
    if len(rows) != len(outputs) or any(not (p.rstrip("/") + "/").endswith("/" + o.path.format(**wildcards).rstrip("/") + "/")
                                        for o, p in zip(rows, outputs)):
        raise GeneratorError(f"rule {rule!r} writes {outputs}, not the rows of the table of outputs "
                             f"(higgs_tune/outputs.py: {[o.path for o in rows]}): declare "
                             f"`output: **rule_outputs({rule!r})`")
    shell = event["shellcmd"] or ""
    runs = set(re.findall(r"-m\s+higgs_tune\.(\w+)", shell)) - set(codesig.RULE_MODULES[rule])
    if runs:
        raise GeneratorError(f"rule {rule!r} runs higgs_tune.{', higgs_tune.'.join(sorted(runs))}, which "
                             f"higgs_tune.codesig.RULE_MODULES[{rule!r}] does not name: add it there, so that "
                             "editing it reruns the rule and its DVC stage")
    words = shlex.split(shell)
    passed = json.loads(words[words.index("--config-json") + 1]) if "--config-json" in words else None
    if passed is not None and wildcards.get("experiment") == config["experiment"]:
        check_config(f"{rule} {wildcards}", passed, config)
    rule_file, doc = declared[rule]
    return Job(rule=rule, rule_file=rule_file,
               inputs={f"_{i}": str(p) for i, p in enumerate(event["input"] or [])},
               outputs=dict(zip(names, outputs)),
               cfg_keys=param_keys(passed, config) if passed is not None else [],
               doc=doc.strip(),
               wildcards={k: v for k, v in wildcards.items() if k not in ("experiment", "nshards")})


def _order(job: Job, jobs: list[Job]) -> int:
    """Depth of ``job`` in the graph (0 = reads no other job's output): a stable stage order."""
    made = {o: j for j in jobs for o in j.outputs.values()}
    ups = [made[i] for i in job.inputs.values() if i in made]
    return 1 + max((_order(u, jobs) for u in ups), default=-1)


# ----------------------------------------------------------------------------------- the stages
def _rel(path: str | Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (POSIX), else absolute."""
    p = Path(os.path.abspath(root / path))
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def audio_deps(manifest: str, data: dict, root: Path, results_dir: Path) -> list[str]:
    """The audio the manifest references, as DVC deps: the folders holding the files (topmost
    only), or the files themselves where such a folder is the repo root or holds ``results_dir``
    (a dep may not contain the stage's outputs)."""
    from .manifest import referenced_audio

    files = referenced_audio(root / manifest, data)
    folders = {f.parent for f in files}
    folders = {d for d in folders if not any(o != d and o in d.parents for o in folders)}
    bad = {d for d in folders if d == root or d in results_dir.parents or d == results_dir}
    deps = sorted(_rel(d, root) for d in folders - bad)
    deps += sorted(_rel(f, root) for f in files if any(f.parent == d or d in f.parents for d in bad))
    return deps


def param_keys(passed: dict, config: dict) -> list[str]:
    """The DVC params of a rule whose ``params.cfg`` is ``passed``: each top-level key, or
    ``section.key`` for every key of a section the rule passes only in part (the train rule's
    ``train`` without its logging/eval/checkpoint keys), so DVC reruns a stage for what Snakemake
    reruns its rule for. Sorted."""
    keys = []
    for k, v in passed.items():
        full = config.get(k)
        if isinstance(v, dict) and isinstance(full, dict) and set(v) < set(full):
            keys += [f"{k}.{sub}" for sub in v]
        else:
            keys.append(k)
    return sorted(keys)


def experiment_stages(exp: Experiment, root: Path) -> tuple[dict[str, dict], list[dict], str, str]:
    """The DVC stages of one experiment, its top-level plot definitions, its params file path and
    that file's text.

    Raises:
        KeyError: a rule missing from ``higgs_tune.codesig.RULE_MODULES`` (:func:`snakemake_graph` checks).
    """
    name = exp.name
    params_file = f"{PARAMS_DIR}/{name}.yaml"
    params_text = (f"# GENERATED by python -m higgs_tune.dvc_stages from {' + '.join(exp.configfiles)}: the merged,\n"
                   f"# validated config of experiment {name!r}. DVC records its sections as the stages' params;\n"
                   "# the dvc.yaml stages run Snakemake with it. Do not edit: edit the config files and regenerate.\n"
                   + _dump(exp.config))
    pkg = root / "workflow" / "higgs_tune"
    results_dir = Path(os.path.abspath(root / exp.config["results_dir"]))
    made = {o for j in exp.jobs for o in j.outputs.values()}
    manifest = exp.config["data"]["manifest"]
    stages: dict[str, dict] = {}
    plot_defs: list[dict] = []
    for job in exp.jobs:
        deps = [_rel(p, root) for p in job.inputs.values()]
        reads_raw = not any(p in made for p in job.inputs.values())
        if (reads_raw and manifest in job.inputs.values()) or job.rule in AUDIO_READERS:
            deps += audio_deps(manifest, exp.config["data"], root, results_dir)
        deps.append(_rel(job.rule_file, root))
        deps += [_rel(f, root) for f in codesig.rule_files(job.rule, pkg=pkg)]
        deps = list(dict.fromkeys(deps))
        outs, metrics, plots = [], [], []
        for oname, path in job.outputs.items():
            entry = _rel(path, root)
            if (job.rule, oname) in METRICS:
                metrics.append(entry)
            elif (job.rule, oname) in PLOTS:
                plots.append(entry)
                for pid, x, ys in PLOTS[(job.rule, oname)]:
                    plot_defs.append({stage_name(pid, name): {"x": x, "y": {entry: ys}}})
            else:
                outs.append(entry)
        target = _rel(next(iter(job.outputs.values())), root)
        stage: dict[str, Any] = {
            "desc": f"Snakemake rule {job.rule}, experiment {name}" + (f": {_first_sentence(job.doc)}" if job.doc else ""),
            "meta": {"rule": job.rule, "experiment": name, "configfiles": exp.configfiles, "params_file": params_file},
            "cmd": (f"snakemake --profile ${{profile}} --configfile {shlex.quote(params_file)} --allowed-rules "
                    f"{job.rule} --forcerun {job.rule} -- {shlex.quote(target)}"),
            "deps": deps,
        }
        if job.cfg_keys:
            stage["params"] = [{params_file: job.cfg_keys}]
        stage["outs"] = outs
        if metrics:
            stage["metrics"] = metrics
        if plots:
            stage["plots"] = plots
        stages[stage_name(job.rule, name, job.wildcards)] = stage
    return stages, plot_defs, params_file, params_text


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.split())
    return text.split(". ", 1)[0].rstrip(".") + "."


def stage_name(rule: str, experiment: str, wildcards: dict[str, str] | None = None) -> str:
    """``<rule>-<experiment>``, then the job's other wildcard values (one stage per job:
    ``evaluate_step-demo-4``); DVC stage names allow only letters, digits, ``_`` and ``-``: ``.`` -> ``_``."""
    return "-".join([rule, experiment.replace(".", "_"), *(str(v).replace(".", "_") for v in (wildcards or {}).values())])


def generate(root: Path, experiments: list[str], profile: str = DEFAULT_PROFILE) -> dict[str, str]:
    """``{relative path: text}`` of ``dvc.yaml`` and one ``params/<experiment>.yaml`` per experiment.

    Args:
        root: the repository root (holds ``Snakefile``).
        experiments: one entry per experiment, config files joined by ``+``.
        profile: the Snakemake profile the stages run with (the ``profile`` var).

    Raises:
        GeneratorError: see the module docstring.
    """
    root = Path(os.path.abspath(root))
    files: dict[str, str] = {}
    stages: dict[str, dict] = {}
    plot_defs: list[dict] = []
    seen: dict[str, str] = {}
    for spec in experiments:
        exp = snakemake_graph(root, [f for f in spec.split("+") if f])
        if exp.name in seen:
            raise GeneratorError(f"experiment {exp.name!r} comes from both {seen[exp.name]} and {spec}; give each "
                                 "overlay its own `experiment:`")
        seen[exp.name] = spec
        exp_stages, exp_plots, params_file, params_text = experiment_stages(exp, root)
        clash = set(exp_stages) & set(stages)
        if clash:
            raise GeneratorError(f"stage names {sorted(clash)} repeat (experiment names differing only in '.'/'_')")
        stages.update(exp_stages)
        plot_defs += exp_plots
        files[params_file] = params_text
    args = " ".join(shlex.quote(a) for a in ["--profile", profile, *experiments])
    header = (
        "# GENERATED from the Snakemake graph by `python -m higgs_tune.dvc_stages` (make dvc.yaml): do not edit.\n"
        "# Each stage runs one Snakemake rule for one experiment; tests/test_dvc.py fails when this file is stale.\n"
        "# Reproduce: dvc repro (all) or dvc repro --glob '*-<experiment>'; lineage: python -m higgs_tune.lineage PATH\n"
        f"{ARGS_MARK} {args}\n")
    body = _dump({"vars": [{"profile": profile}], "stages": stages, "plots": plot_defs})
    files["dvc.yaml"] = header + body
    return files


def recorded_args(dvc_yaml: Path) -> list[str] | None:
    """The generator arguments recorded in an existing ``dvc.yaml`` (``None`` if absent)."""
    if not dvc_yaml.is_file():
        return None
    for line in dvc_yaml.read_text().splitlines():
        if line.startswith(ARGS_MARK):
            return shlex.split(line[len(ARGS_MARK):])
    return None


def experiment_stage_names(dvc_yaml: Path, experiment: str) -> list[str]:
    """Stage names of ``experiment`` in an existing ``dvc.yaml`` (its ``meta.experiment``), in file
    order; ``[]`` when there is none (or no file)."""
    if not dvc_yaml.is_file():
        return []
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    return [name for name, st in stages.items() if (st.get("meta") or {}).get("experiment") == experiment]


def stale(root: Path, files: dict[str, str]) -> list[str]:
    """Paths (relative to ``root``) whose committed text differs from ``files``, plus generated
    params files no experiment produces any more."""
    out = [rel for rel, text in files.items() if not (root / rel).is_file() or (root / rel).read_text() != text]
    for p in sorted((root / PARAMS_DIR).glob("*.yaml")):
        rel = p.relative_to(root).as_posix()
        if rel not in files and p.read_text().startswith("# GENERATED by python -m higgs_tune.dvc_stages"):
            out.append(rel + " (no experiment produces it)")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 written / up to date, 1 stale (``--check``), 2 cannot generate."""
    parser = argparse.ArgumentParser(prog="python -m higgs_tune.dvc_stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="*", help="config files of one experiment joined by '+' "
                        "(default: those recorded in dvc.yaml, else config/demo.yaml)")
    parser.add_argument("--profile", default=None, help=f"Snakemake profile the stages run with (default: recorded, "
                        f"else {DEFAULT_PROFILE}; profiles/slurm on a cluster)")
    parser.add_argument("--root", default=".", help="repository root (holds Snakefile, dvc.yaml); default: .")
    parser.add_argument("--out", default=None, help="write the files under this folder instead of --root")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming the stale files")
    parser.add_argument("--list-stages", metavar="EXPERIMENT", default=None,
                        help="print the stage names of EXPERIMENT in the existing dvc.yaml (one a line) and exit")
    args = parser.parse_args(argv)
    root = Path(os.path.abspath(args.root))
    if args.list_stages is not None:
        names = experiment_stage_names(root / "dvc.yaml", args.list_stages)
        if not names:
            print(f"error: {root / 'dvc.yaml'} has no stage of experiment {args.list_stages!r}; add the experiment "
                  "(python -m higgs_tune.dvc_stages config/demo.yaml ... <its config files joined by +>)",
                  file=sys.stderr)
            return 2
        print("\n".join(names))
        return 0
    if not (root / "Snakefile").is_file():
        print(f"error: {root} has no Snakefile; run from the repository root or pass --root", file=sys.stderr)
        return 2
    recorded = recorded_args(root / "dvc.yaml") or []
    rec = argparse.ArgumentParser(add_help=False)
    rec.add_argument("experiments", nargs="*")
    rec.add_argument("--profile", default=None)
    rec_args = rec.parse_args(recorded)
    experiments = args.experiments or rec_args.experiments or DEFAULT_EXPERIMENTS
    profile = args.profile or rec_args.profile or DEFAULT_PROFILE
    try:
        files = generate(root, experiments, profile)
    except GeneratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        bad = stale(root, files)
        if bad:
            print("stale (regenerate with `make dvc.yaml` or `python -m higgs_tune.dvc_stages`, then commit): "
                  + ", ".join(bad), file=sys.stderr)
            return 1
        print("dvc.yaml and params files are up to date with the Snakemake graph")
        return 0
    out = Path(args.out) if args.out else root
    for rel, text in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    if out == root:
        for rel in stale(root, files):
            if rel.endswith(" (no experiment produces it)"):
                (root / rel.split(" ", 1)[0]).unlink()
    print("wrote " + ", ".join(str(out / rel) for rel in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
