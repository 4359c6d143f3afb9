"""Beside the package, above its entry points: step cost, throughput, memory, data loading (BENCHMARKS.md)."""
