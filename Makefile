# Every target that runs code depends on install, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lock run test lint typecheck check bench chaos chaos-cluster clean

# Our packages' bytecode is written here, once: an editable install leaves it to the
# first import, and a machine with PYTHONDONTWRITEBYTECODE set (as containers and CI often
# are) would compile every module again in every `kq` process (~0.05 s a start).
PACKAGES := kq worker webhook_receiver producer_api ops_dashboard wavespeed_sim bench chaos cluster

install: $(STAMP)
	$(BIN)/python -m compileall -q $(PACKAGES)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Newest releases within pyproject.toml's ranges, in a scratch venv, written to
# constraints.txt (its header kept); run `make test` on them before committing.
lock:
	rm -rf var/lock-venv && $(PYTHON) -m venv var/lock-venv
	var/lock-venv/bin/python -m pip install --quiet --upgrade pip
	var/lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	{ grep '^#' constraints.txt; var/lock-venv/bin/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf var/lock-venv

run: install
	$(BIN)/kq run examples/edits.jsonl

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench

# A full stack under provider and process faults, then every invariant (CHAOS_ARGS=--soak).
chaos: install
	$(BIN)/python -m chaos $(CHAOS_ARGS)

# Seven hosts from network namespaces (root, iproute2, haproxy): 2,000 jobs through a Redis
# failover, a worker host cut off 30 s, a receiver host killed and a worker host drained
# (CLUSTER_ARGS="--seed 2"; --small is the version `make test` runs).
chaos-cluster: install
	$(BIN)/python -m cluster $(CLUSTER_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
