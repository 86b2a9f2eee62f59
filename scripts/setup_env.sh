#!/usr/bin/env bash
# Create .venv/ in the repository root if missing and install RegStation into it (idempotent:
# pip runs again only when pyproject.toml changed). Usage: bash scripts/setup_env.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.regstation-installed${extra:+-test}"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch is pinned in pyproject.toml (a CPU wheel here, a normal release elsewhere).
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e ".${extra}"
  echo "$want" > "$stamp"
fi
