"""Jobs survive: kill -9 of the whole server (or of a worker) mid-transfer, and the job still finishes
with a prompt bitwise equal to an uninterrupted job's, started once more and recorded once."""

import fcntl
import time

import psutil
import pytest
import torch

from post.prompt import read_prompt
from post.service.auth import add_tenant
from post.service.db import open_db
from test_service_support import Server, client, public_file, wait_job, write_prompt

pytestmark = pytest.mark.slow

STEPS = 600


def _wait_step(c, job_id, at_least, timeout=180):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["progress"]["step"] >= at_least:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach step {at_least}: {job}")


def _tensor(data_dir, prompt_id):
    return read_prompt(next(data_dir.rglob(f"{prompt_id}.safetensors"))).tensor


def _lock_free(path, timeout=30):
    end = time.monotonic() + timeout
    with open(path, "w") as f:
        while time.monotonic() < end:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return True
            except BlockingIOError:
                time.sleep(0.1)
    return False


def test_kill_9_mid_transfer_then_restart_gives_the_uninterrupted_prompt(tmp_path):
    data, public = tmp_path / "data", public_file(tmp_path)
    key = add_tenant(open_db(f"sqlite:///{data / 'service.db'}"), "alice")[1]
    opts = dict(steps=STEPS, checkpoint_every=7)  # kills land between checkpoints: steps are redone on resume
    server = Server(data, public, **opts).start()
    try:
        c = client(server.url, key)
        upload = c.post("/v1/prompts", content=write_prompt(tmp_path / "ps.safetensors").read_bytes()).json()["id"]
        reference = wait_job(c, c.post("/v1/jobs", json={"prompt_id": upload, "alpha": 0.5}).json()["id"])
        assert reference["status"] == "done" and reference["attempts"] == 1

        # 1. The whole server is killed with SIGKILL mid-transfer; its worker dies with it.
        job = c.post("/v1/jobs", json={"prompt_id": upload, "alpha": 0.5}).json()["id"]
        seen = _wait_step(c, job, 30)
        assert seen["status"] == "running" and seen["progress"]["step"] < STEPS
        server.kill9()
        assert _lock_free(data / "jobs" / job / ".lock")  # no worker of the dead server holds the job
        server = Server(data, public, **opts).start()
        c = client(server.url, key)
        resumed = wait_job(c, job)
        assert resumed["status"] == "done" and resumed["attempts"] == 2
        assert "resuming transfer from step" in (data / "jobs" / job / "worker.log").read_text()

        # 2. Only the worker is killed; the server restarts it from the checkpoint.
        job2 = c.post("/v1/jobs", json={"prompt_id": upload, "alpha": 0.5}).json()["id"]
        _wait_step(c, job2, 30)
        workers = [p for p in psutil.Process(server.proc.pid).children() if "post.service.worker" in p.cmdline()]
        assert len(workers) == 1
        workers[0].kill()
        again = wait_job(c, job2)
        assert again["status"] == "done" and again["attempts"] == 2

        ref = _tensor(data, reference["result_prompt_id"])
        for j in (resumed, again):
            assert torch.equal(_tensor(data, j["result_prompt_id"]), ref)  # bitwise
        targets = [p for p in c.get("/v1/prompts").json()["prompts"] if p["kind"] == "target"]
        assert sorted(p["job_id"] for p in targets) == sorted([reference["id"], job, job2])  # each recorded once
    finally:
        server.stop()
