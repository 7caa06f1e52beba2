#!/usr/bin/env bash
# Test suite: sets up .venv, builds the extension, runs pytest on test/, then the Triton backend's tests
# (test/triton) in a second pytest process: they need TRITON_INTERPRET=1 before triton is imported.
# Extra arguments go to the first run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
status=0
env -u TRITON_INTERPRET -u SPCONV_BACKEND .venv/bin/python -m pytest -q -ra test --ignore=test/triton "$@" || status=$?
echo "== Triton backend, run by Triton's interpreter on the CPU: test/triton =="
start=$SECONDS
env -u SPCONV_BACKEND TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -ra test/triton || status=$?
echo "test/triton took $((SECONDS - start)) s"
exit $status
