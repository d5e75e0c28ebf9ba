"""Stage: score a model (optionally with a soft prompt) on one split of a task."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from post.config import ModelOptions, TaskOptions, check_split, require
from post.data import LabelledDataset, load_labelled
from post.models import LoadedModel, load_model
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
    """

    model: str
    split: str = "test"
    prompt: Path | None = None
    batch_size: int = 32
    limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        TaskOptions.__post_init__(self)
        ModelOptions.__post_init__(self)
        require(bool(self.model), "model", "must name a model.")
        check_split(self.split)
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}.")
        require(self.limit is None or self.limit >= 1, "limit", f"must be at least 1, got {self.limit}.")


def load_task(cfg: TaskOptions) -> LabelledDataset:
    """The labelled dataset and task a config names."""
    return load_labelled(cfg.task, text_column=cfg.text_column, label_column=cfg.label_column,
                         template=cfg.template, label_words=cfg.label_words, init_text=cfg.init_text,
                         split_seed=cfg.split_seed, encoding=cfg.encoding,
                         cache_dir=getattr(cfg, "cache_dir", None))


def load_configured_model(cfg: ModelOptions, name: str) -> LoadedModel:
    """Load ``name`` with a config's dtype, cache, device and remote-code setting."""
    loaded = load_model(name, dtype=cfg.torch_dtype, cache_dir=cfg.cache_dir,
                        trust_remote_code=cfg.trust_remote_code)
    loaded.model.to(cfg.torch_device)
    return loaded


def subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of size ``limit`` (all, in order, when None)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def evaluate(cfg: EvaluateConfig, run_dir: str | Path) -> dict[str, Any]:
    """Score ``cfg.model`` on ``cfg.split`` of ``cfg.task``; write and return the result."""
    run = RunDir(run_dir, stage="evaluate", config=cfg)
    data = load_task(cfg)
    split = data.split(cfg.split)
    idx = subset(len(split), cfg.limit, cfg.seed)
    texts = [split.texts[i] for i in idx]
    labels = [split.labels[i] for i in idx]
    loaded = load_configured_model(cfg, cfg.model)
    prompt = None
    prompt_meta: dict[str, Any] | None = None
    if cfg.prompt is not None:
        from post.prompt import load_prompt  # arrives with soft-prompt tuning

        prompt_file = load_prompt(cfg.prompt, loaded)
        prompt, prompt_meta = prompt_file.tensor.to(loaded.model.device), prompt_file.summary()
    encoder = Encoder(data.task, loaded.tokenizer, loaded.kind, cfg.max_length)
    verbalizer = Verbalizer.build(data.task, loaded.tokenizer)
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
