"""Benchmarks: ``python -m spconv.benchmark`` runs the CPU benchmark (see spconv/benchmark/cpu.py)."""
