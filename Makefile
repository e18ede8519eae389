# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both create .venv at the repository root; on a machine without CUDA they install the CPU build of torch first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.attnctl-installed
E2E_STAMP := $(VENV)/.attnctl-e2e-installed
# The CPU build of torch, named by its local version so pip cannot pick the CUDA wheel PyPI serves as plain 2.13.0:
# first from the configured sources (a find-links folder or mirror that holds it), else from PyTorch's CPU index.
TORCH_CPU := torch==2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# A venv is usable when it has pip and Python >= 3.10 (what pyproject requires); anything else is made anew.
VENV_OK := import sys, pip; sys.exit(sys.version_info < (3, 10))
PROMPT ?= a red circle to the left of a blue square

.PHONY: setup e2e-setup demo test lint compat bench bench-quick clean

$(STAMP): pyproject.toml
	@if ! $(BIN)/python -c "$(VENV_OK)" 2>/dev/null; then \
	  if [ -e $(VENV) ]; then echo "$(VENV) has no pip or a Python older than 3.10: making it anew"; fi; \
	  rm -rf $(VENV) && $(PY) -m venv $(VENV); fi
	$(BIN)/python -m pip install -q --upgrade pip
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch; \
	  else $(BIN)/python -m pip install -q "$(TORCH_CPU)" 2>/dev/null || \
	    { echo "$(TORCH_CPU) is not in pip's configured sources: installing it from $(TORCH_CPU_INDEX)"; \
	      $(BIN)/python -m pip install -q --index-url $(TORCH_CPU_INDEX) "$(TORCH_CPU)"; }; fi; fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# What the UI tests need: the ui and e2e extras (streamlit, playwright) and a Chromium for the browser test.
# Chromium comes from Debian's package when root with apt; where it cannot be installed the browser test
# skips with the reason (make does not fail). Playwright's own browser download is never used.
$(E2E_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev,ui,e2e]"
	touch $(E2E_STAMP)

e2e-setup: $(E2E_STAMP)
	@if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser test"; \
	  ( DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    ( apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 ) ) || \
	  echo "chromium could not be installed: the browser test will be skipped"; \
	else echo "no chromium and no root apt-get: the browser test will be skipped"; fi

demo: setup
	$(BIN)/attnctl generate --model toy-sd3 --prompt "$(PROMPT)" --seed 0 --out out/demo.png

lint: setup
	$(BIN)/ruff check attnctl tests bench examples

test: lint e2e-setup
	$(BIN)/python -m pytest -q

# The test suite against another diffusers release than the one .venv has (attnctl supports 0.40 to 0.42), in a
# venv of its own; its pytest temp folder is its own too, so it can run beside `make test`.
DIFFUSERS ?= 0.40.0
COMPAT := .venv-diffusers-$(DIFFUSERS)
compat:
	@if ! $(COMPAT)/bin/python -c "$(VENV_OK)" 2>/dev/null; then \
	  if [ -e $(COMPAT) ]; then echo "$(COMPAT) has no pip or a Python older than 3.10: making it anew"; fi; \
	  rm -rf $(COMPAT) && $(PY) -m venv $(COMPAT); fi
	$(COMPAT)/bin/python -m pip install -q --upgrade pip
	@if ! $(COMPAT)/bin/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(COMPAT)/bin/python -m pip install -q torch; \
	  else $(COMPAT)/bin/python -m pip install -q "$(TORCH_CPU)" 2>/dev/null || \
	    { echo "$(TORCH_CPU) is not in pip's configured sources: installing it from $(TORCH_CPU_INDEX)"; \
	      $(COMPAT)/bin/python -m pip install -q --index-url $(TORCH_CPU_INDEX) "$(TORCH_CPU)"; }; fi; fi
	$(COMPAT)/bin/python -m pip install -q -e ".[dev]" "diffusers==$(DIFFUSERS)"
	mkdir -p out
	$(COMPAT)/bin/python -m pytest -q -p no:cacheprovider --basetemp=out/pytest-diffusers-$(DIFFUSERS)

bench: setup
	$(BIN)/python bench/layers.py --json out/bench_layers.json

bench-quick: setup
	$(BIN)/python bench/layers.py --quick --json out/bench_layers_quick.json

clean:
	rm -rf $(VENV) .venv-diffusers-* out .pytest_cache .ruff_cache
