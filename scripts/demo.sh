#!/bin/bash
# The demo on a fresh Debian 12/13 machine, as root: a real Slurm lab cluster, a 2-node job
# submitted as alice, its agents listed by `dxflow ls`, one node's info, and the console URL.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
as_alice() { runuser -l alice -c "$1"; }
echo "== alice submits a 2-node job" >&2
job=$(as_alice 'sbatch --parsable -N2 --wrap="for i in \$(seq 600); do echo step \$i on \$(hostname); sleep 1; done"')
echo "   job $job" >&2
for _ in $(seq 60); do
  ready=$(as_alice "dxflow ls --json" | /opt/dxflow/venv/bin/python -c \
    "import json,sys; print(sum(a['state']=='ready' for a in json.load(sys.stdin) if a['job']=='$job'))")
  [ "$ready" = 2 ] && break
  sleep 0.5
done
echo; echo "\$ dxflow ls            (as alice)"; as_alice "dxflow ls"
echo; echo "\$ dxflow info $job:n2"; as_alice "dxflow info $job:n2"
echo; echo "\$ dxflow console"; as_alice "dxflow console" || true
echo
echo "Try more as alice (runuser -l alice): dxflow logs $job -f, dxflow exec $job:n2 -- hostname,"
echo "dxflow shell $job, dxflow cp $job:n1:slurm-$job.out . ; scancel $job ends it; dxflow lab down removes the lab."
