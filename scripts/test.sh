#!/usr/bin/env bash
# Test suite: sets up .venv, builds the extension, runs pytest on test/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
exec .venv/bin/python -m pytest -q -ra test "$@"
