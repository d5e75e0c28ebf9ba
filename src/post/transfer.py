"""Stage: transfer a soft prompt from a small model to a large one with public data (the provider's side).

POST loss (paper Eq. 3-5) over public inputs x wrapped in the private task's template, at the
answer position, temperature T:

    L1 = T² · KL( softmax(Φs(ps; x)/T) ‖ softmax(Φt(pt; x)/T) )                   match outputs
    L2 = T² · KL( softmax((Φs(ps; x) − Φs(x))/T) ‖ softmax((Φt(pt; x) − Φt(x))/T) )  match the change
    L  = (1 − α) · L1 + α · L2

Only pt is trained (Adam). Φs(ps; x), Φs(x) and Φt(x) do not depend on pt: they are computed once
per public example, so a step costs one forward+backward of the target.

``--loss proxy-labels`` (label-words mode) trains pt on the same three constants differently: each public
text gets the class that proxy tuning gives it, argmax over classes of Φt(x) + (Φs(ps; x) − Φs(x)) (the
target's own answer moved by the change that ps makes on the student), and pt is fitted to those classes by
cross-entropy. The change term L2 asks the target to reproduce the student's change on every text alike,
which a prompt on a different model can only do in part; the labels ask only for the answers that the
change decides. α is not used. The labels are built from class scores, so, like the label-words loss, they need no
shared tokenizer. What the provider reads is the same as for the paper's loss (ps, the
student and public text), so the privacy of the transfer is unchanged.

``--mode vocab`` (the paper) compares full-vocabulary distributions and needs both models to
share a tokenizer. ``--mode label-words`` compares the class distributions (mean label-word
logits per class, each model with its own tokenizer), so a prompt can move across vocabularies
and widths (e.g. a SmolLM2 student -> Gemma 3).

α: explicit (``--alpha``) or the paper's heuristic (Eq. 6) α = min((ZS − RG)/(C − RG), 1), with C
the accuracy of ps on Φs, ZS the zero-shot accuracy of Φt and RG chance. By default the provider
measures both itself on *public* labelled data (``--alpha-public``, e.g. the airline tweets
restricted by class name to the task's classes, balanced so that RG = 1/K): no private text and
no number measured on private data is needed. ``--target-zero-shot``/``--source-accuracy`` take
the user's own measurements instead, which sends statistics of private data outside the DP
guarantee (it warns). The provider never sees private data: the command takes public text only,
and the prompt it reports is the one after a fixed number of steps.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from post import progress
from post.checkpoint import load_checkpoint, save_checkpoint
from post.config import ModelOptions, require, require_transfer_loss
from post.data import load_texts
from post.errors import ConfigError, PostError
from post.models import LoadedModel
from post.parallel import open_distributed_run
from post.prompt import PromptFile, init_prompt, load_prompt, save_prompt
from post.resolve import load_configured_model, subset
from post.results import TransferResult
from post.rundir import RESULT_FILE, RunDir
from post.scoring import (
    Encoder,
    classification_metrics,
    examples_hidden,
    head_logits,
    label_scores,
    packs,
    predict_scores,
    score_groups,
)
from post.tasks import Task, Verbalizer

log = logging.getLogger(__name__)

PROMPT_FILE = "prompt.safetensors"


@dataclass(frozen=True, kw_only=True)
class TransferConfig(ModelOptions):
    """Transfer a soft prompt from a source model to a target model using public text only.

    Attributes:
        source_model: The small model the prompt was tuned on (Φs).
        prompt: The prompt file ps from the user.
        target_model: The large model to transfer to (Φt).
        public: Public text: airline, reviews (movie-review sentences), a labelled dataset's texts, a
            text/JSONL/CSV file, hf:NAME.
        public_limit: Use a seeded random subset of this many public texts.
        steps: Optimizer steps; the reported prompt is the one after exactly these.
        batch_size: Public examples per step (all processes together).
        lr: Adam learning rate.
        alpha: Weight of the prompt-induced-change term; none = the paper's heuristic (Eq. 6).
        alpha_public: Public labelled data on which the provider measures the heuristic α's ZS (the
            target zero-shot) and C (ps on the source), restricted by class name to the task's
            classes and balanced; none = use --target-zero-shot and --source-accuracy.
        alpha_public_limit: Public labelled examples for those two accuracies (split evenly over classes).
        target_zero_shot: The target's zero-shot accuracy on the private task, measured by the user
            (a statistic of private data outside the DP guarantee: prefer --alpha-public).
        source_accuracy: ps's accuracy on the source measured by the user on private data (same caveat).
        temperature: Softmax temperature T.
        mode: vocab (full-vocabulary distributions, same tokenizer) or label-words (class
            distributions: works across tokenizers and widths).
        loss: post (the paper's (1 − α)·L1 + α·L2) or proxy-labels (label-words mode: cross-entropy
            against proxy tuning's class on each public text, argmax of Φt(x) + Φs(ps; x) − Φs(x); no α).
        calibrate_labels: With proxy-labels: divide each class's proxy-tuned probability by its mean over the
            public texts before the argmax (the calibrated baseline's division, on public text only), so a
            source that leans to one class (a DP ps often does) does not hand that lean to pt whole.
        max_length: Maximum tokens per input (text truncated from the left).
        watch_task: Optional labelled data (the user's) scored every --watch-every steps to draw a
            curve; it never selects the prompt.
        watch_split: Split of --watch-task to score.
        watch_limit: Score a seeded subset of this many watch examples.
        watch_every: Steps between watch points.
        checkpoint_every: Save a resumable checkpoint every this many steps.
        seed: Seed of the public subset, batches and prompt init.
    """

    source_model: str
    prompt: Path
    target_model: str
    public: str = "airline"
    public_limit: int | None = 256
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    alpha: float | None = None
    alpha_public: str | None = "airline"
    alpha_public_limit: int = 400
    target_zero_shot: float | None = None
    source_accuracy: float | None = None
    temperature: float = 2.0
    mode: Literal["vocab", "label-words"] = "vocab"
    loss: Literal["post", "proxy-labels"] = "post"
    calibrate_labels: bool = False
    max_length: int = 128
    watch_task: str | None = None
    watch_split: str = "validation"
    watch_limit: int | None = 200
    watch_every: int = 100
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        for name in ("source_model", "target_model"):
            require(bool(getattr(self, name)), name, "must name a model.")
        require(self.steps >= 1, "steps", f"must be at least 1, got {self.steps}.")
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}.")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be a positive number, got {self.lr}.")
        require(self.alpha is None or 0 <= self.alpha <= 1, "alpha", f"must be in [0, 1], got {self.alpha}.")
        for name in ("target_zero_shot", "source_accuracy"):
            v = getattr(self, name)
            require(v is None or 0 <= v <= 1, name, f"must be an accuracy in [0, 1], got {v}.")
        require(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}.")
        require(self.mode in ("vocab", "label-words"), "mode", f"must be vocab or label-words, got {self.mode!r}.")
        require_transfer_loss(self.loss, self.mode)
        if self.loss == "proxy-labels":
            require(self.alpha is None and self.target_zero_shot is None, "loss",
                    "proxy-labels has no α to weight: drop --alpha, --target-zero-shot and --source-accuracy.")
        require(not self.calibrate_labels or self.loss == "proxy-labels", "calibrate_labels",
                "calibrates the proxy labels: it needs --loss proxy-labels.")
        require(self.public_limit is None or self.public_limit >= 1, "public_limit", "must be at least 1.")
        require(self.alpha_public_limit >= 2, "alpha_public_limit", "must be at least 2.")
        if isinstance(self.alpha_public, str) and self.alpha_public.strip().lower() in ("", "none", "null"):
            object.__setattr__(self, "alpha_public", None)  # spelled out on the command line
        require((self.target_zero_shot is None) == (self.source_accuracy is None), "target_zero_shot",
                "and --source-accuracy go together (the user's own measurements for the heuristic α).")
        require(self.watch_every >= 1, "watch_every", "must be at least 1.")
        require(self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1.")


def heuristic_alpha(*, target_zero_shot: float, source_accuracy: float, num_classes: int) -> float:
    """Paper Eq. 6: α = min((ZS − RG) / (C − RG), 1), clipped at 0; RG = 1/num_classes."""
    rg = 1.0 / num_classes
    if source_accuracy <= rg:
        return 1.0  # the small model's prompt is no better than chance: only its effect can be matched
    return float(min(max((target_zero_shot - rg) / (source_accuracy - rg), 0.0), 1.0))


def post_loss(t_prompted: torch.Tensor, t_plain: torch.Tensor, s_prompted: torch.Tensor, s_plain: torch.Tensor,
              *, alpha: float, temperature: float) -> dict[str, torch.Tensor]:
    """(1 − α)·L1 + α·L2 for (B, K) scores (K = vocabulary or classes); batch-mean KLs scaled by T²."""
    temp = temperature

    def kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(student / temp, -1), F.log_softmax(teacher / temp, -1), log_target=True,
                        reduction="batchmean") * temp**2

    l1 = kl(t_prompted, s_prompted)
    l2 = kl(t_prompted - t_plain, s_prompted - s_plain)
    return {"l1": l1, "l2": l2, "loss": (1 - alpha) * l1 + alpha * l2}


def proxy_labels(t_plain: torch.Tensor, s_prompted: torch.Tensor, s_plain: torch.Tensor, *,
                 calibrate: bool = False) -> torch.Tensor:
    """Proxy tuning's class for each row of (N, K) class scores: argmax of Φt(x) + (Φs(ps; x) − Φs(x)).

    ``calibrate``: argmax of log p(c|x) − log mean_x' p(c|x') instead, p the proxy-tuned class distribution and
    x' the same N texts (:func:`post.evaluate.calibrate`).
    """
    from post.evaluate import calibrate as calibrated
    from post.evaluate import combine_proxy

    combined = combine_proxy(t_plain, s_prompted, s_plain)
    if not calibrate:
        return combined.argmax(-1)
    scores = combined.double().cpu().numpy()
    return torch.from_numpy(calibrated(scores, scores)[0].argmax(-1)).to(combined.device)


def proxy_label_loss(t_prompted: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy of Φt(pt; x)'s class scores against the proxy labels; ``agree``: the share already given."""
    ce = F.cross_entropy(t_prompted, labels)
    return {"ce": ce, "agree": (t_prompted.detach().argmax(-1) == labels).float().mean(), "loss": ce}


class Scorer:
    """Answer-position scores of one model for a fixed set of texts: vocabulary logits or class scores."""

    def __init__(self, loaded: LoadedModel, task: Task, texts: list[str], *, mode: str, max_length: int) -> None:
        self.loaded, self.mode = loaded, mode
        self.encoder = Encoder(task, loaded.tokenizer, loaded.kind, max_length)
        self.verbalizer = Verbalizer.build(task, loaded.tokenizer)
        self.seqs, self.answers = self.encoder.encode(texts)
        self.packing = packs(loaded.model, self.encoder)

    def __call__(self, idx: torch.Tensor | np.ndarray, prompt: torch.Tensor | None) -> torch.Tensor:
        model = self.loaded.model
        p = None if prompt is None else prompt.to(model.device, next(model.parameters()).dtype)
        hidden = examples_hidden(model, self.encoder, self.seqs, self.answers, idx, p)
        if self.mode == "vocab":
            return head_logits(model, hidden).float()
        return label_scores(model, hidden, self.verbalizer).float()

    @torch.no_grad()
    def constants(self, prompt: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Scores of every text (N, K) in input order, computed once: they do not depend on the trained prompt.

        A model that packs (:func:`post.scoring.packs`) runs about ``batch_size`` texts' worth of tokens per
        forward with the texts end to end (:func:`post.scoring.pack_rows`); others run batches grouped by length
        (``length_buckets``), each padded only to its own longest (256 airline tweets at batch 8: 1.42x the real
        tokens in input order, 1.03x bucketed). Either way the scores equal one text at a time up to float noise.
        """
        out: torch.Tensor | None = None
        n = 0 if prompt is None else prompt.shape[-2]
        for idx in score_groups([len(s) for s in self.seqs], batch_size, n, packing=self.packing):
            scores = self(idx, prompt).cpu()
            if out is None:
                out = scores.new_empty((len(self.seqs), *scores.shape[1:]))
            out[torch.from_numpy(idx)] = scores
        if out is None:
            raise PostError("there are no public texts to score; give at least one.")
        return out


def _check_same_tokenizer(source: LoadedModel, target: LoadedModel) -> None:
    ts, tt = source.tokenizer, target.tokenizer
    if len(ts) != len(tt) or ts.get_vocab() != tt.get_vocab():
        raise ConfigError(f"--mode vocab needs one tokenizer for source and target, but {source.name} and "
                          f"{target.name} have different vocabularies; use --mode label-words.")


def public_labelled(name: str, task: Task, *, limit: int, seed: int, cache_dir: Path | None = None
                    ) -> tuple[list[str], list[int]]:
    """Texts and labels of a public labelled set, restricted by class name to ``task``'s classes.

    Labels are ``task``'s class indices; the sample is balanced (``limit // K`` per class, seeded),
    so chance accuracy is 1/K.
    """
    from post.data import is_dataset_name, load_labelled

    words = None if is_dataset_name(name.lower()) else {k: list(v) for k, v in task.label_words.items()}
    try:
        data = load_labelled(name, cache_dir=cache_dir, label_words=words)
    except PostError as e:
        raise PostError(f"--alpha-public {name}: {e}") from None
    missing = [c for c in task.class_names if c not in data.class_names]
    if missing:
        raise ConfigError(f"--alpha-public {name} has classes {', '.join(data.class_names)}, not the task's "
                          f"{', '.join(missing)}; give public labelled data with the same class names, or --alpha.")
    from post.templates import restrict_classes

    all_texts, all_labels = restrict_classes(data, "train", task.class_names)
    labels = np.asarray(all_labels)
    rng = np.random.default_rng([seed, 6])
    per_class = max(1, limit // task.num_classes)
    texts, out = [], []
    for k in range(task.num_classes):
        for i in rng.permutation(np.flatnonzero(labels == k))[:per_class]:
            texts.append(all_texts[int(i)])
            out.append(k)
    return texts, out


def _accuracy(loaded: LoadedModel, task: Task, texts: list[str], labels: list[int], prompt: torch.Tensor | None,
              max_length: int) -> float:
    encoder = Encoder(task, loaded.tokenizer, loaded.kind, max_length)
    scores = predict_scores(loaded.model, encoder, Verbalizer.build(task, loaded.tokenizer), texts, prompt=prompt,
                            progress=False)
    return float(classification_metrics(scores, labels, task.class_names)["accuracy"])


def resolve_alpha(cfg: TransferConfig, ps: PromptFile, task: Task, source: LoadedModel, target: LoadedModel
                  ) -> tuple[float, dict[str, Any]]:
    """α as given, or the heuristic from the user's numbers, or (default) from public labelled data."""
    k = task.num_classes
    if cfg.alpha is not None:
        return cfg.alpha, {"alpha_source": "given"}
    if cfg.target_zero_shot is not None and cfg.source_accuracy is not None:
        log.warning("the heuristic α uses accuracies the user measured on private data; they reach the provider "
                    "outside the DP guarantee. --alpha-public measures them on public data instead.")
        zs, c, how = cfg.target_zero_shot, cfg.source_accuracy, "heuristic (Eq. 6), user-measured on private data"
    elif cfg.alpha_public:
        texts, labels = public_labelled(cfg.alpha_public, task, limit=cfg.alpha_public_limit, seed=cfg.seed,
                                        cache_dir=cfg.cache_dir)
        zs = _accuracy(target, task, texts, labels, None, cfg.max_length)
        c = _accuracy(source, task, texts, labels, ps.tensor.to(source.model.device), cfg.max_length)
        how = f"heuristic (Eq. 6) on public {cfg.alpha_public} ({len(texts)} examples)"
        log.info("α from public data: target zero-shot %.4f, ps on the source %.4f", zs, c)
    else:
        raise ConfigError("the heuristic α needs --alpha-public (public labelled data with the task's classes), or "
                          "--target-zero-shot with --source-accuracy; or give --alpha.")
    alpha = heuristic_alpha(target_zero_shot=float(zs), source_accuracy=float(c), num_classes=k)
    return alpha, {"alpha_source": how, "target_zero_shot": zs, "source_accuracy": c}


def transfer(cfg: TransferConfig, run_dir: str | Path) -> TransferResult:
    """Train pt on the target so that Φt(pt) behaves like Φs(ps); write the target prompt file."""
    acc, run, done = open_distributed_run(cfg, run_dir, "transfer")
    if done is not None:
        return TransferResult.from_dict(done, source=str(Path(run_dir) / RESULT_FILE))
    main_process, run_path = acc.is_main_process, Path(run_dir)

    source = load_configured_model(cfg, cfg.source_model)
    ps = load_prompt(cfg.prompt, source)
    task = ps.task
    target = load_configured_model(cfg, cfg.target_model)
    if cfg.mode == "vocab":
        _check_same_tokenizer(source, target)
    t_alpha = time.perf_counter()
    alpha: float | None
    if cfg.loss == "proxy-labels":  # no α to weight: nothing to measure
        alpha, alpha_info = None, {"alpha_source": "not used (--loss proxy-labels)"}
    else:
        alpha, alpha_info = resolve_alpha(cfg, ps, task, source, target)
    alpha_info["alpha_seconds"] = round(time.perf_counter() - t_alpha, 3)
    public = load_texts(cfg.public, cache_dir=cfg.cache_dir)
    texts = [public[i] for i in subset(len(public), cfg.public_limit, cfg.seed)]
    if len(texts) < cfg.batch_size:
        raise PostError(f"{cfg.public} gives {len(texts)} texts, fewer than --batch-size {cfg.batch_size}.")

    log.info("caching source and target outputs on %d public texts (mode %s, %s)", len(texts), cfg.mode,
             "proxy labels" if alpha is None else f"α={alpha:.3f}")
    t0 = time.perf_counter()
    src = Scorer(source, task, texts, mode=cfg.mode, max_length=cfg.max_length)
    tgt = Scorer(target, task, texts, mode=cfg.mode, max_length=cfg.max_length)
    s_prompted = src.constants(ps.tensor, cfg.batch_size)
    s_plain = src.constants(None, cfg.batch_size)
    t_plain = tgt.constants(None, cfg.batch_size)
    cache_seconds = time.perf_counter() - t0
    del source
    labels, label_info = None, {}
    if cfg.loss == "proxy-labels":
        labels = proxy_labels(t_plain, s_prompted, s_plain, calibrate=cfg.calibrate_labels)
        shares = torch.bincount(labels, minlength=len(task.class_names)).double() / len(labels)
        unchanged = float((labels == t_plain.argmax(-1)).double().mean())
        label_info = {"proxy_label_shares": dict(zip(task.class_names, shares.tolist(), strict=True)),
                      "proxy_labels_as_target": unchanged, "calibrate_labels": cfg.calibrate_labels}
        log.info("proxy labels on %d public texts: %s; %.1f%% the target's own answer", len(labels),
                 ", ".join(f"{c} {v:.1%}" for c, v in zip(task.class_names, shares.tolist(), strict=True)),
                 100 * unchanged)

    pt = init_prompt(target, ps.n_tokens, init="text", init_text=task.init_text, seed=cfg.seed)
    pt = pt.to(target.model.device).requires_grad_(True)
    opt = torch.optim.Adam([pt], lr=cfg.lr)
    start, curve, elapsed = 0, [], 0.0
    if (ckpt := load_checkpoint(run_path, params={"prompt": pt}, optimizer=opt)) is not None:
        with torch.no_grad():
            pt.copy_(ckpt[0]["prompt"])
        start, curve, elapsed = int(ckpt[1]["step"]), list(ckpt[1]["curve"]), float(ckpt[1]["elapsed"])
        log.info("resuming transfer from step %d", start)

    watch = _Watch(cfg, target, task) if cfg.watch_task else None
    if watch is not None and start == 0:
        curve.append(watch.point(0, pt, run))
    with progress.steps(cfg.steps, initial=start, desc="transfer", enabled=main_process) as bar:
        t1 = time.perf_counter()
        n = len(texts)
        for step in range(start, cfg.steps):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            global_idx = torch.randperm(n, generator=g)[: cfg.batch_size]
            idx = global_idx[acc.process_index :: acc.num_processes]
            t_prompted = tgt(idx, pt)
            if labels is not None:
                terms = proxy_label_loss(t_prompted, labels[idx].to(t_prompted.device))
            else:
                terms = post_loss(t_prompted, t_plain[idx].to(t_prompted.device),
                                  s_prompted[idx].to(t_prompted.device), s_plain[idx].to(t_prompted.device),
                                  alpha=float(alpha), temperature=cfg.temperature)
            (grad,) = torch.autograd.grad(terms["loss"], pt)
            if acc.num_processes > 1:
                grad = acc.reduce(grad, reduction="mean")
            progress.check_finite("transfer loss", terms["loss"].detach(), also=grad, step=step, run_path=run_path)
            pt.grad = grad
            try:
                opt.step()
            except RuntimeError:  # an update too large for the prompt's dtype (e.g. a huge --lr)
                raise progress.diverged(f"the update of step {step} overflowed", run_path) from None
            # never checkpoint a prompt that is no longer finite
            progress.check_finite("prompt", pt.detach(), step=step, run_path=run_path)
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            done = step + 1
            if main_process:
                run.log(step=done, **{k: float(v.detach()) for k, v in terms.items()})
            if watch is not None and (done % cfg.watch_every == 0 or done == cfg.steps):
                curve.append(watch.point(done, pt, run))
            if main_process and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                save_checkpoint(run_path, tensors={"prompt": pt}, params={"prompt": pt}, optimizer=opt,
                                meta={"step": done, "curve": curve, "elapsed": elapsed + time.perf_counter() - t1})
    acc.wait_for_everyone()
    if main_process:
        train_seconds = elapsed + time.perf_counter() - t1
        path = save_prompt(run_path / PROMPT_FILE, pt, loaded=target, task=task, privacy=ps.meta.get("privacy"),
                           extra={"transferred_from": {
                               "model": ps.meta["model"], "prompt_checksum": ps.meta["checksum"], "alpha": alpha,
                               "mode": cfg.mode, "loss": cfg.loss,
                               "calibrate_labels": cfg.calibrate_labels, "steps": cfg.steps, "public": cfg.public,
                               "public_texts": n}})
        ledger = ps.meta.get("privacy")
        run.finish({
            "source_model": cfg.source_model, "target_model": cfg.target_model, "prompt": str(path),
            "alpha": alpha, **alpha_info, "mode": cfg.mode, "loss": cfg.loss, **label_info, "steps": cfg.steps,
            "public": cfg.public,
            "public_texts": n, "processes": acc.num_processes, "cache_seconds": round(cache_seconds, 3),
            "train_seconds": round(train_seconds, 3), "watch_curve": curve,
            "epsilon": ledger["epsilon"] if ledger else None, "delta": ledger["delta"] if ledger else None,
        })
    acc.wait_for_everyone()
    return TransferResult.from_dir(run_path)


class _Watch:
    """Scores the current target prompt on the user's labelled data, for a curve only."""

    def __init__(self, cfg: TransferConfig, target: LoadedModel, task: Task) -> None:
        from post.data import load_labelled

        # The prompt's own task (template and label words) says how to read the labels.
        data = load_labelled(cfg.watch_task, cache_dir=cfg.cache_dir, template=task.template,
                             label_words={k: list(v) for k, v in task.label_words.items()})
        split = data.split(cfg.watch_split)
        idx = subset(len(split), cfg.watch_limit, cfg.seed)
        self.texts, self.labels = [split.texts[i] for i in idx], [split.labels[i] for i in idx]
        self.target, self.task, self.class_names = target, task, data.class_names
        self.encoder = Encoder(task, target.tokenizer, target.kind, cfg.max_length)
        self.verbalizer = Verbalizer.build(task, target.tokenizer)

    def point(self, step: int, pt: torch.Tensor, run: RunDir | None) -> dict[str, Any]:
        scores = predict_scores(self.target.model, self.encoder, self.verbalizer, self.texts, prompt=pt.detach(),
                                progress=False)
        acc = classification_metrics(scores, self.labels, self.class_names)["accuracy"]
        if run is not None:
            run.log(step=step, watch_accuracy=acc)
        log.info("step %d: watch accuracy %.4f", step, acc)
        return {"step": step, "accuracy": acc}


def summarize(result: TransferResult) -> str:
    curve = result.watch_curve or []
    watch = f"  watch accuracy {curve[0]['accuracy']:.4f} -> {curve[-1]['accuracy']:.4f}" if curve else ""
    how = "proxy labels" if result.alpha is None else f"α={result.alpha:.3f}"
    return (f"transferred to {result.target_model} in {result.steps} steps ({how}, "
            f"{result.mode}, {result.train_seconds:.0f} s){watch}\nprompt: {result.prompt}")
