#!/usr/bin/env bash
# Install (if needed) and open the workstation on the bundled demo pair.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python main.py "$@"
