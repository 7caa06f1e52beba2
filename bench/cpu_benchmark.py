"""CPU benchmark (same as ``python -m spconv.benchmark``): SECOND / CenterPoint backbones and single
layers on the real scans, side by side with another spconv via ``--compare PYTHON``.

Example (spconv 2.3.8 single-threaded, as its CPU build is only correct with one thread):
    python bench/cpu_benchmark.py --compare $(../shared/tools/reference-venv.sh) --compare-threads 1 \
        --json bench/results/cpu.json
"""
from spconv.benchmark.cpu import main

if __name__ == "__main__":
    main()
