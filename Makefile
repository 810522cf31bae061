# Set-up and checks for Baton. `make setup` once on a fresh machine, then `make up` or `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast up proto bench lint-chart clean

setup: $(BIN)/baton

$(BIN)/baton: pyproject.toml
	bash scripts/setup.sh

proto: setup
	$(BIN)/python -m proto.build

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

up: setup
	$(BIN)/baton up

bench: setup
	$(BIN)/python bench/engine_cpu.py

lint-chart: setup
	$(BIN)/python scripts/chart_check.py

clean:
	rm -rf $(VENV) build *.egg-info
