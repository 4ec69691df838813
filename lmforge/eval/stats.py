"""Small statistics for reporting measured results honestly.

lo, hi = wilson_interval(successes=83, n=120)     # 95% interval of an accuracy
p = mcnemar_exact(fixed=31, broken=9)             # paired before/after on the same prompts
"""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (better than p +- z*se near 0, 1 and for small n)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value for a paired before/after comparison on the same items.

    Only the discordant items count: `fixed` (wrong before, right after) and `broken` (right
    before, wrong after). Under "no change" each discordant item is a fair coin, so the p-value
    is the two-sided binomial tail of min(fixed, broken) out of fixed + broken at 1/2. Paired,
    it detects a change that two overlapping accuracy intervals cannot.
    """
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(fixed, broken) + 1)) / 2**n
    return min(1.0, 2 * tail)
