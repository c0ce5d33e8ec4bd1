#!/bin/bash
# Regenerate docs/man/dxflow.1 from the CLI's own parser (argparse-manpage).
# tests/unit/test_manpage.py fails when the committed page no longer matches the parser.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${ARGPARSE_MANPAGE:-/opt/dxflow/venv/bin/argparse-manpage}
mkdir -p docs/man
"$BIN" --module dxflow.cli --function build_parser --prog dxflow --project-name dxflow \
  --manual-title "dxflow manual" --description "reach the nodes of your running HPC jobs" \
  --output docs/man/dxflow.1
echo "wrote docs/man/dxflow.1"
