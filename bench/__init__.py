"""Benchmarks and experiments of selopt (not installed with the package)."""
