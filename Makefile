# Run `make help` for the targets. Everything installs into .venv; nothing is needed by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PORT := $${BENTOML_PORT:-3000}
# make serve HOST=0.0.0.0 accepts connections from other machines; the default only from this one.
HOST ?= 127.0.0.1

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@echo "Installing the project and its tools into $(VENV) (the first time: a few minutes, quietly)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed ## create .venv and install the project with training, load-test, drift and dev extras

system-deps: ## install Debian's prometheus (with promtool), prometheus-pushgateway and chromium (browser test), if missing
	@missing=""; \
	  command -v promtool >/dev/null && command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	  command -v prometheus-pushgateway >/dev/null || missing="$$missing prometheus-pushgateway"; \
	  command -v chromium >/dev/null || missing="$$missing chromium fonts-dejavu-core"; \
	  [ -z "$$missing" ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $$missing >/dev/null; }

train: setup ## generate the demo data, train, export fp32/fp16/int8 and save to the BentoML model store
	$(PY) -m training --demo

demo: stored-model ## set up, train the demo model if none is stored yet, then serve on port 3000 (or $BENTOML_PORT)
	@echo ""
	@echo "Starting the service. Once it logs 'self-test passed: ready' (a few seconds), open"
	@echo "  http://127.0.0.1:$(PORT)/ui     to try the model in a browser"
	@echo "  http://127.0.0.1:$(PORT)/docs   for the API, or from another shell:"
	@echo "  curl -F image=@photo.jpg http://127.0.0.1:$(PORT)/classify"
	@echo "Ctrl+C stops it. 'make train' trains the demo model again."
	@echo ""
	$(MAKE) --no-print-directory serve

serve: setup ## serve the latest stored model on port 3000 (or $BENTOML_PORT), no retraining
	$(BIN)/bentoml serve . --host $(HOST) --port $(PORT)

test: setup system-deps ## set up and run every test, the container's too (GPU tests skip without a GPU)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@if [ "$$(id -u)" = 0 ]; then bash container/base.sh; else echo "not root: the container tests will skip"; fi
	$(BIN)/pytest

monitor: setup system-deps ## Prometheus (rules, :9090) watching the service on :3000 ($BENTOML_PORT), the drift Pushgateway and Evidently's UI (:8000); ARGS='--port 9190' for others
	$(PY) -m monitoring.monitor $(ARGS)

stored-model: setup
	@$(BIN)/bentoml models get $${IMGCLS_MODEL:-image-classifier:latest} >/dev/null 2>&1 || \
	  { echo "No model $${IMGCLS_MODEL:-image-classifier:latest} in the store: training the demo model first (a few minutes on 2 cores)"; \
	    $(PY) -m training --demo; }

container-base: ## podman and the base image the Bento's Dockerfile needs (a stand-in where no registry serves it)
	bash container/base.sh

container: stored-model ## build the Bento and its GPU image (podman, or docker with a daemon); prints the run line
	BIN=$(BIN) bash container/build.sh bentofile.yaml

container-cpu: stored-model ## the same with the CPU-only onnxruntime: a much smaller image for CPU nodes
	BIN=$(BIN) bash container/build.sh bentofile.cpu.yaml

container-jobs: ## the jobs image (deploy/jobs/Containerfile): drift and Locust, without the model or onnxruntime
	bash container/build-jobs.sh

deploy-render: ## print the Kubernetes objects of deploy/cpu, deploy/gpu, deploy/jobs and deploy/monitoring
	@for d in cpu gpu jobs monitoring; do echo "# ---- kubectl kustomize deploy/$$d"; kubectl kustomize deploy/$$d; done

test-container: setup system-deps container-base ## build the images, run them with podman (and kube play the manifests)
	$(BIN)/pytest -m container

test-reliability: setup system-deps ## only the attacks and failures beside a normal client (about 5 minutes; docs/reliability.md)
	$(BIN)/pytest -m reliability -s

bench: setup ## model-stage benchmark, then the full load-test comparison against the FastAPI baseline
	$(PY) -m loadtest.modelbench
	$(PY) -m loadtest.run --compare

audit: setup ## the installed packages against PyPI's vulnerability data (says so when it cannot be reached)
	@test -x .venv-audit/bin/pip-audit || { $(PYTHON) -m venv .venv-audit && .venv-audit/bin/pip install -q pip-audit; }
	@.venv-audit/bin/pip-audit --path "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	  --format json --output .audit.json --progress-spinner off >/dev/null 2>&1 || true
	@$(PY) tools/audit.py .audit.json

lint: setup ## format and lint
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: ## remove caches and generated outputs (keeps .venv, the model store and the inference log)
	rm -rf .pytest_cache .ruff_cache build runs reports results .monitor
	@if [ -x $(PY) ]; then echo "kept: the model store and the inference log, $$($(PY) -c \
	  'from imgcls.inference_log import default_log_dir; print(default_log_dir())')"; fi

.PHONY: help setup system-deps train demo serve monitor test bench audit lint clean stored-model container-base \
	container container-cpu container-jobs deploy-render test-container test-reliability
