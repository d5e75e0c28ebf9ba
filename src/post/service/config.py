"""Options of the provider's service (``post provider serve`` and ``post provider tenants``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from post.config import ModelOptions, require, require_transfer_loss


@dataclass(frozen=True, kw_only=True)
class ServiceConfig(ModelOptions):
    """Serve one target model to many users' soft prompts: uploads, transfer jobs, queries.

    Attributes:
        model: The target model every transferred prompt is for (Φt; alias, hub id or directory).
        student: The student this provider publishes (Φs): uploaded prompts must be tuned on it (fingerprint).
        data_dir: Directory for the database (SQLite default), prompt files and job run directories.
        db: SQLAlchemy database URL (default: sqlite:///DATA_DIR/service.db; postgresql+psycopg://... for
            several replicas).
        host: Address to bind (loopback by default; put TLS in a reverse proxy in front of it).
        port: TCP port.
        max_epsilon: Policy: the largest ε (recomputed from the prompt's own ledger) an upload may carry.
        require_dp: Refuse uploads that carry no privacy ledger.
        public: The provider's public text for transfers (airline, a file, hf:NAME).
        public_limit: Public texts per transfer (seeded subset).
        steps: Transfer steps per job.
        transfer_batch_size: Public examples per transfer step.
        lr: Transfer learning rate.
        mode: Transfer mode: vocab (same tokenizer) or label-words.
        loss: Transfer loss: post (the paper's (1 − α)·L1 + α·L2; a job may give α, else the heuristic on public
            labelled data) or proxy-labels (label-words mode: pt fitted to proxy tuning's class on each public
            text; no α, so a job that gives one is refused).
        checkpoint_every: Transfer checkpoint interval in steps (a killed job resumes from the last one).
        max_length: Maximum tokens per input text.
        max_batch: Most rows (texts) in one forward of the target.
        max_wait_ms: How long the batcher waits for more requests before a forward.
        max_queue: Most requests waiting for the model; more get 429 with Retry-After.
        max_texts: Most texts in one classify/completions request.
        max_body: Largest JSON request body in bytes.
        max_upload: Largest prompt-file upload in bytes.
        rate_limit: Requests per second per tenant (token bucket; 0 disables).
        rate_burst: Token-bucket size per tenant.
        prompt_cache: Transferred prompts kept in memory by id.
        job_workers: Transfer jobs run at once by this server (each in its own process).
        job_lease: Seconds a running job's lease lasts without renewal (a dead server's jobs are taken over
            after this).
        max_attempts: Times a job is started before it is marked failed.
        backend: What scores classify/completions requests: transformers (the target's forward in this process,
            mixed-prompt batches) or vllm (a ``vllm serve MODEL --enable-prompt-embeds`` server; this process
            still loads the target for its tokenizer and input embeddings). Transfer jobs always run here.
        vllm_url: The vLLM server's http(s) base URL, without /v1 (e.g. http://127.0.0.1:8001); needed with
            --backend vllm. Its API key, if it has one, goes in $POST_VLLM_API_KEY.
        vllm_model: The model name vLLM serves the target under (default: --model as given).
        vllm_logprobs: K, the top logprobs asked of vLLM per text; a label token outside the top K is scored with
            the K-th value (an upper bound). vLLM refuses K over its --max-logprobs (default 20).
        vllm_timeout: Seconds to wait for one vLLM answer before the request fails (503 backend_unavailable).
    """

    model: str
    student: str
    data_dir: Path = Path("post-service")
    db: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_epsilon: float = 8.0
    require_dp: bool = True
    public: str = "airline"
    public_limit: int | None = 256
    steps: int = 300
    transfer_batch_size: int = 8
    lr: float = 1e-3
    mode: Literal["vocab", "label-words"] = "vocab"
    loss: Literal["post", "proxy-labels"] = "post"
    checkpoint_every: int = 25
    max_length: int = 128
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_texts: int = 64
    max_body: int = 1 << 20
    max_upload: int = 16 << 20
    rate_limit: float = 50.0
    rate_burst: int = 100
    prompt_cache: int = 256
    job_workers: int = 1
    job_lease: float = 30.0
    max_attempts: int = 3
    backend: Literal["transformers", "vllm"] = "transformers"
    vllm_url: str | None = None
    vllm_model: str | None = None
    vllm_logprobs: int = 20
    vllm_timeout: float = 60.0

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        require(bool(self.model), "model", "must name the target model.")
        require(bool(self.student), "student", "must name the student model users tune on.")
        require(0 <= self.port < 65536, "port", f"must be in [0, 65535], got {self.port}.")
        require(self.max_epsilon > 0, "max_epsilon", f"must be positive, got {self.max_epsilon}.")
        require(self.steps >= 1, "steps", f"must be at least 1, got {self.steps}.")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be a positive number, got {self.lr}.")
        require(self.mode in ("vocab", "label-words"), "mode", f"must be vocab or label-words, got {self.mode!r}.")
        require_transfer_loss(self.loss, self.mode)
        for name in ("transfer_batch_size", "checkpoint_every", "max_batch", "max_queue", "max_texts", "max_body",
                     "max_upload", "rate_burst", "prompt_cache", "job_workers", "max_attempts"):
            require(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}.")
        require(self.public_limit is None or self.public_limit >= 1, "public_limit", "must be at least 1.")
        require(8 <= self.max_length <= 1 << 16, "max_length", f"must be between 8 and 65536, got {self.max_length}.")
        require(0 <= self.max_wait_ms <= 1000, "max_wait_ms", f"must be in [0, 1000], got {self.max_wait_ms}.")
        require(self.rate_limit >= 0, "rate_limit", f"must be non-negative, got {self.rate_limit}.")
        require(self.job_lease > 0, "job_lease", f"must be positive, got {self.job_lease}.")
        self._check_backend()

    def _check_backend(self) -> None:
        require(self.backend in ("transformers", "vllm"), "backend",
                f"must be transformers or vllm, got {self.backend!r}.")
        require(self.vllm_logprobs >= 1, "vllm_logprobs", f"must be at least 1, got {self.vllm_logprobs}.")
        require(self.vllm_timeout > 0 and math.isfinite(self.vllm_timeout), "vllm_timeout",
                f"must be a positive number of seconds, got {self.vllm_timeout}.")
        if self.backend != "vllm":
            require(self.vllm_url is None, "vllm_url", "is only used with --backend vllm; add that or drop it.")
            return
        require(bool(self.vllm_url), "vllm_url", "is required with --backend vllm: the vLLM server's base URL, "
                "e.g. http://127.0.0.1:8001.")
        require(self.vllm_model is None or bool(self.vllm_model.strip()), "vllm_model", "must not be empty.")
        url = urlsplit(str(self.vllm_url))
        try:
            port_ok = url.port is None or url.port > 0
        except ValueError:
            port_ok = False
        require(url.scheme in ("http", "https") and bool(url.hostname) and port_ok and not url.query
                and not url.fragment, "vllm_url", f"must be an http(s) base URL such as http://127.0.0.1:8001, "
                f"got {self.vllm_url!r}.")
        require(url.username is None and url.password is None, "vllm_url",
                "must not carry credentials (they would be logged); put vLLM's API key in $POST_VLLM_API_KEY.")
        require(not url.path.rstrip("/").endswith("/v1"), "vllm_url",
                "give the base URL without /v1 (the service adds /v1/completions).")

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{Path(self.data_dir).resolve() / 'service.db'}"


@dataclass(frozen=True, kw_only=True)
class TenantsConfig:
    """Manage the service's tenants (users) and their API keys.

    Attributes:
        data_dir: The service's data directory (as given to post provider serve).
        db: SQLAlchemy database URL (default: sqlite:///DATA_DIR/service.db).
    """

    data_dir: Path = Path("post-service")
    db: str | None = None

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{Path(self.data_dir).resolve() / 'service.db'}"
