"""Benchmark suite of tlpipe: ``python -m bench.run [--quick]`` (see bench/README.md)."""
