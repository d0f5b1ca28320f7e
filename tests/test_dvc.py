"""DVC over the Snakemake graph: dvc.yaml generated (and never stale), every output versioned, the
lineage of a result readable, and an overlay with only `experiment` and `data.manifest` running a
manifest kept outside the repository (relative and absolute audio paths).

The slow tests share one temporary repository (a copy of this working tree, its own git history and
DVC remote) and one experiment of 5 real LJSpeech clips trained for 2 steps: `make demo` runs it
(Snakemake, then `dvc commit`), a clip changes, `dvc repro` runs it again."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from higgs_tune import codesig, dvc_stages
from higgs_tune.lineage import value_hash

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLIPS = {"a": "LJ001-0008", "b": "LJ001-0002", "c": "LJ001-0013", "d": "LJ001-0011", "e": "LJ001-0020"}
CHEAP = {"train": {"max_steps": 2, "batch_size": 1, "grad_accum_steps": 1, "warmup_steps": 1, "eval_interval": 2,
                   "save_interval": 2, "predictions_interval": 2},
         "eval": {"generate": {"n_samples": 0}}, "audit": {"leak_probe_samples": 1}}


def env_for(repo: Path) -> dict:
    """The environment of a command run in ``repo``: that checkout's package first, the venv on PATH."""
    pkg = repo / "workflow" if (repo / "workflow" / "higgs_tune").is_dir() else ROOT / "workflow"
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(pkg), "PATH": f"{BIN}:{os.environ['PATH']}",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.org", "DVC_NO_ANALYTICS": "1"}


def sh(args: list[str], cwd: Path, ok: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, env=env_for(cwd), capture_output=True, text=True, timeout=timeout)
    if ok:
        assert res.returncode == 0, f"{' '.join(map(str, args))}: rc {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def generator(*args: str, root: Path = ROOT) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "higgs_tune.dvc_stages", "--root", str(root), *args], root, ok=False, timeout=300)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def lock_hashes(repo: Path) -> dict[str, str]:
    """path -> md5 of every out recorded in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for st in lock.values() for o in st.get("outs", [])}


# --------------------------------------------------------------------------------- generated, fast
def test_committed_dvc_yaml_is_generated_and_current(tmp_path):
    """dvc.yaml and params/*.yaml are exactly what the generator writes from the Snakemake graph
    now (with the arguments recorded in dvc.yaml): edit a rule, an import or a config and this fails
    until `make dvc.yaml` is run and committed."""
    recorded = dvc_stages.recorded_args(ROOT / "dvc.yaml")
    assert recorded and "config/demo.yaml" in recorded
    res = generator("--out", str(tmp_path), *recorded)
    assert res.returncode == 0, res.stderr
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert "dvc.yaml" in written and "params/demo.yaml" in written
    for rel in written:
        assert (ROOT / rel).read_text() == (tmp_path / rel).read_text(), (
            f"{rel} is stale: run `make dvc.yaml` (python -m higgs_tune.dvc_stages) and commit it")
    committed = {p.relative_to(ROOT).as_posix() for p in (ROOT / "params").glob("*.yaml")}
    assert committed <= set(written), f"params files no experiment produces: {committed - set(written)}"
    res = generator("--check")
    assert res.returncode == 0, res.stderr
    # the check names what is stale
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text().replace("--forcerun train", "--forcerun x"))
    files = {"dvc.yaml": (ROOT / "dvc.yaml").read_text(), "params/demo.yaml": (ROOT / "params/demo.yaml").read_text()}
    assert dvc_stages.stale(tmp_path, files) == ["dvc.yaml"]


#: rules defined in another rule's file
RULE_FILE = {"evaluate_base": "evaluate", "evaluate_step": "evaluate", "select": "evaluate", "export_model": "export",
             "tokenize_shard": "tokenize", "tokenize_gather": "tokenize"}


def test_stages_follow_the_rules():
    """Each stage runs its rule through Snakemake with the experiment's merged config; deps are the
    rule's inputs, the audio the manifest references, the rule file and exactly the code files its
    code trigger hashes; params are the config sections the rule passes; outputs are cached."""
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = doc["stages"]
    assert doc["vars"] == [{"profile": "profiles/default"}]
    assert set(stages) == {f"{r}-demo" for r in ("manifest", "tokenize", "audit", "train", "curves", "evaluate_base",
                                                  "evaluate", "select", "report")}
    params = yaml.safe_load((ROOT / "params/demo.yaml").read_text())
    demo = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
    assert params["data"]["manifest"] == demo["data"]["manifest"] and params["train"]["max_steps"] == 120
    assert params["audit"]["batch_size"] == 32  # defaults filled as Snakemake validates them
    pkg = ROOT / "workflow" / "higgs_tune"
    for name, st in stages.items():
        rule = st["meta"]["rule"]
        assert st["meta"]["experiment"] == "demo" and st["meta"]["params_file"] == "params/demo.yaml"
        assert st["cmd"].startswith("snakemake --profile ${profile} --configfile params/demo.yaml "
                                    f"--allowed-rules {rule} --forcerun {rule} -- results/demo/")
        assert f"workflow/rules/{RULE_FILE.get(rule, rule)}.smk" in st["deps"]
        modules = {"train": ("train", "launch"), "evaluate_step": ("evaluate",),
                   "tokenize": ("audio_tokens",)}.get(rule, (rule,))
        code = [d for d in st["deps"] if d.startswith("workflow/") and not d.endswith(".smk")]
        assert code == [f.relative_to(ROOT).as_posix() for f in codesig.code_files(*modules, pkg=pkg)], name
        for out in st["outs"] + st.get("metrics", []) + st.get("plots", []):
            assert isinstance(out, str) and out.startswith("results/demo/"), out  # cached (no cache: false)
    assert stages["manifest-demo"]["deps"][:2] == ["data/demo/manifest.jsonl", "data/ljspeech32/wavs"]
    assert stages["manifest-demo"]["params"] == [{"params/demo.yaml": ["cache_dir", "data"]}]
    # the train stage tracks the train keys its rule is rerun for, not the logging/eval/checkpoint ones
    from higgs_tune.config import TRAIN_MONITOR_KEYS

    assert stages["train-demo"]["params"] == [{"params/demo.yaml": ["lora", "model"] + sorted(
        f"train.{k}" for k in params["train"] if k not in TRAIN_MONITOR_KEYS)}]
    assert "train.log_interval" not in stages["train-demo"]["params"][0]["params/demo.yaml"]
    assert "workflow/report/report.html.j2" in stages["report-demo"]["deps"]
    assert stages["evaluate-demo"]["metrics"] == ["results/demo/eval/metrics.json", "results/demo/eval/paired.json"]
    assert stages["evaluate_base-demo"]["metrics"] == ["results/demo/eval_base/metrics.json"]
    # the base model's stage depends on no training setting and on no training output
    # (nor on the eval keys that only choose among checkpoints: eval.checkpoints, eval.select)
    assert stages["evaluate_base-demo"]["params"] == [{"params/demo.yaml": [
        "audio_tokenizer", "data", "eval.batch_size", "eval.bootstrap", "eval.generate", "model"]}]
    assert stages["select-demo"]["params"] == [{"params/demo.yaml": ["eval.select"]}]
    assert stages["select-demo"]["metrics"] == ["results/demo/eval/selection.json"]
    assert not any("/train/" in d for d in stages["evaluate_base-demo"]["deps"])
    assert "results/demo/eval_base/generated.jsonl" in stages["evaluate-demo"]["deps"]
    assert stages["audit-demo"]["metrics"] == ["results/demo/audit/summary.json"]
    assert set(stages["train-demo"]["outs"]) >= {"results/demo/train/adapter", "results/demo/train/checkpoint",
                                                 "results/demo/train/metrics.jsonl"}
    assert stages["curves-demo"]["plots"] == ["results/demo/train/curves.csv", "results/demo/train/val_curves.csv"]
    assert {next(iter(p)) for p in doc["plots"]} == {"loss-demo", "val_loss-demo"}
    res = sh([str(BIN / "dvc"), "stage", "list"], ROOT)  # DVC itself reads it
    assert "train-demo" in res.stdout


def test_several_experiments_and_the_slurm_profile_in_one_dvc_yaml(tmp_path):
    """Two experiments (the demo and an overlay of it) give two chains with their own params files;
    --profile profiles/slurm is the `profile` var every command uses; DVC reads the result."""
    overlay = tmp_path / "other.yaml"
    overlay.write_text("experiment: other.v2\ntrain: {max_steps: 3, save_interval: 1}\neval: {checkpoints: every}\n")
    out = tmp_path / "gen"
    res = generator("--out", str(out), "--profile", "profiles/slurm", "config/demo.yaml", f"config/demo.yaml+{overlay}")
    assert res.returncode == 0, res.stderr
    doc = yaml.safe_load((out / "dvc.yaml").read_text())
    assert doc["vars"] == [{"profile": "profiles/slurm"}]
    # one stage per job: the scored checkpoints of other.v2 (steps 1, 2; 3 is the final adapter's)
    assert len(doc["stages"]) == 20 and "train-other_v2" in doc["stages"]
    assert sorted(s for s in doc["stages"] if s.startswith("evaluate_step")) == ["evaluate_step-other_v2-1",
                                                                           "evaluate_step-other_v2-2"]
    assert "results/other.v2/eval/steps/2/metrics.json" in doc["stages"]["select-other_v2"]["deps"]
    st = doc["stages"]["train-other_v2"]
    assert st["meta"]["experiment"] == "other.v2" and "--configfile params/other.v2.yaml" in st["cmd"]
    assert "results/other.v2/train/adapter" in st["outs"]
    assert yaml.safe_load((out / "params/other.v2.yaml").read_text())["train"]["max_steps"] == 3
    assert dvc_stages.recorded_args(out / "dvc.yaml") == ["--profile", "profiles/slurm", "config/demo.yaml",
                                                          f"config/demo.yaml+{overlay}"]
    assert dvc_stages.experiment_stage_names(out / "dvc.yaml", "other.v2")[0] == "manifest-other_v2"
    sh([str(BIN / "dvc"), "init", "--no-scm", "-q"], out)
    listed = sh([str(BIN / "dvc"), "stage", "list", "--name-only"], out).stdout.split()
    assert sorted(listed) == sorted(doc["stages"])


def test_generator_errors_name_the_problem(tmp_path):
    out = ["--out", str(tmp_path / "out")]
    res = generator(*out, "config/demo.yaml", "config/demo.yaml")
    assert res.returncode == 2 and "experiment 'demo' comes from both" in res.stderr
    res = generator(*out, f"config/demo.yaml+{tmp_path}/absent.yaml")
    assert res.returncode == 2 and f"{tmp_path}/absent.yaml does not exist" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: {rank: 0}\n")
    res = generator(*out, f"config/demo.yaml+{bad}")
    assert res.returncode == 2 and "rank" in res.stderr
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("sweep: {name: lr, runs: {a: {train: {learning_rate: 0.001}}}}\n")
    res = generator(*out, f"config/demo.yaml+{sweep}")
    assert res.returncode == 2 and "declares a sweep ('lr'): a DVC experiment is one config" in res.stderr
    assert not (tmp_path / "out").exists()


def test_rule_declarations_and_the_code_table_cover_every_rule(tmp_path):
    """The generator reads each rule's file and docstring from its declaration, and its code from
    codesig.RULE_MODULES, the table the rule's params.code is computed from: every rule but `all` is in
    the table and hashes its own entry (`code=rule_code("<its name>")`); the table names the module its
    command runs; target rules (`all`, `export`: inputs only) run nothing."""
    declared = dvc_stages.rule_declarations(ROOT)
    blocks = {rule: re.search(rf"^(?:rule|checkpoint) {rule}:\n(.*?)(?=^\S|\Z)", path.read_text(), re.M | re.S)[1]
              for rule, (path, _) in declared.items()}
    assert {r for r, b in blocks.items() if "shell:" in b} == set(codesig.RULE_MODULES)
    assert set(declared) - set(codesig.RULE_MODULES) == {"all", "export"}
    for rule, (path, doc) in declared.items():
        assert path.relative_to(ROOT).as_posix() == ("Snakefile" if rule == "all" else
                                                     f"workflow/rules/{RULE_FILE.get(rule, rule)}.smk")
        assert doc.strip(), f"rule {rule} has no docstring"
        if rule not in codesig.RULE_MODULES:
            continue
        block = blocks[rule]
        assert f'code=rule_code("{rule}")' in block, rule
        runs = set(re.findall(r"-m higgs_tune\.(\w+)", block))
        assert runs and runs <= set(codesig.RULE_MODULES[rule]), (rule, runs)
    assert declared["train"][1].startswith("LoRA fine-tuning with accelerate")
    # the forms a Snakefile may use: a comment before the docstring, r/u prefixes, single quotes, an
    # indented (conditional) rule, no docstring; a file the Snakefile does not include is not read
    (tmp_path / "rules").mkdir()
    (tmp_path / "Snakefile").write_text('include: "rules/a.smk"\n\nrule all:\n    input: "x"\n')
    (tmp_path / "rules" / "a.smk").write_text(
        'rule a:\n    # why\n\n    r"""Doc of a."""\n    shell: "true"\n\n'
        "if True:\n    rule b:\n        u'''Doc\n        of b.'''\n        shell: 'true'\n\n"
        'checkpoint c:\n    output: "c"\n')
    (tmp_path / "rules" / "unused.smk").write_text('rule a:\n    """Not included."""\n')
    got = {r: (f.relative_to(tmp_path).as_posix(), " ".join(d.split())) for r, (f, d) in
           dvc_stages.rule_declarations(tmp_path).items()}
    assert got == {"all": ("Snakefile", ""), "a": ("rules/a.smk", "Doc of a."), "b": ("rules/a.smk", "Doc of b."),
                   "c": ("rules/a.smk", "")}


def test_the_generator_refuses_what_it_cannot_track():
    """A job passed a config value the merged config lacks, a rule running a module its code entry does
    not name, and outputs that are not the table's rows each stop the generator, naming the rule."""
    declared = dvc_stages.rule_declarations(ROOT)
    config = {"experiment": "demo", "data": {"manifest": "m.jsonl", "val_fraction": 0.1}, "cache_dir": ".cache"}
    dvc_stages.check_config("manifest", {"data": {"val_fraction": 0.1}, "cache_dir": ".cache"}, config)
    with pytest.raises(dvc_stages.GeneratorError, match=r"job manifest: Snakemake passes data.val_fraction=0.2"):
        dvc_stages.check_config("manifest", {"data": {"val_fraction": 0.2}}, config)
    event = {"jobid": 0, "rule_name": "curves", "wildcards": {"experiment": "demo"}, "input": ["a", "b"],
             "output": ["results/demo/train/curves.csv", "results/demo/train/val_curves.csv"],
             "shellcmd": "python -m higgs_tune.curves --train a --val b"}
    job = dvc_stages._job(event, declared, config)
    assert job.outputs == {"train": "results/demo/train/curves.csv", "val": "results/demo/train/val_curves.csv"}
    assert job.rule_file == ROOT / "workflow" / "rules" / "curves.smk" and job.cfg_keys == []
    with pytest.raises(dvc_stages.GeneratorError, match=r"rule 'curves' runs higgs_tune.report, which"):
        dvc_stages._job({**event, "shellcmd": event["shellcmd"] + " && python -m higgs_tune.report"}, declared, config)
    for outputs in (event["output"][:1], event["output"][::-1]):  # one missing; two swapped
        with pytest.raises(dvc_stages.GeneratorError, match=r"rule 'curves' writes .*not the rows of the table"):
            dvc_stages._job({**event, "output": outputs}, declared, config)
    with pytest.raises(dvc_stages.GeneratorError, match=r"job curves .*: Snakemake passes data.val_fraction=0.3, "
                                                       r"the merged config has 0.1"):
        dvc_stages._job({**event, "shellcmd": "python -m higgs_tune.curves --config-json "
                         "'{\"data\": {\"val_fraction\": 0.3}}'"}, declared, config)


def test_lineage_without_a_lock_says_so(tmp_path):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    res = sh([sys.executable, "-m", "higgs_tune.lineage", "--root", str(tmp_path), "--no-status",
              str(tmp_path / "results/demo/train/adapter/adapter_model.safetensors")], tmp_path)
    assert "there is no dvc.lock" in res.stdout and "stage train-demo" in res.stdout
    assert "(inside output results/demo/train/adapter)" in res.stdout and "(no hash recorded)" in res.stdout
    res = sh([sys.executable, "-m", "higgs_tune.lineage", "--root", str(tmp_path), str(tmp_path / "README.md")],
             tmp_path, ok=False)
    assert res.returncode == 2 and "no stage of" in res.stderr and "results/demo" in res.stderr


def test_dvc_md5_is_what_dvc_records(tmp_path):
    """higgs_tune.fileio.dvc_md5 (the hash the report and the comparison show) equals what `dvc add`
    writes into its .dvc file: a file's md5, a folder's `<md5>.dir` (hidden files such as
    Snakemake's .snakemake_timestamp included) with its file count and size."""
    from higgs_tune.fileio import dvc_md5

    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 16}\n')
    (folder / "sub" / "w.bin").write_bytes(bytes(range(256)) * 5)
    (folder / ".snakemake_timestamp").write_text("")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\r\n')  # CRLF: DVC 3 hashes the bytes as they are
    sh([str(BIN / "dvc"), "init", "-q", "--no-scm"], tmp_path)
    for name in ("adapter", "metrics.jsonl"):
        sh([str(BIN / "dvc"), "add", "-q", name], tmp_path)
        recorded = yaml.safe_load((tmp_path / f"{name}.dvc").read_text())["outs"][0]
        mine = dvc_md5(tmp_path / name)
        assert mine == {k: recorded[k] for k in ("md5", "size", "nfiles") if k in recorded}, name
    assert dvc_md5(folder)["md5"].endswith(".dir") and dvc_md5(folder)["nfiles"] == 3
    assert dvc_md5(tmp_path / "metrics.jsonl")["md5"] == md5(tmp_path / "metrics.jsonl")
    with pytest.raises(FileNotFoundError, match="nothing to hash"):
        dvc_md5(tmp_path / "absent")


def test_curves_csv(tmp_path):
    from higgs_tune.curves import jsonl_to_csv

    src = tmp_path / "m.jsonl"
    src.write_text('{"step": 1, "loss": 2.5, "codebook_acc": [0.1, 0.2]}\n\n{"step": 2, "loss": 2.0, "lr": 0.1}\n')
    assert jsonl_to_csv(src, tmp_path / "m.csv") == 2
    assert (tmp_path / "m.csv").read_text() == "step,loss,codebook_acc_0,codebook_acc_1,lr\n1,2.5,0.1,0.2,\n2,2.0,,,0.1\n"
    src.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        jsonl_to_csv(src, tmp_path / "m.csv")


# ------------------------------------------------------------------------------ one real run, slow
@pytest.fixture(scope="module")
def run(tmp_path_factory, lj_dir):
    """A temporary git+DVC repository copied from this working tree, with experiment `mine`: an
    overlay holding only `experiment` and `data.manifest`, whose manifest lies outside the repository
    (3 clips relative to it, 2 absolute elsewhere), plus cheap training knobs in a second file.
    `make demo EXPERIMENT=mine` runs it and records dvc.lock; the state is committed (commit A)."""
    tmp = tmp_path_factory.mktemp("dvc")
    repo = tmp / "repo"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if rel == ".venv" or not os.path.lexists(src):
            continue
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, repo / rel, follow_symlinks=False)
    sh(["git", "init", "-q", "-b", "main"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "base"], repo)

    data, elsewhere = tmp / "my_data", tmp / "elsewhere"
    (data / "wavs").mkdir(parents=True)
    elsewhere.mkdir()
    texts = dict(line.rstrip("\n").split("|", 2)[:2] for line in open(lj_dir / "metadata.csv", encoding="utf-8"))
    rows = []
    for key, cid in CLIPS.items():
        if key in "abc":
            shutil.copy(lj_dir / "wavs" / f"{cid}.wav", data / "wavs" / f"{key}.wav")
            url = f"wavs/{key}.wav"
        else:
            shutil.copy(lj_dir / "wavs" / f"{cid}.wav", elsewhere / f"{key}.wav")
            url = str(elsewhere / f"{key}.wav")
        rows.append({"messages": [{"role": "system", "content": "Generate audio following instruction."},
                                  {"role": "user", "content": texts[cid]},
                                  {"role": "assistant", "content": {"type": "audio", "audio_url": url}}],
                     "misc": {"id": cid}})
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overlay = data / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"experiment": "mine", "data": {"manifest": str(data / "manifest.jsonl")}}))
    cheap = tmp / "cheap.yaml"
    cheap.write_text(yaml.safe_dump(CHEAP))

    sh([sys.executable, "-m", "higgs_tune.dvc_stages", f"config/demo.yaml+{cheap}+{overlay}"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "experiment mine"], repo)
    res = sh(["make", "-o", "venv", "demo", "EXPERIMENT=mine", f"VENV={BIN.parent}"], repo, timeout=1500)
    assert "Report:" in res.stdout
    sh(["git", "add", "dvc.lock"], repo)
    sh(["git", "commit", "-qm", "A"], repo)
    return {"repo": repo, "data": data, "elsewhere": elsewhere, "out": repo / "results" / "mine",
            "commit_a": sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()}


def dvc(run, *args, ok=True):
    return sh([str(BIN / "dvc"), *args], run["repo"], ok=ok)


def snakemake_dry(run):
    return sh([str(BIN / "snakemake"), "-n", "--profile", "profiles/default", "--configfile", "params/mine.yaml"],
              run["repo"])


@pytest.mark.slow
def test_overlay_runs_a_manifest_outside_the_repo_and_make_demo_leaves_nothing_to_do(run):
    """Only `experiment` and `data.manifest` in the overlay: the demo config does not confine the
    audio; relative paths resolve against the manifest's folder, absolute ones are kept. After
    `make demo` neither `dvc status` nor `snakemake -n` has anything to do."""
    out = run["out"]
    fixes = json.loads((out / "manifest" / "fixes.json").read_text())
    assert (fixes["rows_in"], fixes["rows_kept"], fixes["rows_quarantined"]) == (5, 5, 0)
    urls = {json.loads(line)["messages"][2]["content"]["audio_url"]
            for split in ("train", "val") for line in open(out / "manifest" / f"{split}.jsonl")}
    assert urls == {str(run["data"] / "wavs" / f"{k}.wav") for k in "abc"} | {
        str(run["elsewhere"] / f"{k}.wav") for k in "de"}
    assert [json.loads(line)["step"] for line in open(out / "train" / "metrics.jsonl")] == [1, 2]
    assert json.loads((out / "audit" / "summary.json").read_text())["passed"] is True
    assert len(json.loads((out / "eval" / "metrics.json").read_text())["codebook_acc"]) == 8
    assert (out / "train" / "curves.csv").read_text().startswith("step,")
    assert "Data and pipelines are up to date" in dvc(run, "status").stdout
    assert "Nothing to be done" in snakemake_dry(run).stdout + snakemake_dry(run).stderr
    stage = yaml.safe_load((run["repo"] / "dvc.yaml").read_text())["stages"]["manifest-mine"]
    assert stage["deps"][:3] == [str(run["data"] / "manifest.jsonl"), str(run["elsewhere"]), str(run["data"] / "wavs")]
    res = dvc(run, "plots", "show", "--json")
    assert "failed" not in res.stdout + res.stderr.lower() and "loss-mine" in res.stdout


@pytest.mark.slow
def test_lineage_of_the_adapter_matches_dvc_lock(run):
    repo = run["repo"]
    res = sh([sys.executable, "-m", "higgs_tune.lineage", "--json", "results/mine/train/adapter"], repo)
    t = json.loads(res.stdout)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert t["stage"]["stage"] == "train-mine" and t["stage"]["rule"] == "train" and t["stage"]["recorded"]
    adapter = next(o for o in t["stage"]["outs"] if o["path"] == "results/mine/train/adapter")
    assert adapter["hash"]["md5"] == next(o["md5"] for o in lock["train-mine"]["outs"]
                                          if o["path"] == "results/mine/train/adapter")
    assert adapter["hash"]["md5"].endswith(".dir") and adapter["hash"]["nfiles"] >= 2
    ups = {s["stage"]: s for s in t["upstream"]}
    assert set(ups) == {"audit-mine", "manifest-mine", "tokenize-mine"}
    data = {d["path"]: d["hash"] for d in ups["manifest-mine"]["deps"]["data"]}
    manifest = run["data"] / "manifest.jsonl"
    assert data[str(manifest)]["md5"] == md5(manifest)  # the manifest's content hash
    assert data[str(run["data"] / "wavs")]["nfiles"] == 3 and data[str(run["elsewhere"])]["nfiles"] == 2
    index = {d["path"]: d for d in t["stage"]["deps"]["upstream"]}["results/mine/tokens/index.parquet"]
    assert index["stage"] == "tokenize-mine" and index["hash"]["md5"] == md5(run["out"] / "tokens" / "index.parquet")
    params = yaml.safe_load((repo / "params/mine.yaml").read_text())
    recorded = {k: p for k, p in t["stage"]["params"].items() if k.startswith("train.")}
    assert recorded and recorded["train.max_steps"]["value"] == 2  # DVC's dotted keys, one per trajectory key
    for key, p in recorded.items():
        assert p["value"] == params["train"][key.removeprefix("train.")] and p["matches_file"], key
        assert p["sha256"] == value_hash(p["value"])
    assert "train.log_interval" not in recorded  # a monitoring key: not part of what the adapter depends on
    code = {d["path"]: d["hash"]["md5"] for d in t["stage"]["deps"]["code"]}
    assert code["workflow/higgs_tune/train/loop.py"] == md5(repo / "workflow/higgs_tune/train/loop.py")
    assert code["workflow/rules/train.smk"] == md5(repo / "workflow/rules/train.smk")
    assert t["git"]["head"] == t["git"]["lock_commit"] == run["commit_a"] and t["git"]["modified"] == []
    assert t["status"] == {}
    text = sh([sys.executable, "-m", "higgs_tune.lineage", "results/mine/eval/metrics.json"], repo).stdout
    assert text.startswith("results/mine/eval/metrics.json") and "stage evaluate-mine" in text
    assert f"HEAD {run['commit_a']}" in text and "workspace: matches dvc.lock" in text
    assert adapter["role"] == "adapter" and "results/mine/train/adapter  [adapter]  md5 " in sh(
        [sys.executable, "-m", "higgs_tune.lineage", "--no-status", "results/mine/train/adapter"], repo).stdout

    # the report names each input by the md5 dvc.lock records for it: a caption and dvc.lock agree by eye
    from browser import html_tables

    html = (run["out"] / "report.html").read_text()
    report_deps = {d["path"]: d["md5"] for d in lock["report-mine"]["deps"]}
    in_captions = set(re.findall(r"\(md5 ([0-9a-f]{32}(?:\.dir)?)\)", html))
    assert len(in_captions) >= 8 and in_captions <= set(report_deps.values()), in_captions - set(report_deps.values())
    files = {row[0]: row for row in html_tables(html)["input-files"]["body"][1:]}  # role, path, bytes, md5
    for path, h in report_deps.items():
        if path.startswith("results/"):  # every output the report reads: listed, by the hash in dvc.lock
            row = next(r for r in files.values() if r[1] == path)
            assert row[3].split()[0] == h, (path, row)
    assert files["adapter"][3].split()[0] == report_deps["results/mine/train/adapter"]
    # the adapter's files: each by its md5, an entry of the folder's listing in DVC's cache
    dir_md5 = report_deps["results/mine/train/adapter"]
    listing = json.loads((repo / ".dvc" / "cache" / "files" / "md5" / dir_md5[:2] / dir_md5[2:]).read_text())
    assert {f"adapter:{e['relpath']}": e["md5"] for e in listing if not e["relpath"].startswith(".")} == {
        role: row[3] for role, row in files.items() if role.startswith("adapter:") and "/." not in row[1]}


@pytest.mark.slow
def test_push_then_pull_restores_the_adapter(run):
    adapter = run["out"] / "train" / "adapter"
    before = tree_bytes(adapter)
    assert "adapter_model.safetensors" in before
    dvc(run, "push")
    assert any((run["repo"] / ".dvc-remote").rglob("*"))
    shutil.rmtree(run["repo"] / ".dvc" / "cache")
    shutil.rmtree(run["out"])
    dvc(run, "pull")
    assert tree_bytes(adapter) == before
    assert "Data and pipelines are up to date" in dvc(run, "status").stdout


@pytest.mark.slow
def test_a_changed_clip_reruns_the_chain_and_checkout_restores_the_earlier_adapter(run, lj_dir):
    """Change one training clip: `dvc status` names every stage that opens the clips; once the manifest
    stage reran, every stage reading its changed outputs. `dvc repro` changes the adapter's and the metrics' hashes; `git checkout`
    of the earlier commit + `dvc checkout` restores the earlier adapter byte for byte."""
    repo, out = run["repo"], run["out"]
    adapter_a = tree_bytes(out / "train" / "adapter")
    hashes_a = lock_hashes(repo)
    train_ids = {json.loads(line)["misc"]["id"] for line in open(out / "manifest" / "train.jsonl")}
    key = next(k for k in "abc" if CLIPS[k] in train_ids)  # a training clip in the folder beside the manifest
    shutil.copy(lj_dir / "wavs" / "LJ001-0004.wav", run["data"] / "wavs" / f"{key}.wav")

    status = dvc(run, "status", "--json").stdout
    # the stages that open the clips: the manifest, tokenize, evaluate (scores clips), the report (embeds them)
    assert set(json.loads(status)) == {"manifest-mine", "tokenize-mine", "evaluate-mine", "evaluate_base-mine",
                                       "report-mine"}
    assert str(run["data"] / "wavs") in status
    dvc(run, "repro", "--single-item", "manifest-mine")
    # a training clip: train.jsonl changed (val.jsonl did not): the stages reading it are named too;
    # curves reads train's outputs and is named once train reran
    downstream = set(json.loads(dvc(run, "status", "--json").stdout))
    # evaluate_base: the clips it scores are still the changed folder's
    assert downstream == {"tokenize-mine", "audit-mine", "train-mine", "evaluate-mine", "evaluate_base-mine",
                          "report-mine"}

    dvc(run, "repro")
    hashes_b = lock_hashes(repo)
    for path in ("results/mine/train/adapter", "results/mine/eval/metrics.json", "results/mine/audit/summary.json",
                 "results/mine/train/curves.csv", "results/mine/train/metrics.jsonl"):
        assert hashes_a[path] != hashes_b[path], path
    assert tree_bytes(out / "train" / "adapter") != adapter_a
    assert "Data and pipelines are up to date" in dvc(run, "status").stdout
    assert "Nothing to be done" in snakemake_dry(run).stdout + snakemake_dry(run).stderr
    sh(["git", "commit", "-qam", "B"], repo)
    diff = dvc(run, "metrics", "diff", run["commit_a"], "HEAD").stdout
    assert "results/mine/eval/metrics.json" in diff and "loss" in diff

    sh(["git", "checkout", "-q", run["commit_a"]], repo)
    dvc(run, "checkout", "--force")
    assert tree_bytes(out / "train" / "adapter") == adapter_a
    assert md5(out / "eval" / "metrics.json") == hashes_a["results/mine/eval/metrics.json"]
    sh(["git", "checkout", "-q", "main"], repo)
    dvc(run, "checkout", "--force")
    assert md5(out / "eval" / "metrics.json") == hashes_b["results/mine/eval/metrics.json"]
