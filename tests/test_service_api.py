"""The service over HTTP: a real ``post provider serve`` (uvicorn) on 127.0.0.1, a real SQLite file, tiny models.

Round trip (upload -> transfer job -> classify), tenant isolation on every route in both directions,
every bad input of the issue answered with its 4xx code and nothing stored, limits, and the user's commands.
"""

import json

import numpy as np
import pytest

from post.cli import main
from post.models import load_model
from post.prompt import read_prompt
from post.scoring import Encoder, predict_scores
from post.service.auth import add_tenant
from post.service.db import open_db
from post.tasks import Verbalizer
from test_service_support import TARGET, Server, client, ledger, public_file, wait_job, write_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    data = root / "data"
    sessions = open_db(f"sqlite:///{data / 'service.db'}")
    keys = {name: add_tenant(sessions, name)[1] for name in ("alice", "bob", "carol")}
    server = Server(data, public_file(root), "--job-workers", "2", "--rate-limit", "20", "--rate-burst", "40",
                    "--max-epsilon", "5").start()
    try:
        c = {name: client(server.url, key) for name, key in keys.items()}
        files = {"alice": write_prompt(root / "alice.safetensors", seed=1),
                 "bob": write_prompt(root / "bob.safetensors", seed=2, n_tokens=6)}
        ids = {}
        for name in ("alice", "bob"):
            r = c[name].post("/v1/prompts", content=files[name].read_bytes())
            assert r.status_code == 201, r.text
            ids[name] = {"upload": r.json()["id"]}
            r = c[name].post("/v1/jobs", json={"prompt_id": ids[name]["upload"], "alpha": 0.5})
            assert r.status_code == 202 and r.json()["status"] == "queued", r.text
            ids[name]["job"] = r.json()["id"]
        for name in ("alice", "bob"):
            job = wait_job(c[name], ids[name]["job"])
            assert job["status"] == "done", job
            ids[name]["target"] = job["result_prompt_id"]
        yield {"root": root, "data": data, "server": server, "keys": keys, "c": c, "ids": ids, "files": files}
    finally:
        server.stop()


def test_round_trip_scores_equal_in_process_scoring(world):
    c, ids = world["c"]["alice"], world["ids"]["alice"]
    job = c.get(f"/v1/jobs/{ids['job']}").json()
    assert job["progress"] == {"step": 40, "steps": 40, "fraction": 1.0} and job["attempts"] == 1
    texts = ["good", "bad", "a great flight", "awful"]
    r = c.post("/v1/classify", json={"prompt_id": ids["target"], "texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["classes"] == ["negative", "positive"] and len(body["labels"]) == 4
    # The stored result is the transfer's own prompt file, and the service's scores are in-process scoring's.
    stored = read_prompt(next(world["data"].rglob(f"{ids['target']}.safetensors")))
    assert stored.meta["transferred_from"]["model"]["name"] == "tiny-llama"
    target = load_model(TARGET)
    ref = predict_scores(target.model, Encoder(stored.task, target.tokenizer, target.kind, 128),
                         Verbalizer.build(stored.task, target.tokenizer), texts, prompt=stored.tensor, progress=False)
    np.testing.assert_allclose(np.array(body["scores"]), ref, atol=1e-5)
    assert body["labels"] == [body["classes"][i] for i in ref.argmax(1)]


def test_openai_style_completions_select_the_prompt_by_model_name(world):
    c, ids = world["c"]["alice"], world["ids"]["alice"]
    r = c.post("/v1/completions", json={"model": f"{TARGET}:{ids['target']}", "prompt": ["good", "bad"],
                                        "temperature": 0, "max_tokens": 1})
    assert r.status_code == 200, r.text
    ans = r.json()
    classified = c.post("/v1/classify", json={"prompt_id": ids["target"], "texts": ["good", "bad"]}).json()
    assert ans["object"] == "text_completion" and [ch["label"] for ch in ans["choices"]] == classified["labels"]
    words = {"negative": " bad", "positive": " good"}
    assert [ch["text"] for ch in ans["choices"]] == [words[lab] for lab in classified["labels"]]
    r = c.post("/v1/completions", json={"model": f"gpt-4:{ids['target']}", "prompt": "good"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"


def test_lists_show_only_your_own(world):
    for me, other in (("alice", "bob"), ("bob", "alice")):
        c = world["c"][me]
        prompts = {p["id"] for p in c.get("/v1/prompts").json()["prompts"]}
        jobs = {j["id"] for j in c.get("/v1/jobs").json()["jobs"]}
        mine, theirs = world["ids"][me], world["ids"][other]
        assert {mine["upload"], mine["target"]} <= prompts and not {theirs["upload"], theirs["target"]} & prompts
        assert mine["job"] in jobs and theirs["job"] not in jobs


def test_every_route_is_404_for_another_tenants_ids_both_directions(world):
    def calls(c, upload, target, job):
        return [c.get(f"/v1/prompts/{upload}"), c.get(f"/v1/prompts/{target}"),
                c.post("/v1/jobs", json={"prompt_id": upload}), c.get(f"/v1/jobs/{job}"),
                c.post(f"/v1/jobs/{job}/cancel"),
                c.post("/v1/classify", json={"prompt_id": target, "texts": ["good"]}),
                c.post("/v1/completions", json={"model": f"{TARGET}:{target}", "prompt": "good"})]

    for me, other in (("alice", "bob"), ("bob", "alice")):
        c, theirs = world["c"][me], world["ids"][other]
        answers = calls(c, theirs["upload"], theirs["target"], theirs["job"])
        unknown = calls(c, "p-0", "p-1", "j-2")  # ids that exist nowhere: the answers must look the same
        for r, u in zip(answers, unknown):
            assert r.status_code == u.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
            msg = r.json()["error"]["message"]
            for id, stand_in in ((theirs["upload"], "p-0"), (theirs["target"], "p-1"), (theirs["job"], "j-2")):
                msg = msg.replace(id, stand_in)
            assert msg == u.json()["error"]["message"]
    # Nothing of the other tenant's changed: bob's finished job was not cancelled by alice's attempt.
    assert world["c"]["bob"].get(f"/v1/jobs/{world['ids']['bob']['job']}").json()["status"] == "done"


def test_every_route_but_health_needs_a_valid_key(world):
    url = world["server"].url
    ids = world["ids"]["alice"]
    routes = [("GET", "/v1/prompts", None), ("POST", "/v1/prompts", b"x"),
              ("GET", f"/v1/prompts/{ids['upload']}", None),
              ("POST", "/v1/jobs", {"prompt_id": ids["upload"]}), ("GET", "/v1/jobs", None),
              ("GET", f"/v1/jobs/{ids['job']}", None), ("POST", f"/v1/jobs/{ids['job']}/cancel", None),
              ("POST", "/v1/classify", {"prompt_id": ids["target"], "texts": ["a"]}),
              ("POST", "/v1/completions", {"model": f"{TARGET}:{ids['target']}", "prompt": "a"})]
    for key in (None, "post_" + "A" * 43, world["keys"]["alice"][:-2]):
        c = client(url, key)
        for method, path, body in routes:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body else {}
            r = c.request(method, path, **kw)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (method, path, r.text)
    health = client(url, None).get("/v1/health").json()
    assert health["status"] == "ok" and health["backend"] == "transformers"


def _code(r):
    return r.status_code, r.json()["error"]["code"]


def test_bad_requests_get_a_clear_4xx(world):
    c, ids = world["c"]["alice"], world["ids"]["alice"]
    h = {"Content-Type": "application/json"}
    assert _code(c.post("/v1/classify", content=b"{not json", headers=h)) == (400, "malformed_json")
    assert _code(c.post("/v1/classify", json={"texts": ["a"]})) == (400, "bad_request")
    assert _code(c.post("/v1/classify", json={"prompt_id": ids["target"], "texts": []})) == (400, "bad_request")
    assert _code(c.post("/v1/classify", json={"prompt_id": ids["target"], "texts": [1]})) == (400, "bad_request")
    assert _code(c.post("/v1/jobs", json={"prompt_id": ids["upload"], "alpha": 2})) == (400, "bad_request")
    # An accuracy measured on the user's private data is not accepted (it would leave the user outside the ledger).
    assert _code(c.post("/v1/jobs", json={"prompt_id": ids["upload"], "target_zero_shot": 0.7,
                                          "source_accuracy": 0.6})) == (400, "bad_request")
    assert _code(c.post("/v1/classify", json={"prompt_id": ids["target"], "texts": ["a"] * 9})) == (
        413, "too_many_texts")
    assert _code(c.post("/v1/classify", json={"prompt_id": ids["target"], "texts": ["a" * 30000]})) == (
        413, "body_too_large")
    chunked = iter([b'{"texts": ["' + b"a" * 15000, b"a" * 15000 + b'"]}'])  # no Content-Length: counted as read
    assert _code(c.post("/v1/classify", content=chunked, headers=h)) == (413, "body_too_large")
    assert _code(c.post("/v1/classify", json={"prompt_id": ids["upload"], "texts": ["a"]})) == (
        409, "wrong_prompt_kind")
    assert _code(c.post("/v1/jobs", json={"prompt_id": ids["target"]})) == (409, "wrong_prompt_kind")
    assert _code(c.post(f"/v1/jobs/{ids['job']}/cancel")) == (409, "job_finished")
    assert _code(c.get("/v1/jobs/j-nope")) == (404, "not_found")
    assert _code(c.post("/v1/classify", json={"prompt_id": "p-nope", "texts": ["a"]})) == (404, "not_found")
    assert _code(c.get("/v1/nothing-here")) == (404, "not_found")
    assert _code(c.delete("/v1/prompts")) == (405, "method_not_allowed")
    for r in (c.post("/v1/classify", content=b"{", headers=h), c.get("/v1/nothing")):
        err = r.json()["error"]
        assert set(err) == {"code", "message"} and "\n" not in err["message"]


def test_bad_uploads_are_refused_and_nothing_is_stored(world):
    c, root = world["c"]["alice"], world["root"]
    before = c.get("/v1/prompts").json()["prompts"]
    files_before = sorted(p.name for p in world["data"].rglob("*.safetensors"))
    good = world["files"]["alice"].read_bytes()
    edited = bytearray(good)
    edited[-5] ^= 0x01
    cases = {
        "corrupt": (b"garbage" * 10, "bad_prompt_file"),
        "edited": (bytes(edited), "bad_prompt_file"),
        "other student": (write_prompt(root / "x1.safetensors", TARGET).read_bytes(), "wrong_student"),
        "over the policy": (write_prompt(root / "x2.safetensors", privacy=ledger(0.6, 400)).read_bytes(),
                            "privacy_policy"),
        "no ledger": (write_prompt(root / "x3.safetensors", privacy=None).read_bytes(), "privacy_policy"),
        "oversized": (b"\0" * 200_001, "body_too_large"),
        "oversized, chunked": (iter([b"\0" * 150_000] * 2), "body_too_large"),
        "empty": (b"", "bad_request"),
    }
    for name, (data, code) in cases.items():
        r = c.post("/v1/prompts", content=data)
        assert 400 <= r.status_code < 500 and r.json()["error"]["code"] == code, (name, r.text)
    assert c.get("/v1/prompts").json()["prompts"] == before
    assert sorted(p.name for p in world["data"].rglob("*.safetensors")) == files_before


def test_a_tenant_over_its_rate_gets_429_with_retry_after(world):
    c = world["c"]["carol"]
    answers = [c.get("/v1/prompts") for _ in range(120)]
    limited = [r for r in answers if r.status_code == 429]
    assert limited and answers[0].status_code == 200
    assert limited[0].json()["error"]["code"] == "rate_limited" and int(limited[0].headers["Retry-After"]) >= 1
    assert world["c"]["alice"].get("/v1/prompts").status_code == 200  # other tenants are not slowed


def test_cancel_a_job(world):
    c, ids = world["c"]["bob"], world["ids"]["bob"]
    job = c.post("/v1/jobs", json={"prompt_id": ids["upload"]}).json()
    r = c.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    done = wait_job(c, job["id"], timeout=60)
    assert done["status"] == "cancelled" and done["result_prompt_id"] is None


def test_the_openapi_document_lists_the_routes(world):
    doc = client(world["server"].url, None).get("/openapi.json").json()
    assert {"/v1/prompts", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/classify",
            "/v1/completions", "/v1/health"} <= set(doc["paths"])


def test_the_users_commands(world, capsys, monkeypatch):
    url, key = world["server"].url, world["keys"]["alice"]
    monkeypatch.setenv("POST_API_KEY", key)  # the key stays out of argv
    assert main(["user", "upload", str(world["files"]["alice"]), "--server", url, "--transfer", "true",
                 "--alpha", "0.5", "--json", "true"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"]["kind"] == "student" and out["job"]["status"] == "queued"
    assert main(["user", "transfer-status", out["job"]["id"], "--server", url, "--wait", "240"]) == 0
    line = capsys.readouterr().out
    assert " done " in line and "-> prompt p-" in line
    target = line.split("-> prompt ")[1].split()[0]
    assert main(["user", "classify", "--server", url, "--prompt-id", target, "good", "bad"]) == 0
    labels = [row.split("\t")[0] for row in capsys.readouterr().out.strip().splitlines()]
    api = world["c"]["alice"].post("/v1/classify", json={"prompt_id": target, "texts": ["good", "bad"]}).json()
    assert labels == api["labels"]
    assert main(["user", "classify", "--server", url, "--prompt-id", "p-nope", "good"]) == 2
    assert "404 not_found" in capsys.readouterr().err
    monkeypatch.delenv("POST_API_KEY")
    assert main(["user", "transfer-status", "--server", url]) == 2
    assert "no API key" in capsys.readouterr().err


def test_keys_never_reach_the_logs(world):
    logs = world["server"].log.read_text() + "".join(p.read_text() for p in world["data"].rglob("worker.log"))
    assert "/v1/classify" in logs  # the access log is on
    for key in world["keys"].values():
        assert key not in logs and key[5:20] not in logs


def test_a_provider_on_proxy_labels_refuses_alpha_and_transfers_without_it(tmp_path):
    """``--loss proxy-labels``: health says so, a job with α is a 400 and stores nothing, a job without one runs
    that loss (the transferred prompt and the job's result record it, with no α)."""
    data = tmp_path / "data"
    key = add_tenant(open_db(f"sqlite:///{data / 'service.db'}"), "dana")[1]
    server = Server(data, public_file(tmp_path), "--mode", "label-words", "--loss", "proxy-labels", steps=4,
                    checkpoint_every=2).start()
    try:
        c = client(server.url, key)
        health = c.get("/v1/health").json()
        assert (health["transfer_mode"], health["transfer_loss"]) == ("label-words", "proxy-labels")
        upload = c.post("/v1/prompts", content=write_prompt(tmp_path / "p.safetensors", seed=4).read_bytes())
        assert upload.status_code == 201, upload.text
        r = c.post("/v1/jobs", json={"prompt_id": upload.json()["id"], "alpha": 0.5})
        assert _code(r) == (400, "bad_request") and "proxy-labels" in r.json()["error"]["message"]
        assert c.get("/v1/jobs").json()["jobs"] == []
        job = wait_job(c, c.post("/v1/jobs", json={"prompt_id": upload.json()["id"]}).json()["id"])
        assert job["status"] == "done", job
        stored = read_prompt(next(data.rglob(f"{job['result_prompt_id']}.safetensors")))
        assert stored.meta["transferred_from"]["loss"] == "proxy-labels"
        result = json.loads(next(data.rglob("result.json")).read_text())
        assert result["loss"] == "proxy-labels" and result["alpha"] is None
    finally:
        server.stop()
