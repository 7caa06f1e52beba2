#!/usr/bin/env bash
# Creates .venv (if needed) with the pinned CPU torch and the test tools, and builds the C++ extension
# in place (only when a source is newer than the built library). Sourced by demo.sh and test.sh.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$py" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, numpy, pytest, hypothesis, ninja" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 numpy pytest hypothesis ninja setuptools wheel
fi
# Triton, the optional [gpu] extra: the GPU kernels, tested on the CPU in Triton's interpreter. torch is
# pinned on the same command line so that pip never swaps the CPU build for a CUDA one.
if ! .venv/bin/python -c "import triton" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 triton ||
    echo "setup.sh: could not install triton; test/triton will be skipped" >&2
fi
lib=$(ls spconv/_C*.so 2>/dev/null | head -n 1 || true)
if [[ -z "$lib" ]] || [[ -n "$(find src include setup.py -newer "$lib" -type f 2>/dev/null | head -n 1)" ]]; then
  echo "building the spconv C++ extension (about a minute)..." >&2
  .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >&2
fi
