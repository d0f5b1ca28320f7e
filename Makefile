# higgs-tune — the two set-up commands: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat envs/cpu.lock envs/nodeps.txt envs/torchaudio-shim/pyproject.toml | sha256sum | cut -c1-12)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# this checkout's package first (a shared venv may hold another checkout's editable install)
export PYTHONPATH := $(CURDIR)/workflow$(if $(PYTHONPATH),:$(PYTHONPATH))
# `make demo` runs experiment demo; EXPERIMENT=name runs another one of dvc.yaml (see `make dvc.yaml`)
# with its merged config params/<name>.yaml: the file whose sections dvc.lock records as params
EXPERIMENT ?= demo
SMK = $(BIN)/snakemake --profile profiles/default --configfile params/$(EXPERIMENT).yaml

.PHONY: demo test venv lint dryrun clean lock dvc.yaml repro

venv: $(STAMP)

# Locked CPU install: every package pinned in envs/cpu.lock and installed without resolution
# (--no-deps), so nothing can pull a CUDA torch, torchvision, or torchaudio builds that do not load
# with torch 2.13. boson-multimodal & co. come from envs/nodeps.txt, torchaudio from the shim.
$(STAMP):
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps -r envs/cpu.lock
	$(BIN)/pip install -q --no-deps -r envs/nodeps.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation ./envs/torchaudio-shim
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch, boson_multimodal, peft, snakemake; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	rm -f $(VENV)/.installed-* && touch $@

# Refreshes dvc.yaml and params/ from the Snakemake graph (`make dvc.yaml`), runs the chain with
# Snakemake on params/$(EXPERIMENT).yaml (= config/demo.yaml merged and validated for the demo), then
# records the run in dvc.lock (`dvc commit` of the experiment's stages: hashes of every dep, param
# and out) so that `dvc status` and `snakemake -n` have nothing to do.
demo: venv
	$(BIN)/python -m higgs_tune.dvc_stages >/dev/null
	$(SMK)
	stages="$$($(BIN)/python -m higgs_tune.dvc_stages --list-stages $(EXPERIMENT))" && $(BIN)/dvc commit -f -q $$stages
	$(SMK) --touch -q >/dev/null
	@echo "Report: $(abspath results/$(EXPERIMENT)/report.html)"

# dvc.yaml and params/<experiment>.yaml from the Snakemake graph, with the experiments and profile
# recorded in dvc.yaml (add one: .venv/bin/python -m higgs_tune.dvc_stages config/demo.yaml config/demo.yaml+my_data.yaml)
dvc.yaml: venv
	$(BIN)/python -m higgs_tune.dvc_stages

# every stage whose deps, params or code changed, through Snakemake (the venv's snakemake on PATH)
repro: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

# two pytest-xdist workers (CI has 2 cores, and much of the suite waits on subprocesses, Slurm and the
# browser); --dist loadfile keeps each test file on one worker, so its module fixtures are built once;
# --no-loadscope-reorder: files in collection order, the long ones first (tests/conftest.py LONG_FIRST)
TEST_WORKERS ?= 2
test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: venv
	$(BIN)/snakemake --lint --configfile config/demo.yaml

dryrun: venv
	$(BIN)/snakemake -n --configfile config/demo.yaml

# Regenerate envs/cpu.lock from envs/requirements-cpu.in (needs the registry; review the diff).
lock:
	rm -rf /tmp/higgs-tune-lock && $(PY) -m venv /tmp/higgs-tune-lock
	/tmp/higgs-tune-lock/bin/pip install -q -r envs/requirements-cpu.in
	/tmp/higgs-tune-lock/bin/pip freeze --all | grep -v -E "^(pip|wheel)==" | grep -v -E '^(torchaudio|boson|descript|llama3|-e )' > envs/cpu.lock

clean:
	rm -rf results .snakemake .checkpoints
