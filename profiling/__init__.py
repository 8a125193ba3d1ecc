"""Benchmarks and profilers; nothing in the package imports this folder."""
