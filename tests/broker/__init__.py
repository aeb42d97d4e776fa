"""Consumers written with ``OrderedConsumer`` on real brokers: several consumer
processes on one queue, jumbled causal chains, redeliveries and a consumer killed
mid-stream, checked by the fault tests' checker (tests/fault/checker.py)."""
