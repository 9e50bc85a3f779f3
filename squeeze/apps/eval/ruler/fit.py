"""Sizing a haystack to a token length: the largest size whose prompt fits.

RULER binary-searches the haystack size once per task and shrinks it per sample when a sample runs
over; here each sample is sized on its own (its keys and needles do not depend on the size, so
the search is over one sample), from a guess made from the token rate, and the result is exact:
the prompt and the answer budget fit the target, and one more unit of haystack would not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class TooLong(ValueError):
    """Even the smallest haystack makes the prompt longer than the target."""


def fit(
    build: Callable[[int], T],
    size: Callable[[T], int],
    target: int,
    lo: int,
    hi: int | None = None,
    strict: bool = True,
) -> tuple[int, T]:
    """The largest ``n`` in ``[lo, hi]`` with ``size(build(n)) <= target``, and ``build(n)``.

    ``size(build(n))`` is taken to grow with ``n``. With ``hi`` reached, ``hi`` is returned
    (the caller decides whether its size is too short).

    Raises:
        TooLong: even ``build(lo)`` is larger than ``target`` (``strict``; else ``lo`` is
            returned).
    """
    best = build(lo)
    s_lo = size(best)
    if s_lo > target:
        if not strict:
            return lo, best
        raise TooLong(f"it needs {s_lo} tokens with the smallest haystack")
    good, probe = lo, lo + max(lo, 16)  # good fits
    while True:
        if hi is not None:
            probe = min(probe, hi)
        item = build(probe)
        s = size(item)
        if s > target:
            bad = probe
            break
        good, best = probe, item
        if probe == hi:
            return good, best
        rate = (s - s_lo) / (probe - lo)  # tokens per unit so far
        # aim 2% past where the rate says the target is, so that the next probe brackets it
        probe += 1 + (int(1.02 * (target - s) / rate) if rate > 0 else probe)
    while bad - good > 1:
        mid = (good + bad) // 2
        item = build(mid)
        if size(item) <= target:
            good, best = mid, item
        else:
            bad = mid
    return good, best
