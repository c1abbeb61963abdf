# qsfraud: every install step lives here or in the scripts it calls.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install liboqs browser lint test demo clean stack-up stack-down stack-status

install: $(STAMP) liboqs browser

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# uv fetches and installs in parallel: a fresh install took 25 s, pip's 58 s (2 cores)
	$(BIN)/pip install -q uv
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -e '.[dev,oqs]'
	@touch $(STAMP)

# The optional oqs backend's library, in the venv (pqc.backend.find_liboqs looks there). A
# failed build is not fatal: the backend stays unavailable and its tests are skipped.
liboqs: $(STAMP)
	@scripts/build-liboqs $(VENV) || echo "make: liboqs was not built (see above);" \
	  "the oqs backend stays unavailable and its tests are skipped" >&2

# Debian's chromium and chromedriver for the UI's browser test; without them that test skips.
browser:
	@scripts/install-browser || echo "make: chromium/chromedriver not installed (see above);" \
	  "the UI's browser test is skipped" >&2

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install lint
	$(BIN)/python -m pytest

# the demo needs neither the optional liboqs backend nor the test browser
demo: $(STAMP)
	$(BIN)/qsfraud demo $(DEMO_ARGS)

stack-up: install
	$(BIN)/qsfraud stack up

stack-down: install
	$(BIN)/qsfraud stack down

stack-status: install
	$(BIN)/qsfraud stack status

clean:
	-test -x $(BIN)/qsfraud && $(BIN)/qsfraud stack down
	rm -rf $(VENV) .qsfraud .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist *.egg-info
