#!/bin/bash
# The Slurm lab tests on each Slurm generation the host does not run (issue #12), as root, after setup.sh:
# for each generation, `dxflow lab up --slurm G` (its Debian root file system and venv are built once and
# cached under /var/cache/dxflow-lab), the tests below run on that lab's login node with `dxflow lab exec`,
# then `dxflow lab down --slurm G`. The host lab (Slurm 22.05) runs them in scripts/test.sh, beside it.
# Usage: scripts/test_generations.sh [GENERATION...]   (default: 24.11 26.05)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (a generation lab is a Slurm cluster in namespaces of its own)" >&2; exit 2; }
if ! command -v mmdebstrap >/dev/null; then  # builds the root file systems (dxflow/lab/rootfs.py)
  echo "== installing mmdebstrap" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
fi
# dxflow from this checkout: a generation lab installs the checkout it runs from into its own venv
# (setup.sh may have put an installed copy in /opt/dxflow/venv, which has no checkout to install)
DXFLOW=(/opt/dxflow/venv/bin/python -m dxflow)
# hooks (prolog/epilog: agents start and are cleaned, a root-squashed home), fleet, logs with output
# patterns, exec, the port of a dead agent (the records the hooks keep), and which backend (squeue or
# pyslurm) is chosen on that generation's Slurm
TESTS=(tests/lab/test_fleet.py tests/lab/test_logs_exec_proxy.py tests/lab/test_root_squash.py
       tests/lab/test_hostile_agent_port.py tests/lab/test_pyslurm_selection.py)
[ $# -gt 0 ] || set -- 24.11 26.05
status=0
for g in "$@"; do
  echo "== Slurm $g: lab up" >&2
  start=$SECONDS
  if "${DXFLOW[@]}" lab up --slurm "$g"; then
    echo "== Slurm $g: lab tests" >&2
    "${DXFLOW[@]}" lab exec --slurm "$g" -- env DXFLOW_REQUIRE_LAB=1 /opt/dxflow/venv/bin/python -m pytest \
      -p no:cacheprovider -q "${TESTS[@]/#/$PWD/}" || status=1
    echo "== Slurm $g: the lab beside the host's (from the host; its last test takes it down)" >&2
    DXFLOW_LAB_SLURM=$g DXFLOW_REQUIRE_LAB=1 /opt/dxflow/venv/bin/python -m pytest -p no:cacheprovider -q \
      tests/lab/test_generation_lab.py || status=1
  else
    status=1
  fi
  [ "${DXFLOW_KEEP_LABS:-0}" = 1 ] || "${DXFLOW[@]}" lab down --slurm "$g"
  echo "== Slurm $g: $((SECONDS - start)) s" >&2
done
exit $status
