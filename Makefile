# The two commands of the README: `make run` (the service) and `make test` (the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint deploy-check bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/agentworker migrate
	$(BIN)/agentworker run

test: $(STAMP)
	$(BIN)/python -m pytest -n 4

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Offline validation of deploy/: needs kubectl (or kustomize) and promtool (Debian package 'prometheus').
deploy-check: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[deploy]'
	$(BIN)/python deploy/check.py

# The benchmarks (bench/): agentworker against plain ARQ and SAQ on a private redis-server; ~7 minutes.
# Prints a table and writes bench/results/*.json. `python -m bench --help` for subsets and --quick.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .ci-venv .pytest_cache .mypy_cache .ruff_cache
