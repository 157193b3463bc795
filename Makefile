# Two commands do all the set-up on a fresh machine:
#   make demo   the main job on the local fleet
#   make test   installs what the suite needs (Debian packages included) and runs it
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH):/usr/sbin
APT_PACKAGES := redis-server haproxy openssh-server cron wrk supervisor
DEMO ?= .demo
PYTEST_ARGS ?=

.PHONY: help deps venv demo test test-fast bench clean

help:
	@echo "make demo   set up, train the examples, register them, show them"
	@echo "make test   install what the tests need and run the whole suite"
	@echo "make bench  run the benchmarks (ratios, side by side)"

# Debian packages the real servers in the tests come from; installed only when missing.
deps:
	@missing=""; for c in redis-server haproxy sshd crontab wrk supervisord; do \
	  command -v $$c >/dev/null 2>&1 || [ -x /usr/sbin/$$c ] || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	@export MLPIPE_REGISTRY=$(CURDIR)/$(DEMO)/registry; set -e; \
	for s in credit-risk hello-world house-prices; do $(BIN)/mlpipe train examples/$$s.yml -m "demo: first $$s"; done; \
	$(BIN)/mlpipe train examples/credit-risk.yml -m "Updated model with August data"; \
	$(BIN)/mlpipe models promote credit-risk:2 --alias production --reason "demo: beats v1"; \
	echo; echo '$$ mlpipe models list'; $(BIN)/mlpipe models list; \
	echo; echo '$$ mlpipe models log credit-risk'; $(BIN)/mlpipe models log credit-risk; \
	echo; echo '$$ mlpipe models show credit-risk@production'; $(BIN)/mlpipe models show credit-risk@production; \
	echo; echo '$$ mlpipe evaluate credit-risk@production'; $(BIN)/mlpipe evaluate credit-risk@production; \
	echo; echo "registry: $(CURDIR)/$(DEMO)/registry  (export MLPIPE_REGISTRY=$(CURDIR)/$(DEMO)/registry to explore)"

test: deps venv
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# mlflow is a benchmark-only dependency: its own venv, with our scikit-learn version so both load the same pickle
.venv-bench/.installed: $(VENV)/.installed
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q mlflow "scikit-learn==$$($(BIN)/python -c 'import sklearn; print(sklearn.__version__)')"
	touch $@

bench: deps venv .venv-bench/.installed
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/serve_vs_mlflow.py

clean:
	rm -rf $(VENV) .venv-bench $(DEMO) .mlpipe .pytest_cache
