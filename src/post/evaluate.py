"""Stage: score a model (optionally with a soft prompt) on one split of a task.

Besides the metrics, every run writes ``predictions.json`` (:func:`write_predictions`): the split's
example indices it scored, their labels and the predicted classes, so two methods scored on the
same sentences can be compared pairwise (exact McNemar test, :mod:`post.stats`).

**Proxy tuning** (a baseline; Liu et al. 2024, "Tuning language models by proxy"): with
``--proxy-source-model S --prompt ps`` the target's logits get the change the prompt causes on the
small model added at query time, ``Φt(x) + (Φs(ps; x) − Φs(x))``, at the answer position. A
class's score is the mean of its label words' logits, a linear map, so adding the three models'
class scores is the same as adding their label-word logits first. Each model's per-position logit
offset is shared by all words and cancels in the argmax, so raw logits can be added. The target
never sees the prompt; the user must run Φs next to every query.

**Calibrated zero-shot** (a baseline that needs no private data; after Zhao et al. 2021, "Calibrate
before use", with the model's mean answer over unlabelled public text as its prior):
``--calibrate-public NAME`` scores ``--calibrate-limit`` unlabelled texts of a public set the same
way (same template, same prompt if any), takes the mean class distribution over them as the model's
prior, and predicts ``argmax_c log p(c | x) − log prior(c)``. It removes a model's bias towards one
label word, which is most of what a prompt that only learned the task's label balance can add.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import log_softmax

from post.config import ModelOptions, TaskOptions, check_split, require
from post.data import load_texts
from post.errors import PostError
from post.prompt import load_prompt
from post.resolve import load_configured_model, load_task, subset
from post.results import EvaluateResult
from post.rundir import RunDir, read_json, write_json
from post.scoring import Encoder, classification_metrics, predict_scores
from post.tasks import Verbalizer

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.json"


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
        proxy_source_model: Proxy tuning (a baseline): the small model --prompt was tuned on; the
            target's label-word logits get Φs(prompt; x) − Φs(x) added. Needs the same tokenizer.
        calibrate_public: Calibrated scoring (a baseline): divide the model's class distribution by
            its mean over unlabelled texts of this public set (a dataset name or file, as for
            --public); no labels and no private data are used.
        calibrate_limit: How many public texts (a seeded sample) estimate that mean.
    """

    model: str
    split: str = "test"
    prompt: Path | None = None
    batch_size: int = 32
    limit: int | None = None
    seed: int = 0
    allow_other_model: bool = False
    proxy_source_model: str | None = None
    calibrate_public: str | None = None
    calibrate_limit: int = 400

    def __post_init__(self) -> None:
        TaskOptions.__post_init__(self)
        ModelOptions.__post_init__(self)
        require(bool(self.model), "model", "must name a model.")
        check_split(self.split)
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}.")
        require(self.limit is None or self.limit >= 1, "limit", f"must be at least 1, got {self.limit}.")
        require(self.proxy_source_model is None or self.prompt is not None, "proxy_source_model",
                "needs --prompt: the prompt tuned on that model, whose effect is added to the target's logits.")
        require(self.proxy_source_model is None or not self.allow_other_model, "allow_other_model",
                "does not apply to proxy tuning (the prompt runs on --proxy-source-model, its own model).")
        require(self.calibrate_limit >= 1, "calibrate_limit", f"must be at least 1, got {self.calibrate_limit}.")
        require(self.calibrate_public is None or self.proxy_source_model is None, "calibrate_public",
                "does not combine with proxy tuning; run them as two evaluations.")


def evaluate(cfg: EvaluateConfig, run_dir: str | Path) -> EvaluateResult:
    """Score ``cfg.model`` on ``cfg.split`` of ``cfg.task``; write and return the result."""
    run = RunDir(run_dir, stage="evaluate", config=cfg)
    if (done := run.existing_result()) is not None:
        return EvaluateResult.from_dict(done, source=str(run.result_path))
    data = load_task(cfg)
    split = data.split(cfg.split)
    idx = subset(len(split), cfg.limit, cfg.seed)
    texts = [split.texts[i] for i in idx]
    labels = [split.labels[i] for i in idx]
    loaded = load_configured_model(cfg, cfg.model)
    source = load_configured_model(cfg, cfg.proxy_source_model) if cfg.proxy_source_model is not None else None
    prompt = prompt_file = None
    prompt_meta: dict[str, Any] | None = None
    if cfg.prompt is not None:
        owner = source if source is not None else loaded  # proxy tuning runs the prompt on its own model
        prompt_file = load_prompt(cfg.prompt, owner, same_model=source is not None or not cfg.allow_other_model)
        prompt, prompt_meta = prompt_file.tensor.to(owner.model.device), prompt_file.summary()
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
    if source is not None:
        assert prompt is not None
        scores = _proxy_scores(cfg, loaded, source, task, encoder, verbalizer, texts, prompt)
    else:
        scores = predict_scores(loaded.model, encoder, verbalizer, texts, batch_size=cfg.batch_size, prompt=prompt,
                                desc=f"evaluate {cfg.split}")
    calibration: dict[str, Any] = {}
    if cfg.calibrate_public is not None:
        public = load_texts(cfg.calibrate_public, cache_dir=cfg.cache_dir)
        if not public:
            raise PostError(f"{cfg.calibrate_public} gives no texts to calibrate on.")
        pidx = subset(len(public), cfg.calibrate_limit, cfg.seed)
        log.info("calibrating on %d unlabelled texts of %s", len(pidx), cfg.calibrate_public)
        public_scores = predict_scores(loaded.model, encoder, verbalizer, [public[i] for i in pidx],
                                       batch_size=cfg.batch_size, prompt=prompt, desc="calibrate")
        scores, prior = calibrate(scores, public_scores)
        calibration = {"method": "calibrated", "calibrate_public": cfg.calibrate_public,
                       "calibration_texts": len(pidx), "class_prior": [round(float(v), 6) for v in prior]}
    elapsed = time.perf_counter() - t0
    metrics = classification_metrics(scores, labels, data.class_names)
    write_predictions(run.path, cfg.split, [int(i) for i in idx], labels, scores)
    run.log(split=cfg.split, **{k: metrics[k] for k in ("n", "accuracy", "macro_f1")},
            examples_per_second=len(texts) / max(elapsed, 1e-9))
    extra = {"method": "proxy", "proxy_source_model": cfg.proxy_source_model} if source is not None else calibration
    written = run.finish({
        "model": cfg.model, "task": cfg.task, "split": cfg.split, "prompt": prompt_meta, **extra,
        **metrics, "scoring_seconds": round(elapsed, 3), "predictions": str(run.path / PREDICTIONS_FILE),
    })
    return EvaluateResult.from_dict(written, source=str(run.result_path))


def calibrate(scores: np.ndarray, public_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) calibrated log-scores ``log p(c|x) − log prior(c)`` and the (C,) prior: the mean of
    ``p(c|x')`` over the (M, C) class scores of public texts x' (softmax over classes)."""
    if scores.ndim != 2 or public_scores.ndim != 2 or scores.shape[1] != public_scores.shape[1]:
        raise PostError(f"calibration needs (N, C) and (M, C) scores, got {scores.shape} and {public_scores.shape}.")
    prior = np.exp(log_softmax(public_scores.astype(np.float64), axis=1)).mean(axis=0)
    return log_softmax(scores.astype(np.float64), axis=1) - np.log(prior), prior


def combine_proxy(target: Any, source_prompted: Any, source_plain: Any) -> Any:
    """(N, C) proxy-tuned class scores ``Φt(x) + (Φs(ps; x) − Φs(x))`` from three (N, C) score arrays (numpy
    arrays here, torch tensors in the transfer's proxy labels)."""
    if not target.shape == source_prompted.shape == source_plain.shape:
        raise PostError(f"proxy tuning needs scores of one shape, got {target.shape}, {source_prompted.shape} and "
                        f"{source_plain.shape}.")
    return target + (source_prompted - source_plain)


def _proxy_scores(cfg: EvaluateConfig, target: Any, source: Any, task: Any, encoder: Encoder,
                  verbalizer: Verbalizer, texts: list[str], prompt: Any) -> np.ndarray:
    """Class scores of proxy tuning: the same encoded inputs and label words on both models."""
    if target.tokenizer.get_vocab() != source.tokenizer.get_vocab():
        raise PostError(f"proxy tuning adds {cfg.proxy_source_model}'s logits to {cfg.model}'s, so both need the "
                        "same tokenizer; use a student of the target (post distill / post student).")
    source_encoder = Encoder(task, source.tokenizer, source.kind, cfg.max_length)
    source_verbalizer = Verbalizer.build(task, source.tokenizer)
    if not _same_ids(source_verbalizer.token_ids, verbalizer.token_ids):
        raise PostError("the label words tokenise differently on the two models; proxy tuning needs the same "
                        "tokenizer.")
    kw = {"batch_size": cfg.batch_size}
    base = predict_scores(target.model, encoder, verbalizer, texts, desc="proxy: target", **kw)
    tuned = predict_scores(source.model, source_encoder, source_verbalizer, texts, prompt=prompt,
                           desc="proxy: source with prompt", **kw)
    plain = predict_scores(source.model, source_encoder, source_verbalizer, texts, desc="proxy: source", **kw)
    return combine_proxy(base, tuned, plain)


def _same_ids(a: Any, b: Any) -> bool:
    return tuple(a.shape) == tuple(b.shape) and bool((a == b).all())


def write_predictions(run_path: str | Path, split: str, indices: list[int], labels: Any, scores: np.ndarray) -> Path:
    """Write ``predictions.json``: {"split", "indices" (into the split), "labels", "predicted"} (class indices).

    ``scores`` is (N, C) in the order of ``indices``. The file holds no text, only indices and
    classes, so pairing two runs needs both to have scored the same split of the same task.
    """
    path = Path(run_path) / PREDICTIONS_FILE
    predicted = np.asarray(scores).argmax(axis=1).tolist() if len(indices) else []
    if len(indices) != len(labels) or len(indices) != len(predicted):
        raise PostError(f"predictions need one index, label and score row per example ({len(indices)}, "
                        f"{len(labels)}, {len(predicted)}).")
    write_json(path, {"split": split, "indices": [int(i) for i in indices], "labels": [int(y) for y in labels],
                      "predicted": [int(p) for p in predicted]})
    return path


def read_predictions(run_path: str | Path) -> dict[int, tuple[int, int]] | None:
    """``example index -> (label, predicted)`` of a run's ``predictions.json``; None when it has none."""
    path = Path(run_path) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    d = read_json(path)
    try:
        rows = zip(d["indices"], d["labels"], d["predicted"], strict=True)
        return {int(i): (int(y), int(p)) for i, y, p in rows}
    except (KeyError, TypeError, ValueError):
        raise PostError(f"{path} is not a predictions file (indices, labels, predicted); delete it and re-run "
                        "the evaluation.") from None


def summarize(result: EvaluateResult) -> str:
    how = f" (proxy tuning via {result.proxy_source_model})" if result.proxy_source_model else ""
    return (f"accuracy {result.accuracy:.4f}  macro-F1 {result.macro_f1:.4f}  on {result.n} "
            f"{result.split} examples of {result.task} with {result.model}{how} ({result.seconds:.1f} s)")
