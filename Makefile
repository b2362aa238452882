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

# DICOM tools the tests write and validate files with (dcmtk, GDCM, dicom3tools' dciodvfy), a
# PACS (Orthanc) and the browser the reports are opened in (Chromium and its WebDriver):
# installed when running as root, as CI does; elsewhere those tests skip and say why. Under
# CI=true nothing may skip: a failed install stops the run here, naming what is missing (and a
# test that finds a part missing fails, tests/helpers.py: missing)
DEBIAN_TOOLS := dcmtk libgdcm-tools dicom3tools orthanc orthanc-dicomweb chromium chromium-driver
DEBIAN_COMMANDS := img2dcm dcmcjpls gdcmconv dciodvfy Orthanc chromium chromedriver
# the PACS tests also need Orthanc's DICOMweb plugin, a file rather than a command
DICOMWEB_PLUGIN := /usr/share/orthanc/plugins/libOrthancDicomWeb.so

.PHONY: install test demo prometheus clean debian-tools system-tools test-setup

install: $(STAMP)

# Debian's prometheus + promtool unpacked under .cache (the monitoring tests run them)
prometheus: $(PROMETHEUS)

$(PROMETHEUS):
	cluster/fetch-prometheus.sh $(PROMETHEUS_DIR)

# the Debian tools, then Prometheus: both may run apt-get update, which takes a lock, and
# test-setup's `make -j` would otherwise start them together; the Python packages install
# alongside
system-tools: debian-tools
	@$(MAKE) --no-print-directory $(PROMETHEUS)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# checked on every run (a few `command -v`), so a machine that gains root or loses a package
# is set right next time; every command is checked, one missing package is enough to install
debian-tools:
	@missing=$$(for c in $(DEBIAN_COMMANDS); do command -v $$c >/dev/null || echo $$c; done; \
		test -f $(DICOMWEB_PLUGIN) || echo orthanc-dicomweb); \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_TOOLS) >/dev/null; } || \
		{ echo "apt-get install $(DEBIAN_TOOLS) failed: missing" $$missing; \
		  if [ "$$CI" = true ]; then exit 1; else echo "(their tests will skip)"; fi; }; \
	elif [ "$$CI" = true ]; then echo "CI=true, not root: $$missing missing and not installed"; exit 1; \
	else echo "not root: $$missing missing, not installed (their tests will skip)"; fi

# everything the tests need, in parallel: the Python packages install while apt-get fetches
# the Debian tools (pip's disk and CPU against the network and dpkg)
test-setup:
	@$(MAKE) --no-print-directory -j3 $(STAMP) system-tools

# two lanes side by side (tests/conftest.py says which test runs in which); LANES=0 runs the
# suite in this one process, as a plain `pytest` does
LANES ?= 2
test: test-setup
	PROMETHEUS_DIR=$(PROMETHEUS_DIR) $(BIN)/python -m pytest -q --durations=30 \
		$(if $(filter-out 0,$(LANES)),-n $(LANES)) $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/raythyroid demo $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
