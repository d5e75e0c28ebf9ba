"""Stage: choose a task's template and label words without showing private data to anyone.

A template and label words made for one kind of model can leave another at chance: the paper's
``{text} It was {mask}.`` was written for a masked LM, and a causal LM may never put " great"
after "It was". This stage ranks candidate templates × label-word sets by how well a model
classifies with them zero-shot, on data that may be used for the choice:

* **public labelled data** (``--public airline``, a built-in or hub set, never a file and never the
  task itself) on any model, the provider's target Φt included: it only sees public text. The
  public set is restricted to the task's classes, matched by class name (a 2-class ``mr`` ranks on
  airline's negative and positive tweets);
* **the user's own data** (``--private true``: the task's validation split) only on a student
  model directory written by ``post distill`` / ``post student``, which the user runs locally. Any
  other model is refused before the data is read: private text can't reach the provider's model
  through this command.

Ranking key: **balanced accuracy** (the mean per-class recall), then macro-F1. Its chance level
is 1/C whatever the class mix, so a template that always answers the majority class scores chance
instead of the majority share (airline is 42% negative, 18% positive); on a class-balanced sample
it equals accuracy. Every row carries n and the Wilson 95% interval of its accuracy
(:mod:`post.stats`).

Cost: one forward pass per template over the sample (hidden state at the answer position only);
every label-word set is then read from the same hidden states through the LM head's rows.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from post.config import ModelOptions, TaskOptions, check_split, require
from post.data import LabelledDataset, default_task, is_dataset_name, load_labelled
from post.errors import PostError
from post.models import LoadedModel
from post.resolve import load_configured_model, load_task
from post.results import ChooseTemplateResult
from post.rundir import RESULT_FILE, RunDir, read_result
from post.scoring import Encoder, classification_metrics, hidden_batches, label_scores
from post.stats import format_p, mcnemar_exact, wilson_interval
from post.tasks import SENTIMENT_WORDS, Task, Verbalizer, parse_label_words

log = logging.getLogger(__name__)

PAPER_TEMPLATE = "{text} It was {mask}."

# Causal-LM-style candidates: the answer is the next token after a cue, as in ordinary text.
SENTIMENT_TEMPLATES: tuple[str, ...] = (
    PAPER_TEMPLATE,
    "Review: {text}\nSentiment: {mask}",
    "Text: {text}\nSentiment: {mask}",
    "{text}\nThe sentiment of this text is{mask}",
    "{text}\nOverall, the tone of this text is{mask}",
    "Text: {text}\nQuestion: What is the sentiment of this text?\nAnswer:{mask}",
)

# Label-word sets by class name; a set is used for the task's classes only (a 2-class task drops
# neutral). "paper" is the paper's verbalizer (its neutral words are the tweet sets').
SENTIMENT_WORD_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "paper": {"negative": SENTIMENT_WORDS["negative"], "neutral": (" moderate", " neutral", " balanced"),
              "positive": SENTIMENT_WORDS["positive"]},
    "positive/negative": {"negative": (" negative",), "neutral": (" neutral",), "positive": (" positive",)},
    "Positive/Negative": {"negative": (" Negative",), "neutral": (" Neutral",), "positive": (" Positive",)},
    "good/bad": {"negative": (" bad",), "neutral": (" okay",), "positive": (" good",)},
    "great/terrible": {"negative": (" terrible",), "neutral": (" okay",), "positive": (" great",)},
}

STUDENT_STAGES = ("distill", "student")  # run stages whose output directory is a student model


@dataclass(frozen=True, kw_only=True)
class ChooseTemplateConfig(TaskOptions, ModelOptions):
    """Rank candidate templates × label words for a task, zero-shot, on public data (or locally on your own).

    Attributes:
        model: The model to rank on: the target Φt (built-in alias, hub id) with public data, or a
            student directory (from post distill / post student) with --private true.
        public: Public labelled set to rank on (built-in or hub name, e.g. airline), restricted to the
            task's classes by class name. Ignored with --private true.
        private: Rank on the task's own data (its --split) instead. Only allowed with a student
            model directory, so private text never reaches the provider's model.
        split: Split of the ranking data (validation by default; never choose on the test split).
        limit: Examples to rank on, drawn class-balanced (limit / classes per class), seeded.
        seed: Seed of that sample.
        templates: Candidate templates, each with {text} and {mask} (default: the built-in
            sentiment candidates, the paper's included).
        label_word_sets: Candidate label words, each 'class=w1,w2;class2=w3' (default: the built-in
            sentiment sets, the paper's included).
        batch_size: Examples per forward pass.
    """

    model: str
    public: str = "airline"
    private: bool = False
    split: str = "validation"
    limit: int = 300
    seed: int = 0
    templates: list[str] | None = None
    label_word_sets: list[str] | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        TaskOptions.__post_init__(self)
        ModelOptions.__post_init__(self)
        require(bool(self.model), "model", "must name a model.")
        check_split(self.split)
        require(self.limit >= 2, "limit", f"must be at least 2, got {self.limit}.")
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}.")
        require(self.template is None, "template", "choose-template ranks templates: list the candidates with "
                "--templates instead.")
        require(self.templates is None or len(self.templates) >= 1, "templates", "must list at least one template.")
        require(self.label_word_sets is None or len(self.label_word_sets) >= 1, "label_word_sets",
                "must list at least one set.")


@dataclass(frozen=True)
class Candidate:
    """One template with one label-word set (already restricted to the task's classes)."""

    template: str
    words_name: str
    label_words: Mapping[str, tuple[str, ...]]

    def task(self, init_text: str = "") -> Task:
        return Task(template=self.template, label_words=dict(self.label_words), init_text=init_text)


def label_words_spec(words: Mapping[str, Sequence[str]]) -> str:
    """``{'negative': (' bad',), ...}`` -> ``'negative=bad;positive=good'`` (the --label-words form)."""
    return ";".join(f"{c}=" + ",".join(w.strip() for w in ws) for c, ws in words.items())


def is_student_dir(model: str) -> bool:
    """Whether ``model`` is a local model directory written by ``post distill`` or ``post student``."""
    path = Path(model).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        return False
    run = path.parent
    try:
        return (run / RESULT_FILE).is_file() and read_result(run).get("stage") in STUDENT_STAGES
    except PostError:
        return False


def task_classes(cfg: TaskOptions) -> tuple[str, ...]:
    """The task's class names, read from --label-words or the built-in task: no data is read."""
    if cfg.label_words is not None:
        return tuple(parse_label_words(cfg.label_words))
    task = default_task(cfg.task)
    if task is None:
        raise PostError(f"{cfg.task} is not a built-in task, so its classes are unknown; give them with "
                        "--label-words 'class=word;class2=word' (the classes as your labels name them).")
    return task.class_names


def word_sets(cfg: ChooseTemplateConfig, classes: Sequence[str]) -> dict[str, dict[str, tuple[str, ...]]]:
    """Candidate label-word sets restricted to ``classes`` (sets that lack one of them are dropped)."""
    if cfg.label_word_sets is not None:
        raw = {spec: parse_label_words(spec) for spec in cfg.label_word_sets}
    else:
        raw = {k: dict(v) for k, v in SENTIMENT_WORD_SETS.items()}
    out = {}
    for name, words in raw.items():
        if all(c in words for c in classes):
            out[name] = {c: tuple(words[c]) for c in classes}
        else:
            log.info("label-word set %r skipped: it has no words for class(es) %s", name,
                     ", ".join(c for c in classes if c not in words))
    if not out:
        raise PostError(f"no label-word set names all of the task's classes {', '.join(classes)}; give sets with "
                        "--label-word-sets 'class=word;class2=word'.")
    return out


def balanced_sample(labels: Sequence[int], num_classes: int, limit: int, seed: int) -> np.ndarray:
    """Indices of up to ``limit // num_classes`` examples of each class, seeded, in a shuffled order."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels, dtype=np.int64)
    per = max(1, limit // num_classes)
    parts = [np.flatnonzero(y == c)[rng.permutation(int((y == c).sum()))][:per] for c in range(num_classes)]
    idx = np.concatenate(parts) if parts else np.empty(0, np.int64)
    return idx[rng.permutation(len(idx))]


def restrict_classes(data: LabelledDataset, split: str, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """``split`` of ``data`` reduced to ``classes`` (by name), labels renumbered in ``classes``' order."""
    missing = [c for c in classes if c not in data.class_names]
    if missing:
        raise PostError(f"{data.name} has no class {', '.join(repr(c) for c in missing)} (it has "
                        f"{', '.join(data.class_names)}); choose public data with the task's classes.")
    remap = {data.class_names.index(c): i for i, c in enumerate(classes)}
    sp = data.split(split)
    keep = [(t, remap[y]) for t, y in zip(sp.texts, sp.labels) if y in remap]
    return [t for t, _ in keep], [y for _, y in keep]


@torch.no_grad()
def answer_states(loaded: LoadedModel, template: str, texts: Sequence[str], max_length: int,
                  batch_size: int) -> torch.Tensor:
    """(N, d) hidden states at the answer position of ``template`` for ``texts``, in their order."""
    probe = Task(template=template, label_words={"a": (" a",), "b": (" b",)})  # the encoder reads the template only
    encoder = Encoder(probe, loaded.tokenizer, loaded.kind, max_length)
    out: torch.Tensor | None = None
    for idx, h in hidden_batches(loaded.model, encoder, texts, batch_size):
        if out is None:
            out = torch.zeros(len(texts), h.shape[-1], dtype=h.dtype, device=h.device)
        out[torch.as_tensor(idx, device=h.device)] = h
    assert out is not None
    return out


def rank_candidates(loaded: LoadedModel, texts: Sequence[str], labels: Sequence[int], classes: Sequence[str],
                    templates: Sequence[str], sets: Mapping[str, Mapping[str, tuple[str, ...]]], *,
                    max_length: int = 128, batch_size: int = 32) -> list[dict[str, Any]]:
    """Zero-shot metrics of every template × label-word set, best first (balanced accuracy, then macro-F1).

    Each row: template, words (set name), label_words, n, accuracy, ci_low, ci_high (Wilson 95%),
    balanced_accuracy, macro_f1, per_class_accuracy, predicted_share (how often each class is
    answered: a template that always answers one class shows it here), p_value_vs_winner (exact
    McNemar against rank 1 on the same examples; None for rank 1).
    """
    was_training = loaded.model.training
    loaded.model.eval()
    rows = []
    try:
        for template in templates:
            hidden = answer_states(loaded, template, texts, max_length, batch_size)
            for name, words in sets.items():
                cand = Candidate(template, name, words)
                try:
                    verbalizer = Verbalizer.build(cand.task(), loaded.tokenizer)
                except PostError as e:
                    log.info("skipped %r with %s: %s", template, name, e)
                    continue
                with torch.no_grad():
                    scores = label_scores(loaded.model, hidden, verbalizer).float().cpu().numpy()
                rows.append(_row(cand, scores, labels, classes))
    finally:
        loaded.model.train(was_training)
    rows.sort(key=lambda r: (-r["balanced_accuracy"], -r["macro_f1"], -r["accuracy"]))
    best = rows[0]["_correct"] if rows else []
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
        # Is the winner really better than this candidate, on the same sentences? (exact McNemar)
        r["p_value_vs_winner"] = None if rank == 1 else float(mcnemar_exact(best, r["_correct"])["p_value"])
    for r in rows:
        del r["_correct"]
    return rows


def _row(cand: Candidate, scores: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> dict[str, Any]:
    m = classification_metrics(scores, labels, classes)
    n = m["n"]
    correct = int(round(m["accuracy"] * n))
    low, high = wilson_interval(correct, n)
    support = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    recalls = [m["per_class_accuracy"][c] for i, c in enumerate(classes) if support[i] > 0]
    pred = np.bincount(scores.argmax(1), minlength=len(classes)) / max(n, 1)
    correct = (scores.argmax(1) == np.asarray(labels)).tolist()
    return {"template": cand.template, "words": cand.words_name,
            "label_words": {c: list(w) for c, w in cand.label_words.items()}, "n": n,
            "accuracy": m["accuracy"], "ci_low": low, "ci_high": high,
            "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0, "macro_f1": m["macro_f1"],
            "per_class_accuracy": m["per_class_accuracy"],
            "predicted_share": {c: float(pred[i]) for i, c in enumerate(classes)}, "_correct": correct}


def _ranking_data(cfg: ChooseTemplateConfig, classes: tuple[str, ...]) -> tuple[str, list[str], list[int]]:
    """(description, texts, labels) of the data the ranking may use; refuses private data on a non-student."""
    if cfg.private:
        if not is_student_dir(cfg.model):
            raise PostError(f"--private true ranks on your own data, so --model must be a student directory "
                            f"written by post distill or post student (run locally), not {cfg.model!r}; to rank on "
                            "the target, use public data (--public airline) instead.")
        data = load_task(cfg)
        texts, labels = restrict_classes(data, cfg.split, classes)
        return f"private:{cfg.task}", texts, labels
    public = str(cfg.public).strip()
    if not is_dataset_name(public) and not public.lower().startswith("hf:"):
        raise PostError(f"--public {public!r} is not a named public dataset (built-in or hub); a file may hold "
                        "private text. To rank on your own data, use --private true with a student model directory.")
    if public.lower() == str(cfg.task).strip().lower():
        raise PostError(f"--public {public} is the task itself (the private data); choose another public set, or "
                        "use --private true with a student model directory.")
    data = load_labelled(public, split_seed=cfg.split_seed, cache_dir=cfg.cache_dir)
    texts, labels = restrict_classes(data, cfg.split, classes)
    return f"public:{public}", texts, labels


def choose_template(cfg: ChooseTemplateConfig, run_dir: str | Path) -> ChooseTemplateResult:
    """Rank every candidate on the allowed data; write table.md, table.csv and result.json (with the winner)."""
    run = RunDir(run_dir, stage="choose-template", config=cfg)
    if (done := run.existing_result()) is not None:
        return ChooseTemplateResult.from_dict(done, source=str(run.result_path))
    classes = task_classes(cfg)
    sets = word_sets(cfg, classes)
    templates = list(cfg.templates) if cfg.templates is not None else list(SENTIMENT_TEMPLATES)
    source, texts, labels = _ranking_data(cfg, classes)
    idx = balanced_sample(labels, len(classes), cfg.limit, cfg.seed)
    texts, labels = [texts[i] for i in idx], [labels[i] for i in idx]
    if not texts:
        raise PostError(f"no {cfg.split} examples of classes {', '.join(classes)} in {source}; choose other data.")
    counts = np.bincount(np.asarray(labels), minlength=len(classes)).tolist()
    loaded = load_configured_model(cfg, cfg.model)
    log.info("ranking %d templates x %d label-word sets on %d %s examples of %s with %s", len(templates), len(sets),
             len(texts), cfg.split, source, cfg.model)
    t0 = time.perf_counter()
    rows = rank_candidates(loaded, texts, labels, classes, templates, sets, max_length=cfg.max_length,
                           batch_size=cfg.batch_size)
    elapsed = time.perf_counter() - t0
    if not rows:
        raise PostError("no candidate could be scored (every label-word set collided in the tokenizer).")
    md, csv_text = ranking_table(rows)
    (run.path / "table.md").write_text(md, encoding="utf-8")
    (run.path / "table.csv").write_text(csv_text, encoding="utf-8")
    best = rows[0]
    run.log(candidates=len(rows), n=len(texts), best_balanced_accuracy=best["balanced_accuracy"])
    return ChooseTemplateResult.from_dict(run.finish({
        "model": cfg.model, "task": cfg.task, "data": source, "split": cfg.split, "classes": list(classes),
        "class_counts": counts, "n": len(texts), "primary_key": "balanced_accuracy",
        "winner": best, "override": {"template": best["template"], "label_words": label_words_spec(
            best["label_words"])},
        "ranking": rows, "markdown": str(run.path / "table.md"), "csv": str(run.path / "table.csv"),
        "table": md, "scoring_seconds": round(elapsed, 3),
    }), source=str(run.result_path))


def _show_template(template: str) -> str:
    return template.replace("\n", "\\n").replace("|", "\\|")


def ranking_table(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """(Markdown, CSV) of a ranking: one row per candidate, best first."""
    md = ["| rank | template | label words | balanced acc. % | accuracy % [95% CI] | n | macro-F1 | p vs #1 |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['rank']} | `{_show_template(r['template'])}` | {r['words']} | "
                  f"{100 * r['balanced_accuracy']:.1f} | {100 * r['accuracy']:.1f} [{100 * r['ci_low']:.1f}–"
                  f"{100 * r['ci_high']:.1f}] | {r['n']} | {r['macro_f1']:.3f} | "
                  f"{format_p(r.get('p_value_vs_winner')) or '–'} |")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "template", "words", "label_words", "n", "balanced_accuracy", "accuracy", "ci_low",
                "ci_high", "macro_f1", "p_value_vs_winner"])
    for r in rows:
        w.writerow([r["rank"], r["template"], r["words"], label_words_spec(r["label_words"]), r["n"],
                    f"{r['balanced_accuracy']:.4f}", f"{r['accuracy']:.4f}", f"{r['ci_low']:.4f}",
                    f"{r['ci_high']:.4f}", f"{r['macro_f1']:.4f}",
                    "" if r.get("p_value_vs_winner") is None else f"{r['p_value_vs_winner']:.6g}"])
    return "\n".join(md) + "\n", buf.getvalue()


def summarize(result: ChooseTemplateResult) -> str:
    w = result.winner
    return (f"{result.table}\nwinner on {result.n} {result.split} examples of {result.data} "
            f"(balanced accuracy {100 * w['balanced_accuracy']:.1f}%): --template {w['template']!r} "
            f"--label-words '{result.override['label_words']}'")
