"""What one server process holds: the database, both models' identities, the target, batcher and jobs.

The batcher's scorer is :class:`~post.service.engine.MixedScorer` (this process's forward) or, with
``--backend vllm``, :class:`~post.service.vllm.VllmScorer` (the same rows scored by a vLLM server).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from post.resolve import load_configured_model
from post.service.config import ServiceConfig
from post.service.db import open_db
from post.service.engine import Batcher, MixedScorer, PromptCache, ServedPrompt
from post.service.errors import ApiError
from post.service.jobs import JobRunner
from post.service.limits import RateLimiter
from post.service.store import ModelIdentity

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 120.0


class Service:
    """Loads everything once: the target's weights, the student's identity (its weights are then dropped)."""

    def __init__(self, cfg: ServiceConfig, *, run_jobs: bool = True) -> None:
        cfg = dataclasses.replace(cfg, data_dir=Path(cfg.data_dir).resolve())
        self.cfg, self.data_dir = cfg, Path(cfg.data_dir)
        self.sessions = open_db(cfg.db_url)
        student = load_configured_model(cfg, cfg.student)
        self.student_identity = ModelIdentity.of(student)
        del student
        self.target = load_configured_model(cfg, cfg.model)
        self.target_identity = ModelIdentity.of(self.target)
        self.scorer = self._scorer(cfg)
        self.cache = PromptCache(self.scorer, self.target_identity, cfg.prompt_cache)
        self.batcher = Batcher(self.scorer, max_batch=cfg.max_batch, max_wait=cfg.max_wait_ms / 1000,
                               max_queue=cfg.max_queue)
        self.limiter = RateLimiter(cfg.rate_limit, cfg.rate_burst)
        self.runner = JobRunner(cfg, self.sessions)
        if run_jobs:
            self.runner.start()

    def _scorer(self, cfg: ServiceConfig) -> MixedScorer:
        """The forward for classify/completions: this process's target, or a vLLM server (--backend vllm)."""
        if cfg.backend != "vllm":
            return MixedScorer(self.target, cfg.max_length)
        from post.service.vllm import VllmScorer

        return VllmScorer(self.target, cfg.max_length, url=str(cfg.vllm_url), model_name=cfg.vllm_model or cfg.model,
                          logprobs=cfg.vllm_logprobs, timeout=cfg.vllm_timeout, workers=cfg.max_batch)

    def score(self, prompt: ServedPrompt, texts: Sequence[str]) -> list[np.ndarray]:
        """Class scores of ``texts`` under ``prompt``, through the shared batcher."""
        future = self.batcher.submit(self.scorer.rows(prompt, texts))
        try:
            return future.result(timeout=ANSWER_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise ApiError("backend_unavailable", f"no answer from the model within {ANSWER_TIMEOUT:g} s; retry "
                           "later.", retry_after=10) from None

    def close(self) -> None:
        self.runner.close()
        self.batcher.close()
        if (close := getattr(self.scorer, "close", None)) is not None:
            close()
