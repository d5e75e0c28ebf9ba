"""The vLLM backend: the embeddings sent equal the transformers backend's, bad tensors are refused, and
:class:`VllmScorer` against a fake vLLM server on 127.0.0.1 scores like :class:`MixedScorer`.

The fake server (no vllm package, no GPU) decodes ``prompt_embeds``, runs the tiny target on them and
answers in vLLM's completions format; the real vLLM was not run here.
"""

import base64
import io
import pickle
import threading
import time

import numpy as np
import pytest
import torch

from post.config import ConfigError
from post.models import load_model
from post.prompt import init_prompt
from post.service.config import ServiceConfig
from post.service.engine import MixedScorer
from post.service.errors import ApiError
from post.service.vllm import VllmRequestBuilder, VllmScorer, check_embeds, decode_prompt_embeds, label_values
from test_service_support import SENTIMENT, TOPICS, free_port


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])  # gemma3 scales its embeddings by sqrt(d)
def test_embeds_equal_the_transformers_backends_rows(model):
    loaded = load_model(model)
    scorer = MixedScorer(loaded, max_length=64)
    builder = VllmRequestBuilder(loaded.model.get_input_embeddings(), model_name=model, max_tokens=64)
    a = scorer.prepare("a", init_prompt(loaded, 3, init="random", seed=0), SENTIMENT)
    b = scorer.prepare("b", init_prompt(loaded, 6, init="random", seed=1), TOPICS)
    rows = scorer.rows(a, ["good"]) + scorer.rows(b, ["a much longer text about the flight"])
    inputs, answers = scorer.inputs(rows)
    for i, (p, text) in enumerate(((a, "good"), (b, "a much longer text about the flight"))):
        sent = builder.embeds(p, text)
        length = int(inputs["attention_mask"][i].sum())
        assert torch.equal(sent, inputs["inputs_embeds"][i, :length])
        assert int(answers[i]) == length - 1  # vLLM reads the next token after the last row: the same position
        body = builder.request(p, text)
        assert body["model"] == model and body["max_tokens"] == 1
        assert torch.equal(decode_prompt_embeds(body["prompt_embeds"], hidden_size=sent.shape[1], max_tokens=64),
                           sent)


def test_masked_lms_are_refused():
    loaded = load_model("tiny-roberta")
    scorer = MixedScorer(loaded, max_length=64)
    p = scorer.prepare("a", init_prompt(loaded, 2, init="random", seed=0), SENTIMENT)
    with pytest.raises(ApiError, match="causal"):
        VllmRequestBuilder(loaded.model.get_input_embeddings(), model_name="r", max_tokens=64).embeds(p, "x")


@pytest.mark.parametrize("tensor, what", [
    (torch.zeros(3, 8, 2), "shape"), (torch.zeros(3, 7), "shape"), (torch.zeros(0, 8), "shape"),
    (torch.zeros(65, 8), "shape"), (torch.zeros(3, 8, dtype=torch.int64), "dtype"),
    (torch.tensor([[float("nan")] * 8]), "finite"), (torch.tensor([[float("inf")] * 8]), "finite"),
    ([[0.0] * 8], "tensor"),
])
def test_crafted_embeddings_are_refused(tensor, what):
    with pytest.raises(ApiError, match=what):
        check_embeds(tensor, hidden_size=8, max_tokens=64)


class _Boom:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_payload_is_not_executed(capsys):
    buf = io.BytesIO()
    torch.save({"x": _Boom()}, buf)
    payload = base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(ApiError, match="could not be read"):
        decode_prompt_embeds(payload, hidden_size=8, max_tokens=64)
    assert "pwned" not in capsys.readouterr().out
    with pytest.raises(ApiError):
        decode_prompt_embeds(base64.b64encode(pickle.dumps([1.0])).decode(), hidden_size=8, max_tokens=64)


class FakeVllm:
    """A stand-in for ``vllm serve MODEL --enable-prompt-embeds`` on 127.0.0.1 (uvicorn in a thread).

    It reads ``prompt_embeds`` with :func:`decode_prompt_embeds`, runs the tiny target on them and answers
    like vLLM's completions API: ``choices[0].logprobs.top_logprobs`` = ``[{token: value}]`` with the top K,
    tokens as ``"token_id:N"`` when the request sets ``return_tokens_as_token_ids`` (else decoded strings),
    values log-probabilities (vLLM's default ``--logprobs-mode raw_logprobs``) or logits (``raw_logits``).
    Errors look like vLLM's: ``{"object": "error", "message": ..., "type": ..., "code": ...}``.
    ``fault`` makes it misbehave; ``delay`` holds every answer back (to see requests overlap).
    """

    def __init__(self, model: str, *, mode: str = "raw_logprobs", max_logprobs: int = 20) -> None:
        import uvicorn
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, PlainTextResponse

        self.name, self.mode, self.max_logprobs = model, mode, max_logprobs
        self.loaded = load_model(model)
        self.model = self.loaded.model.eval()
        self.fault: str | None = None
        self.delay = 0.0
        self.long_bytes = 10**9  # fault "long": refuse requests whose encoded embeddings exceed this
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.inflight = self.max_inflight = 0
        self._lock = threading.Lock()
        app = FastAPI()

        def error(code: int, kind: str, message: str) -> JSONResponse:
            return JSONResponse({"object": "error", "message": message, "type": kind, "param": None, "code": code},
                                status_code=code)

        @app.post("/v1/completions")
        def completions(body: dict, request: Request):  # sync: uvicorn runs requests in threads, like a server
            with self._lock:
                self.bodies.append(body)
                self.auth.append(request.headers.get("authorization"))
                self.inflight += 1
                self.max_inflight = max(self.max_inflight, self.inflight)
            try:
                time.sleep(self.delay)
                if self.fault == "http500":
                    return error(500, "InternalServerError", "CUDA out of memory.")
                if self.fault == "long" and len(base64.b64decode(body["prompt_embeds"])) > self.long_bytes:
                    return error(400, "BadRequestError", "This model's maximum context length is exceeded.")
                if self.fault == "garbage":
                    return PlainTextResponse("<html>502 Bad Gateway</html>")
                if body.get("model") != self.name:
                    return error(404, "NotFoundError", f"The model `{body.get('model')}` does not exist.")
                k = int(body.get("logprobs") or 0)
                if k > self.max_logprobs:
                    return error(400, "BadRequestError", f"Requested sample logprobs of {k}, which is greater than "
                                 f"max allowed: {self.max_logprobs}")
                width = self.model.get_input_embeddings().weight.shape[1]
                embeds = decode_prompt_embeds(body["prompt_embeds"], hidden_size=width, max_tokens=4096)
                with torch.no_grad():
                    logits = self.model(inputs_embeds=embeds[None], use_cache=False).logits[0, -1].double()
                values = logits if self.mode == "raw_logits" else torch.log_softmax(logits, -1)
                top = torch.topk(values, min(k, values.shape[0]))
                as_ids = bool(body.get("return_tokens_as_token_ids")) and self.fault != "strings"
                name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: self.loaded.tokenizer.decode([t]))
                tops = {name(int(t)): float(v) for v, t in zip(top.values, top.indices)}
                best = int(top.indices[0])
                logprobs = {"text_offset": [0], "token_logprobs": [float(values[best])], "tokens": [name(best)],
                            "top_logprobs": [tops]}
                if self.fault == "no_logprobs":
                    logprobs = None
                return {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                        "model": self.name, "choices": [{"index": 0, "text": self.loaded.tokenizer.decode([best]),
                                                         "logprobs": logprobs, "finish_reason": "length",
                                                         "stop_reason": None, "prompt_logprobs": None}],
                        "usage": {"prompt_tokens": embeds.shape[0], "completion_tokens": 1,
                                  "total_tokens": embeds.shape[0] + 1}}
            finally:
                with self._lock:
                    self.inflight -= 1

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "FakeVllm":
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end and self.thread.is_alive(), "the fake vLLM server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _rows(scorer, loaded):
    """Rows of two prompts of two tasks (one with two label words for a class), interleaved, as a batch."""
    a = scorer.prepare("a", init_prompt(loaded, 3, init="random", seed=0), SENTIMENT)
    b = scorer.prepare("b", init_prompt(loaded, 5, init="random", seed=1), TOPICS)
    ra = scorer.rows(a, ["good", "a terrible delay and a lost bag", "fine"])
    rb = scorer.rows(b, ["the crew was friendly", "ok"])
    return [ra[0], rb[0], ra[1], rb[1], ra[2]]


def _vllm_scorer(loaded, url, **kw):
    kw = {"model_name": loaded.name, "logprobs": loaded.model.config.vocab_size, **kw}
    return VllmScorer(loaded, 64, url=url, **kw)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def fake(request):
    with FakeVllm(request.param, mode="raw_logits", max_logprobs=100_000) as f:
        yield f


def test_vllm_scores_equal_the_transformers_backends_with_raw_logits(fake):
    loaded = fake.loaded
    mixed = MixedScorer(loaded, 64)
    scorer = _vllm_scorer(loaded, fake.url)
    try:
        rows = _rows(mixed, loaded)
        fake.bodies.clear()
        fake.delay, fake.max_inflight = 0.3, 0
        try:
            got = scorer.scores(rows)
        finally:
            fake.delay = 0.0
        want = mixed.scores(rows)
        assert [g.shape for g in got] == [(2,), (3,), (2,), (3,), (2,)]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
        assert scorer.missing == 0
        assert fake.max_inflight > 1  # a batch's rows were asked at once
        assert len(fake.bodies) == len(rows)  # one request per row
        for body in fake.bodies:
            assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["return_tokens_as_token_ids"]
            assert body["logprobs"] == loaded.model.config.vocab_size
    finally:
        scorer.close()


def test_vllm_default_logprobs_shift_each_texts_scores_by_one_constant():
    with FakeVllm("tiny-llama", mode="raw_logprobs", max_logprobs=100_000) as fake:
        loaded = fake.loaded
        mixed, scorer = MixedScorer(loaded, 64), _vllm_scorer(loaded, fake.url)
        rows = _rows(mixed, loaded)
        got, want = scorer.scores(rows), mixed.scores(rows)
        scorer.close()
    for g, w in zip(got, want):
        shift = g - w  # = -logsumexp(logits) of that text, the same for every class
        assert np.all(shift < -1) and np.ptp(shift) < 1e-5
        np.testing.assert_allclose(np.exp(g) / np.exp(g).sum(), np.exp(w) / np.exp(w).sum(), atol=1e-6)
        assert g.argmax() == w.argmax()


def test_a_label_token_outside_the_top_k_gets_the_kth_value_an_upper_bound(fake):
    loaded, k = fake.loaded, 3
    mixed, scorer = MixedScorer(loaded, 64), _vllm_scorer(loaded, fake.url, logprobs=k)
    rows = _rows(mixed, loaded)
    try:
        got = scorer.scores(rows)
    finally:
        scorer.close()
    true = mixed.scores(rows)
    missing, over = 0, 0
    builder = VllmRequestBuilder(loaded.model.get_input_embeddings(), model_name="m", max_tokens=4096)
    for row, g, t in zip(rows, got, true):
        with torch.no_grad():
            logits = loaded.model(inputs_embeds=builder.row_embeds(row.prompt, row.ids)[None]).logits[0, -1].double()
        kth = torch.topk(logits, k).values[-1]
        ids = row.prompt.verbalizer.token_ids
        expect = torch.where(logits[ids] >= kth, logits[ids], kth) @ row.prompt.verbalizer.class_matrix.double()
        np.testing.assert_allclose(g, expect.numpy(), atol=1e-5, rtol=0)
        missing += int((logits[ids] < kth).sum())
        assert np.all(g >= t - 1e-5)  # never below the true score
        over += int(np.any(g > t + 1e-4))
    assert missing > 0 and over > 0, "the tiny models' label words should fall outside a top 3"
    assert scorer.missing == missing


def test_the_vllm_api_key_comes_from_the_environment(fake, monkeypatch):
    rows = _rows(MixedScorer(fake.loaded, 64), fake.loaded)[:1]
    for key, header in ((None, None), ("sk-vllm-123", "Bearer sk-vllm-123")):
        if key:
            monkeypatch.setenv("POST_VLLM_API_KEY", key)
        else:
            monkeypatch.delenv("POST_VLLM_API_KEY", raising=False)
        scorer = _vllm_scorer(fake.loaded, fake.url)
        fake.auth.clear()
        scorer.scores(rows)
        scorer.close()
        assert fake.auth == [header]


def test_label_values_reads_the_kth_value_not_the_smallest():
    # vLLM adds the sampled token to the top K when it is not there (sampling): the bound is the K-th value.
    values, missing = label_values({5: -1.0, 7: -2.0, 9: -9.0}, [7, 11], k=2)
    assert values.tolist() == [-2.0, -2.0] and missing == 1


def _scores_or_raise(scorer, rows):
    """The scores, or the first row's error raised (each row of a failing backend carries its own)."""
    out = scorer.scores(rows)
    errors = [x for x in out if isinstance(x, BaseException)]
    if errors:
        assert len(errors) == len(out)  # these faults hit every row
        raise errors[0]
    return out


@pytest.mark.parametrize("fault, message", [
    ("http500", "HTTP 500 (CUDA out of memory.)"), ("garbage", "malformed"), ("strings", "token_id"),
    ("no_logprobs", "malformed"), ("model", "HTTP 404 (The model `nope` does not exist.)"),
    ("logprobs", "HTTP 400 (Requested sample logprobs of 200000"),
])
def test_a_misbehaving_backend_is_a_503_backend_unavailable(fake, fault, message):
    loaded = fake.loaded
    kw = {"model_name": "nope"} if fault == "model" else {"logprobs": 200_000} if fault == "logprobs" else {}
    scorer = _vllm_scorer(loaded, fake.url, **kw)
    fake.fault = fault
    try:
        with pytest.raises(ApiError) as e:
            _scores_or_raise(scorer, _rows(MixedScorer(loaded, 64), loaded))
    finally:
        fake.fault = None
        scorer.close()
    assert e.value.code == "backend_unavailable" and e.value.status == 503 and e.value.retry_after
    assert message in str(e.value) and fake.url not in str(e.value)


def test_a_down_or_slow_backend_is_a_503_backend_unavailable(fake):
    loaded = fake.loaded
    rows = _rows(MixedScorer(loaded, 64), loaded)
    down = _vllm_scorer(loaded, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ApiError, match="cannot be reached") as e:
        _scores_or_raise(down, rows)
    assert e.value.code == "backend_unavailable" and e.value.status == 503
    down.close()
    slow = _vllm_scorer(loaded, fake.url, timeout=0.3)
    fake.delay = 2.0
    try:
        with pytest.raises(ApiError, match="did not answer within 0.3 s") as e:
            _scores_or_raise(slow, rows)
    finally:
        fake.delay = 0.0
        slow.close()
    assert e.value.code == "backend_unavailable"


def test_masked_lm_targets_are_refused_by_the_vllm_backend():
    with pytest.raises(Exception, match="causal LMs only"):
        VllmScorer(load_model("tiny-roberta"), 64, url="http://127.0.0.1:1", model_name="r")


def _cfg(**kw):
    return ServiceConfig(model="tiny-gpt2", student="tiny-llama", **kw)


def test_config_selects_the_backend_and_checks_the_vllm_url():
    assert _cfg().backend == "transformers"
    cfg = _cfg(backend="vllm", vllm_url="https://vllm.internal:8001/", vllm_model="served", vllm_logprobs=50)
    assert (cfg.vllm_url, cfg.vllm_model, cfg.vllm_logprobs) == ("https://vllm.internal:8001/", "served", 50)
    with pytest.raises(ConfigError, match="--vllm-url: is required with --backend vllm"):
        _cfg(backend="vllm")
    for bad in ("127.0.0.1:8001", "ftp://h:1", "http://", "http://h:99999", "http://h:8001/?x=1"):
        with pytest.raises(ConfigError, match="--vllm-url: must be an http"):
            _cfg(backend="vllm", vllm_url=bad)
    with pytest.raises(ConfigError, match="--vllm-url: give the base URL without /v1"):
        _cfg(backend="vllm", vllm_url="http://127.0.0.1:8001/v1/")
    with pytest.raises(ConfigError, match="--vllm-url: must not carry credentials"):
        _cfg(backend="vllm", vllm_url="http://user:secret@h:8001")
    with pytest.raises(ConfigError, match="--vllm-url: is only used with --backend vllm"):
        _cfg(vllm_url="http://127.0.0.1:8001")
    with pytest.raises(ConfigError, match="--backend"):
        _cfg(backend="onnx")
    with pytest.raises(ConfigError, match="--vllm-logprobs"):
        _cfg(backend="vllm", vllm_url="http://h", vllm_logprobs=0)
    with pytest.raises(ConfigError, match="--vllm-timeout"):
        _cfg(backend="vllm", vllm_url="http://h", vllm_timeout=0)


def test_serve_without_a_vllm_url_stops_with_one_line(capsys):
    from post.cli import main

    assert main(["provider", "serve", "--model", "tiny-gpt2", "--student", "tiny-llama", "--backend", "vllm"]) != 0
    err = capsys.readouterr().err
    assert "--vllm-url" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_service_with_backend_vllm_classifies_like_the_transformers_backend(tmp_path):
    """A real ``post provider serve --backend vllm`` (uvicorn, SQLite) against the fake vLLM: upload, transfer,
    classify; the scores are in-process transformers scoring's, and a failing vLLM is a 503."""
    from post.prompt import read_prompt
    from post.scoring import Encoder, predict_scores
    from post.service.auth import add_tenant
    from post.service.db import open_db
    from post.tasks import Verbalizer
    from test_service_support import STUDENT, TARGET, Server, client, public_file, wait_job, write_prompt

    data = tmp_path / "data"
    key = add_tenant(open_db(f"sqlite:///{data / 'service.db'}"), "alice")[1]
    with FakeVllm(TARGET, mode="raw_logits", max_logprobs=100_000) as fake:
        server = Server(data, public_file(tmp_path), "--backend", "vllm", "--vllm-url", fake.url, "--vllm-logprobs",
                        "512", steps=2, checkpoint_every=1).start()
        try:
            c = client(server.url, key)
            assert c.get("/v1/health").json()["backend"] == "vllm"
            r = c.post("/v1/prompts", content=write_prompt(tmp_path / "p.safetensors", STUDENT, seed=3).read_bytes())
            assert r.status_code == 201, r.text
            r = c.post("/v1/jobs", json={"prompt_id": r.json()["id"], "alpha": 0.5})
            job = wait_job(c, r.json()["id"])
            assert job["status"] == "done", job
            texts = ["good", "bad", "a great flight", "awful"]
            r = c.post("/v1/classify", json={"prompt_id": job["result_prompt_id"], "texts": texts})
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(fake.bodies) == len(texts)  # scored by the (fake) vLLM, one request per text
            stored = read_prompt(next(data.rglob(f"{job['result_prompt_id']}.safetensors")))
            target = load_model(TARGET)
            ref = predict_scores(target.model, Encoder(stored.task, target.tokenizer, target.kind, 128),
                                 Verbalizer.build(stored.task, target.tokenizer), texts, prompt=stored.tensor,
                                 progress=False)
            np.testing.assert_allclose(np.array(body["scores"]), ref, atol=1e-5)
            assert body["labels"] == [body["classes"][i] for i in ref.argmax(1)]
            fake.fault = "http500"
            r = c.post("/v1/classify", json={"prompt_id": job["result_prompt_id"], "texts": texts})
            assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable", r.text
            assert "HTTP 500" in r.json()["error"]["message"] and r.headers.get("retry-after")
        finally:
            server.stop()


def test_one_tenants_failing_row_fails_only_that_tenants_request(fake):
    """Rows of several tenants share a batch; a row vLLM refuses (here: too long) must not fail, or leak its
    error message to, the requests batched with it."""
    from post.service.engine import Batcher

    loaded = fake.loaded
    scorer = _vllm_scorer(loaded, fake.url)
    a = scorer.prepare("a", init_prompt(loaded, 3, init="random", seed=0), SENTIMENT)
    b = scorer.prepare("b", init_prompt(loaded, 3, init="random", seed=1), SENTIMENT)
    short, long = scorer.rows(a, ["good", "fine"]), scorer.rows(b, [" ".join(["word"] * 40)])
    fake.long_bytes = len(base64.b64decode(scorer.builder.row_request(short[0])["prompt_embeds"])) * 2
    fake.fault = "long"
    batcher = Batcher(scorer, max_batch=3, max_wait=5.0, max_queue=8)  # closes at the third row
    try:
        ok, bad = batcher.submit(short), batcher.submit(long)
        got = ok.result(timeout=60)
        error = bad.exception(timeout=60)
    finally:
        fake.fault, fake.long_bytes = None, 10**9
        batcher.close()
        scorer.close()
    assert batcher.stats.forwards == 1  # the three rows went out as one batch
    assert len(got) == 2 and all(np.isfinite(x).all() for x in got)
    assert isinstance(error, ApiError) and error.code == "backend_unavailable" and "maximum context" in str(error)
