"""Wilson intervals and the exact McNemar test against hand-computed values and scipy."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from post.errors import PostError
from post.stats import (
    accuracy_interval,
    at_chance,
    binomial_two_sided_half,
    format_interval,
    format_p,
    mcnemar_exact,
    paired_mcnemar,
    wilson_interval,
)


def test_wilson_matches_hand_computation():
    # 8 of 10, z = 1.959964: centre (0.8 + z²/20) / (1 + z²/10), half-width z·sqrt(0.016 + z²/400) / (1 + z²/10)
    z = 1.959963984540054
    d = 1 + z * z / 10
    centre, half = (0.8 + z * z / 20) / d, z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / d
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(centre - half, abs=1e-12) and high == pytest.approx(centre + half, abs=1e-12)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # the textbook value


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (50, 100), (77, 200), (1, 400), (399, 400)])
def test_wilson_matches_scipy(k, n):
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(ci.low, abs=1e-9) and high == pytest.approx(ci.high, abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_edges_and_errors():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(50, 100, 0.99)[0] < wilson_interval(50, 100, 0.95)[0]
    assert accuracy_interval(0.77, 200) == wilson_interval(154, 200)
    for bad in ((11, 10), (-1, 10)):
        with pytest.raises(PostError):
            wilson_interval(*bad)
    with pytest.raises(PostError, match="confidence"):
        wilson_interval(1, 2, 1.5)


def test_binomial_two_sided_by_hand():
    # b = 1, c = 6: 2 · (C(7,0) + C(7,1)) / 2^7 = 2 · 8 / 128
    assert binomial_two_sided_half(1, 7) == pytest.approx(0.125)
    assert binomial_two_sided_half(6, 7) == pytest.approx(0.125)
    assert binomial_two_sided_half(0, 0) == 1.0 and binomial_two_sided_half(2, 4) == 1.0
    assert binomial_two_sided_half(0, 10) == pytest.approx(2 / 1024)


@pytest.mark.parametrize("k,n", [(3, 20), (10, 20), (0, 1), (40, 100), (130, 300), (900, 2000)])
def test_binomial_matches_scipy_binomtest(k, n):
    assert binomial_two_sided_half(k, n) == pytest.approx(sps.binomtest(k, n, 0.5).pvalue, rel=1e-9, abs=1e-300)


def test_mcnemar_counts_only_discordant_pairs():
    a = [True] * 10 + [True] * 6 + [False] * 1 + [False] * 3
    b = [True] * 10 + [False] * 6 + [True] * 1 + [False] * 3
    r = mcnemar_exact(a, b)
    assert (r["n"], r["b"], r["c"]) == (20, 6, 1) and r["p_value"] == pytest.approx(0.125)
    assert mcnemar_exact(b, a)["p_value"] == pytest.approx(0.125)
    assert mcnemar_exact(a, a)["p_value"] == 1.0
    with pytest.raises(PostError, match="same examples"):
        mcnemar_exact(a, b[:-1])


def test_paired_mcnemar_needs_the_same_examples():
    a = {i: (i % 2, i % 2) for i in range(10)}  # all right
    b = {i: (i % 2, 1 - i % 2) if i < 7 else (i % 2, i % 2) for i in range(10)}  # 7 wrong
    r = paired_mcnemar(a, b)
    assert r is not None and (r["b"], r["c"]) == (7, 0) and r["p_value"] == pytest.approx(2 / 128)
    assert paired_mcnemar(a, {i: b[i] for i in range(9)}) is None  # another set of sentences
    assert paired_mcnemar(a, {i: (1 - y, p) for i, (y, p) in b.items()}) is None  # other labels
    assert paired_mcnemar({}, {}) is None


def test_chance_and_formatting():
    assert at_chance(0.45, 0.56, 2) and not at_chance(0.56, 0.66, 2) and at_chance(0.30, 0.40, 3)
    assert format_interval(0.7, 0.604, 0.781, 100) == "70.0 [60.4–78.1] n=100"
    assert format_p(None) == "" and format_p(0.0004) == "<0.001" and format_p(0.0412) == "0.041"


def test_prior_shift_bound_is_a_bound_and_is_reached():
    """No constant shift of the margin beats the reported best accuracy or its smallest p, and both are reached."""
    from post.stats import mcnemar_exact, prior_shift_bound

    rng = np.random.default_rng(0)
    for trial in range(5):
        y = rng.integers(0, 2, 120)
        margin = rng.normal(0.8 * (2 * y - 1) - 0.6 * trial, 1.0).round(2)  # ties, and a lean to one class
        out = prior_shift_bound(margin, y)
        zs = (margin > 0).astype(int) == y
        assert out["zero_shot"]["accuracy"] == pytest.approx(zs.mean())
        best, low = out["best_accuracy"], out["smallest_p"]
        for cut in np.linspace(margin.min() - 2, margin.max() + 2, 3001):
            right = (margin > cut).astype(int) == y
            assert right.mean() <= best["accuracy"] + 1e-12
            if right.mean() > zs.mean():
                assert mcnemar_exact(zs.tolist(), right.tolist())["p_value"] >= low["p"] - 1e-12
        assert low["accuracy"] > zs.mean() or low["p"] == 1.0
        for row in (best, low):  # each reported shift gives what it says
            right = (margin > row["shift"]).astype(int) == y
            assert right.mean() == pytest.approx(row["accuracy"])
            assert mcnemar_exact(zs.tolist(), right.tolist())["p_value"] == pytest.approx(row["p"])
    with pytest.raises(PostError):
        prior_shift_bound([0.1, 0.2], [1])
