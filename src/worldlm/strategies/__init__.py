"""Aggregation rules: pure tensor functions plus small stateful classes, found by name."""

from worldlm.strategies.registry import STRATEGIES, build_strategy, register_strategy

__all__ = ["STRATEGIES", "build_strategy", "register_strategy"]
