# Every target depends on `install`, so `make demo` and `make test` work on a fresh machine.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Ray: keep every local service on 127.0.0.1 (see README, "Ray on one machine").
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export PYTHONUNBUFFERED := 1

.PHONY: help install test test-fast demo bench zoo clean

help:
	@echo "make demo     install, then run the pipeline on the embedded default (digits)"
	@echo "make test     install, then run the test suite"
	@echo "make zoo      build the digits zoo with Ray tasks (ZOO_ARGS='--spec zoo/specs/cifar10.yaml ...')"
	@echo "make bench    install, then run the benchmarks under bench/"
	@echo "make install  create $(VENV) and install the project with its dev extra"

install: $(STAMP)

# pip's local mirror prints one warning per package it does not hold; they are noise, not errors.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(PY) -m pip check
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

demo: install
	$(PY) pipelines/demo.py

zoo: install
	$(PY) pipelines/make_zoo.py $(ZOO_ARGS)

bench: install
	$(PY) bench/graph.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
