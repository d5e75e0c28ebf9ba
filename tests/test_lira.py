"""LiRA scoring: golden values on a hand-made Gaussian toy, and the AUC extremes."""

import numpy as np
import pytest
from scipy import stats

from post.lira import epsilon_lower_bound, leave_one_out, lira_offline, lira_online, logit_confidence, plot_roc, roc


def test_logit_confidence_is_log_odds_of_the_true_class():
    scores = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    got = logit_confidence(scores, np.array([0, 2]))
    np.testing.assert_allclose(got, np.log(p[[0, 1], [0, 2]] / (1 - p[[0, 1], [0, 2]])))
    assert np.isfinite(logit_confidence(np.array([[1000.0, -1000.0]]), np.array([0]))).all()


def test_golden_values_on_a_gaussian_toy():
    conf = np.array([[2.0, 4.0, 0.0, 2.0]])  # in: 2, 4 (μ 3, σ 1); out: 0, 2 (μ 1, σ 1)
    mask = np.array([[True, True, False, False]])
    assert lira_online(np.array([3.0]), conf, mask)[0] == pytest.approx(2.0)  # -0 - (-(3-1)²/2)
    assert lira_offline(np.array([3.0]), conf, mask)[0] == pytest.approx(-np.log(stats.norm.sf(2.0)))
    # Global variance pools deviations over all examples.
    conf2 = np.array([[2.0, 4.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    mask2 = np.array([[True, True, False, False], [True, True, False, False]])
    g = lira_online(np.array([3.0, 0.0]), conf2, mask2, global_variance=True)
    sd = np.sqrt(2 / 4)  # deviations (±1 in row 0 for in, 0 in row 1) pooled over 4 in-entries
    assert g[0] == pytest.approx(stats.norm.logpdf(3, 3, sd) - stats.norm.logpdf(3, 1, sd))


def test_auc_half_when_members_look_like_non_members():
    rng = np.random.default_rng(0)
    conf = rng.normal(size=(2000, 16))
    mask = rng.random((2000, 16)) < 0.5
    for online in (True, False):
        scores, labels = leave_one_out(conf, mask, online=online, global_variance=True)
        assert roc(scores, labels).auc == pytest.approx(0.5, abs=0.02)


def test_auc_one_when_separable():
    rng = np.random.default_rng(1)
    mask = rng.random((500, 8)) < 0.5
    conf = rng.normal(size=mask.shape) * 0.1 + np.where(mask, 5.0, 0.0)
    for online in (True, False):
        r = roc(*leave_one_out(conf, mask, online=online))
        assert r.auc > 0.99 and r.tpr_at(0.01) > 0.9 and r.balanced_accuracy > 0.95


def test_roc_by_hand_and_tpr_at_fpr():
    r = roc(np.array([0.9, 0.8, 0.7, 0.1]), np.array([True, False, True, False]))
    np.testing.assert_allclose(r.tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(r.fpr, [0, 0, 0.5, 0.5, 1])
    assert r.auc == pytest.approx(0.75)
    assert r.tpr_at(0.0) == 0.5 and r.tpr_at(0.5) == 1.0
    assert r.balanced_accuracy == pytest.approx(0.75)
    tied = roc(np.array([1.0, 1.0]), np.array([True, False]))
    assert tied.auc == pytest.approx(0.5)


def test_epsilon_lower_bound():
    rng = np.random.default_rng(2)
    labels = rng.random(4000) < 0.5
    chance = roc(rng.normal(size=4000), labels)
    assert epsilon_lower_bound(chance, int(labels.sum()), int((~labels).sum()), delta=1e-5) < 0.3
    strong = roc(np.where(labels, 10.0, 0.0) + rng.normal(size=4000) * 0.1, labels)
    assert epsilon_lower_bound(strong, int(labels.sum()), int((~labels).sum()), delta=1e-5) > 3


def test_input_checks_and_plot(tmp_path):
    with pytest.raises(ValueError, match="N, S"):
        lira_online(np.zeros(3), np.zeros((3, 2)), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="no shadow"):
        lira_online(np.zeros(2), np.zeros((2, 2)), np.array([[True, True], [True, False]]))
    with pytest.raises(ValueError, match="members"):
        roc(np.zeros(3), np.zeros(3, bool))
    plot_roc({"toy": roc(np.array([1.0, 0.0]), np.array([True, False]))}, str(tmp_path / "roc.png"))
    assert (tmp_path / "roc.png").stat().st_size > 1000


@pytest.mark.parametrize("shadows", [8, 16])
@pytest.mark.parametrize("online", [True, False])
def test_leave_one_out_is_unbiased_with_balanced_masks(shadows, online):
    """Every example sits in exactly half of the shadows, so a member of the target shadow has one
    "in" reference fewer than a non-member; unequal reference counts alone used to move the AUC on
    pure noise to 0.43 (8 shadows). With equal counts it stays at chance."""
    from post.attack import balanced_masks

    rng = np.random.default_rng(0)
    conf = rng.normal(size=(2000, shadows))
    masks = balanced_masks(2000, shadows, 1)
    scores, labels = leave_one_out(conf, masks, online=online)
    assert abs(roc(scores, labels).auc - 0.5) < 0.015
