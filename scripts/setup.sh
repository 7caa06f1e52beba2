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
if ! .venv/bin/python -c "import torch, numpy, pytest, hypothesis, ninja, sklearn, tqdm" 2>/dev/null; then
  # scikit-learn (its bundled UCI digits) and tqdm are for example/scn_digits.py and its test
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 numpy pytest hypothesis ninja setuptools wheel \
    scikit-learn tqdm
fi
# cumm (tensorview) is optional: spconv.utils accepts its tv.Tensor, and the tests of that skip without it.
# It is small and does not depend on torch (deps: pccm, ccimport, pybind11, fire, numpy, sympy).
if ! .venv/bin/python -c "import cumm" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check cumm \
    || echo "warning: could not install cumm; tests with cumm tv.Tensor inputs will be skipped" >&2
fi
# Examples and their tests: matplotlib, tqdm, scikit-learn and open3d (open3d-cpu: the same `open3d` module
# without the CUDA kernels, a 105 MB wheel instead of ~400 MB). torch==2.13.0 is named in the same
# command so that no dependency can pull in another torch. Failures only warn: the tests that need a
# missing package skip with the reason.
if ! .venv/bin/python -c "import importlib.metadata as m; [m.version(p) for p in ('matplotlib', 'tqdm', 'scikit-learn')]" \
    2>/dev/null; then
  echo "installing the examples' packages (matplotlib, tqdm, scikit-learn)..." >&2
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 matplotlib tqdm scikit-learn >&2 ||
    echo "warning: could not install matplotlib/tqdm/scikit-learn: the examples' tests will skip" >&2
fi
# open3d's library links libusb-1.0.so.0 (Debian: libusb-1.0-0); without it `import open3d` fails.
if ! /sbin/ldconfig -p 2>/dev/null | grep -q 'libusb-1\.0\.so\.0'; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing libusb-1.0-0 (needed by open3d)..." >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0; } >&2 ||
      echo "warning: apt-get install libusb-1.0-0 failed: open3d will not import, its tests will skip" >&2
  else
    echo "note: libusb-1.0-0 is missing and apt-get needs root: open3d will not import, its tests will skip" >&2
  fi
fi
if ! .venv/bin/python -c "import importlib.metadata as m; m.version('open3d-cpu')" 2>/dev/null &&
   ! .venv/bin/python -c "import importlib.metadata as m; m.version('open3d')" 2>/dev/null; then
  echo "installing open3d-cpu 0.20 (105 MB download)..." >&2
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 open3d-cpu==0.20.0 >&2 ||
    echo "warning: could not install open3d-cpu: the open3d example's tests will skip" >&2
fi
# Triton, the optional [gpu] extra: the GPU kernels, tested on the CPU in Triton's interpreter. torch is
# pinned on the same command line so that pip never swaps the CPU build for a CUDA one.
if ! .venv/bin/python -c "import triton" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 triton ||
    echo "setup.sh: could not install triton; test/triton will be skipped" >&2
fi
lib=$(ls spconv/_C*.so 2>/dev/null | head -n 1 || true)
if [[ -z "$lib" ]] || [[ -n "$(find src include setup.py -newer "$lib" -type f 2>/dev/null | head -n 1)" ]]; then
  echo "building the spconv C++ extension (a minute or two)..." >&2
  .venv/bin/python setup.py -q build_ext --inplace >&2
fi
if ! .venv/bin/python -c "import importlib.metadata as m; m.version('spconv')" 2>/dev/null; then
  # registers the source tree with the venv (editable), so examples and benches import it from anywhere
  .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >&2
fi
