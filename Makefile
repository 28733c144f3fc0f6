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

.PHONY: help install test test-fast demo bench zoo meta-train tune prune-batch clean

help:
	@echo "make demo        install, then run the whole pipeline on the embedded default (digits): zoo ->"
	@echo "                 meta-train (Ray job on a local head) -> prune_batch with baselines; table, plot, MLflow"
	@echo "make test        install, then run the test suite"
	@echo "make test-fast   install, then the tests not marked slow (no Ray clusters, no subprocess pipelines)"
	@echo "make zoo         build the digits zoo with Ray tasks (ZOO_ARGS='--spec zoo/specs/cifar10.yaml ...')"
	@echo "make meta-train  start a local Ray head, submit pipelines/meta_train.py as a job, stop the head"
	@echo "                 (ZOO=runs/zoo-digits, META_ARGS='--epochs 10 ...')"
	@echo "make tune        Ray Tune search of pruning hyperparameters (TUNE_ARGS='--search pipelines/searches/cifar10.yaml')"
	@echo "make prune-batch prune the zoo's held-out members with the metanetwork and the baselines"
	@echo "                 (METANET=runs/meta-train/metanet/metanetwork.pt; after make demo: METANET=runs/demo/meta-train/metanet/metanetwork.pt ZOO=runs/demo/zoo)"
	@echo "make bench       install, then run the benchmarks under bench/"
	@echo "make install     create $(VENV) and install the project with its dev extra (puts metaprune, ray, mlflow in $(VENV)/bin)"
	@echo "make clean       remove $(VENV) and build files (runs/ is kept)"
	@echo "make help        this list"

install: $(STAMP)

# pip's local mirror prints one warning per package it does not hold; they are noise, not errors.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(PY) -m pip check
	touch $(STAMP)

# two pytest workers, one per core: the slow tests (Ray clusters, pipelines as subprocesses) spend
# much of their time waiting (Ray start-ups, a killed driver's agents), which the other worker fills;
# three workers were no faster (docs/performance.md)
test: install
	$(PY) -m pytest -q -n 2 tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

demo: install
	$(PY) pipelines/demo.py

zoo: install
	$(PY) pipelines/make_zoo.py $(ZOO_ARGS)

ZOO ?= runs/zoo-digits
META_ARGS ?=
HEAD_PID := runs/ray-head.pid
META_RUN = --zoo $(abspath $(ZOO)) --out $(abspath runs/meta-train) $(META_ARGS)
meta-train: install
	@test -f $(ZOO)/manifest.json || { echo "make meta-train: no zoo at $(ZOO): building it with make zoo (after make demo, ZOO=runs/demo/zoo uses the demo's)"; $(MAKE) zoo; }
	# a finished run with the same settings and zoo: no head, no job (meta_train.py --check)
	# the job's code from a snapshot, not ".": a log growing in the repository would break the upload
	@$(PY) pipelines/meta_train.py $(META_RUN) --check && exit 0; \
	$(PY) -m distributed.local_head start --pidfile $(HEAD_PID); \
	status=0; snap=$$($(PY) -m distributed.job_snapshot); \
	RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265 $(VENV)/bin/ray job submit --working-dir $$snap -- \
	  python pipelines/meta_train.py $(META_RUN) \
	  || status=$$?; rm -rf $$snap; $(PY) -m distributed.local_head stop --pidfile $(HEAD_PID); exit $$status

TUNE_ARGS ?=
tune: install
	@test -n "$(TUNE_ARGS)" || test -f $(ZOO)/manifest.json || { echo "make tune: no zoo at $(ZOO): building it with make zoo (after make demo, TUNE_ARGS='--set zoo=runs/demo/zoo' uses the demo's)"; $(MAKE) zoo; }
	$(PY) pipelines/tune.py $(TUNE_ARGS)

PRUNE_ARGS ?= --targets 2 4 8
# METANET: a metanetwork file or MLflow URI; empty: the shipped one (prune_batch says so)
METANET ?= runs/meta-train/metanet/metanetwork.pt
prune-batch: install
	@case "$(METANET)" in ""|models:/*|runs:/*) ;; *) test -f $(METANET) || { echo "make prune-batch: no metanetwork at $(METANET): run make meta-train, pass METANET=FILE|URI (after make demo: METANET=runs/demo/meta-train/metanet/metanetwork.pt ZOO=runs/demo/zoo), or METANET= for the shipped one" >&2; exit 2; };; esac
	$(PY) pipelines/prune_batch.py --zoo $(ZOO) $(if $(METANET),--metanet $(METANET)) --baselines \
	  --out runs/prune-batch $(PRUNE_ARGS)

bench: install
	$(PY) bench/graph.py
	$(PY) bench/metanet.py
	$(PY) bench/zoo.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
