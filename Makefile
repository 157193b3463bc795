# Two commands do all the set-up on a fresh machine:
#   make demo   the main job on the local fleet
#   make test   installs what the suite needs (Debian packages included) and runs it
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH):/usr/sbin
APT_PACKAGES := redis-server haproxy openssh-server openssh-client cron logrotate wrk supervisor systemd python3-venv postgresql
DEMO ?= .demo
PYTEST_ARGS ?=
# test files run side by side (pytest-xdist, one worker per file): each e2e module has its own fleet
# on its own ports, so the slow failure cases overlap; TEST_WORKERS=0 runs everything in one process
TEST_WORKERS ?= 3

.PHONY: help deps venv demo fleet-down test bench clean

help:
	@echo "make demo   set up, train the examples, register them, show them"
	@echo "make test   install what the tests need and run the whole suite"
	@echo "make bench  run the benchmarks (ratios, side by side)"

# Debian packages the real servers in the tests come from; installed only when missing. systemd only
# for systemd-analyze (the unit test; nothing is started); python3-venv for mlpipe_common's molecule venv;
# logrotate for retrain_cron (its molecule checks the rule with logrotate -d); postgresql for the
# capture database tests (started by the tests as the postgres user; the package starts nothing here).
deps:
	@missing=""; for c in redis-server haproxy sshd ssh-keygen crontab logrotate wrk supervisord systemd-analyze; do \
	  command -v $$c >/dev/null 2>&1 || [ -x /usr/sbin/$$c ] || missing="$$missing $$c"; done; \
	/usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
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
	# the Jupyter kernel papermill runs spec notebooks on (into the venv, not the user's ~/.local)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mlpipe)" >/dev/null
	touch $@

venv: $(VENV)/.installed

# The main job on the local fleet: HAProxy on 127.0.0.10, model servers on 127.0.0.11-13
demo: deps venv
	@$(MAKE) --no-print-directory fleet-down
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	@export MLPIPE_FLEET_ROOT=$(CURDIR)/$(DEMO) MLPIPE_REGISTRY=$(CURDIR)/$(DEMO)/registry; set -e; \
	for s in credit-risk hello-world house-prices; do $(BIN)/mlpipe train examples/$$s.yml -m "demo: first $$s"; done; \
	$(BIN)/mlpipe train examples/credit-risk.yml -m "Updated model with August data"; \
	$(BIN)/mlpipe models promote credit-risk:2 --alias production --reason "demo: beats v1"; \
	echo; echo '$$ mlpipe models list'; $(BIN)/mlpipe models list; \
	echo; echo '$$ mlpipe models show credit-risk@production'; $(BIN)/mlpipe models show credit-risk@production; \
	echo; echo "$$ ansible-playbook playbooks/site.yml -e '{\"model_server_models\": [\"credit-risk\", \"hello-world\"]}' -e model_server_capture_sample=1   # two models on every server; record every request"; \
	$(BIN)/ansible-playbook playbooks/site.yml -e '{"model_server_models": ["credit-risk", "hello-world"]}' -e model_server_capture_sample=1 | tail -8; \
	echo; echo '$$ ansible-playbook playbooks/deploy.yml -e model=credit-risk -e version=@production'; \
	$(BIN)/ansible-playbook playbooks/deploy.yml -e model=credit-risk -e version=@production | tail -6; \
	echo; echo '$$ ansible-playbook playbooks/deploy.yml -e model=hello-world -e version=1   # each model deploys on its own'; \
	$(BIN)/ansible-playbook playbooks/deploy.yml -e model=hello-world -e version=1 | tail -6; \
	echo; echo '$$ mlpipe evaluate --endpoint http://127.0.0.11:8000 --model credit-risk --expect-version 2 --min accuracy=0.85   # on its stored holdout'; \
	$(BIN)/mlpipe evaluate --endpoint http://127.0.0.11:8000 --model credit-risk --expect-version 2 --min accuracy=0.85; \
	echo; echo '$$ mlpipe retrain examples/credit-risk.yml   # what cron runs (ansible-playbook playbooks/retrain.yml installs it)'; \
	$(BIN)/mlpipe retrain examples/credit-risk.yml; \
	echo; echo '$$ mlpipe retrain examples/credit-risk.yml --force --dry-run   # exit 10: would be promoted'; \
	$(BIN)/mlpipe retrain examples/credit-risk.yml --force --dry-run || test $$? = 10; \
	echo; echo '$$ mlpipe models history credit-risk'; $(BIN)/mlpipe models history credit-risk; \
	echo; echo '$$ python examples/send_traffic.py http://127.0.0.10:8080 --rows 300 --labels $(DEMO)/labels.csv'; \
	$(BIN)/python examples/send_traffic.py http://127.0.0.10:8080 --rows 300 --labels $(DEMO)/labels.csv; \
	echo; echo '$$ mlpipe predictions list credit-risk --since 1h --limit 5   # what the servers captured'; \
	$(BIN)/mlpipe predictions list credit-risk --since 1h --limit 5; \
	echo; echo '$$ mlpipe feedback load credit-risk $(DEMO)/labels.csv   # the true outcomes, by request id'; \
	$(BIN)/mlpipe feedback load credit-risk $(DEMO)/labels.csv; \
	echo; echo '$$ mlpipe monitor examples/credit-risk.yml --endpoint http://127.0.0.11:8000 --endpoint http://127.0.0.12:8000 --endpoint http://127.0.0.13:8000'; \
	$(BIN)/mlpipe monitor examples/credit-risk.yml --endpoint http://127.0.0.11:8000 --endpoint http://127.0.0.12:8000 \
	  --endpoint http://127.0.0.13:8000 || echo "(exit $$?: an alert is firing; see docs/runbooks/alert-fired.md)"; \
	body=$$($(BIN)/python -c 'import json; from sklearn.datasets import load_breast_cancer as l; f=l(as_frame=True).frame; c=[x for x in f.columns if x!="target"]; print(json.dumps({"dataframe_split": {"columns": c, "data": f[c].head(2).values.tolist()}}))'); \
	echo; echo "The fleet is up: three hosts behind HAProxy, each serving credit-risk and hello-world. Try:"; \
	echo "  curl -s http://127.0.0.10:8080/models/credit-risk/invocations -H 'Content-Type: application/json' -d '$$body'"; \
	curl -s http://127.0.0.10:8080/models/credit-risk/invocations -H 'Content-Type: application/json' -d "$$body"; echo; \
	echo "  curl -s http://127.0.0.10:8080/models/hello-world/invocations -H 'Content-Type: application/json' -d '{\"instances\": [[5.1, 3.5, 1.4, 0.2]]}'"; \
	curl -s http://127.0.0.10:8080/models/hello-world/invocations -H 'Content-Type: application/json' -d '{"instances": [[5.1, 3.5, 1.4, 0.2]]}'; echo; \
	echo "  export MLPIPE_FLEET_ROOT=$(CURDIR)/$(DEMO) MLPIPE_REGISTRY=$(CURDIR)/$(DEMO)/registry   # then ansible-playbook / mlpipe as above"; \
	echo "  make fleet-down   # stops the demo fleet"

# Stop what site.yml started on the local fleet (supervisord + gunicorn per host, HAProxy)
fleet-down:
	@for c in $(DEMO)/*/etc/supervisord.conf; do [ -f "$$c" ] && supervisorctl -c "$$c" shutdown >/dev/null 2>&1; done; \
	for p in $(DEMO)/*/run/haproxy.pid; do [ -f "$$p" ] && kill $$(cat "$$p") 2>/dev/null; done; true

test: deps venv
	$(BIN)/python -m pytest -q -p no:cacheprovider $$( [ "$(TEST_WORKERS)" = 0 ] || echo "-n $(TEST_WORKERS) --dist loadfile" ) $(PYTEST_ARGS)

# mlflow is a benchmark-only dependency: its own venv, with our scikit-learn version so both load the same pickle
.venv-bench/.installed: $(VENV)/.installed
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q mlflow "scikit-learn==$$($(BIN)/python -c 'import sklearn; print(sklearn.__version__)')"
	touch $@

# Seldon MLServer (the other OIP v2 server) with its scikit-learn runtime: benchmark-only, its own venv for the same
# reason. uvloop<0.22: with 0.22+ MLServer 1.7's inference workers die at start (SeldonIO/MLServer#2286)
.venv-mlserver/.installed: $(VENV)/.installed
	$(PYTHON) -m venv .venv-mlserver
	.venv-mlserver/bin/pip install -q mlserver mlserver-sklearn "uvloop<0.22" "scikit-learn==$$($(BIN)/python -c 'import sklearn; print(sklearn.__version__)')"
	touch $@

bench: deps venv .venv-bench/.installed .venv-mlserver/.installed
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/retrain_skip.py
	$(BIN)/python benchmarks/onnx_vs_sklearn.py
	$(BIN)/python benchmarks/serve_vs_mlflow.py
	$(BIN)/python benchmarks/deploy_scaling.py
	$(BIN)/python benchmarks/capture_overhead.py
	$(BIN)/python benchmarks/monitor_scale.py
	$(BIN)/python benchmarks/reload_stall.py
	$(BIN)/python benchmarks/multi_model.py

clean:
	rm -rf $(VENV) .venv-bench .venv-mlserver $(DEMO) .mlpipe .pytest_cache
