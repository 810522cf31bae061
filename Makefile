# Set-up and checks for Baton. `make setup` once on a fresh machine, then `make up` or `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast up proto bench lint-chart clean

setup: $(BIN)/baton

$(BIN)/baton: pyproject.toml
	bash scripts/setup.sh

proto: setup
	$(BIN)/python -m baton.proto.build

# The in-process NIXL (UCX) tests run in their own interpreter: after the rest of the suite has loaded other
# native runtimes into one process, UCX start-up has hit heap corruption (glibc abort). Workers are separate
# processes, so serving is not affected.
ISOLATED := tests/engine/test_kv_transfer.py

test: setup
	$(BIN)/python -m pytest -q --durations=25 --ignore=$(ISOLATED)
	$(BIN)/python -m pytest -q $(ISOLATED)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --ignore=$(ISOLATED)
	$(BIN)/python -m pytest -q -m "not slow" $(ISOLATED)

up: setup
	$(BIN)/baton up

bench: setup
	$(BIN)/python bench/engine_cpu.py

lint-chart: setup
	$(BIN)/python scripts/chart_check.py

clean:
	rm -rf $(VENV) build *.egg-info
