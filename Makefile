# Everything a fresh machine needs: `make launch` runs the default study, `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: launch test test-fast install clean

install: $(VENV)/.installed

# torch first and pinned: its CPU build installs from local disk; letting monai resolve torch would
# pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

launch: install
	$(BIN)/msx launch

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

clean:
	rm -rf $(VENV) msx_runs
