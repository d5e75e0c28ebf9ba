"""choose-template: ranking templates × label words, public data only on the target, private only on a student."""

import json

import numpy as np
import pytest

import post.templates as tpl
from helpers import write_sentiment_csv
from post.cli import main
from post.data import LabelledDataset, Split
from post.errors import ConfigError, PostError
from post.models import load_model
from post.scoring import Encoder, predict_scores
from post.stats import mcnemar_exact
from post.student import StudentConfig, make_student
from post.tasks import Task, Verbalizer
from post.templates import (
    SENTIMENT_TEMPLATES,
    SENTIMENT_WORD_SETS,
    ChooseTemplateConfig,
    balanced_sample,
    choose_template,
    is_student_dir,
    label_words_spec,
    rank_candidates,
    restrict_classes,
    word_sets,
)

TEXTS = ["a good film", "a bad film", "great acting", "awful plot", "the music was amazing", "terrible and poor",
         "it was brilliant", "boring, long and awful", "good", "bad"]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
SETS = {"good/bad": {"negative": (" bad",), "positive": (" good",)},
        "paper": {"negative": (" terrible", " bad"), "positive": (" great", " good", " amazing")}}


def _public(name="airline"):
    """An airline-like public set: 3 classes, positive the smallest."""
    rng = np.random.default_rng(0)
    words = {0: ["awful delay", "bad service", "terrible seats"], 1: ["a flight", "the gate"], 2: ["great crew"]}
    ys = [0] * 30 + [1] * 20 + [2] * 10
    texts = [f"{rng.choice(words[y])} {i}" for i, y in enumerate(ys)]
    split = Split(tuple(texts), tuple(ys))
    task = Task(label_words={"negative": (" bad",), "neutral": (" neutral",), "positive": (" good",)})
    return LabelledDataset(name, task, {"train": split, "validation": split, "test": split}, "test")


def test_every_set_read_from_shared_hidden_states_equals_scoring_it_alone():
    loaded = load_model("tiny-llama")
    template = "Review: {text}\nSentiment: {mask}"
    rows = rank_candidates(loaded, TEXTS, LABELS, ("negative", "positive"), [template, "{text} It was {mask}."], SETS,
                           batch_size=3)
    assert len(rows) == 4 and [r["rank"] for r in rows] == [1, 2, 3, 4]
    keys = [(r["balanced_accuracy"], r["macro_f1"], r["accuracy"]) for r in rows]
    assert keys == sorted(keys, reverse=True)
    correct = []
    for r in rows:
        task = Task(template=r["template"], label_words=SETS[r["words"]])
        scores = predict_scores(loaded.model, Encoder(task, loaded.tokenizer, loaded.kind, 128),
                                Verbalizer.build(task, loaded.tokenizer), TEXTS, batch_size=4)
        pred = scores.argmax(1)
        correct.append((pred == np.array(LABELS)).tolist())
        assert r["accuracy"] == pytest.approx(float(np.mean(pred == np.array(LABELS))))
        assert r["n"] == len(TEXTS) and r["ci_low"] <= r["accuracy"] <= r["ci_high"]
        assert r["predicted_share"]["positive"] == pytest.approx(float(np.mean(pred == 1)))
    assert rows[0]["p_value_vs_winner"] is None and "_correct" not in rows[0]
    for r, ok in zip(rows[1:], correct[1:]):
        assert r["p_value_vs_winner"] == pytest.approx(mcnemar_exact(correct[0], ok)["p_value"])


def test_balanced_accuracy_is_the_mean_recall_not_the_majority_share():
    loaded = load_model("tiny-llama")
    texts, labels = TEXTS[:9] + ["x"] * 6, LABELS[:9] + [0] * 6  # imbalanced: 10 negative, 5 positive
    r = rank_candidates(loaded, texts, labels, ("negative", "positive"), ["{text} It was {mask}."],
                        {"good/bad": SETS["good/bad"]})[0]
    recalls = [r["per_class_accuracy"]["negative"], r["per_class_accuracy"]["positive"]]
    assert r["balanced_accuracy"] == pytest.approx(np.mean(recalls))


def test_balanced_sample_and_class_restriction_by_name():
    labels = [0] * 30 + [1] * 20 + [2] * 10
    idx = balanced_sample(labels, 3, 24, seed=1)
    assert np.bincount(np.asarray(labels)[idx], minlength=3).tolist() == [8, 8, 8]
    assert balanced_sample(labels, 3, 24, seed=1).tolist() == idx.tolist()
    assert np.bincount(np.asarray(labels)[balanced_sample(labels, 3, 90, 0)]).tolist() == [30, 20, 10]
    texts, ys = restrict_classes(_public(), "validation", ("negative", "positive"))
    assert len(texts) == 40 and set(ys) == {0, 1} and ys.count(1) == 10  # positive renumbered 2 -> 1
    assert all(t.startswith("great crew") for t, y in zip(texts, ys) if y == 1)
    with pytest.raises(PostError, match="has no class 'mixed'"):
        restrict_classes(_public(), "validation", ("negative", "mixed"))


def test_word_sets_keep_only_the_tasks_classes():
    cfg = ChooseTemplateConfig(model="tiny-llama")
    two = word_sets(cfg, ("negative", "positive"))
    assert set(two) == set(SENTIMENT_WORD_SETS) and all(set(w) == {"negative", "positive"} for w in two.values())
    assert two["paper"]["positive"][0] == " positive"
    three = word_sets(cfg, ("negative", "neutral", "positive"))
    assert three["positive/negative"]["neutral"] == (" neutral",)
    given = ChooseTemplateConfig(model="m", label_word_sets=["negative=bad;positive=good", "neg=bad;pos=good"])
    assert list(word_sets(given, ("negative", "positive"))) == ["negative=bad;positive=good"]
    with pytest.raises(PostError, match="no label-word set names all"):
        word_sets(given, ("a", "b"))
    assert label_words_spec({"negative": (" bad", " awful"), "positive": (" good",)}) == \
        "negative=bad,awful;positive=good"
    assert "{text} It was {mask}." in SENTIMENT_TEMPLATES  # the paper's stays a candidate


def test_config_checks():
    with pytest.raises(ConfigError, match="--template"):
        ChooseTemplateConfig(model="m", template="{text} {mask}")
    with pytest.raises(ConfigError, match="--limit"):
        ChooseTemplateConfig(model="m", limit=1)
    with pytest.raises(ConfigError, match="--split"):
        ChooseTemplateConfig(model="m", split="dev")


def test_public_ranking_on_the_target_writes_the_winner(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(tpl, "load_labelled", lambda name, **kw: seen.append(name) or _public(name))
    monkeypatch.setattr(tpl, "load_task", lambda cfg: pytest.fail("the task's own data was read"))
    cfg = ChooseTemplateConfig(model="tiny-llama", task="mr", public="airline", limit=20, device="cpu",
                               templates=["{text} It was {mask}.", "Review: {text}\nSentiment: {mask}"],
                               label_word_sets=["negative=bad;positive=good", "negative=terrible;positive=great"])
    r = choose_template(cfg, tmp_path / "ct")
    assert seen == ["airline"] and r.classes == ["negative", "positive"] and r.class_counts == [10, 10]
    assert r.data == "public:airline" and r.primary_key == "balanced_accuracy" and len(r.ranking) == 4
    assert r.winner == r.ranking[0]
    assert r.override["template"] == r.winner["template"]
    assert r.override["label_words"] == label_words_spec(r.winner["label_words"])
    saved = json.loads((tmp_path / "ct" / "result.json").read_text())
    assert saved["winner"]["template"] == r.winner["template"]
    assert (tmp_path / "ct" / "table.csv").read_text().startswith("rank,template,words,label_words,n,")
    assert "| 1 | `" in (tmp_path / "ct" / "table.md").read_text()


def test_public_data_must_be_a_named_set_other_than_the_task(tmp_path, monkeypatch):
    monkeypatch.setattr(tpl, "load_labelled", lambda *a, **kw: pytest.fail("data was read"))
    data = write_sentiment_csv(tmp_path / "mine.csv", n=20)
    with pytest.raises(PostError, match="not a named public dataset"):
        choose_template(ChooseTemplateConfig(model="tiny-llama", task="mr", public=str(data)), tmp_path / "a")
    with pytest.raises(PostError, match="is the task itself"):
        choose_template(ChooseTemplateConfig(model="tiny-llama", task="airline", public="airline"), tmp_path / "b")
    with pytest.raises(PostError, match="its classes are unknown"):
        choose_template(ChooseTemplateConfig(model="tiny-llama", task=str(data)), tmp_path / "c")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct-student")
    r = make_student(StudentConfig(teacher="tiny-llama", keep_layers="0", device="cpu"), root / "student-run")
    return r.model_dir


def test_private_data_only_on_a_student_directory(tmp_path, monkeypatch, student_dir):
    data = write_sentiment_csv(tmp_path / "private.csv", n=60)
    words = "negative=bad;positive=good"
    plain = tmp_path / "copy"
    plain.mkdir()
    (plain / "config.json").write_text("{}")  # a model directory that no distill/student run wrote
    assert is_student_dir(student_dir) and not is_student_dir("tiny-llama") and not is_student_dir(str(plain))
    read = []
    real = tpl.load_task
    monkeypatch.setattr(tpl, "load_task", lambda cfg: read.append(cfg.task) or real(cfg))
    for model in ("tiny-llama", "smollm2-135m", str(plain)):
        with pytest.raises(PostError, match="--model must be a student directory"):
            choose_template(ChooseTemplateConfig(model=model, task=str(data), label_words=words, private=True),
                            tmp_path / f"refused-{len(read)}-{model[-4:]}")
    assert read == []  # refused before the private data was opened
    r = choose_template(ChooseTemplateConfig(model=student_dir, task=str(data), label_words=words, private=True,
                                             limit=6, device="cpu", templates=["{text} It was {mask}."]),
                        tmp_path / "ok")
    assert read == [str(data)] and r.data == f"private:{data}" and r.n == 6 and r.split == "validation"


def test_cli_user_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tpl, "load_labelled", lambda name, **kw: _public(name))
    code = main(["user", "choose-template", "--model", "tiny-llama", "--task", "mr", "--limit", "10",
                 "--device", "cpu", "--templates", '["{text} It was {mask}."]', "--out", str(tmp_path / "ct")])
    out = capsys.readouterr().out
    assert code == 0 and "winner on 10 validation examples of public:airline" in out
    assert main(["user", "choose-template", "--model", "tiny-llama", "--task", "mr", "--private", "true",
                 "--out", str(tmp_path / "no")]) == 2
    assert "student directory" in capsys.readouterr().err


def test_builtin_sentiment_default_is_the_public_winner():
    from post.data import default_task
    from post.tasks import CAUSAL_SENTIMENT_TEMPLATE, CAUSAL_SENTIMENT_WORDS, DEFAULT_TEMPLATE

    mr = default_task("mr")
    assert mr.template == CAUSAL_SENTIMENT_TEMPLATE and dict(mr.label_words) == CAUSAL_SENTIMENT_WORDS
    # the default is one of the shipped candidates, with one of the shipped word sets
    assert CAUSAL_SENTIMENT_TEMPLATE in SENTIMENT_TEMPLATES
    assert any(all(ws[c] == CAUSAL_SENTIMENT_WORDS[c] for c in CAUSAL_SENTIMENT_WORDS)
               for ws in SENTIMENT_WORD_SETS.values())
    assert default_task("sst2").template == DEFAULT_TEMPLATE == tpl.PAPER_TEMPLATE  # hub sets keep the paper's
    assert default_task("reviews.csv") is None
