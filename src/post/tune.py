"""Stage: tune a soft prompt on a (small) model with the private data, optionally with DP-SGD.

Only the prompt is trained; the model is frozen and in eval mode. The loss is cross-entropy
over class scores (mean label-word logits at the answer position).

- Non-private: shuffled epochs of ``batch_size`` examples, Adam (paper: lr 1e-3, batch 32).
- DP-SGD: each step draws a Poisson sample (every example independently with q = batch/N; the
  sample may be empty and still takes a noise step), computes exact per-example prompt
  gradients, clips each to C, sums, adds N(0, σ²C²) and divides by the expected batch size.
  σ is calibrated to (ε, δ) for the planned number of steps by dp-accounting. Large logical
  batches are processed in micro-batches (gradient accumulation) to bound memory.

DP randomness is secret by default: sampling and noise derive from (secret seed, step), with the
secret drawn from OS entropy when the run starts and kept only in the run's private checkpoint
(never in the prompt file, the result or the logs). ``--dp-seed`` makes a run reproducible for
tests and research, and its ledger says the guarantee then does not hold against anyone who
knows the seed; ``--secure-mode`` draws from the OS CSPRNG instead (see :mod:`post.dp`).

The run directory holds ``prompt.safetensors`` (the prompt file), ``privacy.json`` (the ledger)
and a checkpoint; a killed run started again with the same command resumes from it and takes
exactly the same steps (the secret seed is read back from the checkpoint). DP runs log no
per-step loss or batch size: both are functions of the private data outside the guarantee.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from post import progress
from post.accounting import ACCOUNTANTS, PrivacyLedger, calibrate_noise, check_privacy_params, default_delta
from post.checkpoint import load_checkpoint, save_checkpoint
from post.config import ModelOptions, TaskOptions, require
from post.dp import (
    add_noise,
    clip_per_example,
    new_secret_seed,
    per_example_grads,
    poisson_sample,
    secure_add_noise,
    secure_poisson_sample,
    step_generator,
)
from post.errors import PostError
from post.models import LoadedModel
from post.prompt import init_prompt, save_prompt
from post.resolve import load_configured_model, load_task, subset
from post.results import TuneResult
from post.rundir import RunDir, read_json, to_plain, write_json
from post.scoring import Encoder, classification_metrics, examples_hidden, label_scores, micro_batches, predict_scores
from post.tasks import Verbalizer

log = logging.getLogger(__name__)

PROMPT_FILE = "prompt.safetensors"
LEDGER_FILE = "privacy.json"


@dataclass(frozen=True, kw_only=True)
class TuneConfig(TaskOptions, ModelOptions):
    """Tune a soft prompt on a model with private data (optionally DP-SGD).

    Attributes:
        model: Model to tune on: alias, hub id, directory (e.g. a distilled student) or tiny-*.
        n_tokens: Soft-prompt length (paper: 100; 10-16 keep CPU runs short).
        init: Prompt initialisation: text (the task's init text tiled), vocab (random vocabulary rows)
            or random.
        epochs: Passes over the training data (DP: expected passes, epochs/q steps).
        max_steps: Stop after this many optimizer steps (DP: σ is calibrated for the steps actually
            planned).
        lr: Learning rate.
        optimizer: adam (paper) or sgd.
        batch_size: Examples per step (DP: the expected size of the Poisson sample).
        micro_batch_size: Examples per forward/backward; larger batches are accumulated.
        train_limit: Use a seeded random subset of this many training examples (N is then this).
        train_indices: JSON file with a list of training-split indices to train on instead (e.g. a
            membership-inference shadow's half of the pool).
        eval_limit: Validate on a seeded random subset of this many validation examples.
        eval_every: Validate every this many steps (default: once per epoch).
        patience: Stop early once this many validations in a row have not beaten the best one
            before them (a plateau; the step-0 validation counts; the run's ``steps`` and
            ``stopped_early`` say where). The prompt kept is the best validated one (``kept_step``;
            the step-0 prompt if no step beat it), as early stopping keeps the best checkpoint. Not
            with --dp: the step count the ledger publishes would then depend on private validation data.
        test: Score the final prompt on the test split.
        dp: Train with DP-SGD.
        epsilon: Target ε (with --dp).
        delta: δ (with --dp; default: the largest power of ten at most 1/(10·N)).
        max_grad_norm: Per-example clipping norm C (with --dp).
        noise_multiplier: Use this σ instead of calibrating it to --epsilon (with --dp).
        accountant: pld (dp-accounting's privacy loss distributions, tighter) or rdp.
        seed: Seed of prompt init, the data subsets and (non-private) shuffling. It never drives DP
            sampling or noise.
        dp_seed: Reproducible seed for DP sampling and noise, for tests and research only: anyone
            who knows it can replay every draw, so the guarantee does not hold against them (the
            ledger says so). Default: a secret seed from OS entropy, kept in the run's checkpoint.
        secure_mode: Draw DP sampling and noise from the OS CSPRNG, each Gaussian a sum of four draws
            (against floating-point attacks on Gaussian sampling, Mironov 2012); costs a little
            time per step, and a resumed run redraws the steps after its checkpoint.
        checkpoint_every: Save a resumable checkpoint every this many steps.
    """

    model: str
    n_tokens: int = 100
    init: Literal["text", "vocab", "random"] = "text"
    epochs: int = 20
    max_steps: int | None = None
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: int = 32
    micro_batch_size: int = 32
    train_limit: int | None = None
    train_indices: Path | None = None
    eval_limit: int | None = None
    eval_every: int | None = None
    patience: int | None = None
    test: bool = True
    dp: bool = False
    epsilon: float = 8.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    accountant: Literal["pld", "rdp"] = "pld"
    seed: int = 0
    dp_seed: int | None = None
    secure_mode: bool = False
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        TaskOptions.__post_init__(self)
        ModelOptions.__post_init__(self)
        require(bool(self.model), "model", "must name a model.")
        require(1 <= self.n_tokens <= 4096, "n_tokens", f"must be between 1 and 4096, got {self.n_tokens}.")
        require(self.init in ("text", "vocab", "random"), "init", f"must be text, vocab or random, got {self.init!r}.")
        require(self.epochs >= 1, "epochs", f"must be at least 1, got {self.epochs}.")
        require(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be at least 1.")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be a positive number, got {self.lr}.")
        require(self.optimizer in ("adam", "sgd"), "optimizer", f"must be adam or sgd, got {self.optimizer!r}.")
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}.")
        require(self.micro_batch_size >= 1, "micro_batch_size", f"must be at least 1, got {self.micro_batch_size}.")
        require(self.train_limit is None or self.train_limit >= 2, "train_limit", "must be at least 2.")
        require(self.train_limit is None or self.train_indices is None, "train_indices",
                "can't be combined with --train-limit.")
        require(self.eval_limit is None or self.eval_limit >= 1, "eval_limit", "must be at least 1.")
        require(self.eval_every is None or self.eval_every >= 1, "eval_every", "must be at least 1.")
        require(self.patience is None or self.patience >= 1, "patience", "must be at least 1.")
        require(self.patience is None or not self.dp, "patience",
                "can't be combined with --dp: stopping on private validation accuracy makes the step count the "
                "ledger publishes a function of private data; give --max-steps instead.")
        require(self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1.")
        require(self.accountant in ACCOUNTANTS, "accountant", f"must be one of {', '.join(ACCOUNTANTS)}.")
        if self.dp:
            require(self.epsilon > 0 and math.isfinite(self.epsilon), "epsilon",
                    f"must be a positive finite number, got {self.epsilon}.")
            require(self.delta is None or 0 < self.delta < 1, "delta", f"must be in (0, 1), got {self.delta}.")
            require(self.max_grad_norm > 0, "max_grad_norm", f"must be positive, got {self.max_grad_norm}.")
            require(self.noise_multiplier is None or self.noise_multiplier >= 0, "noise_multiplier",
                    f"must be non-negative, got {self.noise_multiplier}.")
            require(self.dp_seed is None or not self.secure_mode, "dp_seed",
                    "can't be combined with --secure-mode (secure mode is not replayable).")
        require(self.dp or (self.dp_seed is None and not self.secure_mode), "dp_seed",
                "and --secure-mode only apply with --dp true.")


@dataclass
class Plan:
    """Steps and privacy parameters fixed before the first step."""

    n_train: int
    steps_per_epoch: int
    total_steps: int
    ledger: PrivacyLedger | None


def randomness_of(cfg: TuneConfig) -> str:
    """How a DP run draws its sampling and noise (the ledger's ``randomness``)."""
    return "secure" if cfg.secure_mode else "seeded" if cfg.dp_seed is not None else "secret"


class DPRandomness:
    """Poisson sampling and Gaussian noise for DP step ``step``: from (seed, step), or from the OS CSPRNG."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed  # None: secure mode

    def sample(self, n: int, rate: float, step: int) -> torch.Tensor:
        if self.seed is None:
            return secure_poisson_sample(n, rate)
        return poisson_sample(n, rate, step_generator(self.seed, step, 0))

    def noise(self, summed: torch.Tensor, ledger: PrivacyLedger, step: int) -> torch.Tensor:
        if self.seed is None:
            return secure_add_noise(summed, noise_multiplier=ledger.noise_multiplier,
                                    max_grad_norm=ledger.max_grad_norm)
        return add_noise(summed, noise_multiplier=ledger.noise_multiplier, max_grad_norm=ledger.max_grad_norm,
                         generator=step_generator(self.seed, step, 1))


# The secret seed is stored in the checkpoint as four 32-bit words (safetensors holds no big ints).
_SECRET_KEY = "dp_secret"
_BEST_KEY = "best_prompt"  # checkpoint tensor: the best-validated prompt (--patience)


def _secret_tensor(seed: int) -> torch.Tensor:
    return torch.tensor([(seed >> (32 * i)) & 0xFFFFFFFF for i in range(4)], dtype=torch.int64)


def _secret_from(tensor: torch.Tensor) -> int:
    return sum(int(w) << (32 * i) for i, w in enumerate(tensor.tolist()))


def read_indices(path: Path, n: int) -> list[int]:
    """A JSON list of distinct indices into a split of ``n`` examples."""
    try:
        idx = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PostError(f"--train-indices {path} is not a readable JSON list ({e}).") from None
    valid = isinstance(idx, list) and all(isinstance(i, int) and 0 <= i < n for i in idx)
    if not valid or len(set(idx)) != len(idx):
        raise PostError(f"--train-indices {path} must be a list of distinct integers in [0, {n}).")
    return idx


def training_indices(cfg: TuneConfig, n: int) -> list[int]:
    """The training-split indices a tuning config trains on: --train-indices, or a seeded --train-limit subset."""
    if cfg.train_indices is not None:
        return read_indices(cfg.train_indices, n)
    return subset(n, cfg.train_limit, cfg.seed).tolist()


def make_plan(cfg: TuneConfig, n_train: int) -> Plan:
    """Steps per epoch and total, and (DP) σ calibrated for exactly those steps."""
    if n_train < 2:
        raise PostError(f"the training split has {n_train} examples; prompt tuning needs at least 2.")
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size)) if not cfg.dp else max(
        1, round(n_train / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    if not cfg.dp:
        return Plan(n_train, steps_per_epoch, total, None)
    q = cfg.batch_size / n_train
    delta = cfg.delta if cfg.delta is not None else default_delta(n_train)
    check_privacy_params(epsilon=cfg.epsilon, delta=delta, sample_rate=q, dataset_size=n_train)
    if cfg.noise_multiplier is not None:
        sigma, target = cfg.noise_multiplier, None
    else:
        log.info("calibrating σ for ε=%g, δ=%g, q=%.4g, %d steps (%s)", cfg.epsilon, delta, q, total, cfg.accountant)
        sigma, target = calibrate_noise(target_epsilon=cfg.epsilon, delta=delta, sample_rate=q, steps=total,
                                        accountant=cfg.accountant), cfg.epsilon
    ledger = PrivacyLedger(noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm, sample_rate=q, steps=0,
                           planned_steps=total, delta=delta, accountant=cfg.accountant, dataset_size=n_train,
                           target_epsilon=target, epsilon=0.0, randomness=randomness_of(cfg))
    return Plan(n_train, steps_per_epoch, total, ledger)


class PromptTrainer:
    """Holds the frozen model, the encoded training data and the prompt; computes gradients."""

    def __init__(self, loaded: LoadedModel, encoder: Encoder, verbalizer: Verbalizer, texts: Sequence[str],
                 labels: Sequence[int], micro_batch_size: int) -> None:
        self.model, self.encoder, self.verbalizer = loaded.model, encoder, verbalizer
        self.seqs, self.answers = encoder.encode(texts)
        self.labels = torch.tensor(list(labels), dtype=torch.long)
        self.micro = micro_batch_size
        self.dtype = next(self.model.parameters()).dtype

    def _chunks(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Positions in ``idx`` of its micro-batches (at most ``micro_batch_size`` each), longest texts first.

        Each micro-batch runs in one forward (:func:`post.scoring.examples_hidden`): packed end to end where the
        model packs, else padded to its own longest, so a logical batch split into several is sorted by token
        length first (:func:`post.scoring.micro_batches`): over an epoch of mr batches of 32 in padded
        micro-batches of 8 that is 1.13x the real tokens instead of 1.39x (``bench/tune_step.py
        --compare-unsorted``). Either way each example's loss (and gradient) depends only on its own tokens
        and prompt copy, so the summed gradient -- and, for DP, the sum of per-example clipped gradients -- is
        the same up to float summation order; sampling and noise never see this order. One micro-batch keeps
        the input order.
        """
        return [torch.from_numpy(b) for b in micro_batches([len(self.seqs[int(i)]) for i in idx], self.micro)]

    def _losses(self, idx: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """(b,) per-example cross-entropy over class scores for examples ``idx`` with ``prompt``."""
        hidden = examples_hidden(self.model, self.encoder, self.seqs, self.answers, idx,
                                 prompt.to(self.model.device, self.dtype))
        scores = label_scores(self.model, hidden, self.verbalizer)
        return F.cross_entropy(scores.float(), self.labels[idx].to(scores.device), reduction="none")

    def mean_gradient(self, prompt: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Gradient of the mean loss over ``idx`` (non-private), accumulated over micro-batches."""
        grad = torch.zeros_like(prompt)
        total = 0.0
        for pos in self._chunks(idx):
            chunk = idx[pos]
            p = prompt.detach().clone().requires_grad_(True)
            loss = self._losses(chunk, p).sum()
            (g,) = torch.autograd.grad(loss, p)
            grad += g.to(grad) / len(idx)
            total += float(loss.detach())
        return grad, total / max(len(idx), 1)

    def clipped_sum(self, prompt: torch.Tensor, idx: torch.Tensor, max_grad_norm: float
                    ) -> tuple[torch.Tensor, float, torch.Tensor]:
        """Sum over ``idx`` of per-example clipped (``max_grad_norm``) gradients; mean loss; norms in ``idx`` order."""
        summed = torch.zeros_like(prompt)
        total, all_norms = 0.0, torch.zeros(len(idx))
        for pos in self._chunks(idx):
            chunk = idx[pos]
            grads, losses = per_example_grads(lambda copies, c=chunk: self._losses(c, copies), prompt, len(chunk))
            clipped, n = clip_per_example(grads.to(summed), max_grad_norm)
            summed += clipped.sum(0)
            total += float(losses.sum())
            all_norms[pos] = n.detach().float().cpu()
        return summed, total / max(len(idx), 1), all_norms

    def dp_gradient(self, prompt: torch.Tensor, idx: torch.Tensor, *, ledger: PrivacyLedger, expected_batch: float,
                    noise: np.random.Generator | Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, float]:
        """The privatised gradient: (Σ clip(g_i) + N(0, σ²C²)) / expected batch size.

        ``noise`` is a generator for :func:`add_noise`, or a function adding the noise itself.
        """
        summed, loss, _ = self.clipped_sum(prompt, idx, ledger.max_grad_norm)
        if callable(noise):
            noisy = noise(summed)
        else:
            noisy = add_noise(summed, noise_multiplier=ledger.noise_multiplier, max_grad_norm=ledger.max_grad_norm,
                              generator=noise)
        return noisy / expected_batch, loss


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))


def _make_optimizer(cfg: TuneConfig, prompt: torch.Tensor) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([prompt], lr=cfg.lr)
    return torch.optim.Adam([prompt], lr=cfg.lr)


def saved_ledger(run_path: Path, *, plan: PrivacyLedger | None = None, at_least: int = 0) -> PrivacyLedger:
    """A DP run's ``privacy.json``, recomputed; refused when missing, edited, or behind the run's progress.

    With ``plan``, its fixed parameters (σ, C, q, δ, N, accountant, planned steps) must be the plan's,
    and it must count at least ``at_least`` steps (the steps the run's checkpoint has taken).
    """
    path = Path(run_path) / LEDGER_FILE
    if not path.is_file():
        raise PostError(f"{run_path} holds a DP run without its privacy ledger {LEDGER_FILE}, so the steps it took "
                        "can't be accounted and no ε is reported; run again with a new --out.")
    ledger = PrivacyLedger.from_dict(read_json(path))
    fixed = ("noise_multiplier", "max_grad_norm", "sample_rate", "planned_steps", "delta", "accountant",
             "dataset_size")
    if plan is not None and any(getattr(ledger, k) != getattr(plan, k) for k in fixed):
        raise PostError(f"the privacy ledger {path} belongs to other DP settings than this run's; no ε is "
                        "reported. Run again with a new --out.")
    if ledger.steps < at_least or ledger.steps > ledger.planned_steps:
        raise PostError(f"the privacy ledger {path} counts {ledger.steps} steps, but the run has taken {at_least} "
                        f"of {ledger.planned_steps}; it under-counts, so no ε is reported. Run again with a new --out.")
    return ledger


def _check_finished(run: RunDir, result: dict[str, Any]) -> dict[str, Any]:
    """A finished DP run's result stands only if its ledger still backs the ε it reports."""
    if result.get("dp"):
        ledger = saved_ledger(run.path)
        if ledger.steps != ledger.planned_steps or to_plain(ledger.to_dict()) != result.get("privacy") or \
                to_plain(ledger.epsilon) != result.get("epsilon"):
            raise PostError(f"{run.path / LEDGER_FILE} disagrees with the ε in {run.result_path}; one of them was "
                            "edited, so no ε is reported. Run again with a new --out.")
    return result


def plateaued(history: list[dict[str, Any]], patience: int | None) -> bool:
    """Whether the last ``patience`` validations all failed to beat the best one before them."""
    if patience is None or len(history) <= patience:
        return False
    best_before = max(p["val_accuracy"] for p in history[:-patience])
    return all(p["val_accuracy"] <= best_before for p in history[-patience:])


def tune(cfg: TuneConfig, run_dir: str | Path) -> TuneResult:
    """Tune a prompt; write prompt file, ledger, metrics and result into ``run_dir``."""
    run = RunDir(run_dir, stage="tune", config=cfg)
    if (done := run.existing_result()) is not None:
        return TuneResult.from_dict(_check_finished(run, done), source=str(run.result_path))
    data = load_task(cfg)
    train = data.split("train")
    tr_idx = training_indices(cfg, len(train))
    texts, labels = [train.texts[i] for i in tr_idx], [train.labels[i] for i in tr_idx]
    plan = make_plan(cfg, len(texts))
    val = data.split("validation")
    va_idx = subset(len(val), cfg.eval_limit, cfg.seed)
    val_texts, val_labels = [val.texts[i] for i in va_idx], [val.labels[i] for i in va_idx]

    loaded = load_configured_model(cfg, cfg.model)
    encoder = Encoder(data.task, loaded.tokenizer, loaded.kind, cfg.max_length)
    verbalizer = Verbalizer.build(data.task, loaded.tokenizer)
    trainer = PromptTrainer(loaded, encoder, verbalizer, texts, labels, cfg.micro_batch_size)
    prompt = init_prompt(loaded, cfg.n_tokens, init=cfg.init, init_text=data.task.init_text, seed=cfg.seed)
    prompt = prompt.to(loaded.model.device).requires_grad_(True)
    opt = _make_optimizer(cfg, prompt)
    start, history, elapsed_before, secret = 0, [], 0.0, None
    best: dict[str, Any] = {}  # with --patience: the best validation's step, accuracy and prompt, kept at the end
    if (ckpt := load_checkpoint(run.path, params={"prompt": prompt}, optimizer=opt)) is not None:
        tensors, meta = ckpt
        with torch.no_grad():
            prompt.copy_(tensors["prompt"])
        start, history, elapsed_before = int(meta["step"]), list(meta["history"]), float(meta["elapsed"])
        if cfg.patience is not None and not cfg.dp:
            if _BEST_KEY in tensors and "best" in meta:
                best = {"prompt": tensors[_BEST_KEY].to(prompt), **meta["best"]}
            elif history:  # a checkpoint written before the best prompt was kept: nothing may undercut its best
                top = max(range(len(history)), key=lambda i: history[i]["val_accuracy"])
                best = {"prompt": None, "step": history[top]["step"], "val": history[top]["val_accuracy"]}
        if _SECRET_KEY in tensors:
            secret = _secret_from(tensors[_SECRET_KEY])
        log.info("resuming from step %d", start)
    if plan.ledger is not None and start > 0:
        saved_ledger(run.path, plan=plan.ledger, at_least=start)
    if plan.ledger is not None and ckpt is None and (run.path / LEDGER_FILE).exists():
        # Steps were accounted (and taken) but their checkpoint is gone: starting over would draw a new secret
        # and rewrite the ledger to fewer steps than were run.
        raise PostError(f"{run.path} holds a DP run's ledger but no readable checkpoint; its steps can't be replayed "
                        "or un-spent. Run again with a new --out.")
    randomness: DPRandomness | None = None
    extra_tensors: dict[str, torch.Tensor] = {}
    if plan.ledger is not None and not cfg.secure_mode:
        if cfg.dp_seed is not None:
            secret = cfg.dp_seed
        elif secret is None:
            if start > 0:
                raise PostError(f"the checkpoint in {run.path} holds no DP seed, so the run can't resume with the same "
                                "noise; run again with a new --out.")
            secret = new_secret_seed()
        extra_tensors = {_SECRET_KEY: _secret_tensor(secret)} if cfg.dp_seed is None else {}
    if plan.ledger is not None:
        randomness = DPRandomness(None if cfg.secure_mode else secret)

    def checkpoint(done: int) -> None:
        kept = {_BEST_KEY: best["prompt"]} if best.get("prompt") is not None else {}
        save_checkpoint(run.path, tensors={"prompt": prompt, **extra_tensors, **kept}, params={"prompt": prompt},
                        optimizer=opt, meta={"step": done, "history": history,
                                             "elapsed": elapsed_before + time.perf_counter() - t0,
                                             **({"best": {k: best[k] for k in ("step", "val")}} if kept else {})})
    eval_every = cfg.eval_every or plan.steps_per_epoch

    def reserve(done: int) -> None:
        """Account the steps up to the next checkpoint before taking them: the ledger on disk may run
        ahead of the work (a resumed run replays those steps with the same samples and noise), never behind."""
        if plan.ledger is not None and done < plan.total_steps:
            upto = min((done // cfg.checkpoint_every + 1) * cfg.checkpoint_every, plan.total_steps)
            write_json(run.path / LEDGER_FILE, plan.ledger.after(upto).to_dict())

    def validate(step: int) -> dict[str, Any]:
        scores = predict_scores(loaded.model, encoder, verbalizer, val_texts, batch_size=cfg.micro_batch_size,
                                prompt=prompt.detach(), progress=False)
        m = classification_metrics(scores, val_labels, data.class_names)
        point = {"step": step, "epoch": step / plan.steps_per_epoch, "val_accuracy": m["accuracy"]}
        run.log(**point)
        log.info("step %d/%d  validation accuracy %.4f", step, plan.total_steps, m["accuracy"])
        if cfg.patience is not None and (not best or m["accuracy"] > best["val"]):
            best.update(prompt=prompt.detach().clone(), step=step, val=m["accuracy"])
        return point

    log.info("tuning a %d-token prompt on %s: %d training examples, %d steps%s", cfg.n_tokens, cfg.model,
             plan.n_train, plan.total_steps, f", DP σ={plan.ledger.noise_multiplier:.4f}" if plan.ledger else "")
    if start == 0 and not history:
        history.append(validate(0))
    t0 = time.perf_counter()
    if plan.ledger is not None and ckpt is None:
        # Before any step is accounted: the secret seed is on disk (privately) before the first step uses it,
        # and a DP run whose ledger exists always has a checkpoint to resume from.
        checkpoint(0)
    with progress.steps(plan.total_steps, initial=start, desc="tune") as bar:
        n = plan.n_train
        reserve(start)
        done = start
        # a resumed run that had already stopped early (not one that had finished its plan)
        stopped_early = plateaued(history, cfg.patience) and start < plan.total_steps
        for step in range(start, plan.total_steps if not stopped_early else start):
            if plan.ledger is not None and randomness is not None:
                idx = randomness.sample(n, plan.ledger.sample_rate, step)
                grad, loss = trainer.dp_gradient(prompt, idx, ledger=plan.ledger, expected_batch=cfg.batch_size,
                                                 noise=lambda summed, s=step: randomness.noise(summed, plan.ledger, s))
            else:
                epoch, pos = divmod(step, plan.steps_per_epoch)
                idx = _epoch_order(cfg.seed, epoch, n)[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
                grad, loss = trainer.mean_gradient(prompt, idx)
            progress.check_finite("loss", loss, also=grad, step=step, run_path=run.path)
            prompt.grad = grad
            try:
                opt.step()
            except RuntimeError:  # an update too large for the prompt's dtype (e.g. a huge --lr)
                raise progress.diverged(f"the update of step {step} overflowed", run.path) from None
            # never checkpoint a prompt that is no longer finite
            progress.check_finite("prompt", prompt.detach(), step=step, run_path=run.path)
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            # A DP run logs no per-step line: its loss, its sample size and even the time a step took (which grows
            # with the sample) are functions of the private data outside the guarantee.
            if plan.ledger is None:
                run.log(step=step + 1, loss=loss, batch=len(idx))
            done = step + 1
            if done % eval_every == 0 or done == plan.total_steps:
                history.append(validate(done))
                stopped_early = plateaued(history, cfg.patience) and done < plan.total_steps
            if done % cfg.checkpoint_every == 0 or done == plan.total_steps or stopped_early:
                checkpoint(done)
                reserve(done)
            if stopped_early:
                log.info("validation accuracy has not beaten %.4f for %d validations: stopping at step %d of %d",
                         max(p["val_accuracy"] for p in history[: -cfg.patience]), cfg.patience, done,
                         plan.total_steps)
                break
    train_seconds = elapsed_before + time.perf_counter() - t0
    val_accuracy, kept_step = history[-1]["val_accuracy"], None
    if best.get("prompt") is not None:  # --patience (never with DP): the best validated prompt, ties to the earliest
        kept_step, val_accuracy = best["step"], best["val"]
        with torch.no_grad():
            prompt.copy_(best["prompt"])
        if best["step"] != history[-1]["step"]:
            log.info("keeping the prompt of step %d, the best validation (accuracy %.4f; the last, step %d: %.4f)",
                     best["step"], best["val"], done, history[-1]["val_accuracy"])

    ledger = plan.ledger.after(plan.total_steps) if plan.ledger is not None else None
    if ledger is not None:
        write_json(run.path / LEDGER_FILE, ledger.to_dict())
    result: dict[str, Any] = {
        "model": cfg.model, "task": cfg.task, "n_tokens": cfg.n_tokens, "dp": cfg.dp, "steps": done,
        "planned_steps": plan.total_steps, "stopped_early": stopped_early,
        "n_train": plan.n_train, "train_seconds": round(train_seconds, 3), "validation_curve": history,
        "val_accuracy": val_accuracy, "kept_step": kept_step, "privacy": ledger.to_dict() if ledger else None,
        "epsilon": ledger.epsilon if ledger else None, "delta": ledger.delta if ledger else None,
    }
    if cfg.test:
        test = data.split("test")
        scores = predict_scores(loaded.model, encoder, verbalizer, list(test.texts), batch_size=cfg.micro_batch_size,
                                prompt=prompt.detach(), desc="test")
        metrics = classification_metrics(scores, test.labels, data.class_names)
        result.update(test_accuracy=metrics["accuracy"], test_macro_f1=metrics["macro_f1"], test=metrics)
    # What leaves the user: the prompt, the public task definition and the ledger without N (see
    # post.prompt.LEAVES_USER); no accuracy, seed, path or training-set size.
    save_prompt(run.path / PROMPT_FILE, prompt, loaded=loaded, task=data.task,
                privacy=ledger.public() if ledger else None)
    result["prompt"] = str(run.path / PROMPT_FILE)
    return TuneResult.from_dict(run.finish(result), source=str(run.result_path))


def summarize(result: TuneResult) -> str:
    priv = f"  ε={float(result.epsilon):.3f} δ={result.delta:g}" if result.epsilon is not None else ""
    test = f"test accuracy {result.test_accuracy:.4f}  " if result.test_accuracy is not None else ""
    return (f"{test}validation accuracy {result.val_accuracy:.4f}  ({result.n_tokens}-token prompt on "
            f"{result.model}, {result.steps} steps, {result.train_seconds:.0f} s){priv}\n"
            f"prompt: {result.prompt}")
