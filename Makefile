# cleanloop: `make cycle` runs the whole loop on the demo data; `make test` runs the tests.
# Every target bootstraps .venv on first use. Pass Hydra overrides with ARGS="...".

PYTHON ?= python3
# The torch requirement: the CPU wheel by default; GPU users set their CUDA build, e.g.
#   make cycle TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cleanloop-installed
ARGS ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
UI_PORT ?= 5000
STORE := sqlite:///$(CURDIR)/mlruns/mlflow.db
# `make server`: the team's MLflow server; PostgreSQL's data and the artifact root live in SERVER_DIR
SERVER_DIR ?= .cache/server
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5000

.DEFAULT_GOAL := help
.PHONY: help venv test test-fast lint cycle demo-data cache audit oof flag prune review train-baseline train-cleaned compare sweep ui server bench bench-efficacy clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'
	@echo '  ARGS="..." passes Hydra overrides, e.g. make cycle ARGS="data=manifest data.manifest=/data/m.csv model=medsiglip trainer=gpu"'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP) ## create .venv (torch from TORCH, then the project)

test: $(STAMP) ## the whole test suite, slow end-to-end tests included (CI runs this); TEST_WORKERS=1 for one process
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: $(STAMP) ## the tests not marked slow
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check src tests

cycle: $(STAMP) ## demo-data -> oof -> flag -> review -> prune -> train baseline/cleaned -> compare
	$(BIN)/cleanloop cycle $(ARGS)

demo-data: $(STAMP) ## (re)build the demo dataset in data/demo/
	$(BIN)/cleanloop demo-data $(ARGS)

cache: $(STAMP) ## decode + resize every image once into the image cache (then train with data.cache=true)
	$(BIN)/cleanloop cache $(ARGS)

audit: $(STAMP) ## exact and near duplicate images across and within splits (leakage), audit/duplicates.csv
	$(BIN)/cleanloop audit $(ARGS)

oof: $(STAMP) ## k-fold out-of-fold probabilities
	$(BIN)/cleanloop oof $(ARGS)

flag: $(STAMP) ## cleanlab label issues and outliers
	$(BIN)/cleanloop flag $(ARGS)

prune: $(STAMP) ## write the cleaned manifest
	$(BIN)/cleanloop prune $(ARGS)

review: $(STAMP) ## the review page for flagged rows: outputs/<data>/review/index.html
	$(BIN)/cleanloop review $(ARGS)

train-baseline: $(STAMP) ## train on the input manifest
	$(BIN)/cleanloop train role=baseline $(ARGS)

train-cleaned: $(STAMP) ## train on the cleaned manifest
	$(BIN)/cleanloop train role=cleaned $(ARGS)

compare: $(STAMP) ## per-class recall deltas with bootstrap intervals
	$(BIN)/cleanloop compare $(ARGS)

sweep: $(STAMP) ## multirun: cleanlab's filter_by x recipe.seed, ending with sweep_summary.csv
	$(BIN)/cleanloop cycle -m flag.filter_by=prune_by_noise_rate,both,confident_learning recipe.seed=0,1,2 compare.seeds=1 $(ARGS)

ui: $(STAMP) ## MLflow UI on the project's store at 127.0.0.1:$(UI_PORT)
# (MLflow 3 also starts GenAI job workers, e.g. online scoring, that cleanloop never uses: off)
	@$(BIN)/python -m cleanloop.tracking --uri "$(STORE)" --port $(UI_PORT)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri "$(STORE)" --host 127.0.0.1 --port $(UI_PORT)

server: $(STAMP) ## team MLflow server on PostgreSQL at SERVER_HOST:SERVER_PORT, data in SERVER_DIR; ARGS: extra `mlflow server` flags; Ctrl-C stops it
	$(BIN)/python -m cleanloop.pgserver --dir "$(SERVER_DIR)" --host $(SERVER_HOST) --port $(SERVER_PORT) $(if $(ARGS),-- $(ARGS))

bench: $(STAMP) ## benchmarks B1-B5, B9 (B6 where CUDA is; B7, B8 with --parts); rewrites bench/RESULTS.md. ARGS="--parts b1,b4" for some
	$(BIN)/python bench/run.py $(ARGS)

bench-efficacy: $(STAMP) ## B7: cleanloop vs a cleanlab+LogisticRegression peer on noisy digits (~15 min); ARGS="--quick" for a smoke run
	$(BIN)/python bench/run.py --parts b7 --b7-args "$(ARGS)"

clean: ## remove outputs (keeps .venv, data and mlruns)
	rm -rf outputs multirun
