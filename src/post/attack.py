"""Stage: LiRA and RMIA membership inference on soft prompts (``post attack lira``), the privacy audit.

N shadow prompts are tuned with the settings of the prompt under attack (DP or not), each on a
seeded half of a pool of training examples; every example is in exactly half of the shadows. For
every example and shadow the shadow prompt's logit-scaled confidence in the true class is
recorded, and each shadow is attacked in turn with the others as reference: LiRA (online and
offline, with and without a global variance) and RMIA (online, and offline with its parameter a),
on the same scores. With ``--transfer-target`` every shadow prompt is also transferred to that
model with public data, and the transferred prompts (what the provider holds) are attacked
through the target's outputs.

DP shadows run the released prompt's mechanism as closely as the pool allows: the released
prompt (``target_n_train`` examples, the whole training split by default) fixes the sampling rate
q, the steps T, σ and δ; each shadow samples at q too (batch = ⌊q·its size⌋, at least 1), takes
exactly T steps, and uses the target's δ. σ is the target's unless a small pool forces a shadow's
rate above q, and then it is raised until the highest rate spends no more than the ε under
attack. Every shadow's own ledger is checked against that ε, and the result records both
mechanisms (``target_mechanism``, ``shadow_mechanism``).

Shadows are independent jobs: they run in parallel worker processes, each in its own run
directory, so an interrupted attack resumes and a finished shadow is never retrained.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from post.config import require, require_transfer_loss
from post.errors import PostError
from post.lira import Roc, epsilon_lower_bound, leave_one_out, leave_one_out_rmia, logit_confidence, plot_roc, roc
from post.resolve import load_configured_model, load_task, subset
from post.results import AttackResult
from post.rundir import RunDir, read_json, write_json
from post.tune import TuneConfig, saved_ledger, tune

log = logging.getLogger(__name__)

CONFIDENCE = "confidence.json"


@dataclass(frozen=True, kw_only=True)
class AttackConfig(TuneConfig):
    """LiRA and RMIA membership inference on prompts tuned with these settings (all of post tune's options apply).

    With --dp, the tuning options (batch size, epochs, max steps, ε, δ, σ) describe the released prompt
    under attack, trained on --target-n-train examples; each shadow derives its own batch and epochs
    from them so that it runs the same rate q and number of steps.

    Attributes:
        shadows: Number of shadow prompts (paper: 8; ≥ 16 recommended).
        pool_size: Training examples in the membership pool (each shadow trains on half of it).
        workers: Shadow jobs run in parallel processes.
        audit_delta: δ for the empirical ε lower bound (default: the DP δ, else 1e-5).
        transfer_target: Also transfer every shadow prompt to this model and attack the transferred prompts.
        public: Public text for those transfers.
        public_limit: Public texts per transfer.
        transfer_steps: Transfer steps per shadow.
        transfer_lr: Transfer learning rate.
        transfer_batch_size: Public examples per transfer step.
        transfer_alpha: Transfer α (the paper's loss; not used by proxy labels).
        transfer_mode: vocab or label-words.
        transfer_loss: post (the paper's) or proxy-labels (label-words mode): the loss the audited
            transfers use, which should be the one the provider deploys.
        transfer_calibrate_labels: With proxy-labels: calibrate the labels on the public texts (post transfer
            --calibrate-labels), as the deployed transfer does.
        target_n_train: Training examples of the prompt under attack (its post tune --train-limit; default: the
            whole training split): with --dp it fixes the sampling rate, steps and δ the shadows copy.
        rmia_a: RMIA's offline parameter a (p_IN ≈ a·p_OUT + 1 − a; the paper tunes it on reference models).
    """

    shadows: int = 16
    pool_size: int | None = 1000
    workers: int = 1
    audit_delta: float | None = None
    transfer_target: str | None = None
    public: str = "airline"
    public_limit: int | None = 256
    transfer_steps: int = 300
    transfer_lr: float = 1e-3
    transfer_batch_size: int = 8
    transfer_alpha: float = 0.5
    transfer_mode: str = "vocab"
    transfer_loss: str = "post"
    transfer_calibrate_labels: bool = False
    target_n_train: int | None = None
    rmia_a: float = 0.3

    def __post_init__(self) -> None:
        TuneConfig.__post_init__(self)
        require(self.shadows >= 4, "shadows", "must be at least 4 (each shadow is attacked with the others as "
                f"in- and out-references), got {self.shadows}.")
        require(self.shadows % 2 == 0, "shadows", "must be even: every example is in exactly half of the shadows.")
        require(self.pool_size is None or self.pool_size >= 4, "pool_size", "must be at least 4.")
        require(self.workers >= 1, "workers", f"must be at least 1, got {self.workers}.")
        require(self.train_indices is None and self.train_limit is None, "train_indices",
                "the attack chooses each shadow's training examples itself; drop --train-indices/--train-limit.")
        require(self.audit_delta is None or 0 < self.audit_delta < 1, "audit_delta", "must be in (0, 1).")
        require(self.target_n_train is None or self.target_n_train >= 2, "target_n_train", "must be at least 2.")
        require(0 <= self.rmia_a <= 1, "rmia_a", f"must be in [0, 1], got {self.rmia_a}.")
        require_transfer_loss(self.transfer_loss, self.transfer_mode, option="transfer_loss",
                              mode_flag="--transfer-mode")


def balanced_masks(n: int, shadows: int, seed: int) -> np.ndarray:
    """(n, shadows) membership: every example in exactly half of the shadows, seeded."""
    rng = np.random.default_rng(seed)
    order = rng.random((n, shadows)).argsort(axis=1)
    return order < shadows // 2


def _tune_config(cfg: AttackConfig, indices_file: Path | None, seed: int, **overrides: Any) -> TuneConfig:
    """The TuneConfig of one shadow: the attack's tuning options, its training indices and seed, ``overrides``."""
    fields = {f.name for f in dataclasses.fields(TuneConfig) if f.init}
    base = {k: getattr(cfg, k) for k in fields}
    if base.get("dp_seed") is not None:  # an explicit, reproducible DP seed: one per shadow
        base["dp_seed"] = base["dp_seed"] + seed - cfg.seed
    return TuneConfig(**{**base, "train_indices": indices_file, "seed": seed, "test": False, **overrides})


@dataclass(frozen=True)
class ShadowPlan:
    """How DP shadows copy the released prompt's mechanism (see the module docstring).

    Attributes:
        target: The released prompt's mechanism: dataset_size, sample_rate, steps, noise_multiplier, delta,
            epsilon (after its steps).
        batch_sizes: Each shadow's expected batch (its Poisson rate is batch / its size).
        epochs: Each shadow's epochs, enough that it takes ``steps`` steps.
        steps: Steps every shadow takes (the target's).
        noise_multiplier: σ of every shadow.
        delta: δ of every shadow (the target's).
    """

    target: dict[str, Any]
    batch_sizes: list[int]
    epochs: list[int]
    steps: int
    noise_multiplier: float
    delta: float

    def overrides(self, s: int) -> dict[str, Any]:
        """TuneConfig fields of shadow ``s``."""
        return {"batch_size": self.batch_sizes[s], "epochs": self.epochs[s], "max_steps": self.steps,
                "noise_multiplier": self.noise_multiplier, "delta": self.delta}


def plan_dp_shadows(cfg: AttackConfig, sizes: list[int], target_n: int) -> ShadowPlan:
    """Batches, steps, σ and δ for DP shadows of ``sizes`` examples copying a released prompt on ``target_n``."""
    from post.accounting import calibrate_noise
    from post.tune import make_plan

    target = make_plan(_tune_config(cfg, None, cfg.seed), target_n).ledger
    assert target is not None
    steps, q = target.planned_steps, target.sample_rate
    eps = target.after(steps).epsilon
    if target.delta >= 1 / max(sizes):
        raise PostError(f"the attacked prompt's δ = {target.delta:g} is not below 1/N for a shadow of {max(sizes)} "
                        "examples; give a smaller --delta or a larger --pool-size.")
    batches = [max(1, math.floor(q * n + 1e-9)) for n in sizes]
    epochs = [max(1, math.ceil(steps / max(1, round(n / b)))) for n, b in zip(sizes, batches)]
    top = max(b / n for b, n in zip(batches, sizes))
    sigma = target.noise_multiplier
    if top > q * (1 + 1e-12) and sigma > 0:
        # A pool too small for rate q: the shadows with batch 1 sample faster, so they need more noise to stay
        # within the ε under attack.
        sigma = max(sigma, calibrate_noise(target_epsilon=eps, delta=target.delta, sample_rate=top, steps=steps,
                                           accountant=cfg.accountant))
    info = {"dataset_size": target_n, "sample_rate": q, "steps": steps, "noise_multiplier": target.noise_multiplier,
            "delta": target.delta, "epsilon": eps, "batch_size": cfg.batch_size}
    return ShadowPlan(info, batches, epochs, steps, sigma, target.delta)


def _confidences(model_name: str, cfg: AttackConfig, prompt_path: str, pool: list[int]) -> list[float]:
    """Logit-scaled confidence in the true class of every pool example under one prompt."""
    from post.prompt import load_prompt
    from post.scoring import Encoder, predict_scores
    from post.tasks import Verbalizer

    data = load_task(cfg)
    train = data.split("train")
    loaded = load_configured_model(cfg, model_name)
    pf = load_prompt(prompt_path, loaded)
    enc = Encoder(pf.task, loaded.tokenizer, loaded.kind, cfg.max_length)
    scores = predict_scores(loaded.model, enc, Verbalizer.build(pf.task, loaded.tokenizer),
                            [train.texts[i] for i in pool], batch_size=cfg.micro_batch_size,
                            prompt=pf.tensor.to(loaded.model.device), progress=False)
    return logit_confidence(scores, np.array([train.labels[i] for i in pool])).tolist()


def shadow_transfer_config(cfg: AttackConfig, prompt: Path, s: int):  # noqa: ANN201
    """The transfer of shadow ``s``'s prompt: the attack's transfer options (its loss, and α only for the paper's)."""
    from post.transfer import TransferConfig

    alpha = cfg.transfer_alpha if cfg.transfer_loss == "post" else None
    return TransferConfig(
        source_model=cfg.model, prompt=prompt, target_model=cfg.transfer_target, public=cfg.public,
        public_limit=cfg.public_limit, steps=cfg.transfer_steps, batch_size=cfg.transfer_batch_size,
        lr=cfg.transfer_lr, alpha=alpha, mode=cfg.transfer_mode, loss=cfg.transfer_loss,
        calibrate_labels=cfg.transfer_calibrate_labels, max_length=cfg.max_length,
        cache_dir=cfg.cache_dir, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed + 1 + s)


def run_shadow(cfg: AttackConfig, root: str, s: int, pool: list[int], members: list[int], threads: int,
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tune shadow ``s`` on ``members`` and record its confidences (and its transferred prompt's)."""
    import torch

    torch.set_num_threads(threads)
    d = Path(root) / f"shadow-{s:03d}"
    d.mkdir(parents=True, exist_ok=True)
    if (d / CONFIDENCE).exists():
        return read_json(d / CONFIDENCE)
    idx_file = d / "train_indices.json"
    if not idx_file.exists():
        write_json(idx_file, members)
    tuned = tune(_tune_config(cfg, idx_file, cfg.seed + 1 + s, **(overrides or {})), d / "tune")
    out: dict[str, Any] = {"shadow": s, "source": _confidences(cfg.model, cfg, tuned.prompt, pool),
                           "tune_seconds": tuned.train_seconds}
    if cfg.transfer_target:
        from post.transfer import transfer

        moved = transfer(shadow_transfer_config(cfg, Path(tuned.prompt), s), d / "transfer")
        out["target"] = _confidences(cfg.transfer_target, cfg, moved.prompt, pool)
        out["transfer_seconds"] = moved.train_seconds
    write_json(d / CONFIDENCE, out)
    return out


def _figures(scores: np.ndarray, labels: np.ndarray, delta: float, seed: int) -> tuple[dict[str, Any], Roc]:
    r = roc(scores, labels)
    return {"auc": r.auc, "tpr_at_0.1%_fpr": r.tpr_at(0.001), "tpr_at_1%_fpr": r.tpr_at(0.01),
            "balanced_accuracy": r.balanced_accuracy,
            "epsilon_lower_bound": epsilon_lower_bound(scores, labels, delta=delta, seed=seed)}, r


def audit(conf: np.ndarray, masks: np.ndarray, *, delta: float, rmia_a: float = 0.3, seed: int = 0
          ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Roc]]:
    """Attack figures from (N, S) confidences and membership: LiRA's variants, RMIA's, and all ROC curves."""
    lira, rmia, curves = {}, {}, {}
    for online in (True, False):
        for global_variance in (False, True):
            name = f"{'online' if online else 'offline'}{', global variance' if global_variance else ''}"
            scores, labels = leave_one_out(conf, masks, online=online, global_variance=global_variance)
            lira[name], curves[f"LiRA {name}"] = _figures(scores, labels, delta, seed)
    for name, a in (("online", None), (f"offline, a={rmia_a:g}", rmia_a)):
        scores, labels = leave_one_out_rmia(conf, masks, a=a)
        rmia[name], curves[f"RMIA {name}"] = _figures(scores, labels, delta, seed)
    return lira, rmia, curves


def _shadow_ledgers(shadows_dir: Path, n: int, ceiling: float) -> list[float]:
    """Each DP shadow's ε from its own ledger (recomputed); refused if one spent more than ``ceiling``."""
    eps = [saved_ledger(shadows_dir / f"shadow-{s:03d}" / "tune").epsilon for s in range(n)]
    worst = int(np.argmax(eps))
    if eps[worst] > ceiling * (1 + 1e-6) + 1e-9:
        raise PostError(f"shadow {worst} spent ε = {eps[worst]:.4f}, more than the ε = {ceiling:.4f} under attack; its "
                        f"prompt is not the mechanism attacked. Run again with a new --out.")
    return eps


def attack(cfg: AttackConfig, run_dir: str | Path) -> AttackResult:
    """Train (or reuse) every shadow, score membership, and report the attack and the audit."""
    import time

    run = RunDir(run_dir, stage="attack-lira", config=cfg)
    if (done := run.existing_result()) is not None:
        return AttackResult.from_dict(done, source=str(run.result_path))
    t0 = time.perf_counter()
    data = load_task(cfg)
    train = data.split("train")
    pool = subset(len(train), cfg.pool_size, cfg.seed).tolist()
    if len(pool) < 4:
        raise PostError(f"the training split has {len(pool)} examples; the attack needs at least 4.")
    masks = balanced_masks(len(pool), cfg.shadows, cfg.seed)
    sizes = masks.sum(axis=0).astype(int).tolist()
    plan = plan_dp_shadows(cfg, sizes, cfg.target_n_train or len(train)) if cfg.dp else None
    write_json(run.path / "membership.json", {"pool": pool, "in": masks.astype(int).tolist()})
    shadows_dir = run.path / "shadows"
    import torch

    # Share the threads this process may use (OMP_NUM_THREADS, torch.set_num_threads) among the workers.
    threads = max(1, min(os.cpu_count() or 1, torch.get_num_threads()) // cfg.workers)
    jobs = [(cfg, str(shadows_dir), s, pool, [pool[i] for i in np.nonzero(masks[:, s])[0]], threads,
             plan.overrides(s) if plan else None) for s in range(cfg.shadows)]
    log.info("LiRA: %d shadows on a pool of %d %s examples, %d worker(s)", cfg.shadows, len(pool), cfg.task,
             cfg.workers)
    if cfg.workers == 1:
        outs = [run_shadow(*job) for job in jobs]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as ex:
            outs = list(ex.map(run_shadow, *zip(*jobs)))
    for o in outs:
        run.log(shadow=o["shadow"], tune_seconds=o["tune_seconds"])
    eps_s = _shadow_ledgers(shadows_dir, cfg.shadows, plan.target["epsilon"]) if plan else []
    epsilon = plan.target["epsilon"] if plan else None
    delta = cfg.audit_delta or (plan.delta if plan else 1e-5)
    conf = np.array([o["source"] for o in outs]).T
    figures, rmia, curves = audit(conf, masks, delta=delta, rmia_a=cfg.rmia_a, seed=cfg.seed)
    plot_roc(curves, str(run.path / "roc.png"))
    result: dict[str, Any] = {
        "model": cfg.model, "task": cfg.task, "dp": cfg.dp, "shadows": cfg.shadows, "pool": len(pool),
        "epsilon": epsilon, "delta": delta, "source_prompt": figures, "source_prompt_rmia": rmia,
        "epsilon_lower_bound_assumes": "independent scores; leave-one-out scores share shadows, so the bound is "
                                       "indicative, not certified (post attack canary is)",
        "auc": figures["online"]["auc"], "tpr_at_1%_fpr": figures["online"]["tpr_at_1%_fpr"],
        "tpr_at_0.1%_fpr": figures["online"]["tpr_at_0.1%_fpr"], "rmia_auc": rmia["online"]["auc"],
        "rmia_tpr_at_1%_fpr": rmia["online"]["tpr_at_1%_fpr"],
        "rmia_tpr_at_0.1%_fpr": rmia["online"]["tpr_at_0.1%_fpr"],
        "rmia_offline_auc": rmia[f"offline, a={cfg.rmia_a:g}"]["auc"],
        "roc_png": str(run.path / "roc.png"), "wall_seconds": round(time.perf_counter() - t0, 3),
    }
    if plan:
        rates = [b / n for b, n in zip(plan.batch_sizes, sizes)]
        result.update(
            shadow_epsilon_max=max(eps_s), target_mechanism=plan.target,
            shadow_mechanism={"dataset_sizes": sizes, "batch_sizes": plan.batch_sizes, "sample_rates": rates,
                              "steps": plan.steps, "noise_multiplier": plan.noise_multiplier, "delta": plan.delta,
                              "epsilons": eps_s},
            mechanism_note=_mechanism_note(plan, rates))
    if cfg.transfer_target:
        conf_t = np.array([o["target"] for o in outs]).T
        figures_t, rmia_t, curves_t = audit(conf_t, masks, delta=delta, rmia_a=cfg.rmia_a, seed=cfg.seed)
        plot_roc(curves_t, str(run.path / "roc-transferred.png"))
        result.update(transfer_target=cfg.transfer_target, transfer_loss=cfg.transfer_loss,
                      transfer_calibrate_labels=cfg.transfer_calibrate_labels, transferred_prompt=figures_t,
                      transferred_prompt_rmia=rmia_t, transferred_auc=figures_t["online"]["auc"],
                      transferred_rmia_auc=rmia_t["online"]["auc"],
                      roc_transferred_png=str(run.path / "roc-transferred.png"))
    return AttackResult.from_dict(run.finish(result), source=str(run.result_path))


def _mechanism_note(plan: ShadowPlan, rates: list[float]) -> str:
    t = plan.target
    same_q = max(rates) <= t["sample_rate"] * (1 + 1e-12) and min(rates) >= 0.9 * t["sample_rate"]
    rate = (f"q {min(rates):.4g}-{max(rates):.4g} (batch {min(plan.batch_sizes)}-{max(plan.batch_sizes)}) against "
            f"the released prompt's q {t['sample_rate']:.4g} (batch {t['batch_size']} of {t['dataset_size']})")
    sigma = ("the same σ" if plan.noise_multiplier == t["noise_multiplier"] else
             f"σ {plan.noise_multiplier:.4g} instead of {t['noise_multiplier']:.4g} (the pool is too small for its q)")
    return (f"shadows: {rate}{' (as close as integer batches allow)' if same_q else ''}; the same {plan.steps} "
            f"steps and δ = {plan.delta:g}; {sigma}")


def summarize(result: AttackResult) -> str:
    privacy = f"DP, ε={float(result.epsilon):.2f}" if result.dp else "non-private"
    lines = [f"LiRA and RMIA on {result.shadows} shadow prompts ({privacy}), pool {result.pool}, "
             f"{result.wall_seconds:.0f} s"]
    for label, figures, rmia in (("source prompt", result.source_prompt, result.source_prompt_rmia),
                                 ("transferred prompt", result.transferred_prompt, result.transferred_prompt_rmia)):
        if figures:
            for name, o in (("LiRA", figures["online"]), ("RMIA", (rmia or {}).get("online"))):
                if o:
                    lines.append(f"  {label}, {name}: AUC {o['auc']:.3f}  TPR@1%FPR {o['tpr_at_1%_fpr']:.3f}  TPR@0.1%"
                                 f"FPR {o['tpr_at_0.1%_fpr']:.3f}  empirical ε ≥ {o['epsilon_lower_bound']:.2f}")
    if result.mechanism_note:
        lines.append(f"  {result.mechanism_note}; largest shadow ε {result.shadow_epsilon_max:.3f}")
    lines.append(f"ROC: {result.roc_png}")
    return "\n".join(lines)
