"""The bench's statistics, on numpy arrays: medians, quantiles, and which sample pairs a slow
spell of the host touched.

A sample is a number; None (a probe that produced no value) and NaN are no sample and are left
out, so a missing number never counts as 0.
"""
from __future__ import annotations

import numpy as np


def _kept(values) -> list:
    return [v for v in values if v is not None and v == v]


def median(values):
    """The median of the samples in ``values``; None when there is none.

    An even count gives the mean of the middle two; an odd count the middle sample itself (as
    ``statistics.median``), so the median of integer counts (retransmits) stays an integer in
    the result document."""
    kept = _kept(values)
    if not kept:
        return None
    samples = np.asarray(kept, dtype=float)
    if len(kept) % 2:
        middle = kept[int(np.argsort(samples, kind="stable")[len(kept) // 2])]
        return middle.item() if isinstance(middle, np.generic) else middle
    return float(np.median(samples))


def quantile(values, q: float) -> float:
    """The q-quantile (0..1) of the samples in ``values``, by linear interpolation between the
    closest ranks (numpy's ``linear``, Hyndman and Fan's type 7); NaN when there is none."""
    kept = _kept(values)
    if not kept:
        return float("nan")
    return float(np.quantile(np.asarray(kept, dtype=float), q, method="linear"))


def pair_kinds(own_slow, twin_slow) -> dict[str, np.ndarray]:
    """Sample pairs by how many of their halves were slow: ``calm`` (neither), ``spell`` (both:
    a slow spell outlasted the pair), ``mixed`` (one: the pair's ratio says nothing). Each kind
    is a boolean mask over the pairs."""
    a, b = np.asarray(own_slow, dtype=bool), np.asarray(twin_slow, dtype=bool)
    return {"calm": ~a & ~b, "spell": a & b, "mixed": a ^ b}
