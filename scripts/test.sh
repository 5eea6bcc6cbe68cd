#!/usr/bin/env bash
# Runs the test suite in .venv (set up on first use). Extra arguments go to pytest, e.g. `scripts/test.sh -m slow`.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo_root/scripts/setup_venv.sh"
cd "$repo_root"
exec "$repo_root/.venv/bin/python" -m pytest "$@"
