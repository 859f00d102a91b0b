"""The benchmarks of scripts/bench.py, one module each; numbers in docs/benchmarks.md."""
