#!/bin/bash
# The whole test suite on a fresh Debian 12/13 machine, as root: installs what it needs,
# starts the lab cluster (munge, slurmctld, slurmd + sshd per node) and its site service (PostgreSQL, two
# replicas: `dxflow lab site up`), type-checks dxflow/, runs the unit tests beside the Slurm lab tests on the
# other Slurm generations (DXFLOW_GENERATIONS=0 skips those), then the lab tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# four compute nodes: node sets, fan-out and node-local storage are tested on a job of four (issue #15)
DXFLOW_LAB_NODES=4 scripts/setup.sh test,site
mkdir -p artifacts
# the type check of dxflow/ (mypy.ini): zero errors; the tests run either way, and either failing fails
status=0
/opt/dxflow/venv/bin/python -m mypy || status=1
# here the lab must be up: a lab test fails, instead of being skipped, when it is not (tests/lab/conftest.py)
export DXFLOW_REQUIRE_LAB=1
# the site store's tests on the lab's PostgreSQL too (a database of root's, not the site's: dxflow.lab.postgres)
DXFLOW_TEST_PG=$(/opt/dxflow/venv/bin/python -c 'from dxflow.lab import postgres; from dxflow.lab.layout import Layout
print(postgres.test_database(postgres.Postgres(Layout())).url)')
export DXFLOW_TEST_PG
if [ $# -eq 0 ]; then
  # the Slurm lab tests again on Slurm 24.11 and 26.05, each a lab of its own beside this one (issue #12),
  # while the unit tier runs: the unit tier uses no lab, and the two together take the longer one's time
  # (2.4 min, not 3.5); their output follows the unit tier's
  gens=
  if [ "${DXFLOW_GENERATIONS:-1}" = 1 ]; then
    scripts/test_generations.sh > artifacts/generations.log 2>&1 &
    gens=$!
  fi
  # the unit tier in four processes (its tests mostly wait on sockets and timeouts), then the lab tier in
  # one: lab tests share one cluster and its nodes
  /opt/dxflow/venv/bin/python -m pytest tests/unit -p no:cacheprovider -n 4 || status=$?
  if [ -n "$gens" ]; then
    wait "$gens" || status=1
    cat artifacts/generations.log
  fi
  /opt/dxflow/venv/bin/python -m pytest tests/lab -p no:cacheprovider || status=$?
else
  /opt/dxflow/venv/bin/python -m pytest tests -p no:cacheprovider "$@" || status=$?
fi
exit $status
