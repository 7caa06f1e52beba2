#!/usr/bin/env bash
# Creates .venv (if needed), installs spconv in it (editable, with the extras test, examples and gpu, and the
# pinned CPU build torch==2.13.0) and builds the C++ extension in place, rebuilding it only when a source is
# newer than the built library. The compiler output goes to build/build.log and is shown only on failure.
# Sourced by demo.sh and test.sh.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
mkdir -p build
log=build/build.log

build_failed() {
  echo "setup.sh: $1 failed; the last lines of $log:" >&2
  tail -n 60 "$log" >&2
  exit 1
}

if [[ ! -x .venv/bin/python ]]; then
  "$py" -m venv .venv
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
# Everything pyproject.toml's extras name, and spconv itself, installed?
installed() {
  .venv/bin/python - <<'EOF' 2>/dev/null
import importlib.metadata as m
for p in ("spconv", "torch", "setuptools", "ninja", "numpy", "pytest", "hypothesis", "scikit-learn", "tqdm", "cumm",
          "matplotlib", "triton"):
    m.version(p)
try:
    m.version("open3d-cpu")
except m.PackageNotFoundError:
    m.version("open3d")
EOF
}
if ! installed; then
  # Step 1: the build requirements, so that step 2 can build without isolation against this very torch.
  echo "setup.sh: installing torch 2.13.0 (CPU build) and the build tools (log: $log)..." >&2
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 setuptools wheel ninja >"$log" 2>&1 ||
    build_failed "pip install torch==2.13.0 setuptools wheel ninja"
  # Step 2: spconv and its extras. torch==2.13.0 on the same line: no dependency can swap in a CUDA torch.
  # This also builds the extension (a few minutes on 2 cores; MAX_JOBS=N limits the parallel compiles).
  echo "setup.sh: installing spconv[test,examples,gpu] and building its C++ extension (log: $log)..." >&2
  if ! .venv/bin/pip install -v --disable-pip-version-check --no-build-isolation -e ".[test,examples,gpu]" \
      torch==2.13.0 >>"$log" 2>&1; then
    # An extra that cannot be installed here (no wheel for this platform, no network) must not stop the
    # suite: install spconv with the test tools only; the tests that need a missing package skip.
    echo "warning: pip could not install all extras (see $log); retrying with pytest and hypothesis only" >&2
    .venv/bin/pip install -v --disable-pip-version-check --no-build-isolation -e . torch==2.13.0 pytest hypothesis \
      >>"$log" 2>&1 || build_failed "pip install -e ."
  fi
fi
lib=$(ls spconv/_C*.so 2>/dev/null | head -n 1 || true)
if [[ -z "$lib" ]] || [[ -n "$(find src include setup.py -newer "$lib" -type f 2>/dev/null | head -n 1)" ]]; then
  echo "setup.sh: building the spconv C++ extension (a few minutes on 2 cores; log: $log)..." >&2
  .venv/bin/python setup.py build_ext --inplace >"$log" 2>&1 || build_failed "the build"
fi
