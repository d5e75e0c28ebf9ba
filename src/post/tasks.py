"""Tasks: classification as infilling.

A task is a template with a ``{text}`` slot and a ``{mask}`` slot, label words per class and a
text to initialise soft prompts from. A causal LM reads the logits of the last token before
``{mask}`` (what follows the mask is dropped); a masked LM reads the logits at the mask token.
Label words carry their leading space (" great"), so the space before ``{mask}`` in the
template is absorbed into the mask for masked LMs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from post.errors import ConfigError, PostError

DEFAULT_TEMPLATE = "{text} It was {mask}."  # the paper's (made for a masked LM); hub sets and user files keep it

# The built-in sentiment tasks' default for causal LMs, chosen by `post user choose-template --model smollm2-135m
# --task mr --public airline --limit 300` on 300 class-balanced *public* airline tweets (negative/positive) only:
# balanced accuracy 80.3% [75.5-84.4] zero-shot, where the paper's template and words give 50.7% (chance).
# See post.templates and the README ("Choosing a template").
CAUSAL_SENTIMENT_TEMPLATE = "{text}\nOverall, the tone of this text is{mask}"
CAUSAL_SENTIMENT_WORDS: dict[str, tuple[str, ...]] = {"negative": (" Negative",), "positive": (" Positive",)}

SENTIMENT_WORDS: dict[str, tuple[str, ...]] = {
    "negative": (" terrible", " negative", " bad", " poor", " awful"),
    "positive": (" positive", " good", " great", " awesome", " brilliant", " amazing"),
}


@dataclass(frozen=True)
class Task:
    """What to ask the model and how to read its answer.

    Attributes:
        template: Input template; must contain ``{text}`` and ``{mask}`` once each, with
            ``{text}`` first.
        label_words: Class name -> label words (each normally with a leading space), in
            class-index order.
        init_text: Text whose token embeddings initialise a soft prompt (tiled to its length).
    """

    template: str = DEFAULT_TEMPLATE
    label_words: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(SENTIMENT_WORDS))
    init_text: str = "Predict if sentiment of this review is positive or negative"

    def __post_init__(self) -> None:
        check_template(self.template)
        if len(self.label_words) < 2:
            raise ConfigError(f"a task needs at least 2 classes, got {len(self.label_words)}.")
        for name, words in self.label_words.items():
            if not words or not all(isinstance(w, str) and w.strip() for w in words):
                raise ConfigError(
                    f"class {name!r} has no label words; give at least one non-empty word per "
                    "class (e.g. --label-words 'negative=bad,awful;positive=good,great')."
                )
        object.__setattr__(self, "label_words", {str(k): tuple(v) for k, v in self.label_words.items()})

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.label_words)

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    def to_dict(self) -> dict:
        return {"template": self.template, "label_words": {k: list(v) for k, v in self.label_words.items()},
                "init_text": self.init_text}

    @classmethod
    def from_dict(cls, d: Mapping) -> Task:
        try:
            return cls(template=str(d["template"]),
                       label_words={str(k): tuple(str(w) for w in v) for k, v in dict(d["label_words"]).items()},
                       init_text=str(d.get("init_text", "")))
        except PostError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise PostError(f"malformed task description ({e!r}); expected template, label_words, init_text.") from None


def check_template(template: str) -> None:
    """Reject templates without exactly one ``{text}`` before exactly one ``{mask}``."""
    if not isinstance(template, str):
        raise ConfigError("--template must be a string containing {text} and {mask}.")
    for slot in ("{text}", "{mask}"):
        if template.count(slot) != 1:
            raise ConfigError(
                f"--template must contain {slot} exactly once (got {template!r}); "
                "e.g. '{text} It was {mask}.'"
            )
    if template.index("{text}") > template.index("{mask}"):
        raise ConfigError(f"--template must put {{text}} before {{mask}} (got {template!r}).")


def parse_label_words(spec: str | Mapping[str, Sequence[str] | str]) -> dict[str, tuple[str, ...]]:
    """Parse label words from ``'neg=bad,awful;pos=good'`` or a mapping (YAML).

    A word gets a leading space unless it already starts with whitespace; write ``\\,``-free
    words. Order of classes is kept.
    """
    items: list[tuple[str, Sequence[str] | str]]
    if isinstance(spec, str):
        items = []
        for part in spec.split(";"):
            if not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(
                    f"--label-words entry {part.strip()!r} has no '='; write "
                    "'class=word1,word2;class2=word3'."
                )
            name, words = part.split("=", 1)
            items.append((name.strip(), words))
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        raise ConfigError("--label-words must be 'class=w1,w2;class2=w3' or a mapping of class to words.")
    out: dict[str, tuple[str, ...]] = {}
    for name, words in items:
        if not isinstance(words, str | list | tuple):
            raise ConfigError(f"--label-words: class {name!r} needs a word or a list of words, got {words!r}.")
        raw = words.split(",") if isinstance(words, str) else list(words)
        cleaned = tuple(w if w[:1].isspace() else " " + w for w in (str(x).strip() for x in raw) if w)
        if not str(name):
            raise ConfigError("--label-words has an empty class name.")
        if not cleaned:
            raise ConfigError(f"class {name!r} has no label words in --label-words.")
        out[str(name)] = cleaned
    if len(out) < 2:
        raise ConfigError("--label-words must name at least 2 classes.")
    return out


@dataclass(frozen=True)
class Verbalizer:
    """Token ids of every label word and the matrix that averages them into class scores.

    Attributes:
        token_ids: (W,) vocabulary ids of all label words, classes concatenated.
        class_matrix: (W, C) with 1/|words of c| where word w belongs to class c.
    """

    token_ids: torch.Tensor
    class_matrix: torch.Tensor

    @classmethod
    def build(cls, task: Task, tokenizer: PreTrainedTokenizerBase) -> Verbalizer:
        ids: list[int] = []
        owner: list[int] = []
        seen: dict[int, tuple[str, str]] = {}
        unk = getattr(tokenizer, "unk_token_id", None)
        for c, (name, words) in enumerate(task.label_words.items()):
            for word in words:
                toks = tokenizer(word, add_special_tokens=False)["input_ids"]
                if not toks or (unk is not None and toks[0] == unk):
                    raise PostError(
                        f"label word {word!r} of class {name!r} is not in the tokenizer's vocabulary; "
                        "choose another word."
                    )
                if len(toks) > 1:
                    pieces = tokenizer.convert_ids_to_tokens(toks)
                    warnings.warn(
                        f"label word {word!r} is split into {len(toks)} tokens {pieces}; "
                        "its first token is scored.",
                        stacklevel=2,
                    )
                tid = int(toks[0])
                if tid in seen and seen[tid][0] != name:
                    raise PostError(
                        f"label words {seen[tid][1]!r} ({seen[tid][0]}) and {word!r} ({name}) start with "
                        "the same token, so the classes can't be told apart; change one of them."
                    )
                if tid in seen:
                    continue
                seen[tid] = (name, word)
                ids.append(tid)
                owner.append(c)
        mat = torch.zeros(len(ids), task.num_classes)
        for w, c in enumerate(owner):
            mat[w, c] = 1.0
        mat = mat / mat.sum(0, keepdim=True)
        return cls(token_ids=torch.tensor(ids, dtype=torch.long), class_matrix=mat)

    def class_scores(self, word_logits: torch.Tensor) -> torch.Tensor:
        """(B, W) label-word logits -> (B, C) class scores (mean over each class's words)."""
        return word_logits @ self.class_matrix.to(word_logits)
