"""Benchmarks (scripts and the utility sweep package)."""
