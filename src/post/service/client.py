"""The user's side of the service: a small httpx client (``post user upload|transfer-status|classify``).

The key is sent as ``Authorization: Bearer KEY``; pass it with ``--key`` or, to keep it out of the
process list and shell history, in the environment variable ``POST_API_KEY``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import httpx

from post.errors import PostError

KEY_ENV = "POST_API_KEY"
logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request on stderr is noise for a command


class Client:
    """Calls to one server with one key; every failure is a one-line :class:`PostError`."""

    def __init__(self, server: str, key: str | None, *, timeout: float = 120.0) -> None:
        key = key or os.environ.get(KEY_ENV)
        if not key:
            raise PostError(f"no API key: pass --key or set {KEY_ENV} (post provider tenants add NAME prints one).")
        if not server.startswith(("http://", "https://")):
            raise PostError(f"--server {server!r} is not a URL; use e.g. http://127.0.0.1:8000.")
        self.base = server.rstrip("/")
        self.http = httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        try:
            r = self.http.request(method, self.base + path, **kw)
        except httpx.HTTPError as e:
            raise PostError(f"cannot reach {self.base} ({type(e).__name__}: {e}); is post provider serve "
                            "running there?") from None
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            raise PostError(f"the server refused: {r.status_code} {err.get('code', '?')}: "
                            f"{err.get('message', r.text[:200])}")
        if not isinstance(body, dict):
            raise PostError(f"{self.base}{path} answered {r.status_code} without a JSON object; is it a POST "
                            "service?")
        return body

    def upload(self, path: Path) -> dict[str, Any]:
        p = Path(path)
        if not p.is_file():
            raise PostError(f"no prompt file at {p}; pass the prompt.safetensors that post tune wrote.")
        return self.call("POST", "/v1/prompts", content=p.read_bytes(),
                         headers={"Content-Type": "application/octet-stream"})

    def start_job(self, prompt_id: str, *, alpha: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt_id": prompt_id}
        if alpha is not None:
            body["alpha"] = alpha
        return self.call("POST", "/v1/jobs", json=body)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/jobs/{job_id}")

    def jobs(self) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/jobs")["jobs"]

    def wait(self, job_id: str, timeout: float, poll: float = 1.0) -> dict[str, Any]:
        """Poll a job until it ends or ``timeout`` seconds pass; returns its last status."""
        end = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in ("done", "failed", "cancelled") or time.monotonic() >= end:
                return job
            time.sleep(poll)

    def classify(self, prompt_id: str, texts: list[str]) -> dict[str, Any]:
        return self.call("POST", "/v1/classify", json={"prompt_id": prompt_id, "texts": texts})


def job_line(job: dict[str, Any]) -> str:
    p = job["progress"]
    tail = (f" -> prompt {job['result_prompt_id']}" if job.get("result_prompt_id") else "") + (
        f" ({job['error']})" if job.get("error") else "")
    return f"{job['id']}  {job['status']}  step {p['step']}/{p['steps']}  from {job['prompt_id']}{tail}"
