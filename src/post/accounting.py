"""Privacy accounting for DP-SGD with Poisson sampling, on Google's dp-accounting library.

The spend of a run is kept as data, a :class:`PrivacyLedger` (noise multiplier, sampling rate,
steps, δ, accountant), from which ε is recomputed by the library, never by hand-written maths.
PLD (privacy loss distributions, the default) gives a tighter ε than RDP for the same noise.

Reference: dp-accounting, https://github.com/google/differential-privacy/tree/main/python
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from post.errors import ConfigError, PostError

Accountant = Literal["pld", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")
RANDOMNESS: tuple[str, ...] = ("secret", "secure", "seeded")

# dp-accounting's RDP code logs a warning per order that fails to converge; the orders are
# simply excluded, which is safe (the bound only gets looser).
logging.getLogger("absl").setLevel(logging.ERROR)
log = logging.getLogger(__name__)


def _accountant(name: str):  # noqa: ANN202 - dp_accounting.PrivacyAccountant
    from dp_accounting import pld, rdp

    if name == "pld":
        return pld.PLDAccountant()
    if name == "rdp":
        return rdp.RdpAccountant()
    raise ConfigError(f"--accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}.")


def _event(noise_multiplier: float, sample_rate: float, steps: int):  # noqa: ANN202 - dp_accounting.DpEvent
    import dp_accounting

    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def check_privacy_params(*, epsilon: float | None = None, delta: float, sample_rate: float,
                         dataset_size: int | None = None) -> None:
    """Reject settings no accountant can honour, naming the flag."""
    if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(f"--epsilon must be a positive finite number, got {epsilon}.")
    if not 0 < delta < 1:
        raise ConfigError(f"--delta must be in (0, 1), got {delta}.")
    if dataset_size is not None and delta >= 1 / dataset_size:
        raise ConfigError(f"--delta {delta:g} is not below 1/N = {1 / dataset_size:.3g} for N = {dataset_size} "
                          "training examples: such a δ allows leaking whole examples; use a smaller --delta.")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"the sampling rate batch_size/N must be in (0, 1], got {sample_rate:g}; "
                          "lower --batch-size or use more training data.")


def compute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "pld") -> float:
    """ε spent by ``steps`` Poisson-sampled Gaussian steps at (σ, q), for δ."""
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return float(_accountant(accountant).compose(_event(noise_multiplier, sample_rate, steps)).get_epsilon(delta))


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "pld", tol: float = 1e-5) -> float:
    """Smallest noise multiplier σ whose ε for ``steps`` steps at rate q is ≤ ``target_epsilon``.

    A PLD search takes tens of seconds, so answers are remembered in the cache directory
    (``accounting/calibrations.json``). A remembered σ is never trusted as such: its ε is
    recomputed (one accountant call) and it is used only if that ε is within the target.
    """
    check_privacy_params(epsilon=target_epsilon, delta=delta, sample_rate=sample_rate)
    if steps < 1:
        raise ConfigError("DP training must plan at least one step; raise --epochs or lower --batch-size.")
    key = json.dumps([target_epsilon, delta, sample_rate, steps, accountant, tol])
    memo = _memo_path()
    remembered = _read_memo(memo).get(key)
    if isinstance(remembered, float) and remembered > 0:
        eps = compute_epsilon(noise_multiplier=remembered, sample_rate=sample_rate, steps=steps, delta=delta,
                              accountant=accountant)
        if eps <= target_epsilon * (1 + 1e-9):
            return remembered
        log.warning("ignoring a remembered σ=%g that gives ε=%g > %g", remembered, eps, target_epsilon)
    sigma = _search_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
                          accountant=accountant, tol=tol)
    try:
        table = _read_memo(memo)
        table[key] = sigma
        from post.cache import atomic_path

        memo.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(memo) as tmp:
            tmp.write_text(json.dumps(table, indent=0), encoding="utf-8")
    except OSError:  # remembering is an optimisation only
        pass
    return sigma


def _memo_path() -> Path:
    from post.cache import cache_root

    return cache_root() / "accounting" / "calibrations.json"


def _read_memo(path: Path) -> dict[str, Any]:
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _search_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                  tol: float) -> float:
    import dp_accounting

    bracket = dp_accounting.mechanism_calibration.ExplicitBracketInterval

    def solve(name: str, low: float, high: float) -> float:
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(name), lambda s: _event(s, sample_rate, steps), target_epsilon, delta,
            bracket_interval=bracket(low, high), tol=tol))

    try:
        # RDP is cheap at any σ and never under-states ε, so its σ bounds the PLD answer from above;
        # PLD is then searched just below it (PLD at tiny σ costs minutes and gigabytes).
        sigma = solve("rdp", 1e-3, 1e4)
        if accountant != "rdp":
            try:
                sigma = solve(accountant, 0.5 * sigma, sigma)
            except ValueError:
                sigma = solve(accountant, 0.05 * sigma, sigma)
    except Exception as e:  # the library raises plain exceptions when no σ in range works
        raise PostError(f"the accountant found no noise level giving ε = {target_epsilon} at δ = {delta:g} for "
                        f"{steps} steps at sampling rate {sample_rate:.3g} ({e}); raise --epsilon or train fewer "
                        "steps.") from None
    return float(sigma)


@dataclass(frozen=True)
class PrivacyLedger:
    """Everything needed to recompute a DP-SGD run's ε.

    Attributes:
        noise_multiplier: σ: the Gaussian noise on the summed clipped gradients has std σ·C.
        max_grad_norm: C, the per-example clipping norm.
        sample_rate: q, each example's Poisson inclusion probability per step.
        steps: Noisy steps actually taken (each one is accounted, even an empty batch's).
        planned_steps: Steps σ was calibrated for.
        delta: δ.
        accountant: pld or rdp (dp-accounting).
        dataset_size: N, private training examples (None in the copy that leaves the user, see
            :meth:`public`: ε needs only q).
        target_epsilon: ε asked for (None when σ was given directly).
        epsilon: ε spent after ``steps`` steps, as computed by the accountant.
        randomness: where sampling and noise came from: ``secret`` (a seed from OS entropy, kept only
            in the user's checkpoint), ``secure`` (the OS CSPRNG, Mironov-hardened sums) or
            ``seeded`` (an explicit --dp-seed: the guarantee does not hold against anyone who knows
            it, since they can replay every draw).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    planned_steps: int
    delta: float
    accountant: str
    dataset_size: int | None
    target_epsilon: float | None
    epsilon: float
    randomness: str = "secret"

    def recompute_epsilon(self) -> float:
        return compute_epsilon(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                               steps=self.steps, delta=self.delta, accountant=self.accountant)

    def after(self, steps: int) -> PrivacyLedger:
        """The ledger once ``steps`` steps in all have been taken."""
        eps = compute_epsilon(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=steps,
                              delta=self.delta, accountant=self.accountant)
        return PrivacyLedger(**{**asdict(self), "steps": steps, "epsilon": eps})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def public(self) -> dict[str, Any]:
        """The ledger as it leaves the user (in the prompt file): without the training-set size N."""
        return {k: v for k, v in asdict(self).items() if k != "dataset_size"}

    @property
    def holds_against_seed_holders(self) -> bool:
        """False for a run seeded with an explicit --dp-seed: whoever knows it can replay the noise."""
        return self.randomness != "seeded"

    def _malformed(self) -> str | None:
        """What is wrong with the fields' types or ranges, or None."""

        def number(x: object) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and not math.isnan(x)

        def count(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 0

        checks = {
            "noise_multiplier": number(self.noise_multiplier) and 0 <= self.noise_multiplier < math.inf,
            "max_grad_norm": number(self.max_grad_norm) and 0 < self.max_grad_norm < math.inf,
            "sample_rate": number(self.sample_rate) and 0 < self.sample_rate <= 1,
            "steps": count(self.steps) and count(self.planned_steps) and self.steps <= self.planned_steps,
            "planned_steps": count(self.planned_steps),
            "delta": number(self.delta) and 0 < self.delta < 1,
            "accountant": self.accountant in ACCOUNTANTS,
            "dataset_size": self.dataset_size is None or (count(self.dataset_size) and self.dataset_size >= 1),
            "randomness": self.randomness in RANDOMNESS,
            "target_epsilon": self.target_epsilon is None or (number(self.target_epsilon) and self.target_epsilon > 0),
            "epsilon": number(self.epsilon) and self.epsilon >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        return f"bad {', '.join(bad)}" if bad else None

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, verify: bool = True, tol: float = 1e-6) -> PrivacyLedger:
        """Rebuild a ledger; with ``verify``, refuse one whose ε disagrees with its own numbers."""
        # Older ledgers name no randomness: they were seeded from the public config, so say so.
        optional = {"dataset_size": None, "randomness": "seeded"}
        try:
            values = {k: d[k] if k in d or k not in optional else optional[k] for k in cls.__dataclass_fields__}
        except (KeyError, TypeError, IndexError) as e:
            raise PostError(f"the privacy ledger is incomplete ({e!r}); no ε can be reported for it.") from None
        if values["epsilon"] == "inf":  # how run files spell an unbounded ε (no noise)
            values["epsilon"] = math.inf
        ledger = cls(**values)
        if (problem := ledger._malformed()) is not None:
            raise PostError(f"the privacy ledger is malformed ({problem}); no ε can be reported for it.")
        if verify:
            try:
                eps = ledger.recompute_epsilon()
            except (ValueError, ArithmeticError) as e:
                raise PostError(f"the privacy ledger's numbers can't be accounted ({e}); no ε can be reported "
                                "for it.") from None
            if not math.isclose(eps, ledger.epsilon, rel_tol=1e-3, abs_tol=tol):
                raise PostError(f"the privacy ledger says ε = {ledger.epsilon} but its own numbers give ε = {eps:.4f}; "
                                "it was edited or is corrupt, so no ε is reported.")
        return ledger


def default_delta(n: int) -> float:
    """A δ well below 1/N: the largest power of ten at most 1/(10·N) (N = 3200 -> 1e-5).

    δ bounds the probability that the guarantee fails outright; δ ≈ 1/N would allow one whole
    example to leak, so common practice keeps δ ≪ 1/N.
    """
    if n < 1:
        raise ConfigError("DP training needs at least one training example.")
    return 10.0 ** math.floor(math.log10(1 / (10 * n)))
