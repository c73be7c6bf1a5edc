"""How the K samples of a prompt are split among generators by share. Its own module because both the config
check (every generator gets a sample of each prompt) and the Mixture generator need it, and the config must not
import the generators (they sit above it)."""

from __future__ import annotations


def split_counts(shares: list[float], total: int) -> list[int]:
    """`total` split in proportion to `shares` (largest remainders; ties go to the earlier generator)."""
    weight = sum(shares)
    exact = [total * share / weight for share in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
