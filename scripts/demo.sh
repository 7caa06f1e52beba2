#!/usr/bin/env bash
# Main demo: SECOND VoxelBackBone8x on the KITTI scan in ../shared/data (a generated scene if absent).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
exec .venv/bin/python example/second_demo.py "$@"
