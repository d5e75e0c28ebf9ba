"""The evaluate stage's per-example predictions and the proxy-tuning baseline, on tiny models."""

import json

import numpy as np
import pytest

import post.evaluate as ev
from helpers import write_sentiment_csv
from post.errors import ConfigError, PostError
from post.evaluate import EvaluateConfig, combine_proxy, evaluate, read_predictions, write_predictions
from post.models import load_model, save_model, tiny_model
from post.prompt import read_prompt
from post.resolve import subset
from post.rundir import read_result
from post.scoring import Encoder, predict_scores
from post.student import build_student
from post.tasks import Verbalizer
from post.tune import TuneConfig, tune

LABEL_WORDS = "negative=bad;positive=good"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data = write_sentiment_csv(root / "d.csv", n=120)
    teacher = tiny_model("llama")
    target_dir = save_model(teacher, root / "target")
    source_dir = save_model(build_student(teacher, "1"), root / "source")
    ps = tune(TuneConfig(model=str(source_dir), task=str(data), label_words=LABEL_WORDS, n_tokens=4, epochs=2,
                         batch_size=8, lr=0.1, test=False, device="cpu"), root / "ps")
    return root, data, target_dir, source_dir, ps


def _cfg(setup, **kw):
    root, data, target_dir, source_dir, ps = setup
    return EvaluateConfig(**{"model": str(target_dir), "task": str(data), "label_words": LABEL_WORDS,
                             "split": "test", "device": "cpu", **kw})


def test_combine_proxy_by_hand():
    t = np.array([[1.0, 2.0], [0.0, -1.0]])
    sp = np.array([[0.5, 0.1], [3.0, 0.0]])
    s = np.array([[0.2, 0.3], [1.0, 1.0]])
    np.testing.assert_allclose(combine_proxy(t, sp, s), [[1.3, 1.8], [2.0, -2.0]])
    np.testing.assert_array_equal(combine_proxy(t, s, s), t)  # no change on the small model: the target as it is
    with pytest.raises(PostError, match="one shape"):
        combine_proxy(t, sp[:1], s)


def test_predictions_file_round_trip_and_errors(tmp_path):
    write_predictions(tmp_path, "test", [4, 1, 7], [1, 0, 1], np.array([[0.1, 0.9], [0.2, 0.1], [3.0, 1.0]]))
    assert read_predictions(tmp_path) == {4: (1, 1), 1: (0, 0), 7: (1, 0)}
    assert read_predictions(tmp_path / "none") is None
    with pytest.raises(PostError, match="one index, label and score row"):
        write_predictions(tmp_path, "test", [1, 2], [0], np.zeros((2, 2)))
    (tmp_path / "predictions.json").write_text(json.dumps({"indices": [1, 2], "labels": [0]}))
    with pytest.raises(PostError, match="not a predictions file"):
        read_predictions(tmp_path)


def test_evaluate_writes_predictions_that_match_its_accuracy(setup, tmp_path):
    r = evaluate(_cfg(setup, limit=9, seed=3), tmp_path / "zs")
    preds = read_predictions(tmp_path / "zs")
    n_test = 12  # 10% of 120
    assert sorted(preds) == subset(n_test, 9, 3).tolist() and r.n == 9
    assert r.accuracy == pytest.approx(np.mean([y == p for y, p in preds.values()]))
    assert r.predictions.endswith("predictions.json") and r.method is None
    assert "method" not in read_result(tmp_path / "zs")  # only a proxy evaluation names its method


def test_proxy_tuning_adds_the_prompts_change_on_the_source(setup, tmp_path):
    root, data, target_dir, source_dir, ps = setup
    r = evaluate(_cfg(setup, prompt=ps.prompt, proxy_source_model=str(source_dir)), tmp_path / "proxy")
    assert r.method == "proxy" and r.proxy_source_model == str(source_dir)
    assert r.prompt.model.endswith("source") and r.prompt.method == "tuned"
    # The same figure computed by hand from the three models' scores.
    target, source = load_model(str(target_dir)), load_model(str(source_dir))
    task = read_prompt(ps.prompt).task
    from post.data import load_labelled

    texts = list(load_labelled(str(data), label_words=LABEL_WORDS).split("test").texts)
    prompt = read_prompt(ps.prompt).tensor

    def scores(m, p=None):
        return predict_scores(m.model, Encoder(task, m.tokenizer, m.kind, 128), Verbalizer.build(task, m.tokenizer),
                              texts, prompt=p)

    want = scores(target) + scores(source, prompt) - scores(source)
    got = read_predictions(tmp_path / "proxy")
    assert [got[i][1] for i in range(len(texts))] == want.argmax(1).tolist()
    # and it is not the target alone nor the prompt on the source alone (the test can fail)
    assert not np.allclose(want, scores(target)) and not np.allclose(want, scores(source, prompt))


def test_proxy_with_no_prompt_change_is_the_target_zero_shot(setup, tmp_path, monkeypatch):
    zero_shot = evaluate(_cfg(setup), tmp_path / "zs")
    real = ev.predict_scores
    # The small model ignores the prompt: Φs(ps; x) − Φs(x) = 0 exactly.
    monkeypatch.setattr(ev, "predict_scores", lambda *a, prompt=None, **kw: real(*a, **kw))
    root, data, target_dir, source_dir, ps = setup
    proxy = evaluate(_cfg(setup, prompt=ps.prompt, proxy_source_model=str(source_dir)), tmp_path / "proxy")
    assert read_predictions(tmp_path / "proxy") == read_predictions(tmp_path / "zs")
    assert proxy.accuracy == zero_shot.accuracy and proxy.confusion_matrix == zero_shot.confusion_matrix


def test_proxy_refuses_bad_setups(setup, tmp_path, monkeypatch):
    root, data, target_dir, source_dir, ps = setup
    with pytest.raises(ConfigError, match="--proxy-source-model: needs --prompt"):
        _cfg(setup, proxy_source_model=str(source_dir))
    with pytest.raises(ConfigError, match="--allow-other-model"):
        _cfg(setup, prompt=ps.prompt, proxy_source_model=str(source_dir), allow_other_model=True)
    # the prompt must belong to the proxy source, not to the target
    with pytest.raises(PostError):
        evaluate(_cfg(setup, prompt=ps.prompt, proxy_source_model=str(target_dir)), tmp_path / "wrong")
    # another tokenizer
    calls = {"n": 0}
    orig = ev.load_configured_model

    def other_vocab(cfg, name):
        loaded = orig(cfg, name)
        calls["n"] += 1
        if calls["n"] == 1:  # the target model
            loaded.tokenizer.add_tokens(["zzzznewtoken"])
        return loaded

    monkeypatch.setattr(ev, "load_configured_model", other_vocab)
    with pytest.raises(PostError, match="same tokenizer"):
        evaluate(_cfg(setup, prompt=ps.prompt, proxy_source_model=str(source_dir)), tmp_path / "vocab")


def test_calibrate_by_hand():
    scores = np.array([[2.0, 0.0], [0.0, 0.5]])
    public = np.array([[1.0, 0.0], [3.0, 0.0]])  # the model leans to class 0 on public text
    got, prior = ev.calibrate(scores, public)
    p_pub = np.exp(public) / np.exp(public).sum(1, keepdims=True)
    want_prior = p_pub.mean(0)
    np.testing.assert_allclose(prior, want_prior)
    logp = scores - np.log(np.exp(scores).sum(1, keepdims=True))
    np.testing.assert_allclose(got, logp - np.log(want_prior))
    assert got.argmax(1).tolist() == [0, 1] and scores.argmax(1).tolist() == [0, 1]
    # a bias towards class 0 is removed: a mild class-0 lean becomes class 1 once divided by the prior
    mild = np.array([[0.4, 0.0]])
    assert ev.calibrate(mild, public)[0].argmax(1).tolist() == [1]
    # an even prior leaves the argmax as it is
    assert ev.calibrate(mild, np.zeros((3, 2)))[0].argmax(1).tolist() == [0]
    with pytest.raises(PostError, match="calibration needs"):
        ev.calibrate(scores, np.zeros((3, 3)))


def test_calibrated_evaluation_divides_by_the_public_prior(setup, tmp_path):
    root, data, target_dir, source_dir, ps = setup
    public = root / "public.txt"
    public.write_text("\n".join(["a plain day", "the weather", "it rained", "some news", "a long list"]) + "\n")
    zs = evaluate(_cfg(setup), tmp_path / "zs")
    cal = evaluate(_cfg(setup, calibrate_public=str(public), calibrate_limit=4), tmp_path / "cal")
    raw = read_result(tmp_path / "cal")
    assert cal.method == "calibrated" and raw["calibrate_public"] == str(public) and raw["calibration_texts"] == 4
    assert sum(raw["class_prior"]) == pytest.approx(1.0, abs=1e-5)
    # the same predictions computed by hand from the target's scores
    target = load_model(str(target_dir))
    from post.data import load_labelled, load_texts

    task = load_labelled(str(data), label_words=LABEL_WORDS).task
    texts = list(load_labelled(str(data), label_words=LABEL_WORDS).split("test").texts)
    enc, verb = Encoder(task, target.tokenizer, target.kind, 128), Verbalizer.build(task, target.tokenizer)
    pub = load_texts(str(public))
    pub_scores = predict_scores(target.model, enc, verb, [pub[i] for i in subset(len(pub), 4, 0)])
    want, prior = ev.calibrate(predict_scores(target.model, enc, verb, texts), pub_scores)
    np.testing.assert_allclose(raw["class_prior"], prior, atol=1e-6)
    got = read_predictions(tmp_path / "cal")
    assert [got[i][1] for i in range(len(texts))] == want.argmax(1).tolist()
    assert zs.n == cal.n


def test_calibration_refuses_bad_options(setup):
    with pytest.raises(ConfigError, match="calibrate_limit|calibrate-limit"):
        _cfg(setup, calibrate_public="airline", calibrate_limit=0)
    root, data, target_dir, source_dir, ps = setup
    with pytest.raises(ConfigError, match="does not combine with proxy"):
        _cfg(setup, calibrate_public="airline", prompt=ps.prompt, proxy_source_model=str(source_dir))
