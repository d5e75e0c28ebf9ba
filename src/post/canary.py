"""Stage: a one-run privacy audit with canaries (``post attack canary``).

m canaries (random-word texts with random labels, made by the auditor, unlike any real example)
are each put into the training set with probability ½ by a secret coin; the prompt is tuned
once with exactly the settings of the prompt it audits (DP or not), on that prompt's training
examples plus the included canaries. Each canary is then scored by how much the tuned prompt
raised the model's confidence in the canary's label over the initial prompt (the logit-scaled
confidence, ``post.lira.logit_confidence``, after minus before). The auditor guesses "in" for the
``guesses_in`` highest scores and "out" for the ``guesses_out`` lowest and abstains on the rest;
the number of correct guesses gives an ε lower bound by Steinke, Nasr & Jagielski's theorem.

Theorem (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run", Thm. 3.1):
if the training run is (ε, δ)-DP with respect to adding or removing one canary, the coins are
independent fair coins, and the guesser makes at most r guesses (any function of the output),
then the number W of correct guesses satisfies

    P[W ≥ v] ≤ P[Binomial(r, p) ≥ v] + 2mδ · max_{1≤i≤v} P[v − i ≤ Binomial(r, p) < v] / i,
    p = e^ε / (1 + e^ε).

Unlike the shadow-model bound (``post.lira.epsilon_lower_bound``) this needs no independence of
the m scores: they all come from one model, and the theorem accounts for that. The reported ε is
the largest ε whose P[W ≥ v] is at most 1 − ``confidence``: every smaller ε is rejected at that
level. The bound is computed with the run's δ and also with δ = 0 (the pure-ε version).

Caveat: DP-SGD here samples with rate q = batch/N, and N counts the included canaries, so q moves
by a fraction of a percent with the coins; the accountant treats q as fixed (as DP-SGD practice
does). The audit's canaries are random text, which is the auditor's choice: a weak canary gives a
weak (still valid) bound.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from post.config import require
from post.results import CanaryResult
from post.tune import TuneConfig

log = logging.getLogger(__name__)

CANARIES = "canaries.json"
TASK_FILE = "canary-task.jsonl"
SCORES = "canary-scores.json"


# --------------------------------------------------------------------------- the bound (pure functions)

def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[≥ v of r guesses correct] for an (ε, δ)-DP run with m canaries (see the module)."""
    if not (0 <= v <= r <= m) or epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, ε ≥ 0 and δ in [0, 1], got m={m}, r={r}, v={v}, ε={epsilon}, "
                         f"δ={delta}")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = float(stats.binom.sf(v - 1, r, p))
    if delta == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    below = stats.binom.cdf(v - 1, r, p) - stats.binom.cdf(v - i - 1, r, p)  # P[v − i ≤ W < v]
    return float(min(tail + 2 * m * delta * np.max(below / i), 1.0))


def one_run_epsilon(m: int, r: int, v: int, *, delta: float = 0.0, confidence: float = 0.95) -> float:
    """ε lower bound at ``confidence`` from v correct of r guesses on m canaries (δ = 0: pure ε).

    The largest ε with ``one_run_p_value(m, r, v, ε, δ) ≤ 1 − confidence`` (bisection; the p-value
    grows with ε). 0 when even ε = 0 explains the guesses.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(m, r, v, eps, delta) <= beta

    if r == 0 or not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # all r correct with r huge: no finite ε explains it at this confidence
            return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
        if hi - lo < 1e-6:
            break
    return lo


def guesses(scores: np.ndarray, k_in: int, k_out: int) -> np.ndarray:
    """(m,) guesses from (m,) scores: +1 ("in") for the k_in highest, −1 for the k_out lowest, 0 abstain."""
    scores = np.asarray(scores, float)
    if k_in + k_out > len(scores) or min(k_in, k_out) < 0:
        raise ValueError(f"need k_in, k_out ≥ 0 and k_in + k_out ≤ m = {len(scores)}, got {k_in} and {k_out}")
    order = np.argsort(-scores, kind="stable")
    g = np.zeros(len(scores), dtype=int)
    g[order[:k_in]] = 1
    if k_out:
        g[order[-k_out:]] = -1
    return g


def count_correct(guess: np.ndarray, coins: np.ndarray) -> tuple[int, int]:
    """(r, v): guesses made and guesses right, from (m,) guesses in {−1, 0, 1} and (m,) coins (True = in)."""
    guess, coins = np.asarray(guess, int), np.asarray(coins, bool)
    made = guess != 0
    return int(made.sum()), int(((guess == 1) & coins).sum() + ((guess == -1) & ~coins).sum())


# --------------------------------------------------------------------------- the stage

@dataclass(frozen=True, kw_only=True)
class CanaryConfig(TuneConfig):
    """One-run audit: tune once with secret canaries and bound ε from guessing them (all of post tune's options apply).

    Attributes:
        canaries: Canaries m; each is trained on with probability ½.
        guesses_in: Guess "member" for this many highest-scoring canaries.
        guesses_out: Guess "non-member" for this many lowest-scoring canaries.
        canary_words: Random words per canary text.
        canary_seed: Seed of the canaries and their coins (default: secret and random; the coins are
            kept in the run directory).
        confidence: Confidence of the ε lower bound.
        audit_delta: δ for the bound (default: the run's δ; without --dp the δ a DP run would take).
    """

    canaries: int = 256
    guesses_in: int = 32
    guesses_out: int = 32
    canary_words: int = 8
    canary_seed: int | None = None
    confidence: float = 0.95
    audit_delta: float | None = None

    def __post_init__(self) -> None:
        TuneConfig.__post_init__(self)
        require(self.canaries >= 2, "canaries", f"must be at least 2, got {self.canaries}.")
        require(self.guesses_in >= 0 and self.guesses_out >= 0, "guesses_in", "guesses must be non-negative.")
        require(1 <= self.guesses_in + self.guesses_out <= self.canaries, "guesses_in",
                f"--guesses-in + --guesses-out must be between 1 and --canaries ({self.canaries}), got "
                f"{self.guesses_in} + {self.guesses_out}.")
        require(1 <= self.canary_words <= 64, "canary_words", f"must be between 1 and 64, got {self.canary_words}.")
        require(0 < self.confidence < 1, "confidence", f"must be in (0, 1), got {self.confidence}.")
        require(self.audit_delta is None or 0 <= self.audit_delta < 1, "audit_delta", "must be in [0, 1).")


def make_canaries(m: int, words: int, n_classes: int, seed: int) -> tuple[list[str], list[int], np.ndarray]:
    """m random-word texts, their random labels (class indices) and their fair coins (True = trained on)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    texts = [" ".join("".join(rng.choice(letters, size=int(rng.integers(3, 9)))) for _ in range(words))
             for _ in range(m)]
    labels = rng.integers(0, n_classes, size=m).tolist()
    coins = rng.random(m) < 0.5
    return texts, labels, coins


def _load_or_make(path: Path, cfg: CanaryConfig, n_classes: int) -> dict[str, Any]:
    """The run's canaries and coins: made once (secret seed unless given), then read back on resume."""
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    seed = cfg.canary_seed if cfg.canary_seed is not None else secrets.randbits(63)
    texts, labels, coins = make_canaries(cfg.canaries, cfg.canary_words, n_classes, seed)
    from post.rundir import write_json

    record = {"texts": texts, "labels": labels, "in": coins.astype(int).tolist()}
    write_json(path, record)
    return record


def _write_task(path: Path, data: Any, train_idx: list[int], canaries: dict[str, Any]) -> None:
    """The audited run's data as a file: its training examples plus the included canaries; the validation split."""
    names = data.class_names
    train, val = data.split("train"), data.split("validation")
    rows = [(train.texts[i], names[train.labels[i]], "train") for i in train_idx]
    rows += [(t, names[y], "train") for t, y, c in zip(canaries["texts"], canaries["labels"], canaries["in"]) if c]
    rows += [(t, names[y], "validation") for t, y in zip(val.texts, val.labels)]
    rows.append((val.texts[0], names[val.labels[0]], "test"))  # never scored (test=False); the file needs one
    from post.cache import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps({"text": t, "label": y, "split": s}) + "\n" for t, y, s in rows),
                       encoding="utf-8")


def canary_scores(cfg: TuneConfig, prompt_path: str, texts: list[str], labels: list[int]) -> np.ndarray:
    """(m,) membership scores: each canary's logit-scaled confidence in its label under the tuned prompt
    minus under the initial prompt (the one tuning started from), which cancels each text's own prior."""
    from post.lira import logit_confidence
    from post.prompt import init_prompt, read_prompt
    from post.resolve import load_configured_model
    from post.scoring import Encoder, predict_scores
    from post.tasks import Verbalizer

    pf = read_prompt(prompt_path)
    loaded = load_configured_model(cfg, cfg.model)
    start = init_prompt(loaded, cfg.n_tokens, init=cfg.init, init_text=pf.task.init_text, seed=cfg.seed)
    enc = Encoder(pf.task, loaded.tokenizer, loaded.kind, cfg.max_length)
    verbalizer = Verbalizer.build(pf.task, loaded.tokenizer)
    conf = [logit_confidence(predict_scores(loaded.model, enc, verbalizer, texts, batch_size=cfg.micro_batch_size,
                                            prompt=p.to(loaded.model.device), progress=False), np.asarray(labels))
            for p in (pf.tensor, start)]
    return conf[0] - conf[1]


def fixed_mechanism(cfg: CanaryConfig, n_train: int, delta: float) -> dict[str, Any]:
    """Steps and σ that do not depend on the secret coins (DP runs with a target ε).

    The training set holds n_train to n_train + m examples depending on the coins, and tuning would
    derive its steps and σ from that N, so the audited run would not be one fixed mechanism. Here T
    is planned for the largest set and σ calibrated at the largest rate any coins give (q = B/n_train):
    whatever the coins, the run takes T steps at a rate ≤ q with that σ, so it is (ε, δ)-DP for the
    target ε, and its own ledger (at its actual q) reports no more.
    """
    if not cfg.dp or cfg.noise_multiplier is not None:
        return {}
    from post.accounting import calibrate_noise

    steps = max(1, round((n_train + cfg.canaries) / cfg.batch_size)) * cfg.epochs
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    sigma = calibrate_noise(target_epsilon=cfg.epsilon, delta=delta, sample_rate=min(1.0, cfg.batch_size / n_train),
                            steps=steps, accountant=cfg.accountant)
    per_epoch_min = max(1, round(n_train / cfg.batch_size))
    return {"max_steps": steps, "epochs": max(cfg.epochs, -(-steps // per_epoch_min)), "noise_multiplier": sigma}


def _tune_config(cfg: CanaryConfig, task_file: Path, task: Any, delta: float | None,
                 mechanism: dict[str, Any] | None = None) -> TuneConfig:
    fields = {f.name for f in dataclasses.fields(TuneConfig) if f.init}
    values = {k: getattr(cfg, k) for k in fields}
    values.update(mechanism or {})
    values.update(task=str(task_file), text_column="text", label_column="label", template=task.template,
                  label_words={k: list(v) for k, v in task.label_words.items()}, init_text=task.init_text,
                  train_limit=None, train_indices=None, test=False, encoding="utf-8")
    if cfg.dp:
        values["delta"] = delta
    return TuneConfig(**values)


def canary_audit(cfg: CanaryConfig, run_dir: str | Path) -> CanaryResult:
    """Tune once with secret canaries, guess them, and report the one-run ε lower bound."""
    from post.accounting import default_delta
    from post.resolve import load_task
    from post.rundir import RunDir, write_json
    from post.tune import training_indices, tune

    run = RunDir(run_dir, stage="attack-canary", config=cfg)
    if (done := run.existing_result()) is not None:
        return CanaryResult.from_dict(done, source=str(run.result_path))
    t0 = time.perf_counter()
    data = load_task(cfg)
    train = data.split("train")
    train_idx = training_indices(cfg, len(train))
    canaries = _load_or_make(run.path / CANARIES, cfg, len(data.class_names))
    coins = np.asarray(canaries["in"], bool)
    # One δ whatever the coins: below 1/N for the largest possible training set.
    delta = cfg.delta if cfg.delta is not None else default_delta(len(train_idx) + cfg.canaries)
    task_file = run.path / TASK_FILE
    if not task_file.exists():
        _write_task(task_file, data, train_idx, canaries)
    log.info("canary audit: %d canaries (%d trained on, secret), %d training examples, %s", cfg.canaries,
             int(coins.sum()), len(train_idx), f"DP ε={cfg.epsilon:g}" if cfg.dp else "non-private")
    tuned = tune(_tune_config(cfg, task_file, data.task, delta, fixed_mechanism(cfg, len(train_idx), delta)),
                 run.path / "tune")
    scores = canary_scores(cfg, tuned.prompt, canaries["texts"], canaries["labels"])
    guess = guesses(scores, cfg.guesses_in, cfg.guesses_out)
    r, v = count_correct(guess, coins)
    audit_delta = cfg.audit_delta if cfg.audit_delta is not None else (tuned.delta if cfg.dp else delta)
    write_json(run.path / SCORES, {"scores": scores.tolist(), "guesses": guess.tolist()})
    from post.lira import roc

    result: dict[str, Any] = {
        "model": cfg.model, "task": cfg.task, "dp": cfg.dp, "canaries": cfg.canaries, "canaries_in": int(coins.sum()),
        "guesses_in": cfg.guesses_in, "guesses_out": cfg.guesses_out, "guesses": r, "correct": v,
        "precision": v / r, "confidence": cfg.confidence, "audit_delta": audit_delta,
        "epsilon_lower_bound": one_run_epsilon(cfg.canaries, r, v, delta=audit_delta, confidence=cfg.confidence),
        "epsilon_lower_bound_pure": one_run_epsilon(cfg.canaries, r, v, delta=0.0, confidence=cfg.confidence),
        "canary_auc": roc(scores, coins).auc if 0 < coins.sum() < len(coins) else None,
        "epsilon": tuned.epsilon, "delta": tuned.delta, "n_train": len(train_idx), "steps": tuned.steps,
        "val_accuracy": tuned.val_accuracy, "tune_dir": str(run.path / "tune"),
        "wall_seconds": round(time.perf_counter() - t0, 3),
    }
    # A bound above the accounted ε means broken DP code or accounting (or a 1 − confidence chance event).
    result["exceeds_accounted_epsilon"] = bool(result["epsilon"] is not None
                                               and result["epsilon_lower_bound"] > result["epsilon"])
    if result["exceeds_accounted_epsilon"]:
        log.warning("the canary audit's lower bound ε ≥ %.3f exceeds the run's accounted ε = %.3f: check the DP "
                    "implementation and its accounting", result["epsilon_lower_bound"], result["epsilon"])
    return CanaryResult.from_dict(run.finish(result), source=str(run.result_path))


def summarize(result: CanaryResult) -> str:
    privacy = f"DP, ε={float(result.epsilon):.2f}" if result.dp else "non-private"  # type: ignore[arg-type]
    return (f"one-run canary audit ({privacy}): {result.correct} of {result.guesses} guesses right on "
            f"{result.canaries} canaries; empirical ε ≥ {result.epsilon_lower_bound:.3f} at δ = "
            f"{result.audit_delta:g} (pure ε ≥ {result.epsilon_lower_bound_pure:.3f}), "
            f"{result.confidence:.0%} confidence, {result.wall_seconds:.0f} s")
