"""Offline data, small models and measured results (see benchmarks/RESULTS.md)."""
