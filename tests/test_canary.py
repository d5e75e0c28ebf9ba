"""One-run canary audit: the bound of Steinke, Nasr & Jagielski (hand values, monotonicity, coverage on
mechanisms with a known ε) and the stage end to end on a tiny model."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from helpers import write_sentiment_csv
from post.canary import (
    CanaryConfig,
    canary_audit,
    count_correct,
    guesses,
    make_canaries,
    one_run_epsilon,
    one_run_p_value,
)
from post.errors import PostError

LW = "negative=bad;positive=good"


def test_p_value_by_hand():
    # ε = 0: p = ½. Two guesses, both right: P[Bin(2, ½) ≥ 2] = ¼; the δ term is 2mδ·max(P[W=1]/1,
    # P[W<2]/2) = 2·10·0.01·max(0.5, 0.375) = 0.1.
    assert one_run_p_value(10, 2, 2, 0.0, 0.0) == pytest.approx(0.25)
    assert one_run_p_value(10, 2, 2, 0.0, 0.01) == pytest.approx(0.35)
    assert one_run_p_value(10, 2, 0, 1.0, 0.0) == 1.0
    p = 1 / (1 + math.exp(-1.0))
    assert one_run_p_value(100, 20, 15, 1.0, 0.0) == pytest.approx(stats.binom.sf(14, 20, p))
    with pytest.raises(ValueError):
        one_run_p_value(10, 11, 2, 1.0, 0.0)


def test_epsilon_by_hand_and_monotone():
    # All 10 of 10 right, pure ε: the bound solves p^10 = 0.05, p = e^ε/(1+e^ε).
    p = 0.05 ** 0.1
    assert one_run_epsilon(1000, 10, 10) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
    assert one_run_epsilon(1000, 10, 5) == 0.0  # half right is chance
    assert one_run_epsilon(1000, 0, 0) == 0.0
    by_v = [one_run_epsilon(1000, 100, v) for v in range(50, 101, 5)]
    assert all(b <= c for b, c in zip(by_v, by_v[1:])) and by_v[-1] > by_v[0]
    # More δ, more confidence, or fewer guesses at the same precision: a smaller bound.
    assert one_run_epsilon(1000, 100, 90, delta=1e-4) < one_run_epsilon(1000, 100, 90, delta=0.0)
    assert one_run_epsilon(1000, 100, 90, confidence=0.99) < one_run_epsilon(1000, 100, 90, confidence=0.9)
    assert one_run_epsilon(1000, 50, 45) < one_run_epsilon(1000, 100, 90)
    # The bound is where the p-value crosses 1 − confidence.
    eps = one_run_epsilon(1000, 100, 90, delta=1e-5)
    assert one_run_p_value(1000, 100, 90, eps, 1e-5) <= 0.05 < one_run_p_value(1000, 100, 90, eps + 1e-3, 1e-5)


def _limit(trials, level=0.05):
    """More exceedances than this fail a check of 'at most 5%' (Binomial(trials, 0.05), 99.9% quantile)."""
    return stats.binom.ppf(0.999, trials, level)


def test_coverage_on_randomized_response_canaries():
    """ε-DP randomized response on each canary's coin; the auditor guesses what it sees on r of m canaries.
    The 95% bound may exceed the true ε in at most 5% of trials."""
    eps, m, r, trials = 1.0, 500, 200, 2000
    rng = np.random.default_rng(0)
    right = rng.binomial(r, 1 / (1 + math.exp(-eps)), size=trials)  # correct guesses are exactly Binomial(r, p)
    bound = {v: one_run_epsilon(m, r, int(v)) for v in np.unique(right)}
    over = sum(bound[v] > eps for v in right)
    assert over <= _limit(trials)
    assert np.mean([bound[v] for v in right]) > 0.3  # and not vacuous


def test_coverage_on_laplace_canaries_with_top_k_guesses():
    """Each canary adds 1 to its own score, plus Laplace(1/ε) noise: ε-DP per canary. Top-k / bottom-k
    guesses from the scores (a data-dependent choice of which to guess) still keep the coverage, with δ."""
    eps, m, k, trials = 2.0, 1000, 50, 400
    rng = np.random.default_rng(1)
    over, values, cache = 0, [], {}
    for _ in range(trials):
        coins = rng.random(m) < 0.5
        scores = coins + rng.laplace(scale=1 / eps, size=m)
        r, v = count_correct(guesses(scores, k, k), coins)
        if (r, v) not in cache:
            cache[r, v] = one_run_epsilon(m, r, v, delta=1e-5)
        values.append(cache[r, v])
        over += cache[r, v] > eps
    assert over <= _limit(trials)
    assert np.mean(values) > 0.5


def test_guesses_and_counting():
    g = guesses(np.array([0.1, 0.9, 0.5, -1.0, 0.7]), 2, 1)
    assert g.tolist() == [0, 1, 0, -1, 1]
    assert count_correct(g, np.array([True, True, False, False, False])) == (3, 2)
    with pytest.raises(ValueError):
        guesses(np.zeros(3), 2, 2)


def test_canaries_are_seeded_random_text_with_fair_coins():
    texts, labels, coins = make_canaries(400, 6, 2, seed=3)
    again = make_canaries(400, 6, 2, seed=3)
    assert texts == again[0] and labels == again[1] and (coins == again[2]).all()
    assert len(set(texts)) == 400 and all(len(t.split()) == 6 for t in texts)
    assert set(labels) == {0, 1} and 150 < coins.sum() < 250
    assert make_canaries(400, 6, 2, seed=4)[0] != texts


def test_config_names_bad_flags():
    with pytest.raises(PostError, match="guesses"):
        CanaryConfig(model="tiny-llama", canaries=10, guesses_in=8, guesses_out=8)
    with pytest.raises(PostError, match="canaries"):
        CanaryConfig(model="tiny-llama", canaries=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "d.csv", n=120)


def _config(data, **kw):
    base = dict(model="tiny-llama", task=str(data), label_words=LW, n_tokens=2, epochs=2, batch_size=8, lr=0.1,
                canaries=24, guesses_in=4, guesses_out=4, canary_words=3, canary_seed=5, eval_limit=8, device="cpu",
                checkpoint_every=1000)
    return CanaryConfig(**{**base, **kw})


def test_stage_end_to_end_non_private(data, tmp_path):
    cfg = _config(data, train_limit=40)
    result = canary_audit(cfg, tmp_path / "a")
    canaries = json.loads((tmp_path / "a" / "canaries.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "a" / "canary-task.jsonl").read_text().splitlines()]
    included = [t for t, c in zip(canaries["texts"], canaries["in"]) if c]
    train_texts = [r["text"] for r in rows if r["split"] == "train"]
    assert len(train_texts) == 40 + len(included) and set(included) <= set(train_texts)
    assert not set(canaries["texts"]) - set(included) & set(train_texts)  # an excluded canary is never trained on
    assert result.canaries == 24 and result.canaries_in == len(included)
    assert result.guesses == 8 and 0 <= result.correct <= 8
    assert result.epsilon is None and result.epsilon_lower_bound >= 0
    assert result.epsilon_lower_bound == one_run_epsilon(24, 8, result.correct, delta=result.audit_delta)
    assert json.loads((tmp_path / "a" / "result.json").read_text())["correct"] == result.correct
    assert canary_audit(cfg, tmp_path / "a") == result  # a finished audit is read back, not re-run


def test_stage_scores_line_up_with_the_coins(data, tmp_path, monkeypatch):
    """With a scorer that sees the coins, every guess is right and the bound is as high as 8 guesses allow:
    the guesses, the coins and the bound are wired to the same canaries."""
    import post.canary as canary

    def oracle(cfg, prompt_path, texts, labels):
        record = json.loads((tmp_path / "o" / "canaries.json").read_text())
        assert record["texts"] == texts and record["labels"] == labels
        return np.array(record["in"], float) + np.linspace(0, 0.1, len(texts))

    monkeypatch.setattr(canary, "canary_scores", oracle)
    result = canary_audit(_config(data, canary_seed=None), tmp_path / "o")  # secret coins: any split of 24
    n_in = result.canaries_in
    assert result.guesses == 8 and result.correct == min(4, n_in) + min(4, 24 - n_in)
    assert result.canary_auc == (1.0 if 0 < n_in < 24 else None)
    if 4 <= n_in <= 20:  # all but 2.8e-4 of draws
        assert result.epsilon_lower_bound_pure == pytest.approx(one_run_epsilon(24, 8, 8), abs=1e-6)
        assert result.epsilon_lower_bound_pure > 0.5


def test_stage_dp_run_reports_its_ledger(data, tmp_path):
    result = canary_audit(_config(data, dp=True, epsilon=4.0, accountant="rdp", max_steps=3), tmp_path / "d")
    ledger = json.loads((tmp_path / "d" / "tune" / "privacy.json").read_text())
    assert result.epsilon == pytest.approx(ledger["epsilon"]) and result.epsilon <= 4.0 + 1e-9
    # One δ whatever the coins: below 1/N for the training set with every canary in.
    assert result.delta == ledger["delta"] == result.audit_delta and ledger["delta"] < 1 / (120 * 0.8 + 24)
    assert result.steps == 3 and not result.exceeds_accounted_epsilon


def test_cli_runs_the_audit_and_names_a_bad_flag(data, tmp_path, capsys):
    from post.cli import main

    args = ["attack", "canary", "--model", "tiny-llama", "--task", str(data), "--label-words", LW, "--n-tokens", "2",
            "--epochs", "1", "--batch-size", "8", "--canaries", "12", "--guesses-in", "3", "--guesses-out", "3",
            "--eval-limit", "4", "--device", "cpu", "--out", str(tmp_path / "c")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "of 6 guesses right on 12 canaries" in out and "empirical ε ≥" in out
    assert json.loads((tmp_path / "c" / "result.json").read_text())["stage"] == "attack-canary"
    assert main([*args[:-2], "--guesses-in", "20", "--out", str(tmp_path / "bad")]) == 2
    assert "--guesses-in" in capsys.readouterr().err


def test_the_audited_dp_mechanism_does_not_depend_on_the_secret_coins():
    """T and σ are fixed before the coins decide N: every coin outcome runs the same steps at a rate ≤ q."""
    from post.accounting import compute_epsilon
    from post.canary import fixed_mechanism
    from post.tune import TuneConfig, make_plan

    cfg = CanaryConfig(model="tiny-llama", canaries=40, guesses_in=4, guesses_out=4, dp=True, epsilon=4.0,
                       accountant="rdp", batch_size=8, epochs=2)
    mech = fixed_mechanism(cfg, 60, 1e-4)
    for n_in in (0, 17, 40):  # any number of canaries included
        n = 60 + n_in
        tc = TuneConfig(model="tiny-llama", dp=True, batch_size=8, delta=1e-4, accountant="rdp", **mech)
        plan = make_plan(tc, n)
        assert plan.total_steps == mech["max_steps"] and plan.ledger.noise_multiplier == mech["noise_multiplier"]
        assert compute_epsilon(noise_multiplier=mech["noise_multiplier"], sample_rate=8 / n, steps=plan.total_steps,
                               delta=1e-4, accountant="rdp") <= 4.0 + 1e-9


def test_exact_coverage_when_correct_guesses_are_binomial():
    """Exactly, not by simulation: with v ~ Binomial(r, e^ε/(1+e^ε)) (the worst case for ε-DP), the probability
    that the 95% bound exceeds ε is at most 5% (an off-by-one in the tail breaks this)."""
    for eps, r in ((1.0, 200), (0.5, 64), (2.0, 32)):
        p = 1 / (1 + math.exp(-eps))
        miss = sum(stats.binom.pmf(v, r, p) for v in range(r + 1) if one_run_epsilon(500, r, v) > eps)
        assert miss <= 0.05, (eps, r, miss)
