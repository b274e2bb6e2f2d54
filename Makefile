# sftkit: make setup | demo | test | lab | lint | strip | clean | constraints
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
CONSTRAINTS := constraints.txt
# setup is a no-op while this stamp exists; it changes whenever constraints.txt or pyproject.toml does
STAMP := $(VENV)/.stamp-$(shell cat $(CONSTRAINTS) pyproject.toml 2>/dev/null | { sha256sum 2>/dev/null || shasum -a 256; } | cut -c1-16)
# interpreter used to create .venv: python3.11 if it runs, else python3 (must be >= 3.10); override with PY=...
PY ?=
PYTEST_ARGS ?=
LAB_ARGS ?=
NBMAKE_TIMEOUT ?= 900
DEMO_DIR := outputs/demo

# Headless runs (demo, test): offline, deterministic hashing, and the venv's bin first on PATH so
# papermill/nbmake start the `python3` kernel with the venv's interpreter (jupyter_client maps the
# kernelspec's "python" to sys.executable; JUPYTER_PREFER_ENV_PATH puts the venv's kernelspec first).
HEADLESS_ENV := PATH="$(CURDIR)/$(BIN):$$PATH" JUPYTER_PREFER_ENV_PATH=1 PYTHONHASHSEED=0 \
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline \
	TOKENIZERS_PARALLELISM=false

# run a pytest command; exit status 5 ("no tests collected") is not a failure, anything else non-zero is
define pytest_ok
rc=0; $(1) || rc=$$?; \
if [ $$rc -eq 5 ]; then echo "(no tests collected: ok)"; elif [ $$rc -ne 0 ]; then exit $$rc; fi
endef

.PHONY: help setup demo test test-fast lab lint strip clean constraints

help:
	@echo "make setup        create .venv (torch first via tools/install_torch.sh, then -e .[dev] under constraints.txt)"
	@echo "make demo         run notebooks/00_quickstart.ipynb headless -> $(DEMO_DIR)/"
	@echo "make test         ruff + pytest tests/ + nbmake notebooks/   (PYTEST_ARGS='-m \"not slow\"' to skip slow)"
	@echo "make test-fast    ruff + pytest tests/ -m 'not slow' (no notebook execution)"
	@echo "make lab          jupyter lab in notebooks/"
	@echo "make lint         ruff check + notebooks carry no outputs"
	@echo "make strip        strip outputs from notebooks/*.ipynb in place"
	@echo "make clean        remove outputs/ and caches (keeps .venv)"
	@echo "make constraints  regenerate constraints.txt from .venv (pip freeze)"

setup: $(STAMP)

$(STAMP):
	@set -e; \
	if [ ! -x $(PYTHON) ]; then \
		py="$(PY)"; \
		if [ -z "$$py" ]; then \
			for c in python3.11 python3; do \
				if $$c -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then py=$$c; break; fi; \
			done; \
		fi; \
		if [ -z "$$py" ]; then echo "setup: need python3.11 or python3 >= 3.10 on PATH (or PY=...)" >&2; exit 1; fi; \
		echo "setup: creating $(VENV) with $$py ($$($$py -c 'import sys; print(sys.version.split()[0])'))"; \
		$$py -m venv $(VENV); \
	fi
	PYTHON=$(PYTHON) CONSTRAINTS=$(CONSTRAINTS) bash tools/install_torch.sh
	$(PYTHON) -m pip install -c $(CONSTRAINTS) -e ".[dev]"
	@rm -f $(VENV)/.stamp-*
	@touch $@
	@echo "setup: done ($@)"

demo: setup
	@mkdir -p $(DEMO_DIR)
	$(HEADLESS_ENV) $(BIN)/papermill notebooks/00_quickstart.ipynb $(DEMO_DIR)/00_quickstart.ipynb \
		-k python3 --cwd notebooks -p output_dir "$(CURDIR)/$(DEMO_DIR)"
	@echo "--- $(DEMO_DIR)/metrics.json"
	@cat $(DEMO_DIR)/metrics.json; echo

# Serial on purpose: nbmake under xdist starts several kernels at once (ZMQ port races), and the
# notebooks train on CPU, so -n 2 on a 2-core machine buys little.
test: setup
	$(BIN)/ruff check sftkit tests tools bench
	@$(call pytest_ok,$(HEADLESS_ENV) $(PYTHON) -m pytest tests $(PYTEST_ARGS))
	@if compgen -G 'notebooks/*.ipynb' >/dev/null; then \
		echo "$(PYTHON) -m pytest --nbmake --nbmake-kernel=python3 --nbmake-timeout=$(NBMAKE_TIMEOUT) notebooks"; \
		$(call pytest_ok,$(HEADLESS_ENV) $(PYTHON) -m pytest --nbmake --nbmake-kernel=python3 \
			--nbmake-timeout=$(NBMAKE_TIMEOUT) notebooks $(PYTEST_ARGS)); \
	else \
		echo "no notebooks/*.ipynb yet: skipping nbmake"; \
	fi

test-fast: setup
	$(BIN)/ruff check sftkit tests tools bench
	@$(call pytest_ok,$(HEADLESS_ENV) $(PYTHON) -m pytest tests -m "not slow" $(PYTEST_ARGS))

lab: setup
	cd notebooks && PATH="$(CURDIR)/$(BIN):$$PATH" JUPYTER_PREFER_ENV_PATH=1 \
		exec "$(CURDIR)/$(BIN)/jupyter" lab $(LAB_ARGS) $$([ "$$(id -u)" = 0 ] && echo --allow-root)

lint: setup
	$(BIN)/ruff check sftkit tests tools bench
	$(PYTHON) tools/strip_notebooks.py --check

strip: setup
	$(PYTHON) tools/strip_notebooks.py

clean:
	rm -rf outputs notebooks/outputs notebooks/wandb wandb .pytest_cache .ruff_cache build dist
	find . \( -path ./$(VENV) -o -path ./.git \) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints -o -name '*.egg-info' \) \
		-type d -prune -exec rm -rf {} +

# torch is written without its local label (2.13.0+cpu -> 2.13.0) so the pin fits CPU and CUDA wheels;
# platform-specific torch dependencies (nvidia-*, triton) are left out for the same reason.
constraints:
	@test -x $(PYTHON) || { echo "no $(VENV): run make setup first" >&2; exit 1; }
	@set -eo pipefail; tmp=$$(mktemp); \
	head -n 2 $(CONSTRAINTS) > $$tmp; \
	echo "torch==$$($(PYTHON) -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])')" >> $$tmp; \
	$(PYTHON) -m pip freeze --exclude-editable \
		| grep -v -i -E '^(-e |sftkit( |==|$$)|torch( |==)|nvidia-|triton( |==))' >> $$tmp; \
	cat $$tmp > $(CONSTRAINTS); rm -f $$tmp; \
	echo "wrote $(CONSTRAINTS) ($$(grep -c '==' $(CONSTRAINTS)) pins)"
