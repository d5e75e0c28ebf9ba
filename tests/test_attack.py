"""The LiRA/RMIA attack stage: DP shadows copy the released prompt's mechanism (q, steps, δ) and never spend
more than the ε under attack, also on a pool smaller than the batch; the result carries both attacks."""

import json
import math

import pytest

from helpers import write_sentiment_csv
from post.accounting import calibrate_noise, compute_epsilon, default_delta
from post.attack import AttackConfig, attack, balanced_masks, plan_dp_shadows

LW = "negative=bad;positive=good"


def _cfg(**kw):
    base = dict(model="tiny-llama", task="unused.csv", label_words=LW, n_tokens=2, batch_size=16, epochs=1,
                dp=True, epsilon=8.0, accountant="rdp", shadows=4, pool_size=40, eval_limit=4, device="cpu")
    return AttackConfig(**{**base, **kw})


def test_shadows_copy_the_released_rate_steps_and_delta():
    cfg = _cfg(max_steps=20)
    plan = plan_dp_shadows(cfg, [200, 210], target_n=800)  # q = 16/800 = 0.02, 50 steps per epoch -> 20
    t = plan.target
    assert t["sample_rate"] == pytest.approx(0.02) and t["steps"] == 20 and t["delta"] == default_delta(800)
    assert plan.batch_sizes == [4, 4] and plan.steps == 20  # ⌊0.02·200⌋, ⌊0.02·210⌋: the rate never above q
    assert plan.delta == t["delta"] and plan.noise_multiplier == t["noise_multiplier"]
    assert t["epsilon"] <= 8.0 + 1e-9
    for s, n in enumerate([200, 210]):
        o = plan.overrides(s)
        assert min(round(n / o["batch_size"]) * o["epochs"], o["max_steps"]) == 20  # tune takes exactly T steps
        assert compute_epsilon(noise_multiplier=o["noise_multiplier"], sample_rate=o["batch_size"] / n, steps=20,
                               delta=o["delta"], accountant="rdp") <= t["epsilon"] * (1 + 1e-9)


def test_a_pool_too_small_for_the_rate_raises_sigma_to_stay_within_epsilon():
    cfg = _cfg(max_steps=8)
    plan = plan_dp_shadows(cfg, [10, 10], target_n=400)  # q = 0.04 would be 0.4 examples: batch 1, rate 0.1
    assert plan.batch_sizes == [1, 1]
    assert plan.noise_multiplier > plan.target["noise_multiplier"]
    eps = compute_epsilon(noise_multiplier=plan.noise_multiplier, sample_rate=0.1, steps=8, delta=plan.delta,
                          accountant="rdp")
    assert eps <= plan.target["epsilon"] * (1 + 1e-6)
    expected = calibrate_noise(target_epsilon=plan.target["epsilon"], delta=plan.delta, sample_rate=0.1, steps=8,
                               accountant="rdp")
    assert plan.noise_multiplier == pytest.approx(expected)


def test_dp_attack_on_a_pool_smaller_than_the_batch(tmp_path):
    """The demo-quick shape: batch 16, pool 20 (shadows of 10). Every shadow's own ledger stays within the
    target's ε, takes its δ and steps, and the result records both mechanisms and RMIA beside LiRA."""
    data = write_sentiment_csv(tmp_path / "d.csv", n=80)
    cfg = _cfg(task=str(data), pool_size=20, epochs=2, max_steps=3, target_n_train=40)
    result = attack(cfg, tmp_path / "a")
    ledgers = [json.loads((tmp_path / "a" / "shadows" / f"shadow-{s:03d}" / "tune" / "privacy.json").read_text())
               for s in range(4)]
    sizes = balanced_masks(20, 4, cfg.seed).sum(axis=0).tolist()
    target = result.target_mechanism
    assert target["dataset_size"] == 40 and target["sample_rate"] == pytest.approx(16 / 40) and target["steps"] == 3
    assert result.epsilon == target["epsilon"] <= 8.0 + 1e-9
    for x, n in zip(ledgers, sizes):
        assert x["dataset_size"] == n and x["steps"] == x["planned_steps"] == 3
        assert x["delta"] == target["delta"] == default_delta(40)
        assert x["epsilon"] <= result.epsilon * (1 + 1e-6)
    assert result.shadow_epsilon_max == pytest.approx(max(x["epsilon"] for x in ledgers))
    assert result.shadow_mechanism["batch_sizes"] == [math.floor(0.4 * n) for n in sizes]
    assert "q" in result.mechanism_note and "3 steps" in result.mechanism_note
    for value in (result.auc, result.rmia_auc, *(result.extra[key] for key in (
            "rmia_tpr_at_1%_fpr", "rmia_tpr_at_0.1%_fpr", "rmia_offline_auc"))):
        assert 0 <= value <= 1
    assert set(result.source_prompt_rmia) == {"online", "offline, a=0.3"}
    assert result.rmia_auc == result.source_prompt_rmia["online"]["auc"]
    for figs in (result.source_prompt, result.source_prompt_rmia):
        assert all(f["epsilon_lower_bound"] >= 0 and 0 <= f["tpr_at_0.1%_fpr"] <= 1 for f in figs.values())
    from post.attack import summarize

    assert "RMIA" in summarize(result) and "largest shadow ε" in summarize(result)


def test_a_shadow_that_spent_more_than_the_target_is_refused(tmp_path):
    from post.accounting import PrivacyLedger
    from post.attack import _shadow_ledgers
    from post.errors import PostError
    from post.rundir import write_json

    for s, sigma in enumerate([1.0, 0.8]):
        ledger = PrivacyLedger(noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=0.1, steps=0, planned_steps=10,
                               delta=1e-3, accountant="rdp", dataset_size=50, target_epsilon=None, epsilon=0.0)
        write_json(tmp_path / f"shadow-{s:03d}" / "tune" / "privacy.json", ledger.after(10).to_dict())
    eps = _shadow_ledgers(tmp_path, 2, ceiling=100.0)
    assert eps[1] > eps[0] > 0
    assert _shadow_ledgers(tmp_path, 2, ceiling=eps[1]) == eps
    with pytest.raises(PostError, match="shadow 1 spent"):
        _shadow_ledgers(tmp_path, 2, ceiling=(eps[0] + eps[1]) / 2)


def test_the_shadows_transfer_with_the_audited_loss(tmp_path):
    """The transferred prompts under attack are made with the transfer the provider runs: proxy labels take no α
    (the attack's α is for the paper's loss only), and a loss that needs label words refuses the vocab mode."""
    from post.attack import shadow_transfer_config
    from post.errors import ConfigError

    ps = tmp_path / "ps.safetensors"
    paper = shadow_transfer_config(_cfg(transfer_target="tiny-gpt2", transfer_alpha=0.3), ps, 2)
    assert (paper.loss, paper.alpha, paper.mode, paper.batch_size) == ("post", 0.3, "vocab", 8)
    labels = shadow_transfer_config(_cfg(transfer_target="tiny-gpt2", transfer_mode="label-words",
                                         transfer_loss="proxy-labels", transfer_batch_size=4), ps, 2)
    assert (labels.loss, labels.alpha, labels.mode, labels.batch_size) == ("proxy-labels", None, "label-words", 4)
    assert labels.calibrate_labels is False
    calibrated = shadow_transfer_config(_cfg(transfer_target="tiny-gpt2", transfer_mode="label-words",
                                             transfer_loss="proxy-labels", transfer_calibrate_labels=True), ps, 2)
    assert calibrated.calibrate_labels is True
    assert labels.seed == paper.seed == _cfg().seed + 3  # each shadow its own public sample and batches
    with pytest.raises(ConfigError, match="transfer_mode|transfer-mode"):
        _cfg(transfer_target="tiny-gpt2", transfer_loss="proxy-labels")
    with pytest.raises(ConfigError, match="transfer_loss|transfer-loss"):
        _cfg(transfer_target="tiny-gpt2", transfer_loss="ce")
