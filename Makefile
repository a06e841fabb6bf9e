# Everything a fresh machine needs: `make launch` runs the default study, `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: launch test test-fast install browser clean

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

# The UI test renders MLflow's model page in headless Chromium (Debian's package; PyPI has none that works
# offline). Installed only when missing and only where apt-get can run; otherwise that one test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ; } || \
	  echo "Chromium could not be installed: the MLflow UI browser test will be skipped"

test: install browser
	$(BIN)/pytest

# The unit tier (tests/conftest.py): no Ray, no server, no study.
test-fast: install
	$(BIN)/pytest -m "not integration and not slow"

clean:
	rm -rf $(VENV) msx_runs
