#!/usr/bin/env bash
# Makes one node of an msx Ray cluster ready. The setup_commands of cluster/*.yaml run it on every node:
# on the head at every `ray up`, on each worker whenever the autoscaler starts it.
#
#   bash ~/msx/cluster/setup_node.sh SHARED_FOLDER CONFIG [REQUIREMENT...]
#
# SHARED_FOLDER: the folder every node mounts at the same path; it holds the results (MSX_STORAGE), the
# data and, when there is one, the wheelhouse. CONFIG: the cluster config, named in messages.
# REQUIREMENTs: more packages to install along with msx (a100.yaml: boto3, for Ray's AWS autoscaler).
#
# Packages come from SHARED_FOLDER/wheelhouse when it exists (cluster/wheelhouse.sh makes it), and then
# from there only: a node that cannot reach a package index downloads nothing. Without a wheelhouse they
# come from the node's package index. A second run is quick: when the virtual environment already holds
# what this checkout's pyproject.toml asks for, pip does not run.
set -euo pipefail

usage="usage: setup_node.sh SHARED_FOLDER CONFIG [REQUIREMENT...]"
shared=${1:?$usage}
config=${2:?$usage}
shift 2

fail() {
    echo "$config, node $(hostname): $*" >&2
    exit 1
}

[ -d "$shared" ] && [ -w "$shared" ] ||
    fail "no writable shared folder at $shared: mount it, writable, at that path on every node (see cluster/README.md)"
mkdir -p "$shared/msx_runs" "$shared/data"

# file_mounts copies the token from the machine that runs `ray up`; every node's Ray starts with
# RAY_AUTH_MODE=token and refuses to start without one.
[ -s ~/.ray/auth_token ] ||
    fail "no Ray authentication token at ~/.ray/auth_token: make one once, on the machine that runs ray up, with 'ray get-auth-token --generate' (file_mounts copies it to the nodes)"
chmod 600 ~/.ray/auth_token

venv=~/msx-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" ||
    fail "python3 -m venv failed: msx needs Python 3.10+ with its venv module (Debian, Ubuntu: apt install python3-venv)"

# The environment of every later command, `ray exec`, Ray itself and so the study's driver.
cat > ~/.msx_env <<EOF
source $venv/bin/activate
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=token
export MSX_STORAGE=$shared/msx_runs
EOF
grep -qxF 'source ~/.msx_env' ~/.bashrc 2>/dev/null || echo 'source ~/.msx_env' >> ~/.bashrc

# msx is installed editable from the synced checkout, so a new `ray up` brings new code without pip; only
# new requirements (pyproject.toml, REQUIREMENTs) need an install.
installed="$venv/.msx-requirements"
wanted=$({ cat ~/msx/pyproject.toml; printf '%s\n' "$@"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$installed" 2>/dev/null)" = "$wanted" ]; then
    echo "msx and its requirements are installed already in $venv"
    exit 0
fi
wheelhouse="$shared/wheelhouse"
if [ -d "$wheelhouse" ]; then
    echo "installing msx from the synced checkout, its requirements from $wheelhouse only"
    "$venv/bin/pip" install --progress-bar off --no-index --find-links "$wheelhouse" -e ~/msx "$@" ||
        fail "pip could not install msx from the wheelhouse $wheelhouse: remake it (cluster/wheelhouse.sh) with this checkout, on a machine with this node's platform and Python ($(python3 --version 2>&1))"
else
    echo "installing msx from the synced checkout, its requirements from the package index (no wheelhouse at $wheelhouse)"
    "$venv/bin/pip" install --progress-bar off -e ~/msx "$@" ||
        fail "pip could not install msx's requirements from the package index; nodes that cannot reach one install from a wheelhouse made with cluster/wheelhouse.sh $wheelhouse"
fi
echo "$wanted" > "$installed"
