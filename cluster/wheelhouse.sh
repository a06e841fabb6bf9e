#!/usr/bin/env bash
# Collects every package msx's nodes need into one folder, so that nodes with no package index in reach
# can still install (cluster/setup_node.sh installs from SHARED_FOLDER/wheelhouse, and only from there,
# when it exists):
#
#   PYTHON=.venv/bin/python bash cluster/wheelhouse.sh /mnt/shared/wheelhouse [REQUIREMENT...]
#
# Run it from a checkout on a machine that can reach the index and has the nodes' OS, CPU architecture
# and Python minor version (wheels are built for the Python that runs pip). The head will do once its
# first `ray up` has installed msx there: ray exec CLUSTER.yaml 'bash ~/msx/cluster/wheelhouse.sh /mnt/shared/wheelhouse'.
# REQUIREMENTs are the extra packages the config installs (a100.yaml: "boto3>=1.26").
set -euo pipefail

wheelhouse=${1:?usage: wheelhouse.sh WHEELHOUSE_FOLDER [REQUIREMENT...]}
shift
checkout=$(cd "$(dirname "$0")/.." && pwd)
# setuptools: the build backend that installs the checkout itself (editable) on the nodes.
"${PYTHON:-python3}" -m pip wheel --progress-bar off --wheel-dir "$wheelhouse" setuptools "$checkout" "$@"
# The nodes install msx from their synced checkout, never from a wheel.
rm -f "$wheelhouse"/msx-*.whl
echo "$(ls "$wheelhouse" | wc -l) wheels in $wheelhouse"
