"""Errors the API answers with: an HTTP status, a stable machine-readable code and a one-line message.

Every error body is ``{"error": {"code": CODE, "message": "..."}}``; clients branch on the code,
people read the message. The codes below are part of the API and never change meaning.
"""

from __future__ import annotations

CODES: dict[str, int] = {
    "malformed_json": 400,       # the body is not JSON
    "bad_request": 400,          # JSON of the wrong shape (missing or ill-typed fields)
    "unauthorized": 401,         # no key, or not a valid key
    "not_found": 404,            # no such route, or no such id for this tenant (others' ids look the same)
    "unknown_model": 404,        # completions: the model part of NAME:<prompt-id> is not the served model
    "method_not_allowed": 405,   # the route exists but not with this method
    "wrong_prompt_kind": 409,    # e.g. classify with an uploaded (untransferred) prompt
    "job_finished": 409,         # cancel of a job that has already ended
    "body_too_large": 413,       # request body or upload over the limit
    "too_many_texts": 413,       # more texts than --max-texts in one request
    "bad_prompt_file": 422,      # not a readable, intact POST prompt file
    "wrong_student": 422,        # tuned on another model than the published student
    "privacy_policy": 422,       # no ledger, or a ledger whose recomputed ε is over the policy
    "rate_limited": 429,         # this tenant's request rate is over its limit (Retry-After)
    "queue_full": 429,           # the model's queue is full (Retry-After)
    "internal": 500,             # a bug: the message says no more than that
    "backend_unavailable": 503,  # the inference backend could not answer
}


class ApiError(Exception):
    """Raised by a route; answered as JSON with :data:`CODES`' status for ``code``."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(" ".join(message.split()))
        self.code, self.status, self.retry_after = code, CODES[code], retry_after

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": str(self)}}
