"""The vLLM backend: class scores from a ``vllm serve MODEL --enable-prompt-embeds`` server.

``post provider serve --backend vllm --vllm-url http://127.0.0.1:8001`` scores classify and
completions requests through vLLM (the optional extra ``post[vllm]``, GPU only) instead of this
process's forward; uploads, transfer jobs and everything else stay here. vLLM cannot hold soft
prompts itself, but it accepts a request's input as embeddings. The service builds them the way
the transformers backend does (:class:`post.service.engine.MixedScorer`): row = ``[p (n, d), E[s] (L, d)]``
with E the target's own input-embedding layer (so scaled embeddings stay right; the service still
loads the target for its tokenizer and E) and s the task-templated token ids up to the answer
position; the answer is read at the last position (causal LMs only: vLLM does not serve masked LMs).
vLLM must serve the very weights of ``--model`` (the service cannot check that).

:class:`VllmScorer` sends one ``POST /v1/completions`` per row (``max_tokens`` 1, temperature 0,
``logprobs`` K, ``return_tokens_as_token_ids`` so that top logprobs come keyed ``"token_id:N"``, not
by ambiguous token strings), a batch's rows at once from a thread pool, and turns
``choices[0].logprobs.top_logprobs[0]`` into class scores exactly as :meth:`post.tasks.Verbalizer.class_scores`
does: the mean, over each class's label words, of their first token's value. Two caveats:

- vLLM returns log-probabilities by default, ``logit - logsumexp(logits)``: the class scores are then
  the transformers backend's minus one constant per text (same labels, same softmax over classes).
  Start vLLM with ``--logprobs-mode raw_logits`` to get the transformers backend's numbers.
- A label token outside the top K gets the K-th largest returned value, an upper bound on its own,
  and is counted (:attr:`VllmScorer.missing`) and logged. Raise K (``--vllm-logprobs``, default 20;
  vLLM refuses K above its own ``--max-logprobs``, default 20) until the count stays 0.

vLLM failing (refused connection, timeout, a non-200 answer, a malformed body) is answered 503
``backend_unavailable`` with Retry-After; the log has the details.

vLLM's completions API takes ``prompt_embeds`` as base64 of a ``torch.save``'d tensor, and
``torch.load`` of crafted bytes has been a remote-code-execution CVE. So the service never sends a
tensor it did not check, and :func:`decode_prompt_embeds` (for a receiving side, and the tests)
loads with ``weights_only=True`` and checks again: 2-D, the model's width, a float dtype, a
bounded length, every value finite.

Several replicas: run N ``post provider serve`` processes (each its own vLLM or GPU) with the same
``--db postgresql+psycopg://...`` and a shared ``--data-dir`` (e.g. NFS) behind one reverse proxy;
jobs are leased through the database, so each runs on exactly one replica.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import numpy as np
import torch

from post.errors import PostError
from post.models import LoadedModel
from post.service.engine import MixedScorer, Row, ServedPrompt
from post.service.errors import ApiError

log = logging.getLogger(__name__)

API_KEY_ENV = "POST_VLLM_API_KEY"
TOKEN_ID_PREFIX = "token_id:"
RETRY_AFTER = 10.0

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_embeds(t: object, *, hidden_size: int, max_tokens: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Refuse anything but a finite (L, hidden_size) float tensor with 1 <= L <= max_tokens."""
    if not isinstance(t, torch.Tensor):
        raise ApiError("bad_request", f"prompt embeddings must be a tensor, got {type(t).__name__}.")
    if t.dim() != 2 or t.shape[1] != hidden_size or not 1 <= t.shape[0] <= max_tokens:
        raise ApiError("bad_request", f"prompt embeddings of shape {tuple(t.shape)}; expected (L, {hidden_size}) "
                       f"with 1 <= L <= {max_tokens}.")
    if t.dtype not in FLOAT_DTYPES or (dtype is not None and t.dtype != dtype):
        raise ApiError("bad_request", f"prompt embeddings of dtype {t.dtype}; expected {dtype or 'a float dtype'}.")
    if t.is_sparse or not torch.isfinite(t).all():
        raise ApiError("bad_request", "prompt embeddings must be dense and finite (no NaN or inf).")
    return t


class VllmRequestBuilder:
    """Completions requests with ``prompt_embeds`` for rows of transferred prompts on one target."""

    def __init__(self, embedding: torch.nn.Module, *, model_name: str, max_tokens: int, logprobs: int = 20) -> None:
        self.embedding, self.model_name = embedding, model_name
        self.max_tokens, self.logprobs = max_tokens, logprobs
        weight = embedding.weight
        self.hidden_size, self.dtype = int(weight.shape[1]), weight.dtype

    def embeds(self, prompt: ServedPrompt, text: str) -> torch.Tensor:
        """(n + L, d): the soft prompt, then the embeddings of the templated text's tokens (no padding)."""
        seqs, answers = self._causal(prompt).encode([text])
        return self.row_embeds(prompt, seqs[0][: answers[0] + 1])

    @torch.no_grad()
    def row_embeds(self, prompt: ServedPrompt, ids: Sequence[int]) -> torch.Tensor:
        """(n + L, d) for token ids (L,) that end at the answer position."""
        self._causal(prompt)
        device = self.embedding.weight.device
        tokens = torch.tensor(list(ids), dtype=torch.long, device=device)
        rows = torch.cat([prompt.tensor.to(device, self.dtype), self.embedding(tokens)])
        return check_embeds(rows.cpu(), hidden_size=self.hidden_size, max_tokens=self.max_tokens, dtype=self.dtype)

    def request(self, prompt: ServedPrompt, text: str) -> dict[str, Any]:
        """The JSON body of one ``POST /v1/completions`` to vLLM: one next-token step with its top logprobs."""
        return self.body(self.embeds(prompt, text))

    def row_request(self, row: Row) -> dict[str, Any]:
        """The request body for one :class:`~post.service.engine.Row` (its ids are cut after the answer)."""
        return self.body(self.row_embeds(row.prompt, row.ids[: row.answer + 1]))

    def body(self, embeds: torch.Tensor) -> dict[str, Any]:
        return {"model": self.model_name, "prompt_embeds": encode_prompt_embeds(embeds), "max_tokens": 1,
                "temperature": 0.0, "logprobs": self.logprobs, "return_tokens_as_token_ids": True}

    @staticmethod
    def _causal(prompt: ServedPrompt) -> Any:
        if prompt.encoder.kind != "causal":
            raise ApiError("wrong_prompt_kind", "the vLLM backend serves causal LMs only.")
        return prompt.encoder


def encode_prompt_embeds(t: torch.Tensor) -> str:
    """base64 of ``torch.save(t)``: the form vLLM's completions API reads."""
    buf = io.BytesIO()
    torch.save(t.detach().cpu().contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_prompt_embeds(data: str, *, hidden_size: int, max_tokens: int) -> torch.Tensor:
    """Load and check base64 prompt embeddings; ``weights_only`` refuses anything but plain tensors."""
    try:
        raw = base64.b64decode(data, validate=True)
        t = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to decode is the sender's fault
        raise ApiError("bad_request", f"prompt embeddings could not be read ({type(e).__name__}).") from None
    return check_embeds(t, hidden_size=hidden_size, max_tokens=max_tokens)


def top_logprobs(answer: object) -> dict[int, float]:
    """``{token id: value}`` of the first generated position of a vLLM completions answer.

    Reads ``choices[0].logprobs.top_logprobs[0]``, a ``{"token_id:N": value}`` object (the request sets
    ``return_tokens_as_token_ids``). Raises ValueError saying what is wrong with a malformed answer.
    """
    try:
        top = answer["choices"][0]["logprobs"]["top_logprobs"][0]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].logprobs.top_logprobs[0]") from None
    if not isinstance(top, dict) or not top:
        raise ValueError("top_logprobs[0] is not a non-empty object")
    out: dict[int, float] = {}
    for key, value in top.items():
        if not (isinstance(key, str) and key.startswith(TOKEN_ID_PREFIX) and key[len(TOKEN_ID_PREFIX):].isdigit()):
            raise ValueError(f"top logprobs keyed {key[:40]!r}, not 'token_id:N' (a vLLM that ignores "
                             "return_tokens_as_token_ids)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"a top logprob that is not a number ({str(value)[:40]!r})")
        out[int(key[len(TOKEN_ID_PREFIX):])] = float(value)
    return out


def label_values(top: Mapping[int, float], token_ids: Sequence[int], k: int) -> tuple[np.ndarray, int]:
    """(W,) values of the label tokens and how many were missing from ``top``.

    A missing token gets the K-th largest returned value: every token outside the top K scores at most
    that, so it is an upper bound (the class scores of classes with missing words are over-estimated).
    """
    ranked = sorted(top.values(), reverse=True)
    bound = ranked[min(k, len(ranked)) - 1]
    values = np.array([top.get(int(t), bound) for t in token_ids], dtype=np.float64)
    return values, sum(int(t) not in top for t in token_ids)


class VllmScorer(MixedScorer):
    """:class:`MixedScorer`'s interface (prepare, rows, scores) with the forward done by a vLLM server.

    Prompts and rows are prepared locally (the target's tokenizer and input embeddings); ``scores``
    sends one completions request per row, all rows of a call at once (``workers`` threads).
    """

    def __init__(self, loaded: LoadedModel, max_length: int, *, url: str, model_name: str, logprobs: int = 20,
                 timeout: float = 60.0, workers: int = 32, max_prompt_tokens: int = 4096) -> None:
        if loaded.kind != "causal":
            raise PostError(f"--backend vllm serves causal LMs only; {model_name} is a {loaded.kind} LM. "
                            "Use --backend transformers.")
        super().__init__(loaded, max_length)
        self.url, self.k, self.timeout = url.rstrip("/"), logprobs, timeout
        self.builder = VllmRequestBuilder(self.model.get_input_embeddings(), model_name=model_name,
                                          max_tokens=max_length + max_prompt_tokens, logprobs=logprobs)
        key = os.environ.get(API_KEY_ENV)
        # trust_env=False: no proxy from the environment sees the key or the embeddings
        self.client = httpx.Client(base_url=self.url, timeout=timeout, trust_env=False,
                                   headers={"Authorization": f"Bearer {key}"} if key else None,
                                   limits=httpx.Limits(max_connections=workers, max_keepalive_connections=workers))
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="post-vllm")
        self.missing = 0  # label-token values replaced by the K-th value (the upper-bound fallback)
        self._count = threading.Lock()

    def scores(self, rows: Sequence[Row]) -> list[np.ndarray | BaseException]:
        """Per row, its (C_i,) class scores in its task's class order (see the module doc for their scale), or the
        error its own request met: one tenant's failing row (too long, refused) fails only that tenant's request,
        and vLLM's message about it goes to no one else."""
        futures = [self.pool.submit(self._row, r) for r in rows]
        concurrent.futures.wait(futures)  # all answers (or errors) in: none left behind
        out: list[np.ndarray | BaseException] = []
        for r, f in zip(rows, futures):
            if (error := f.exception()) is not None:
                out.append(error)
                continue
            verb = r.prompt.verbalizer
            values, missing = label_values(f.result(), verb.token_ids.tolist(), self.k)
            if missing:
                with self._count:
                    self.missing += missing
                log.warning("prompt %s: %d of %d label tokens not in vLLM's top %d; scored with the K-th value "
                            "(an upper bound). Raise --vllm-logprobs.", r.prompt.id, missing, len(values), self.k)
            out.append((values @ verb.class_matrix.double().numpy()).astype(np.float32))
        return out

    def _row(self, row: Row) -> dict[int, float]:
        return self._ask(self.builder.row_request(row))

    def _ask(self, body: dict[str, Any]) -> dict[int, float]:
        try:
            answer = self.client.post("/v1/completions", json=body)
        except httpx.TimeoutException:
            log.warning("vLLM at %s did not answer within %g s", self.url, self.timeout)
            raise ApiError("backend_unavailable", f"the model backend did not answer within {self.timeout:g} s; "
                           "retry later.", retry_after=RETRY_AFTER) from None
        except httpx.HTTPError as e:
            log.warning("vLLM at %s cannot be reached: %s: %s", self.url, type(e).__name__, e)
            raise ApiError("backend_unavailable", f"the model backend cannot be reached ({type(e).__name__}); "
                           "retry later.", retry_after=RETRY_AFTER) from None
        if answer.status_code != 200:
            log.warning("vLLM at %s answered HTTP %d: %s", self.url, answer.status_code, answer.text[:1000])
            raise ApiError("backend_unavailable", f"the model backend answered HTTP {answer.status_code} "
                           f"({_message(answer)}).", retry_after=RETRY_AFTER)
        try:
            return top_logprobs(answer.json())
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            log.warning("vLLM at %s answered malformed JSON (%s): %s", self.url, e, answer.text[:1000])
            raise ApiError("backend_unavailable", f"the model backend's answer is malformed ({str(e)[:120]}).",
                           retry_after=RETRY_AFTER) from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _message(answer: httpx.Response) -> str:
    """vLLM's own one-line error message ({"message": ...} or {"error": {"message": ...}}), cut short."""
    try:
        body = answer.json()
        msg = body.get("message") or body.get("error", {}).get("message")
    except (ValueError, AttributeError):
        msg = None
    return " ".join(str(msg or answer.reason_phrase or "no message").split())[:200]
