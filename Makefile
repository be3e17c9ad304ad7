# Two commands do all set-up on a fresh machine:  make run  ·  make test
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
PROFILE ?= demo
ARGS   ?=

.PHONY: install run test test-fast compile bench clean
.DEFAULT_GOAL := help

help:
	@echo "make run      full local pipeline (profile $(PROFILE)) -> runs/<timestamp>/report.html"
	@echo "make test     the whole test suite"
	@echo "make compile  pipeline.yaml for the Kubeflow UI / kfp CLI"
	@echo "make bench    PPO step benchmark (bench/)"

# torch is pinned to the CPU wheel on local disk: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements.lock requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) pipeline.py run --profile $(PROFILE) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not e2e" $(ARGS)

compile: $(STAMP)
	$(PY) pipeline.py compile -o pipeline.yaml

bench: $(STAMP)
	$(PY) bench/ppo_step.py

clean:
	rm -rf $(VENV) .pytest_cache runs

-include docker/image.mk
