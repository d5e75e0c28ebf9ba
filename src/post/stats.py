"""Small-sample statistics for accuracies: Wilson intervals and the exact McNemar test.

* :func:`wilson_interval`: the Wilson score interval for a binomial proportion (Wilson 1927). Unlike
  the normal ("Wald") interval it stays inside [0, 1] and keeps close to its nominal coverage at the
  test-set sizes of this project (100-400 sentences) and at accuracies near 0 or 1.
* :func:`mcnemar_exact`: two classifiers scored on the *same* sentences. Only the discordant pairs
  count: b sentences only A got right, c only B got right. Under H0 (equal accuracy) each
  discordant pair goes either way with probability 1/2, so the two-sided p-value is
  ``min(1, 2 · P[Binomial(b + c, 1/2) ≤ min(b, c)])`` (McNemar 1947, exact form; the same as
  ``scipy.stats.binomtest(b, b + c, 0.5).pvalue``). Unlike comparing two intervals, it uses the
  pairing, which is what makes a few points of difference on 200 sentences testable.

Everything is pure Python (``math.comb`` with exact integers), so it runs without scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

import numpy as np

from post.errors import PostError


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise PostError(f"confidence must be between 0 and 1, got {confidence}.")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) Wilson score interval for ``successes`` out of ``n`` (``(0, 1)`` when n is 0)."""
    if n < 0 or not 0 <= successes <= n:
        raise PostError(f"need 0 <= successes <= n, got {successes} of {n}.")
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The exact bounds at 0 and n successes are 0 and 1; keep float rounding from moving them.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def accuracy_interval(accuracy: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson interval of an accuracy measured on ``n`` examples (its count of correct is rounded)."""
    return wilson_interval(int(round(accuracy * n)), n, confidence)


def binomial_two_sided_half(k: int, n: int) -> float:
    """Two-sided exact p-value of ``k`` successes in ``n`` trials at p = 1/2 (1.0 when n is 0)."""
    if n < 0 or not 0 <= k <= n:
        raise PostError(f"need 0 <= k <= n, got {k} of {n}.")
    if n == 0:
        return 1.0
    low = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(low + 1))  # exact integers: no underflow at large n
    return min(1.0, 2 * tail / 2**n)


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, float | int]:
    """Exact McNemar test of two methods' per-example correctness on the same examples.

    Returns ``n`` (pairs), ``b`` (A right, B wrong), ``c`` (A wrong, B right) and ``p_value``.
    """
    if len(correct_a) != len(correct_b):
        raise PostError(f"McNemar needs the same examples for both methods, got {len(correct_a)} and "
                        f"{len(correct_b)}.")
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    return {"n": len(correct_a), "b": b, "c": c, "p_value": binomial_two_sided_half(b, b + c)}


def paired_mcnemar(a: Mapping[int, tuple[int, int]], b: Mapping[int, tuple[int, int]]) -> dict[str, float | int] | None:
    """McNemar on two prediction maps ``example index -> (label, predicted)``.

    Only defined when both scored exactly the same examples with the same labels; otherwise None
    (a p-value over a different set than the accuracies it sits next to would mislead).
    """
    if not a or set(a) != set(b) or any(a[i][0] != b[i][0] for i in a):
        return None
    keys = sorted(a)
    return mcnemar_exact([a[i][0] == a[i][1] for i in keys], [b[i][0] == b[i][1] for i in keys])


def at_chance(low: float, high: float, num_classes: int) -> bool:
    """Whether chance (1 / num_classes) lies inside the interval [low, high]."""
    if num_classes < 1:
        raise PostError(f"num_classes must be at least 1, got {num_classes}.")
    return low <= 1.0 / num_classes <= high


def format_interval(accuracy: float, low: float, high: float, n: int) -> str:
    """``70.0 [60.4–78.1] n=100`` (percent, one decimal)."""
    return f"{100 * accuracy:.1f} [{100 * low:.1f}–{100 * high:.1f}] n={n}"


def format_p(p: float | None) -> str:
    """A p-value for tables: blank when absent, ``<0.001`` when tiny, else three decimals."""
    if p is None:
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def prior_shift_bound(margin: Sequence[float], labels: Sequence[int]) -> dict[str, dict[str, float]]:
    """What a constant shift of a two-class score margin (class 1 minus class 0) can do against the unshifted
    margin on the same examples: the best accuracy any shift reaches, and the smallest exact McNemar p of a shift
    that is more accurate than no shift (p 1.0 when none is).

    Every decision a shift can make is tried: a threshold between each pair of neighbouring margins and past both
    ends. The shifts are read off ``labels``, so both figures are oracle bounds on what a label-prior correction
    alone (calibration, a prompt that only evens out the classes) can show on these examples, not settings.
    """
    m, y = np.asarray(margin, dtype=np.float64), np.asarray(labels, dtype=int)
    if m.shape != y.shape or m.ndim != 1 or not len(m):
        raise PostError(f"need one margin per label, got {m.shape} and {y.shape}.")
    zs = (m > 0).astype(int) == y
    u = np.unique(m)
    cuts = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    rows = []
    for cut in cuts:
        right = (m > cut).astype(int) == y
        rows.append({"shift": float(cut), "accuracy": float(right.mean()),
                     "p": float(mcnemar_exact(zs.tolist(), right.tolist())["p_value"])})
    better = [r for r in rows if r["accuracy"] > zs.mean()] or [{"shift": 0.0, "accuracy": float(zs.mean()), "p": 1.0}]
    return {"zero_shot": {"accuracy": float(zs.mean())},
            "best_accuracy": max(rows, key=lambda r: (r["accuracy"], -r["p"])),
            "smallest_p": min(better, key=lambda r: (r["p"], -r["accuracy"])),
            "significant": {"shifts": sum(r["p"] < 0.05 for r in better), "of": len(rows)}}
