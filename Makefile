# tlpipe: two commands do everything — `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.tlpipe-installed
HOST ?= 127.0.0.1
UI_PORT ?= 5000
PREFECT_PORT ?= 4200
SERVE_PORT ?= 5001
TRACKING_PORT ?= 5010
PG_PORT ?= 55432
WORK_POOL ?= tlpipe

# Nothing phones home: Prefect, MLflow and DVC telemetry off in every command.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup run lint test test-fast bench bench-full ui prefect-server prefect-stop deploy worker serve serve-model tracking-server tracking-stop remote clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check "uv==0.13.9"
	$(BIN)/uv pip install -q --compile-bytecode -p $(PY) -r requirements.lock
	$(BIN)/uv pip install -q --compile-bytecode -p $(PY) --no-deps -e .
	@touch $(STAMP)

run: setup
	$(BIN)/tlpipe repro

# ruff (its pin: the `test` extra of pyproject.toml; installed here until requirements.lock carries it)
RUFF_PIN := $(shell grep -o '"ruff==[^"]*"' pyproject.toml | tr -d '"')

lint: setup
	@test -x $(BIN)/ruff || $(BIN)/uv pip install -q -p $(PY) "$(RUFF_PIN)"
	$(BIN)/ruff check .

test: lint
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

test-fast: lint
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow"

bench: setup
	$(PY) -m bench.run --quick

bench-full: setup
	$(PY) -m bench.run

# DVC experiments side by side: each model's test accuracy (a column per model, headed by its name) and the
# params that differ between rows; fits 160 columns with six models (`dvc exp show` alone: every column).
.PHONY: exps
exps: setup
	$(BIN)/tlpipe exps

# The course's accuracy-vs-compute chart on your data: one DVC experiment per backbone (queued), then
# reports/compare_backbones/backbones.{png,csv}. Options: SOURCE=/abs/path (e.g. hymenoptera), BACKBONES="a b c",
# SET="key=value ..." (params for every run, e.g. SET="data.image_size=fixres data.resize_mode=center_crop").
.PHONY: compare-backbones
compare-backbones: setup
	$(BIN)/tlpipe compare-backbones $(foreach b,$(BACKBONES),-b $(b)) \
	  $(if $(SOURCE),-S data.source=$(abspath $(SOURCE)) -S data.max_per_class=null) $(foreach s,$(SET),-S $(s))

ui: setup
	$(BIN)/tlpipe ui --host $(HOST) --port $(UI_PORT)

# The project's Prefect server (runs kept in .prefect/prefect.db); stages and `tlpipe` start it on demand too.
prefect-server: setup
	TLPIPE_PREFECT_PORT=$(PREFECT_PORT) $(BIN)/tlpipe prefect-server start

prefect-stop: setup
	$(BIN)/tlpipe prefect-server stop

# Retrain deployment on a Prefect process work pool; `make worker` (on each machine) executes its runs.
deploy: setup
	$(BIN)/tlpipe deploy --work-pool $(WORK_POOL)

worker: setup
	$(BIN)/tlpipe worker --pool $(WORK_POOL)

serve: setup
	$(BIN)/tlpipe serve

serve-model: setup
	$(BIN)/tlpipe serve-model --host $(HOST) --port $(SERVE_PORT)

# Shared tracking: PostgreSQL + MLflow server (artifacts proxied) on 127.0.0.1, state in .tlpipe/.
tracking-server: setup
	$(PY) -m tlpipe.ops.services start --pg-port $(PG_PORT) --port $(TRACKING_PORT)

tracking-stop: setup
	$(PY) -m tlpipe.ops.services stop

# Default DVC remote for `dvc push`/`dvc pull`: make remote REMOTE=/path/or/s3://bucket/prefix
remote: setup
	@test -n "$(REMOTE)" || { echo "usage: make remote REMOTE=/path/to/dir (or s3://bucket/prefix)"; exit 2; }
	$(BIN)/dvc remote add --default --force store $(REMOTE)

clean:
	rm -rf data models reports metrics/*.json mlflow.db mlartifacts dvc.lock
