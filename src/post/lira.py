"""LiRA membership-inference scoring (Carlini et al. 2022), as pure numpy/scipy functions.

Shapes: N examples, S shadow models. ``conf[i, s]`` is shadow s's logit-scaled confidence in
example i's true class, log(p / (1 − p)); ``in_mask[i, s]`` says whether i was in s's training set.

- online LiRA: per-example Gaussians fitted to the "in" and "out" confidences; the score is the
  log-likelihood ratio of the observed confidence under "in" versus "out";
- offline LiRA: only the "out" Gaussian; a one-sided test, score = −log P(out-confidence > observed);
- ``global_variance``: one variance shared by all examples (more stable with few shadows).
- RMIA: the target model's probability of x relative to the reference models', compared with the
  same ratio for population samples z (non-members); offline with the paper's parameter a.
- ``epsilon_lower_bound``: the empirical ε an attack's error rates imply (threshold chosen on one
  half of the scores, bounded on the other; see its docstring for the independence assumption).

References: Carlini et al., "Membership Inference Attacks From First Principles", IEEE S&P 2022;
tensorflow_privacy's ``advanced_mia.compute_score_lira``; Zarifzadeh et al., "Low-Cost High-Power
Membership Inference Attacks", ICML 2024 (RMIA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import expit, logsumexp

_EPS = 1e-30


def logit_confidence(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) log(p_y / (1 − p_y)) from (N, C) class scores, p = softmax(scores), computed stably.

    log(p_y/(1−p_y)) = s_y − logsumexp_{c≠y} s_c.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (N, C) and labels (N,), got {scores.shape} and {labels.shape}")
    rows = np.arange(len(labels))
    others = scores.copy()
    others[rows, labels] = -np.inf
    return scores[rows, labels] - logsumexp(others, axis=1)


def _check(target: np.ndarray, conf: np.ndarray, in_mask: np.ndarray) -> None:
    if conf.ndim != 2 or in_mask.shape != conf.shape:
        raise ValueError(f"conf and in_mask must both be (N, S), got {conf.shape} and {in_mask.shape}")
    if target.shape != (conf.shape[0],):
        raise ValueError(f"target must be (N,) = ({conf.shape[0]},), got {target.shape}")
    if not (np.isfinite(conf).all() and np.isfinite(target).all()):
        raise ValueError("confidences must be finite")


def _gaussian(conf: np.ndarray, mask: np.ndarray, global_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and std of conf[i, mask[i]] (std shared by all examples if ``global_variance``)."""
    count = mask.sum(axis=1)
    if (count == 0).any():
        raise ValueError(f"{int((count == 0).sum())} examples have no shadow on this side; use more shadows")
    mean = np.where(mask, conf, 0.0).sum(axis=1) / count
    dev = np.where(mask, conf - mean[:, None], 0.0)
    pooled = np.sqrt((dev**2).sum() / max(mask.sum(), 1))
    if global_variance:
        return mean, np.full(conf.shape[0], pooled)
    std = np.sqrt((dev**2).sum(axis=1) / count)
    # One sample says nothing about spread: such examples use the pooled std instead of ~0.
    return mean, np.where(count >= 2, std, pooled)


def lira_online(target: np.ndarray, conf: np.ndarray, in_mask: np.ndarray, *, global_variance: bool = False,
                out_mask: np.ndarray | None = None) -> np.ndarray:
    """(N,) online LiRA scores: log N(target; μ_in, σ_in) − log N(target; μ_out, σ_out). Higher = member.

    ``out_mask`` (default ``~in_mask``) picks the "out" references, so a caller can leave some shadows out.
    """
    target, conf, in_mask = np.asarray(target, float), np.asarray(conf, float), np.asarray(in_mask, bool)
    _check(target, conf, in_mask)
    out_mask = ~in_mask if out_mask is None else np.asarray(out_mask, bool) & ~in_mask
    mu_in, sd_in = _gaussian(conf, in_mask, global_variance)
    mu_out, sd_out = _gaussian(conf, out_mask, global_variance)
    return stats.norm.logpdf(target, mu_in, sd_in + _EPS) - stats.norm.logpdf(target, mu_out, sd_out + _EPS)


def lira_offline(target: np.ndarray, conf: np.ndarray, in_mask: np.ndarray, *, global_variance: bool = False,
                 out_mask: np.ndarray | None = None) -> np.ndarray:
    """(N,) offline LiRA scores: −log P(Z > target), Z ~ N(μ_out, σ_out). Higher = member.

    The one-sided test's p-value in log space; −logsf keeps its resolution in the upper tail, where
    members sit (log P(Z ≤ t) would round to 0 for all of them).
    """
    target, conf, in_mask = np.asarray(target, float), np.asarray(conf, float), np.asarray(in_mask, bool)
    _check(target, conf, in_mask)
    out_mask = ~in_mask if out_mask is None else np.asarray(out_mask, bool) & ~in_mask
    mu_out, sd_out = _gaussian(conf, out_mask, global_variance)
    return -stats.norm.logsf(target, mu_out, sd_out + _EPS)


def _first_k(mask: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Keep the first ``k[i]`` True entries of each row of ``mask``."""
    return mask & (np.cumsum(mask, axis=1) <= k[:, None])


def leave_one_out(conf: np.ndarray, in_mask: np.ndarray, *, online: bool = True, global_variance: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Attack each shadow in turn with the others as reference: (M,) scores and membership labels.

    Examples that the reference shadows leave without an "in" (online) or "out" side are skipped
    for that target shadow, so M ≤ N·S.

    Every example uses as many "in" as "out" references (the first min(n_in, n_out) of each side).
    Without that, an example that is a member of the target shadow has one "in" reference fewer
    than a non-member (every example is in a fixed share of the shadows), and the estimators' small-
    sample bias alone separates members from non-members: on pure noise with balanced masks the
    online AUC comes out 0.62 with 4 shadows and 0.43 with 8 instead of 0.5.
    """
    conf, in_mask = np.asarray(conf, float), np.asarray(in_mask, bool)
    fn = lira_online if online else lira_offline
    scores, labels = [], []
    for s in range(conf.shape[1]):
        rest = np.delete(np.arange(conf.shape[1]), s)
        ref_in, ref_out = in_mask[:, rest], ~in_mask[:, rest]
        k = np.minimum(ref_in.sum(1), ref_out.sum(1))
        ok = k > 0 if online else ref_out.any(1)
        if online:
            use_in, use_out = _first_k(ref_in, k), _first_k(ref_out, k)
        else:  # only the "out" side counts: give members and non-members the same number of references
            kk = np.minimum(ref_out.sum(1), (conf.shape[1] - 1) // 2)
            use_in, use_out = ref_in, _first_k(ref_out, kk)
            ok = kk > 0
        scores.append(fn(conf[ok, s], conf[ok][:, rest], use_in[ok], global_variance=global_variance,
                         out_mask=use_out[ok]))
        labels.append(in_mask[ok, s])
    return np.concatenate(scores), np.concatenate(labels)


def rmia(target: np.ndarray, ref: np.ndarray, use: np.ndarray, z_target: np.ndarray, z_ref: np.ndarray,
         z_use: np.ndarray, *, a: float | None = None, gamma: float = 1.0, z_self: np.ndarray | None = None
         ) -> np.ndarray:
    """(N,) RMIA scores (Zarifzadeh et al., ICML 2024). Higher = member.

    Probabilities of the true label: ``target`` (N,) under the model attacked, ``ref`` (N, R) under
    R reference models, ``use`` (N, R) which references count for each example; likewise ``z_target``
    (Z,), ``z_ref`` (Z, R), ``z_use`` (Z, R) for Z population samples z (non-member data). With
    p(x) the probability averaged over the models a member-or-not x could have been trained into,

        LR(x, z) = (p(x | θ) / p(x)) / (p(z | θ) / p(z)),   score(x) = Pr_z[LR(x, z) ≥ γ].

    ``a=None`` (online): p(x) is the mean over the used references, which must hold x as often as
    not. ``a`` given (offline, for few references): ``use`` marks references trained without x, and
    p(x) = ½((1 + a)·p_OUT(x) + (1 − a)), the paper's linear stand-in for the missing IN models.
    ``z_self`` (N,) gives, for an x that is itself one of the z, its row in z_target; it is left out
    of its own comparison.
    """
    def marginal(ref_p: np.ndarray, mask: np.ndarray) -> np.ndarray:
        count = mask.sum(axis=1)
        if (count == 0).any():
            raise ValueError(f"{int((count == 0).sum())} samples have no reference model; use more shadows")
        mean = np.where(mask, ref_p, 0.0).sum(axis=1) / count
        return mean if a is None else 0.5 * ((1 + a) * mean + (1 - a))

    target, ref, use = np.asarray(target, float), np.asarray(ref, float), np.asarray(use, bool)
    z_target, z_ref, z_use = np.asarray(z_target, float), np.asarray(z_ref, float), np.asarray(z_use, bool)
    if ref.ndim != 2 or use.shape != ref.shape or target.shape != (ref.shape[0],):
        raise ValueError(f"target (N,), ref and use (N, R) expected, got {target.shape}, {ref.shape}, {use.shape}")
    if z_ref.ndim != 2 or z_use.shape != z_ref.shape or z_target.shape != (z_ref.shape[0],) or len(z_target) < 2:
        raise ValueError(f"z_target (Z,), z_ref and z_use (Z, R) with Z ≥ 2 expected, got {z_target.shape}, "
                         f"{z_ref.shape}, {z_use.shape}")
    if a is not None and not 0 <= a <= 1:
        raise ValueError(f"a must be in [0, 1], got {a}")
    ratio_x = target / np.maximum(marginal(ref, use), _EPS)
    ratio_z = z_target / np.maximum(marginal(z_ref, z_use), _EPS)
    ordered = np.sort(ratio_z)
    # LR(x, z) ≥ γ  ⟺  ratio_z ≤ ratio_x / γ
    count = np.searchsorted(ordered, ratio_x / gamma, side="right").astype(float)
    total = np.full(len(target), float(len(ratio_z)))
    if z_self is not None:
        own = np.asarray(z_self, int)
        has = own >= 0
        count[has] -= ratio_z[own[has]] <= ratio_x[has] / gamma
        total[has] -= 1
    return count / total


def leave_one_out_rmia(conf: np.ndarray, in_mask: np.ndarray, *, a: float | None = None, gamma: float = 1.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """RMIA on the same shadows as :func:`leave_one_out`: (M,) scores and membership labels.

    Each shadow is attacked in turn with the others as references; the population z for a target
    shadow are the pool examples it was not trained on. Online (``a=None``) every example uses as
    many references holding it as not (the first min(n_in, n_out) of each), as LiRA does; offline
    only those without it, at most (S − 1) // 2 of them.
    """
    conf, in_mask = np.asarray(conf, float), np.asarray(in_mask, bool)
    prob = expit(conf)  # p from log(p / (1 − p))
    scores, labels = [], []
    for s in range(conf.shape[1]):
        rest = np.delete(np.arange(conf.shape[1]), s)
        ref_in, ref_out = in_mask[:, rest], ~in_mask[:, rest]
        if a is None:
            k = np.minimum(ref_in.sum(1), ref_out.sum(1))
            use = _first_k(ref_in, k) | _first_k(ref_out, k)
        else:
            k = np.minimum(ref_out.sum(1), (conf.shape[1] - 1) // 2)
            use = _first_k(ref_out, k)
        ok = k > 0
        pop = np.nonzero(ok & ~in_mask[:, s])[0]
        if len(pop) < 2:
            continue
        row = np.full(conf.shape[0], -1)
        row[pop] = np.arange(len(pop))
        x = np.nonzero(ok)[0]
        scores.append(rmia(prob[x, s], prob[x][:, rest], use[x], prob[pop, s], prob[pop][:, rest], use[pop], a=a,
                           gamma=gamma, z_self=row[x]))
        labels.append(in_mask[x, s])
    if not scores:
        raise ValueError("no shadow has two non-members to compare with; use a larger pool")
    return np.concatenate(scores), np.concatenate(labels)


@dataclass(frozen=True)
class Roc:
    """ROC curve (thresholds from high to low) and its summary figures."""

    fpr: np.ndarray
    tpr: np.ndarray
    auc: float

    def tpr_at(self, fpr: float) -> float:
        """Highest TPR whose FPR is at most ``fpr``."""
        ok = self.fpr <= fpr
        return float(self.tpr[ok].max()) if ok.any() else 0.0

    @property
    def balanced_accuracy(self) -> float:
        return float(np.max(1 - (self.fpr + (1 - self.tpr)) / 2))


def roc(scores: np.ndarray, labels: np.ndarray) -> Roc:
    """ROC of "member if score ≥ t" over all thresholds; ties broken jointly; trapezoid AUC."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be (M,), got {scores.shape} and {labels.shape}")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("need both members and non-members")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # end of each group of tied scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    tpr, fpr = np.r_[0.0, tp / n_pos], np.r_[0.0, fp / n_neg]
    return Roc(fpr=fpr, tpr=tpr, auc=float(np.trapezoid(tpr, fpr)))


def _cp_lower(k: np.ndarray, n: int, a: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower limit at level ``a`` of a binomial rate from k successes of n."""
    k = np.asarray(k, float)
    return np.where(k > 0, stats.beta.ppf(a, np.maximum(k, 1), n - k + 1), 0.0)


def _cp_upper(k: np.ndarray, n: int, a: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper limit at level ``a`` of a binomial rate from k successes of n."""
    k = np.asarray(k, float)
    return np.where(k < n, stats.beta.ppf(1 - a, k + 1, np.maximum(n - k, 1)), 1.0)


def _epsilons(tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int, delta: float, a: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """(T,) and (T,): ε implied at each threshold by the two DP inequalities, each rate bounded at level a/2.

    e1 = log((TPR_lo − δ)/FPR_hi) from TPR ≤ e^ε·FPR + δ; e2 = log((TNR_lo − δ)/FNR_hi) from
    TNR ≤ e^ε·FNR + δ. −inf where the inequality can prove nothing.
    """
    tpr_lo, fpr_hi = _cp_lower(tp, n_pos, a / 2), _cp_upper(fp, n_neg, a / 2)
    tnr_lo, fnr_hi = _cp_lower(n_neg - fp, n_neg, a / 2), _cp_upper(n_pos - tp, n_pos, a / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.where((tpr_lo > delta) & (fpr_hi > 0), np.log(np.maximum(tpr_lo - delta, _EPS) / fpr_hi), -np.inf)
        e2 = np.where((tnr_lo > delta) & (fnr_hi > 0), np.log(np.maximum(tnr_lo - delta, _EPS) / fnr_hi), -np.inf)
    return e1, e2


def _counts_at(scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T,) members and non-members with score ≥ each threshold."""
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    return (len(pos) - np.searchsorted(pos, thresholds, side="left"),
            len(neg) - np.searchsorted(neg, thresholds, side="left"))


def epsilon_lower_bound(scores: np.ndarray, labels: np.ndarray, *, delta: float, confidence: float = 0.95,
                        seed: int = 0) -> float:
    """Empirical lower bound on ε from attack scores: threshold chosen on one half, bounded on the other.

    An (ε, δ)-DP mechanism forces TPR ≤ e^ε·FPR + δ and TNR ≤ e^ε·FNR + δ for every test "member if
    score ≥ t" (Kairouz et al. 2015). The scores are split at random (``seed``) into two halves. On
    the first, the threshold and the inequality giving the largest ε are chosen; on the second, that
    one test's rates are bounded with one-sided Clopper-Pearson limits (TPR or TNR from below, FPR or
    FNR from above, each at (1 − ``confidence``)/2), so the ε returned is a lower bound at
    ``confidence``: choosing the threshold on the same scores that are bounded (the maximum over all
    thresholds of per-threshold limits) has no such coverage — on a pure ε-DP Laplace pair it exceeded
    the true ε in 11-12% of trials at a nominal 5%.

    Assumption: the M scores are independent trials, each one example and one trained model. The
    leave-one-out scores of a shadow attack are not: the N scores against one shadow share that
    model, and an example is scored against every shadow. The bound is therefore a statement about
    the attack's measured error rates, as in the LiRA literature, not a certified audit; the
    one-run canary audit (``post.canary``) makes no such assumption.

    Args:
        scores: (M,) attack scores, higher = member.
        labels: (M,) true membership.
        delta: δ of the (ε, δ) being audited (0 for pure ε).
        confidence: Probability that the bound holds.
        seed: Seed of the split.

    Returns:
        ε ≥ 0 (0 when the attack proves nothing).
    """
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be (M,), got {scores.shape} and {labels.shape}")
    if not 0 <= delta < 1 or not 0 < confidence < 1:
        raise ValueError(f"need 0 ≤ delta < 1 and 0 < confidence < 1, got {delta} and {confidence}")
    a = 1 - confidence
    half = np.random.default_rng(seed).permutation(len(scores)) < len(scores) // 2
    sel, held = (scores[half], labels[half]), (scores[~half], labels[~half])
    if min(sel[1].sum(), (~sel[1]).sum(), held[1].sum(), (~held[1]).sum()) == 0:
        return 0.0
    thresholds = np.unique(sel[0])
    tp, fp = _counts_at(*sel, thresholds)
    e1, e2 = _epsilons(tp, fp, int(sel[1].sum()), int((~sel[1]).sum()), delta, a)
    best = int(np.argmax(np.maximum(e1, e2)))
    if max(e1[best], e2[best]) <= 0:
        return 0.0
    tp, fp = _counts_at(*held, thresholds[best : best + 1])
    h1, h2 = _epsilons(tp, fp, int(held[1].sum()), int((~held[1]).sum()), delta, a)
    chosen = h1[0] if e1[best] >= e2[best] else h2[0]
    return float(max(chosen, 0.0))


def plot_roc(curves: dict[str, Roc], path: str) -> None:
    """Log-log ROC curves (the LiRA paper's view: the low-FPR regime matters) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    for name, r in curves.items():
        ax.plot(np.maximum(r.fpr, 1e-5), np.maximum(r.tpr, 1e-5), label=f"{name} (AUC {r.auc:.3f})")
    ax.plot([1e-5, 1], [1e-5, 1], "k--", lw=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(1e-4, 1), ylim=(1e-4, 1), xlabel="false positive rate",
           ylabel="true positive rate", title="Membership inference on soft prompts")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
