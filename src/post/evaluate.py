"""Stage: score a model (optionally with a soft prompt) on one split of a task."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from post.config import ModelOptions, TaskOptions, check_split, require
from post.errors import PostError
from post.prompt import load_prompt
from post.resolve import load_configured_model, load_task, subset
from post.rundir import RunDir
from post.scoring import Encoder, classification_metrics, predict_scores
from post.tasks import Verbalizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(TaskOptions, ModelOptions):
    """Evaluate a model on a task.

    Attributes:
        model: Built-in alias (smollm2-135m, gemma-3-270m), hub id, model directory or tiny-* test model.
        split: Which split to score: train, validation or test.
        prompt: A soft-prompt file (from ``post tune``) to prepend; none for zero-shot.
        batch_size: Examples per forward pass.
        limit: Score a seeded random subset of this many examples (default: the whole split).
        seed: Seed of that subset.
        allow_other_model: Use a prompt tuned on another model of the same width as it is ("direct
            transfer", a baseline); without it such a prompt is refused.
    """

    model: str
    split: str = "test"
    prompt: Path | None = None
    batch_size: int = 32
    limit: int | None = None
    seed: int = 0
    allow_other_model: bool = False

    def __post_init__(self) -> None:
        TaskOptions.__post_init__(self)
        ModelOptions.__post_init__(self)
        require(bool(self.model), "model", "must name a model.")
        check_split(self.split)
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}.")
        require(self.limit is None or self.limit >= 1, "limit", f"must be at least 1, got {self.limit}.")


def evaluate(cfg: EvaluateConfig, run_dir: str | Path) -> dict[str, Any]:
    """Score ``cfg.model`` on ``cfg.split`` of ``cfg.task``; write and return the result."""
    run = RunDir(run_dir, stage="evaluate", config=cfg)
    if (done := run.existing_result()) is not None:
        return done
    data = load_task(cfg)
    split = data.split(cfg.split)
    idx = subset(len(split), cfg.limit, cfg.seed)
    texts = [split.texts[i] for i in idx]
    labels = [split.labels[i] for i in idx]
    loaded = load_configured_model(cfg, cfg.model)
    prompt = prompt_file = None
    prompt_meta: dict[str, Any] | None = None
    if cfg.prompt is not None:
        prompt_file = load_prompt(cfg.prompt, loaded, same_model=not cfg.allow_other_model)
        prompt, prompt_meta = prompt_file.tensor.to(loaded.model.device), prompt_file.summary()
    task = data.task
    if prompt_file is not None:  # a prompt is only meaningful with the template it was tuned with
        task = prompt_file.task
        if task.class_names != data.class_names:
            raise PostError(f"the prompt was tuned for classes {list(task.class_names)}, but {cfg.task} has "
                            f"{list(data.class_names)}; evaluate it on the task it was tuned for.")
    encoder = Encoder(task, loaded.tokenizer, loaded.kind, cfg.max_length)
    verbalizer = Verbalizer.build(task, loaded.tokenizer)
    log.info("scoring %d %s examples of %s with %s", len(texts), cfg.split, cfg.task, cfg.model)
    t0 = time.perf_counter()
    scores = predict_scores(loaded.model, encoder, verbalizer, texts, batch_size=cfg.batch_size, prompt=prompt,
                            desc=f"evaluate {cfg.split}")
    elapsed = time.perf_counter() - t0
    metrics = classification_metrics(scores, labels, data.class_names)
    run.log(split=cfg.split, **{k: metrics[k] for k in ("n", "accuracy", "macro_f1")},
            examples_per_second=len(texts) / max(elapsed, 1e-9))
    return run.finish({
        "model": cfg.model, "task": cfg.task, "split": cfg.split, "prompt": prompt_meta,
        **metrics, "scoring_seconds": round(elapsed, 3),
    })


def summarize(result: dict[str, Any]) -> str:
    return (f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  on {result['n']} "
            f"{result['split']} examples of {result['task']} with {result['model']} ({result['seconds']:.1f} s)")
