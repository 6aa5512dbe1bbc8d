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

# Set-up: .venv from uv.lock (`uv sync --frozen`), on CPython 3.11-3.13, Linux x86_64 or aarch64 (README "Set-up").
# The interpreter: PYTHON=/path/to/python3.X when given, else the existing .venv's when it is supported, else the
# first of python3.13, python3.12, python3.11, python3 that is 3.11-3.13. A .venv of another interpreter (one that
# no longer runs, is unsupported, or differs from PYTHON=) is replaced. The core and the `test` extra are always
# installed; EXTRAS adds more and is remembered (`make setup EXTRAS=gpu`: JAX with CUDA for bench/gpu_run.sh;
# `make setup EXTRAS=test`: back to the default).
PYTHON ?=
EXTRAS ?=
UV_VERSION := 0.13.9
PY_SUPPORTED := import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13) or sys.implementation.name != "cpython")
PY_ID := import platform, sys; print(platform.python_implementation(), platform.python_version(), "in", sys.base_prefix)
export UV_PYTHON_DOWNLOADS := never

# Prints nothing when $(VENV) is a virtual environment of a supported interpreter (made here when missing, replaced
# when stale), else the one line that `make setup` stops with. Progress goes to stderr.
define VENV_CHECK
pick() { for c in $(if $(PYTHON),"$(PYTHON)",python3.13 python3.12 python3.11 python3); do
    p=$$(command -v "$$c" 2>/dev/null) && "$$p" -c '$(PY_SUPPORTED)' 2>/dev/null && { echo "$$p"; return 0; };
  done; return 1; };
need="make setup: needs CPython 3.11, 3.12 or 3.13 (tried $(if $(PYTHON),PYTHON=$(PYTHON),python3.13 python3.12 python3.11 python3)); install one, or pass PYTHON=/path/to/python3.X";
if [ -e $(VENV) ] && [ ! -f $(VENV)/pyvenv.cfg ]; then
  echo "make setup: $(VENV) exists but is no virtual environment; move it away, or pass VENV=another/folder"; exit 0; fi;
if [ -f $(VENV)/pyvenv.cfg ]; then
  have=$$($(PY) -c '$(PY_ID)' 2>/dev/null) || have=; want=$$have; why=;
  $(if $(PYTHON),want=$$(p=$$(pick) && "$$p" -c '$(PY_ID)') || { echo "$$need"; exit 0; };)
  if [ -z "$$have" ]; then why="its Python ($$(sed -n 's/^home *= *//p' $(VENV)/pyvenv.cfg)) no longer runs";
  elif ! $(PY) -c '$(PY_SUPPORTED)' 2>/dev/null; then why="$$have is not CPython 3.11-3.13";
  elif [ "$$have" != "$$want" ]; then why="$$have, but PYTHON is $$want"; fi;
  if [ -n "$$why" ]; then
    echo "make setup: replacing $(VENV): $$why" >&2;
    rm -rf $(VENV); fi; fi;
if [ ! -f $(VENV)/pyvenv.cfg ]; then
  base=$$(pick) || { echo "$$need"; exit 0; };
  echo "make setup: $(VENV) from $$base" >&2;
  "$$base" -m venv $(VENV) >&2 || { rm -rf $(VENV); echo "make setup: $$base cannot create a virtual environment (Debian: apt-get install python3-venv)"; exit 0; }; fi
endef

setup:
	$(if $(findstring n,$(firstword -$(MAKEFLAGS))),,$(eval VENV_PROBLEM := $(shell $(VENV_CHECK))))
	$(if $(VENV_PROBLEM),$(error $(VENV_PROBLEM)))
	@extras="$(filter-out test,$(EXTRAS))"; $(if $(EXTRAS),,[ -f $(STAMP) ] && extras=$$(cat $(STAMP));) \
	if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" != "$$extras" ]; then rm -f $(STAMP); fi; \
	$(MAKE) -q $(STAMP) 2>/dev/null || $(MAKE) --no-print-directory $(STAMP) EXTRAS="$$extras"

$(STAMP): pyproject.toml uv.lock
	@case "$$($(BIN)/uv --version 2>/dev/null)" in "uv $(UV_VERSION)"*) ;; *) \
	  { $(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip -q; } && \
	  $(PY) -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)";; esac
	UV_PROJECT_ENVIRONMENT=$(abspath $(VENV)) $(BIN)/uv sync -q --frozen --compile-bytecode -p $(PY) \
	  --extra test $(foreach e,$(filter-out test,$(EXTRAS)),--extra $(e))
	@echo "$(filter-out test,$(EXTRAS))" > $(STAMP)

run: setup
	$(BIN)/tlpipe repro

# ruff: pinned in the `test` extra of pyproject.toml (uv.lock), configured in [tool.ruff]
lint: setup
	$(BIN)/ruff check .

test: lint
	$(PY) -m pytest -q -n 3 --dist loadgroup --durations=15

test-fast: lint
	$(PY) -m pytest -q -n 3 --dist loadgroup -m "not slow"

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
