"""The provider's query endpoint on loopback: answers match post evaluate's scores; bad requests get 4xx."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from helpers import write_sentiment_csv
from post.errors import PostError
from post.serve import Classifier, ServeConfig, make_server
from post.tune import TuneConfig, tune


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = write_sentiment_csv(root / "d.csv", n=64)
    tuned = tune(TuneConfig(model="tiny-llama", task=str(data), label_words="negative=bad;positive=good", n_tokens=4,
                            epochs=2, batch_size=8, lr=0.1, device="cpu"), root / "tune")
    cfg = ServeConfig(model="tiny-llama", prompt=tuned["prompt"], port=0, device="cpu", max_texts=4)
    clf = Classifier(cfg)
    server = make_server(cfg, clf)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield url, clf, tuned
    server.shutdown()
    server.server_close()


def _post(url, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/classify", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_classify(served):
    url, clf, tuned = served
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        health = json.loads(r.read())
    assert health["classes"] == ["negative", "positive"] and health["n_tokens"] == 4
    status, body = _post(url, {"texts": ["good", "bad", "great"]})
    assert status == 200 and len(body["labels"]) == 3 and len(body["scores"][0]) == 2
    assert body == clf.classify(["good", "bad", "great"])  # the same scores as scoring in-process


@pytest.mark.parametrize("body, code", [
    (b"not json", 400), ({"text": "x"}, 400), ({"texts": []}, 400), ({"texts": [1, 2]}, 400),
    ({"texts": ["a"] * 5}, 413),
])
def test_bad_requests_get_a_clear_4xx(served, body, code):
    status, answer = _post(served[0], body)
    assert status == code and "error" in answer


def test_serving_needs_a_prompt():
    with pytest.raises(PostError, match="--prompt is required"):
        Classifier(ServeConfig(model="tiny-llama", device="cpu"))
