# higgs-tune — the two set-up commands: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat envs/cpu.lock envs/nodeps.txt envs/torchaudio-shim/pyproject.toml | sha256sum | cut -c1-12)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv lint dryrun clean lock

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

demo: venv
	$(BIN)/snakemake --profile profiles/default --configfile config/demo.yaml
	$(BIN)/dvc commit -f -q && $(BIN)/snakemake --profile profiles/default --configfile config/demo.yaml --touch -q >/dev/null
	@echo "Report: $(abspath results/demo/report.html)"

test: venv
	$(BIN)/python -m pytest -q

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
