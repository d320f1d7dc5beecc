"""Benchmarks that print figures; never part of the test suite (shared machines are noisy)."""

import statistics


def summary(label: str, samples: list[float]) -> float:
    """Print median, min and max in milliseconds; return the median in seconds."""
    med = statistics.median(samples)
    print(f"{label:<48} median {med * 1000:8.2f} ms   min {min(samples) * 1000:8.2f}   max {max(samples) * 1000:8.2f}   (n={len(samples)})", flush=True)  # fmt: skip
    return med
