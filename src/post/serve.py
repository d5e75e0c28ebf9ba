"""The provider's query endpoint: the target model with a transferred prompt behind HTTP + JSON.

After the transfer the user classifies new texts by querying Φt with pt; this is that service, kept
small on purpose (the standard library's threading HTTP server, one model, one prompt):

- ``GET /health`` -> ``{"model", "classes", "n_tokens", "epsilon"}``
- ``POST /classify`` with ``{"texts": [...]}`` -> ``{"labels": [...], "scores": [[...], ...]}``
  (class scores: mean label-word logits at the answer position, as everywhere else).

It binds to 127.0.0.1 unless told otherwise; put a real gateway in front of it for anything else.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from post.config import ModelOptions, require
from post.errors import PostError

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20


@dataclass(frozen=True, kw_only=True)
class ServeConfig(ModelOptions):
    """Serve a model with a soft prompt for classification queries over HTTP.

    Attributes:
        model: The target model (alias, hub id or directory).
        prompt: The transferred prompt file for that model (or none: zero-shot).
        host: Address to bind (default loopback only).
        port: TCP port (0 picks a free one).
        max_length: Maximum tokens per input.
        batch_size: Texts scored per forward pass.
        max_texts: Most texts accepted in one request.
        max_requests: Stop after answering this many requests (for scripted use and tests).
    """

    model: str
    prompt: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_length: int = 128
    batch_size: int = 32
    max_texts: int = 256
    max_requests: int | None = None

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        require(bool(self.model), "model", "must name a model.")
        require(0 <= self.port < 65536, "port", f"must be in [0, 65535], got {self.port}.")
        require(self.batch_size >= 1 and self.max_texts >= 1, "batch_size", "batch sizes must be at least 1.")
        require(self.max_requests is None or self.max_requests >= 1, "max_requests", "must be at least 1.")


class Classifier:
    """A loaded model, prompt, task, encoder and verbalizer: texts in, class scores out."""

    def __init__(self, cfg: ServeConfig) -> None:
        from post.prompt import load_prompt
        from post.resolve import load_configured_model
        from post.scoring import Encoder
        from post.tasks import Verbalizer

        if cfg.prompt is None:
            raise PostError("--prompt is required: the service answers with the task the prompt file carries.")
        self.loaded = load_configured_model(cfg, cfg.model)
        pf = load_prompt(cfg.prompt, self.loaded)
        self.prompt, self.meta, self.task = pf.tensor.to(self.loaded.model.device), pf.meta, pf.task
        self.encoder = Encoder(self.task, self.loaded.tokenizer, self.loaded.kind, cfg.max_length)
        self.verbalizer = Verbalizer.build(self.task, self.loaded.tokenizer)
        self.batch_size = cfg.batch_size
        self.lock = threading.Lock()  # one forward at a time: the model is not re-entrant on CPU threads

    def classify(self, texts: list[str]) -> dict[str, Any]:
        from post.scoring import predict_scores

        with self.lock, torch.no_grad():
            scores = predict_scores(self.loaded.model, self.encoder, self.verbalizer, texts,
                                    batch_size=self.batch_size, prompt=self.prompt, progress=False)
        names = list(self.task.class_names)
        return {"labels": [names[int(i)] for i in scores.argmax(1)], "scores": scores.tolist(), "classes": names}

    def health(self) -> dict[str, Any]:
        privacy = self.meta.get("privacy") or {}
        return {"model": self.loaded.name, "classes": list(self.task.class_names),
                "n_tokens": int(self.prompt.shape[0]), "epsilon": privacy.get("epsilon")}


def make_server(cfg: ServeConfig, classifier: Classifier) -> ThreadingHTTPServer:
    """An HTTP server bound to (host, port) that answers /health and /classify."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                self._send(200, classifier.health())
            else:
                self._send(404, {"error": "unknown path; use GET /health or POST /classify"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/classify":
                self._send(404, {"error": "unknown path; use POST /classify"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                self._send(413 if length > MAX_BODY else 400, {"error": f"send a JSON body of 1..{MAX_BODY} bytes"})
                return
            try:
                body = json.loads(self.rfile.read(length))
                texts = body["texts"]
                ok = isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                ok = False
            if not ok:
                self._send(400, {"error": 'send {"texts": ["...", ...]} with at least one string'})
                return
            if len(texts) > cfg.max_texts:
                self._send(413, {"error": f"at most {cfg.max_texts} texts per request"})
                return
            self._send(200, classifier.classify(texts))

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.info("%s %s", self.address_string(), format % args)

    try:
        return ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    except OSError as e:
        raise PostError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); choose another --port.") from None


def serve(cfg: ServeConfig) -> None:
    """Load the model and prompt, then answer requests until interrupted (or --max-requests)."""
    classifier = Classifier(cfg)
    server = make_server(cfg, classifier)
    host, port = server.server_address[:2]
    print(f"serving {cfg.model} with {cfg.prompt} on http://{host}:{port} (POST /classify, GET /health)",
          flush=True)
    try:
        if cfg.max_requests is None:
            server.serve_forever()
        else:
            for _ in range(cfg.max_requests):
                server.handle_request()
    finally:
        server.server_close()
