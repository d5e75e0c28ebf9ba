"""Prompt files on disk, rows in the database: verifying an upload, storing it, reading it back.

An upload is written to a temporary file inside the data directory and checked there with
:func:`post.prompt.read_prompt` (safetensors, never a pickle; checksum over tensor and metadata;
the privacy ledger's ε recomputed by the accountant), then against this provider's policy (ε at
most ``--max-epsilon``, a ledger required unless ``--require-dp false``) and the published
student's identity (fingerprint of config + embedding matrix, tokenizer, width, vocabulary).
Only a file that passes every check is moved to ``DATA_DIR/prompts/<tenant>/<id>.safetensors``
and recorded; anything else is deleted and answered with a 4xx.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy.orm import Session, sessionmaker

from post.errors import PostError
from post.models import LoadedModel, fingerprints, tokenizer_fingerprint
from post.prompt import PromptFile, read_prompt, vocab_size
from post.service.db import Prompt, new_id
from post.service.errors import ApiError


@dataclass(frozen=True)
class ModelIdentity:
    """What a prompt file's ``model`` metadata must match to be used on a model."""

    name: str
    fingerprint: str
    tokenizer: str
    hidden_size: int
    vocab_size: int
    accepted: frozenset[str] = frozenset()  # fingerprints that name this model: this version's and the older fp32 one

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelIdentity:
        current, legacy = fingerprints(loaded.model)
        return cls(loaded.name, current, tokenizer_fingerprint(loaded.tokenizer), loaded.hidden_size,
                   vocab_size(loaded), frozenset((current, legacy)))

    def mismatch(self, meta: dict) -> str | None:
        """Why a prompt's model metadata does not match this model, or None."""
        m = meta["model"]
        if int(m["hidden_size"]) != self.hidden_size or int(m["vocab_size"]) != self.vocab_size:
            return (f"width {m['hidden_size']} and vocabulary {m['vocab_size']}, not {self.hidden_size} and "
                    f"{self.vocab_size}")
        if m.get("tokenizer") not in (None, self.tokenizer):
            return "another tokenizer"
        if m["fingerprint"] not in (self.accepted or {self.fingerprint}):
            return f"fingerprint {m['fingerprint'][:12]}, not {self.fingerprint[:12]}"
        return None


def read_checked(path: Path, shown_as: str) -> PromptFile:
    """:func:`read_prompt` with API errors; the server's paths never appear in a message."""
    try:
        pf = read_prompt(path)
    except PostError as e:
        raise ApiError("bad_prompt_file", str(e).replace(str(path), shown_as)) from None
    if pf.tensor.dtype != torch.float32:
        raise ApiError("bad_prompt_file", f"{shown_as} holds a {pf.tensor.dtype} prompt; prompt files are float32.")
    return pf


def check_policy(pf: PromptFile, *, max_epsilon: float, require_dp: bool) -> None:
    """The provider's privacy policy: a ledger (if required) whose recomputed ε is within the limit."""
    ledger = pf.meta.get("privacy")
    if ledger is None:
        if require_dp:
            raise ApiError("privacy_policy", "the prompt carries no privacy ledger and this provider accepts DP "
                           "prompts only; tune it with post tune --dp.")
        return
    eps = float(ledger["epsilon"])  # read_prompt has recomputed it from the ledger's own numbers
    if not eps <= max_epsilon:
        raise ApiError("privacy_policy", f"the prompt's ledger gives ε = {eps:.4g}, over this provider's limit of "
                       f"{max_epsilon:g}; tune it with a smaller --epsilon.")


def _prompt_row(pf: PromptFile, *, id: str, tenant_id: str, kind: str, rel: str, digest: str,
                job_id: str | None = None) -> Prompt:
    ledger = pf.meta.get("privacy") or {}
    return Prompt(id=id, tenant_id=tenant_id, kind=kind, path=rel, sha256=digest, model=pf.meta["model"]["name"],
                  n_tokens=pf.n_tokens, classes=json.dumps(list(pf.task.class_names)),
                  epsilon=ledger.get("epsilon"), delta=ledger.get("delta"), job_id=job_id)


def store_upload(sessions: sessionmaker[Session], data_dir: Path, tenant_id: str, data: bytes, *,
                 student: ModelIdentity, max_epsilon: float, require_dp: bool) -> Prompt:
    """Verify an uploaded prompt file and store it; raises :class:`ApiError` (and stores nothing) if it fails."""
    tmp_dir = data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".safetensors", dir=tmp_dir)
    tmp = Path(tmp_name)
    final: Path | None = None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        pf = read_checked(tmp, "the uploaded file")
        if pf.meta.get("transferred_from") is not None:
            raise ApiError("wrong_student", "the uploaded prompt is a transferred one; upload the prompt you tuned "
                           f"on {student.name}.")
        if (why := student.mismatch(pf.meta)) is not None:
            raise ApiError("wrong_student", f"the prompt was tuned on {pf.meta['model']['name']} ({why}), not on "
                           f"this provider's student {student.name}; tune it on the published student.")
        check_policy(pf, max_epsilon=max_epsilon, require_dp=require_dp)
        pid = new_id("p")
        rel = f"prompts/{tenant_id}/{pid}.safetensors"
        final = data_dir / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        row = _prompt_row(pf, id=pid, tenant_id=tenant_id, kind="student", rel=rel,
                          digest=hashlib.sha256(data).hexdigest())
        with sessions.begin() as s:
            s.add(row)
        return row
    except BaseException:
        if final is not None:
            final.unlink(missing_ok=True)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def register_output(s: Session, data_dir: Path, src: Path, *, id: str, tenant_id: str, job_id: str) -> Prompt:
    """Copy a finished job's prompt file into the store and add its row to session ``s`` (idempotent by id)."""
    if (row := s.get(Prompt, id)) is not None:
        return row
    rel = f"prompts/{tenant_id}/{id}.safetensors"
    final = data_dir / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    tmp = final.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, final)
    pf = read_prompt(final)
    row = _prompt_row(pf, id=id, tenant_id=tenant_id, kind="target", rel=rel,
                      digest=hashlib.sha256(data).hexdigest(), job_id=job_id)
    s.add(row)
    return row


def prompt_view(row: Prompt) -> dict:
    """The public description of a stored prompt (no server paths)."""
    return {"id": row.id, "kind": row.kind, "model": row.model, "n_tokens": row.n_tokens,
            "classes": json.loads(row.classes), "epsilon": row.epsilon, "delta": row.delta, "sha256": row.sha256,
            "job_id": row.job_id, "created_at": row.created_at}
