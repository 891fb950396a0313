# Two entry points (see README): `make dashboard` and `make test`. Everything else is a helper.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-installed
DEV     := $(VENV)/.dev-installed
PORT    ?= 8501

.PHONY: setup setup-dev dashboard dashboard-remote demo test test-fast chromium benchmark clean-runs

$(RUNTIME): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

$(DEV): $(RUNTIME) requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(RUNTIME)
setup-dev: $(DEV) chromium

## Set up and start the dashboard on 127.0.0.1:$(PORT) (CPU demo preselected, synthetic data generated on first start)
dashboard: setup
	$(BIN)/python -m streamlit run dashboard/server.py --server.port $(PORT)

## Remote monitoring: binds all interfaces; refuses to start without DASHBOARD_PASSWORD
dashboard-remote: setup
	@test -n "$$DASHBOARD_PASSWORD" || { echo "error: set DASHBOARD_PASSWORD first (see docs/dashboard.md)"; exit 2; }
	$(BIN)/python -m streamlit run dashboard/server.py --server.address 0.0.0.0 --server.port $(PORT)

## Train the CPU demo from the shell (no browser)
demo: setup
	$(BIN)/python -m engine train --config configs/demo_cpu.yaml

## Debian's Chromium for the browser tests (Playwright drives /usr/bin/chromium)
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; }
	@command -v chromium >/dev/null 2>&1 || { echo "error: chromium could not be installed"; exit 1; }

## Set up and run every test (unit, AppTest and end-to-end browser tests)
test: setup-dev
	$(BIN)/python -m pytest -q -ra

## Everything but the browser tests
test-fast: setup-dev
	$(BIN)/python -m pytest -q -ra -m "not e2e"

benchmark: setup
	$(BIN)/python scripts/benchmark.py

clean-runs:
	rm -rf runs/* checkpoints/*
	touch runs/.gitkeep checkpoints/.gitkeep
