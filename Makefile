# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both create .venv at the repository root; on a machine without CUDA they install the CPU build of torch first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.attnctl-installed
TORCH_CPU := torch==2.13.0
PROMPT ?= a red circle to the left of a blue square

.PHONY: setup demo test lint bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch; \
	  else $(BIN)/python -m pip install -q $(TORCH_CPU); fi; fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/attnctl generate --model toy-sd3 --prompt "$(PROMPT)" --seed 0 --out out/demo.png

lint: setup
	$(BIN)/ruff check attnctl tests bench examples

test: lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/layers.py --json out/bench_layers.json

bench-quick: setup
	$(BIN)/python bench/layers.py --quick --json out/bench_layers_quick.json

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
