"""Stage: does a soft prompt spell out its training data? (``post attack reconstruct``)

Every prompt vector is projected onto its nearest vocabulary tokens by cosine similarity against
the model's input-embedding matrix (special tokens excluded). The nearest-token reading of the
prompt is then compared, n-gram by n-gram, with the private training texts:

- ``in_private``: projected n-grams that occur somewhere in the private training split;
- ``private_only``: of those, the ones that occur in no public text and not in the prompt's
  initialisation text or template, i.e. n-grams only the private data could have put there;
- ``longest_run``: the longest stretch of consecutive projected tokens found verbatim in one
  training text.

The control is a ``--reference`` prompt tuned with the same settings on public data: a prompt that
does not spell out its training data reproduces no more private n-grams than the reference does.
Tokens are compared in a normalised form (decoded, stripped, lower-cased; whitespace-only tokens
dropped) so that ``Ġgood``, ``▁good`` and ``Good`` count as one word.

The check runs on the user's side: it reads the private training texts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from post.config import ModelOptions, TaskOptions, check_split, require
from post.data import load_texts
from post.errors import PostError
from post.models import LoadedModel
from post.prompt import check_compatible, read_prompt
from post.resolve import load_configured_model, load_task
from post.results import ReconstructResult
from post.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ReconstructConfig(TaskOptions, ModelOptions):
    """Project prompts onto their nearest vocabulary tokens and count the private n-grams they reproduce.

    Attributes:
        prompt: Prompt files to check (e.g. the private ps and the transferred pt).
        reference: Control prompts tuned with the same settings on public data.
        model: Model whose vocabulary the prompts are projected onto (default: each prompt's own
            model, by the name it records); a prompt from another model is refused.
        local_model: The directory of the local model (e.g. the student) for prompts that record a
            local model (``local:NAME``: prompt files carry no paths).
        split: The private split the prompts were trained on.
        public: Public text whose n-grams don't count as private (e.g. the transfer's public set);
            none to count every private n-gram.
        public_limit: Use at most this many public texts.
        top_k: Nearest tokens reported per prompt vector.
        max_n: Longest n-gram counted.
    """

    prompt: list[Path] = field(default_factory=list)
    reference: list[Path] = field(default_factory=list)
    model: str | None = None
    local_model: str | None = None
    split: str = "train"
    public: str | None = None
    public_limit: int | None = 5000
    top_k: int = 5
    max_n: int = 4

    def __post_init__(self) -> None:
        TaskOptions.__post_init__(self)
        ModelOptions.__post_init__(self)
        require(bool(self.prompt), "prompt", "give at least one prompt file to check.")
        check_split(self.split)
        require(1 <= self.top_k <= 100, "top_k", f"must be between 1 and 100, got {self.top_k}.")
        require(1 <= self.max_n <= 16, "max_n", f"must be between 1 and 16, got {self.max_n}.")
        require(self.public_limit is None or self.public_limit >= 1, "public_limit", "must be at least 1.")


# --------------------------------------------------------------------------- pure parts


def nearest_tokens(prompt: torch.Tensor, embeddings: torch.Tensor, k: int,
                   exclude: Iterable[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, cosines), each (n, k): the k vocabulary rows nearest to each prompt row by cosine.

    ``exclude`` ids (special tokens) are never returned.
    """
    if prompt.dim() != 2 or embeddings.dim() != 2 or prompt.shape[1] != embeddings.shape[1]:
        raise PostError(f"prompt of shape {tuple(prompt.shape)} and embeddings of shape {tuple(embeddings.shape)} "
                        "don't share a width.")
    p = torch.nn.functional.normalize(prompt.float(), dim=-1)
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    sims = p @ e.T
    banned = [i for i in exclude if 0 <= i < sims.shape[1]]
    if banned:
        sims[:, banned] = -float("inf")
    k = min(k, sims.shape[1] - len(banned))
    cos, ids = sims.topk(k, dim=-1)
    return ids, cos


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    """The distinct n-grams of a token sequence."""
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def corpus_ngrams(docs: Iterable[Sequence[str]], max_n: int) -> dict[int, set[tuple[str, ...]]]:
    """Every n-gram (n = 1..max_n) of every document, by n."""
    out: dict[int, set[tuple[str, ...]]] = {n: set() for n in range(1, max_n + 1)}
    for doc in docs:
        for n in range(1, max_n + 1):
            out[n] |= ngrams(doc, n)
    return out


def longest_run(tokens: Sequence[str], grams: dict[int, set[tuple[str, ...]]],
                docs: Iterable[Sequence[str]]) -> int:
    """Length of the longest stretch of ``tokens`` that occurs verbatim (contiguously) in one of ``docs``.

    ``grams`` (from :func:`corpus_ngrams` over the same docs) answers short runs; runs longer than
    its largest n are checked against the documents themselves.
    """
    best = 0
    joined: list[str] | None = None
    for n in range(1, len(tokens) + 1):
        candidates = ngrams(tokens, n)
        if n in grams:
            found = bool(candidates & grams[n])
        else:
            if joined is None:  # "\x00" keeps tokens apart, so a match can't start or end inside a token
                joined = ["\x00" + "\x00".join(d) + "\x00" for d in docs]
            found = any("\x00" + "\x00".join(c) + "\x00" in d for c in candidates for d in joined)
        if not found:
            break
        best = n
    return best


def reproduction(tokens: Sequence[str], private: dict[int, set[tuple[str, ...]]],
                 excluded: dict[int, set[tuple[str, ...]]]) -> dict[str, dict[str, int]]:
    """Per n: distinct projected n-grams, how many occur in the private texts, and how many of those
    are in none of the ``excluded`` texts (public text, init text, template)."""
    out = {}
    for n in sorted(private):
        mine = ngrams(tokens, n)
        hits = mine & private[n]
        out[str(n)] = {"projected": len(mine), "in_private": len(hits),
                       "private_only": len(hits - excluded.get(n, set()))}
    return out


# --------------------------------------------------------------------------- the stage


class _Vocabulary:
    """A tokenizer's ids -> normalised words, memoised."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.tokenizer = loaded.tokenizer
        self._words: dict[int, str] = {}

    def word(self, i: int) -> str:
        if i not in self._words:
            self._words[i] = self.tokenizer.decode([i]).strip().lower()
        return self._words[i]

    def words(self, ids: Iterable[int]) -> list[str]:
        return [w for w in (self.word(int(i)) for i in ids) if w]

    def documents(self, texts: Sequence[str]) -> list[list[str]]:
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [self.words(doc) for doc in ids]


def _excluded_ids(loaded: LoadedModel) -> list[int]:
    """Special tokens and embedding rows past the tokenizer's vocabulary (padding rows): never a reading."""
    rows = int(loaded.model.get_input_embeddings().weight.shape[0])
    return sorted(set(loaded.tokenizer.all_special_ids) | set(range(len(loaded.tokenizer), rows)))


def reconstruct(cfg: ReconstructConfig, run_dir: str | Path) -> ReconstructResult:
    """Project every prompt and reference onto its vocabulary; write and return the counts."""
    run = RunDir(run_dir, stage="reconstruct", config=cfg)
    if (done := run.existing_result()) is not None:
        return ReconstructResult.from_dict(done, source=str(run.result_path))
    data = load_task(cfg)
    private_texts = list(data.split(cfg.split).texts)
    public_texts = load_texts(cfg.public, limit=cfg.public_limit, cache_dir=cfg.cache_dir) if cfg.public else []
    files = [(p, False) for p in cfg.prompt] + [(p, True) for p in cfg.reference]
    models: dict[str, LoadedModel] = {}
    corpora: dict[str, tuple[_Vocabulary, list[list[str]], dict, dict]] = {}
    rows = []
    for path, is_reference in files:
        pf = read_prompt(path)
        name = cfg.model or pf.meta["model"]["name"]
        if name.startswith("local:"):
            if cfg.local_model is None:
                raise PostError(f"{path} was tuned on a local model ({name}); pass its directory with --local-model "
                                "or --model.")
            name = cfg.local_model
        if name not in models:
            models[name] = load_configured_model(cfg, name)
        loaded = models[name]
        check_compatible(pf, loaded, same_model=True)
        if not is_reference and tuple(pf.task.class_names) != tuple(data.class_names):
            raise PostError(f"{path} was tuned for classes {list(pf.task.class_names)}, not those of {cfg.task} "
                            f"({list(data.class_names)}); check it against the task it was tuned on.")
        fp = pf.meta["model"].get("tokenizer") or name
        if fp not in corpora:  # n-grams depend on the tokenizer only
            vocab = _Vocabulary(loaded)
            docs = vocab.documents(private_texts)
            log.info("tokenised %d private texts for %s", len(docs), name)
            corpora[fp] = (vocab, docs, corpus_ngrams(docs, cfg.max_n),
                           corpus_ngrams(vocab.documents(public_texts), cfg.max_n))
        vocab, docs, private, public = corpora[fp]
        task = pf.task
        own = corpus_ngrams(vocab.documents([task.init_text, task.template.replace("{text}", " ")
                                             .replace("{mask}", " ")]), cfg.max_n)
        excluded = {n: public[n] | own[n] for n in private}
        emb = loaded.model.get_input_embeddings().weight.detach()
        ids, cos = nearest_tokens(pf.tensor.to(emb.device), emb, cfg.top_k, _excluded_ids(loaded))
        ids, cos = ids.cpu(), cos.cpu()
        top1 = vocab.words(ids[:, 0].tolist())
        counts = reproduction(top1, private, excluded)
        row = {**pf.summary(), "reference": is_reference,
               "projection": loaded.tokenizer.decode(ids[:, 0].tolist()),
               "mean_top1_cosine": round(float(cos[:, 0].mean()), 4), "words": len(top1),
               "nearest": [[{"token": loaded.tokenizer.decode([int(i)]), "cosine": round(float(c), 4)}
                            for i, c in zip(ids[r].tolist(), cos[r].tolist())] for r in range(ids.shape[0])],
               "ngrams": counts, "longest_run": longest_run(top1, private, docs)}
        run.log(prompt=str(path), reference=is_reference, mean_top1_cosine=row["mean_top1_cosine"],
                longest_run=row["longest_run"],
                private_only=private_only_multigrams(counts))
        rows.append(row)
    result = {"task": cfg.task, "split": cfg.split, "private_texts": len(private_texts),
              "public": cfg.public, "public_texts": len(public_texts), "max_n": cfg.max_n, "prompts": rows,
              "verdict": verdict(rows)}
    # the check's Markdown before its result: a directory with result.json has both
    (Path(run_dir) / "reconstruct.md").write_text(markdown(ReconstructResult(stage=run.stage, **result)),
                                                  encoding="utf-8")
    return ReconstructResult.from_dict(run.finish(result), source=str(run.result_path))


def private_only_multigrams(counts: dict[str, dict[str, int]]) -> int:
    """Private-only n-grams with n ≥ 2, from :func:`reproduction`'s counts (single words prove little)."""
    return sum(c["private_only"] for n, c in counts.items() if int(n) >= 2)


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One line: do the private prompts reproduce more private-only n-grams (n ≥ 2) than the references?"""
    mine = [private_only_multigrams(r["ngrams"]) for r in rows if not r["reference"]]
    refs = [private_only_multigrams(r["ngrams"]) for r in rows if r["reference"]]
    if not refs:
        return (f"private prompts reproduce at most {max(mine)} private-only n-grams (n ≥ 2); no reference prompt "
                "was given to compare with.")
    worse = max(mine) > max(refs)
    return (f"private prompts reproduce at most {max(mine)} private-only n-grams (n ≥ 2), references "
            f"{max(refs)}: " + ("MORE than a prompt tuned on public data; inspect the tokens."
                                if worse else "no more than a prompt tuned on public data."))


def markdown(result: ReconstructResult) -> str:
    """The check as a Markdown table plus each prompt's nearest-token reading."""
    ns = [str(n) for n in range(1, int(result.max_n) + 1)]
    head = ("| prompt | model | kind | ε | mean top-1 cos | " + " | ".join(f"{n}-grams in private / private-only"
                                                                        for n in ns) + " | longest run |")
    lines = [f"# Prompt reconstruction check: {result.task} ({result.private_texts} {result.split} texts"
             + (f", public {result.public} {result.public_texts} texts" if result.public else "") + ")",
             "", head, "|" + "---|" * (6 + len(ns))]
    for r in result.prompts:
        eps = f"{r['epsilon']:.2f}" if r.get("epsilon") is not None else "∞"
        cells = " | ".join(f"{r['ngrams'][n]['in_private']}/{r['ngrams'][n]['projected']} / "
                           f"{r['ngrams'][n]['private_only']}" for n in ns)
        kind = "reference (public)" if r["reference"] else r["method"]
        lines.append(f"| {Path(str(r['path'])).parent.name or r['path']} | {r['model']} | {kind} | {eps} | "
                     f"{r['mean_top1_cosine']:.3f} | {cells} | {r['longest_run']} |")
    lines += ["", result.verdict, ""]
    for r in result.prompts:
        lines.append(f"- `{r['path']}`: {r['projection']!r}")
    return "\n".join(lines) + "\n"


def summarize(result: ReconstructResult) -> str:
    return markdown(result)
