"""Benchmarks that print figures; never part of the test suite (shared machines are noisy)."""
