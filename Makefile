# Everything a fresh machine needs: `make launch` runs the default study, `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: launch test test-fast lint install browser sshd slurm clean

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

# Lint (ruff, configured in pyproject.toml) before any test: `make test` (CI) and `make test-fast` fail on a lint error.
lint: install
	$(BIN)/ruff check .

# The UI tests render MLflow's model page and the Ray dashboard in headless Chromium (Debian's package; PyPI has
# none that works offline). Installed only when missing and only where apt-get can run; otherwise those tests are skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ; } || \
	  echo "Chromium could not be installed: the MLflow UI and Ray dashboard browser tests will be skipped"

# The cluster test (tests/cluster/test_ray_up.py) runs `ray up` over SSH against its own SSH servers on
# 127.0.0.1 and 127.0.0.2: Debian's openssh-server, rsync (Ray's file mounts) and netcat (Ray's way to an SSH
# port other than 22), installed only when missing and only where apt-get can run as root, with the system's
# SSH service kept from starting (policy-rc.d) and from starting at boot. Otherwise that test is skipped.
sshd:
	@if ! { [ -x /usr/sbin/sshd ] && command -v rsync && command -v nc; } >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    policy=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy=1; }; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync netcat-openbsd >/dev/null; \
	    [ -z "$$policy" ] || rm -f /usr/sbin/policy-rc.d; \
	    ! command -v systemctl >/dev/null 2>&1 || systemctl disable ssh.service ssh.socket >/dev/null 2>&1 || true; \
	  fi; \
	  { [ -x /usr/sbin/sshd ] && command -v rsync && command -v nc; } >/dev/null 2>&1 || \
	    echo "openssh-server, rsync or netcat could not be installed: the ray up cluster test will be skipped"; \
	fi

# The SLURM test harness (tests/cluster/slurm_cluster.py) runs a real slurmctld, slurmd and munged from the test's
# temporary folder on 127.0.0.1: Debian's slurm-wlm (slurmctld, slurmd, slurm-client) and munge, installed only when
# missing and only where apt-get can run as root, with the system's SLURM and munge services kept from starting
# (policy-rc.d) and from starting at boot. Otherwise the SLURM tests are skipped.
slurm:
	@if ! { command -v sbatch && command -v slurmctld && command -v slurmd && command -v munged; } >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    policy=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy=1; }; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; \
	    [ -z "$$policy" ] || rm -f /usr/sbin/policy-rc.d; \
	    ! command -v systemctl >/dev/null 2>&1 || systemctl disable slurmctld.service slurmd.service munge.service >/dev/null 2>&1 || true; \
	  fi; \
	  { command -v sbatch && command -v slurmctld && command -v slurmd && command -v munged; } >/dev/null 2>&1 || \
	    echo "slurm-wlm or munge could not be installed: the SLURM tests will be skipped"; \
	fi

test: install lint browser sshd slurm
	$(BIN)/pytest

# The unit tier (tests/conftest.py): no Ray, no server, no study.
test-fast: install lint
	$(BIN)/pytest -m "not integration and not slow"

clean:
	rm -rf $(VENV) msx_runs
