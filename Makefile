# The two commands of the README: `make repro` (the study on the default params) and `make test`.
# Both create the project venv and install the pinned requirements first (idempotent).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Prefect's settings (home .prefect/, no analytics, start-up timeout) are in prefect.toml
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install browser postgres slurm repro test lint bench clean-data serve ui screenshots mlflow-view pool

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

repro: install
	$(BIN)/dvc repro

# Debian's chromium, for the test that screenshots the MLflow and Prefect UIs (tests/flows/test_ui.py)
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Debian's PostgreSQL, for the scale-out tests' servers (tests/scaleout: they start their own,
# on loopback, as the postgres user)
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql >/dev/null; }

# Debian's Slurm and munge, for the scale-out tests' one-node cluster (tests/scaleout: they
# start munged, slurmctld and slurmd of their own, on loopback)
slurm:
	@command -v slurmctld >/dev/null || [ -x /usr/sbin/slurmctld ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; }

# Two pytest workers, a test file each at a time (module fixtures stay whole): many tests wait on
# servers, heartbeats or subprocesses, so two files at once take ~30% less wall time on 2 cores
test: install browser postgres slurm
	$(BIN)/ruff check .
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder

# MLflow (the project's mlflow.db) and Prefect servers on 127.0.0.1 + the grid deployment; Ctrl-C stops
ui: install
	$(BIN)/python -m flows.ui

# Re-take the screenshots of both UIs (docs/screenshots/, shown in docs/uis.md) with the UI test
screenshots: install browser
	SCREENSHOTS_DIR=$(CURDIR)/docs/screenshots $(BIN)/pytest tests/flows/test_ui.py

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/loader_throughput.py
	$(BIN)/python bench/model_speed.py
	$(BIN)/python bench/moe_speed.py
	$(BIN)/python bench/shards_memory.py
	$(BIN)/python bench/long_tail.py oracle
	$(BIN)/python bench/cpu_kernels.py

# The grid as a Prefect deployment, to start and schedule grids from the UI (docs/grid.md).
# Needs a Prefect server: `.venv/bin/prefect server start --host 127.0.0.1` in another terminal.
PREFECT_SERVER ?= http://127.0.0.1:4200/api
serve: install
	@$(BIN)/python -c "import urllib.request as u; u.urlopen('$(PREFECT_SERVER)/health', timeout=5)" \
	  2>/dev/null || { echo "no Prefect server at $(PREFECT_SERVER): start one with" \
	  "'$(BIN)/prefect server start --host 127.0.0.1'"; exit 1; }
	PREFECT_API_URL=$(PREFECT_SERVER) $(BIN)/python -m flows.grid serve

# A local Prefect work pool with WORKERS workers (docs/scale-out.md); needs the servers
# (`make ui` in another terminal) and PREFECT_API_URL / MLFLOW_TRACKING_URI exported; Ctrl-C stops
WORKERS ?= 2
pool: install
	$(BIN)/python -m flows.pool up --pool local --workers $(WORKERS)

clean-data:
	rm -rf data results

# Re-take the MLflow comparison view of docs/uis.md (docs/screenshots/mlflow-comparison-*.png) from
# this checkout's MLflow store (after `make repro`)
mlflow-view: install browser
	$(BIN)/python docs/mlflow_comparison_view.py
