"""Benchmarks run from the repository root: python -m bench.proxy, python -m bench.gpu_report."""
