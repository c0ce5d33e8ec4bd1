#!/bin/bash
# The whole test suite on a fresh Debian 12/13 machine, as root: installs what it needs,
# starts the lab cluster (munge, slurmctld, slurmd + sshd per node), runs unit and lab tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
mkdir -p artifacts
exec /opt/dxflow/venv/bin/python -m pytest tests -p no:cacheprovider "$@"
