"""Benchmark building blocks: load generation for a serving endpoint and the metrics FastGen reports."""
