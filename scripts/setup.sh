#!/bin/bash
# Shared set-up for demo.sh and test.sh on a fresh Debian 12/13 machine, as root:
# Debian packages, the dxflow venv under /opt (readable by every user), the lab cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (the lab builds a Slurm cluster on this machine)" >&2; exit 2; }
export DEBIAN_FRONTEND=noninteractive
PKGS="slurm-wlm munge openssh-server iproute2 util-linux procps python3-venv python3-pip"
PKGS="$PKGS libcap2-bin"  # capsh: the lab tests' stand-in for a root-squashed home (tests/lab/test_root_squash.py)
# the lab's SSH profiles (dxflow lab profile up mfa|adopt): a TOTP PAM module, oathtool for the tests' codes,
# Slurm's pam_slurm_adopt
PKGS="$PKGS libpam-google-authenticator oathtool libpam-slurm-adopt"
[ "${DXFLOW_BROWSER:-1}" = 1 ] && PKGS="$PKGS chromium"
# the site service's replicas keep their state in PostgreSQL (dxflow lab site up runs a cluster of its own)
PKGS="$PKGS postgresql"
missing=$(for p in $PKGS; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  echo "== installing Debian packages: $missing" >&2
  apt-get update -qq
  apt-get install -y -qq $missing >/dev/null
fi
VENV=/opt/dxflow/venv
[ -x $VENV/bin/python ] || /usr/bin/python3 -m venv $VENV
echo "== installing dxflow ${1:+and $1 extras }into $VENV" >&2
$VENV/bin/pip install -q --upgrade pip >/dev/null
# the dependency versions the tests passed with (docs/install.md); a site may drop -c to take newer ones
$VENV/bin/pip install -q -c constraints.txt ".${1:+[$1]}"
chmod -R a+rX /opt/dxflow
# DXFLOW_LAB_NODES compute nodes: the demo's 2 by default; test.sh asks 4 (multi-node tests need a job of 4)
echo "== bringing the lab cluster up (${DXFLOW_LAB_NODES:-2} nodes)" >&2
$VENV/bin/dxflow lab up --nodes "${DXFLOW_LAB_NODES:-2}"
# extras naming `site` (test.sh: test,site): the site service beside it, for tests/lab/test_site_*.py
case ",${1:-}," in *,site,*) echo "== bringing the lab's site service up" >&2; $VENV/bin/dxflow lab site up ;; esac
