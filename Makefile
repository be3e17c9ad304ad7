# Two commands do all set-up on a fresh machine:  make run  ·  make test
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
PROFILE ?= demo
ARGS   ?=

.PHONY: install run test test-fast browser compile bench bench-trl bench-scaling bench-costs clean \
	tune reproduce
.DEFAULT_GOAL := help

help:
	@echo "make run      full local pipeline (profile $(PROFILE)) -> runs/<timestamp>/report.html"
	@echo "make test     the whole test suite"
	@echo "make tune     equal step-size search for MLE and RL (4 trials each; validation from train)"
	@echo "make reproduce  the run with seeds 0,1,2 -> mean +- sd per metric (3x make run)"
	@echo "make compile  pipeline.yaml for the Kubeflow UI / kfp CLI"
	@echo "make bench    PPO step benchmark (bench/)"
	@echo "make bench-trl  ours vs TRL 0.29.1 PPO, alternately (builds $(TRL_VENV); slow)"
	@echo "make bench-scaling  cost model: whole local pipeline at 3 sizes x 1, 2 shards (slow)"
	@echo "make bench-costs    cost account per stage: runs the demo, or ARGS=\"--run runs/<stamp>\""

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

# A real browser for tests/test_report_browser.py (Debian's chromium; needs root or sudo-less
# apt, as on CI). Without it that test is skipped and says how to install it.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "warning: could not install chromium; the browser test will be skipped"

# One pytest-xdist worker per core, each with its share of the threads (tests/conftest.py);
# ARGS="-n 0" runs in one process.
XDIST = -n auto

test: $(STAMP) browser
	$(PY) -m pytest $(XDIST) $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not slow and not e2e" $(ARGS)

# Equal tuning budget (lastmile/tune.py): selected on training rows held out, never the test
# split; ARGS="--trials 2 --max-train 140" for a shorter search.
tune: $(STAMP)
	$(PY) pipeline.py tune --profile $(PROFILE) $(ARGS)

# One run per seed (lastmile/reproduce.py), one after another; ARGS="--seeds 0,1,2,3,4".
reproduce: $(STAMP)
	$(PY) pipeline.py reproduce --profile $(PROFILE) $(ARGS)

compile: $(STAMP)
	$(PY) pipeline.py compile -o pipeline.yaml

bench: $(STAMP)
	$(PY) bench/ppo_step.py

# The cost model: the whole local pipeline (profile smoke) at 3 data sizes x 1 and 2 shards.
bench-scaling: $(STAMP)
	$(PY) bench/scaling.py $(ARGS)

# The cost account (issue 21): per stage seconds, tokens, FLOPs and the share of the matmul bound.
# Runs the demo first unless ARGS names a finished run: make bench-costs ARGS="--run runs/latest"
bench-costs: $(STAMP)
	$(PY) bench/stage_costs.py $(ARGS)

# TRL 0.29.1 (the last release with PPOTrainer) lives in its own venv, outside our dependencies;
# the shared packages are held to requirements.lock's versions.
TRL_VENV  ?= .venv-trl
TRL_PY     = $(TRL_VENV)/bin/python
TRL_STAMP  = $(TRL_VENV)/.installed

$(TRL_STAMP): requirements.lock
	test -x $(TRL_PY) || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_PY) -m pip install -q --upgrade pip
	$(TRL_PY) -m pip install -q torch==2.13.0
	$(TRL_PY) -m pip install -q -c requirements.lock trl==0.29.1 transformers==5.23.0 "peft==0.21.*"
	touch $(TRL_STAMP)

bench-trl: $(STAMP) $(TRL_STAMP)
	$(PY) bench/ppo_vs_trl.py --trl-python $(TRL_PY) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache runs

-include docker/image.mk
