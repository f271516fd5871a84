"""Benchmark helpers behind ``make bench`` / ``make bench-doc`` (not imported by training)."""
