"""Requests for a vLLM server that takes prompt embeddings (``vllm serve MODEL --enable-prompt-embeds``).

vLLM (the optional extra ``post[vllm]``, GPU only) cannot hold soft prompts itself, but it accepts
a request's input as embeddings. The service builds them the way the transformers backend does
(:class:`post.service.engine.MixedScorer`): row = ``[p (n, d), E[s] (L, d)]`` with E the target's
own input-embedding layer (so scaled embeddings stay right) and s the task-templated token ids;
the answer is read at the last position (causal LMs only: vLLM does not serve masked LMs).

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
import io
from typing import Any

import torch

from post.service.engine import ServedPrompt
from post.service.errors import ApiError

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

    @torch.no_grad()
    def embeds(self, prompt: ServedPrompt, text: str) -> torch.Tensor:
        """(n + L, d): the soft prompt, then the embeddings of the templated text's tokens (no padding)."""
        if prompt.encoder.kind != "causal":
            raise ApiError("wrong_prompt_kind", "the vLLM backend serves causal LMs only.")
        seqs, _ = prompt.encoder.encode([text])
        ids = torch.tensor(seqs[0], dtype=torch.long, device=self.embedding.weight.device)
        rows = torch.cat([prompt.tensor.to(self.embedding.weight.device, self.dtype), self.embedding(ids)])
        return check_embeds(rows.cpu(), hidden_size=self.hidden_size, max_tokens=self.max_tokens, dtype=self.dtype)

    def request(self, prompt: ServedPrompt, text: str) -> dict[str, Any]:
        """The JSON body of one ``POST /v1/completions`` to vLLM: one next-token step with its top logprobs."""
        return {"model": self.model_name, "prompt_embeds": encode_prompt_embeds(self.embeds(prompt, text)),
                "max_tokens": 1, "temperature": 0.0, "logprobs": self.logprobs}


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
