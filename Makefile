# cyclemerge: `make run` runs the whole pipeline on params.yaml, `make test` runs the tests.
# Both create the virtual environment (.venv) on first use.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum requirements-lock.txt pyproject.toml | sha256sum | cut -c1-12)
export PATH := $(abspath $(BIN)):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export DVC_NO_ANALYTICS := 1
unexport PIP_CONSTRAINT

.PHONY: venv run pipeline serve grid test test-fast ui ui-check bench clean

venv: $(STAMP)
$(STAMP): requirements-lock.txt pyproject.toml
	@echo "Setting up $(VENV) (first time: about 2-3 minutes, 6.4 GB)…"
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q -r requirements-lock.txt 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/pip check >/dev/null
	@rm -f $(VENV)/.installed-* && touch $@

# The whole pipeline: DVC runs the stages whose params, code or inputs changed, each as a Prefect flow.
# The dataset check comes first (seconds), so a machine that cannot get the data stops before the install.
run:
	@bash scripts/ensure_data.sh params.yaml
	@$(MAKE) --no-print-directory venv
	@[ -d .git ] || git init -q
	@# Nothing stale: DVC says so in half a second, before torch and the pipeline's stack load.
	@$(BIN)/python -m flows.uptodate || $(BIN)/python -m flows.pipeline --run-dvc

# The same DAG as one Prefect flow run (what a deployment runs), without DVC.
pipeline:
	@bash scripts/ensure_data.sh params.yaml
	@$(MAKE) --no-print-directory venv
	@$(BIN)/python -m flows.pipeline

# Serve the pipeline flow on a schedule (a Prefect deployment; CRON or INTERVAL seconds).
CRON ?= 0 3 * * *
serve: venv
	@$(BIN)/python -m flows.serve --cron "$(CRON)"

# A comparison grid (benchmarks/grids/*.yaml): one pipeline run per point, seed models shared via .cache/grid.
GRID ?= benchmarks/grids/paper.yaml
grid: venv
	@$(BIN)/python -m flows.grid $(GRID)

test: venv
	@$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test-fast: venv
	@$(BIN)/python -m pytest -q -m "not slow"

ui: venv
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000 --workers 1

ui-check: venv
	@bash checks/ui_check.sh

bench: venv
	@$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf artifacts .prefect-results mlruns mlflow.db .dvc/tmp
