"""Metrics rows, written as JSON lines."""
