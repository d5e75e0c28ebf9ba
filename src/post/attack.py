"""Stage: LiRA membership inference on soft prompts (``post attack lira``), the privacy audit.

N shadow prompts are tuned with exactly the settings of the prompt under attack (DP or not),
each on a seeded half of a pool of training examples; every example is in exactly half of the
shadows. For every example and shadow the shadow prompt's logit-scaled confidence in the true
class is recorded, and each shadow is attacked in turn with the others as reference (online and
offline LiRA, with and without a global variance). With ``--transfer-target`` every shadow prompt
is also transferred to that model with public data, and the transferred prompts (what the
provider holds) are attacked through the target's outputs.

Shadows are independent jobs: they run in parallel worker processes, each in its own run
directory, so an interrupted attack resumes and a finished shadow is never retrained.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from post.config import require
from post.errors import PostError
from post.lira import Roc, epsilon_lower_bound, leave_one_out, logit_confidence, plot_roc, roc
from post.resolve import load_configured_model, load_task, subset
from post.rundir import RunDir, read_json, write_json
from post.tune import TuneConfig, saved_ledger, tune

log = logging.getLogger(__name__)

CONFIDENCE = "confidence.json"


@dataclass(frozen=True, kw_only=True)
class AttackConfig(TuneConfig):
    """LiRA membership inference on prompts tuned with these settings (all of post tune's options apply).

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
        transfer_alpha: Transfer α.
        transfer_mode: vocab or label-words.
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
    transfer_alpha: float = 0.5
    transfer_mode: str = "vocab"

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


def balanced_masks(n: int, shadows: int, seed: int) -> np.ndarray:
    """(n, shadows) membership: every example in exactly half of the shadows, seeded."""
    rng = np.random.default_rng(seed)
    order = rng.random((n, shadows)).argsort(axis=1)
    return order < shadows // 2


def _tune_config(cfg: AttackConfig, indices_file: Path, seed: int) -> TuneConfig:
    fields = {f.name for f in dataclasses.fields(TuneConfig) if f.init}
    base = {k: getattr(cfg, k) for k in fields}
    return TuneConfig(**{**base, "train_indices": indices_file, "seed": seed, "test": False})


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


def run_shadow(cfg: AttackConfig, root: str, s: int, pool: list[int], members: list[int], threads: int
               ) -> dict[str, Any]:
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
    tuned = tune(_tune_config(cfg, idx_file, cfg.seed + 1 + s), d / "tune")
    out: dict[str, Any] = {"shadow": s, "source": _confidences(cfg.model, cfg, tuned["prompt"], pool),
                           "tune_seconds": tuned["train_seconds"]}
    if cfg.transfer_target:
        from post.transfer import TransferConfig, transfer

        moved = transfer(TransferConfig(
            source_model=cfg.model, prompt=Path(tuned["prompt"]), target_model=cfg.transfer_target, public=cfg.public,
            public_limit=cfg.public_limit, steps=cfg.transfer_steps, lr=cfg.transfer_lr, alpha=cfg.transfer_alpha,
            mode=cfg.transfer_mode, max_length=cfg.max_length, cache_dir=cfg.cache_dir, dtype=cfg.dtype,
            device=cfg.device, seed=cfg.seed + 1 + s), d / "transfer")
        out["target"] = _confidences(cfg.transfer_target, cfg, moved["prompt"], pool)
        out["transfer_seconds"] = moved["train_seconds"]
    write_json(d / CONFIDENCE, out)
    return out


def audit(conf: np.ndarray, masks: np.ndarray, *, delta: float) -> tuple[dict[str, Any], dict[str, Roc]]:
    """Attack figures for every LiRA variant from (N, S) confidences and membership."""
    figures, curves = {}, {}
    for online in (True, False):
        for global_variance in (False, True):
            name = f"{'online' if online else 'offline'}{', global variance' if global_variance else ''}"
            scores, labels = leave_one_out(conf, masks, online=online, global_variance=global_variance)
            r = roc(scores, labels)
            curves[name] = r
            figures[name] = {"auc": r.auc, "tpr_at_0.1%_fpr": r.tpr_at(0.001), "tpr_at_1%_fpr": r.tpr_at(0.01),
                             "balanced_accuracy": r.balanced_accuracy,
                             "epsilon_lower_bound": epsilon_lower_bound(r, int(labels.sum()), int((~labels).sum()),
                                                                        delta=delta)}
    return figures, curves


def attack(cfg: AttackConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train (or reuse) every shadow, score membership, and report the attack and the audit."""
    import time

    run = RunDir(run_dir, stage="attack-lira", config=cfg)
    if (done := run.existing_result()) is not None:
        return done
    t0 = time.perf_counter()
    data = load_task(cfg)
    train = data.split("train")
    pool = subset(len(train), cfg.pool_size, cfg.seed).tolist()
    if len(pool) < 4:
        raise PostError(f"the training split has {len(pool)} examples; the attack needs at least 4.")
    masks = balanced_masks(len(pool), cfg.shadows, cfg.seed)
    if cfg.dp and cfg.noise_multiplier is None:
        # Every shadow trains with one σ (one training recipe, one accountant search instead of one per
        # shadow), calibrated for the smallest shadow: its sample rate is the highest, so no shadow spends
        # more than the ε under attack (calibrating for half the pool let a smaller shadow exceed it).
        from post.tune import make_plan

        smallest = int(masks.sum(axis=0).min())
        plan = make_plan(_tune_config(cfg, run.path / "unused.json", cfg.seed), smallest)
        cfg = dataclasses.replace(cfg, noise_multiplier=plan.ledger.noise_multiplier)  # type: ignore[union-attr]
    write_json(run.path / "membership.json", {"pool": pool, "in": masks.astype(int).tolist()})
    shadows_dir = run.path / "shadows"
    import torch

    # Share the threads this process may use (OMP_NUM_THREADS, torch.set_num_threads) among the workers.
    threads = max(1, min(os.cpu_count() or 1, torch.get_num_threads()) // cfg.workers)
    jobs = [(cfg, str(shadows_dir), s, pool, [pool[i] for i in np.nonzero(masks[:, s])[0]], threads)
            for s in range(cfg.shadows)]
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
    ledger = saved_ledger(shadows_dir / "shadow-000" / "tune").to_dict() if cfg.dp else None
    delta = cfg.audit_delta or (ledger["delta"] if ledger else 1e-5)
    conf = np.array([o["source"] for o in outs]).T
    figures, curves = audit(conf, masks, delta=delta)
    plot_roc(curves, str(run.path / "roc.png"))
    result: dict[str, Any] = {
        "model": cfg.model, "task": cfg.task, "dp": cfg.dp, "shadows": cfg.shadows, "pool": len(pool),
        "epsilon": ledger["epsilon"] if ledger else None, "delta": delta, "source_prompt": figures,
        "auc": figures["online"]["auc"], "tpr_at_1%_fpr": figures["online"]["tpr_at_1%_fpr"],
        "roc_png": str(run.path / "roc.png"), "wall_seconds": round(time.perf_counter() - t0, 3),
    }
    if cfg.transfer_target:
        conf_t = np.array([o["target"] for o in outs]).T
        figures_t, curves_t = audit(conf_t, masks, delta=delta)
        plot_roc(curves_t, str(run.path / "roc-transferred.png"))
        result.update(transfer_target=cfg.transfer_target, transferred_prompt=figures_t,
                      transferred_auc=figures_t["online"]["auc"],
                      roc_transferred_png=str(run.path / "roc-transferred.png"))
    return run.finish(result)


def summarize(result: dict[str, Any]) -> str:
    privacy = f"DP, ε={float(result['epsilon']):.2f}" if result["dp"] else "non-private"
    lines = [f"LiRA on {result['shadows']} shadow prompts ({privacy}), pool {result['pool']}, "
             f"{result['wall_seconds']:.0f} s"]
    for label, figs in (("source prompt", result["source_prompt"]),
                        ("transferred prompt", result.get("transferred_prompt"))):
        if figs:
            o = figs["online"]
            lines.append(f"  {label}: AUC {o['auc']:.3f}  TPR@1%FPR {o['tpr_at_1%_fpr']:.3f}  TPR@0.1%FPR "
                         f"{o['tpr_at_0.1%_fpr']:.3f}  empirical ε ≥ {o['epsilon_lower_bound']:.2f}")
    lines.append(f"ROC: {result['roc_png']}")
    return "\n".join(lines)
