# Quick start: `make serve` (set up and run the server), `make test` (set up and run the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a CUDA machine use e.g. `make serve TORCH=torch`.
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: serve test check bench load setup test-deps

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/python -m agent serve $(ARGS)

test-deps: $(VENV)/.installed
	./scripts/install-test-deps.sh

test: test-deps
	$(BIN)/python -m pytest $(ARGS)

check: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy agent sessions media

bench: $(VENV)/.installed
	$(BIN)/python -m bench.serve_capacity

# A short load run against a server already started with `make serve`.
load: $(VENV)/.installed
	$(BIN)/python -m load_tests --url ws://127.0.0.1:8765/v1/session --users 4 --duration 30 \
		--slo-ttff-p95 2 --slo-gap-p95 0.1 $(ARGS)
