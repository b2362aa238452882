# Everything installs into .venv on first use; `make test` and `make demo` need nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pyproject accepts any torch>=2.4 (GPU users install theirs). Here we pin the CPU build that
# pip finds on local disk; elsewhere override, e.g. make test TORCH_SPEC='torch>=2.4'.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-run
PYTEST_ARGS ?=

PROMETHEUS_DIR := .cache/prometheus
PROMETHEUS := $(PROMETHEUS_DIR)/usr/bin/prometheus

.PHONY: install test demo prometheus clean

install: $(STAMP)

# Debian's prometheus + promtool unpacked under .cache (the monitoring tests run them)
prometheus: $(PROMETHEUS)

$(PROMETHEUS):
	cluster/fetch-prometheus.sh $(PROMETHEUS_DIR)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

test: $(STAMP) $(PROMETHEUS)
	PROMETHEUS_DIR=$(PROMETHEUS_DIR) $(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/raythyroid demo $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
