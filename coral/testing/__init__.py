"""Helpers for tests, benchmarks and the demo: tiny models built from configs (random weights)."""
