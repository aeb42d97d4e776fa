"""Benchmarks for the SQL causal ordering: run ``python -m bench``.

Not a test: it measures and prints figures (a markdown table, and JSON in
``bench/results/``); see docs/bench.md for how to read them.
"""
