"""Benchmarks behind scripts/benchmark.py. Each mode returns rows (dicts) for a table and JSON."""
