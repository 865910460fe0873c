"""Aggregation rules: pure tensor functions plus small stateful classes, found by name
(`worldlm.strategies.registry`)."""
