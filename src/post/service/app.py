"""The HTTP API (FastAPI): versioned routes under ``/v1``, JSON errors with stable codes.

Every route but ``GET /v1/health`` needs ``Authorization: Bearer KEY``. A tenant sees only its
own prompts and jobs: another tenant's id is answered exactly like an unknown one (404
``not_found``). The OpenAPI document is at ``/openapi.json`` and the docs at ``/docs``.

(No ``from __future__ import annotations`` here: FastAPI reads the route signatures' annotations,
some of which are local to :func:`create_app`.)
"""

import json
import logging
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from post import __version__
from post.service.auth import tenant_for_key
from post.service.db import FINAL_STATES, Job, Prompt, Tenant, new_id
from post.service.errors import ApiError
from post.service.jobs import job_view, request_cancel
from post.service.limits import BodyLimit
from post.service.state import Service
from post.service.store import prompt_view, store_upload

log = logging.getLogger(__name__)

UPLOAD_PATH = "/v1/prompts"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobRequest(_Strict):
    prompt_id: str = Field(max_length=64, description="An uploaded (student) prompt of yours.")
    # No accuracy measured on the user's private data is taken: the heuristic α is measured by the provider on
    # public labelled data (post transfer --alpha-public), so nothing outside the ledger leaves the user.
    alpha: float | None = Field(None, ge=0, le=1, description="Weight of the change term; none = the heuristic "
                                "(Eq. 6), measured by the provider on public labelled data. Refused by a provider "
                                "that transfers with proxy labels (GET /v1/health: transfer_loss), which weigh no α.")


class ClassifyRequest(_Strict):
    prompt_id: str = Field(max_length=64, description="A transferred prompt of yours.")
    texts: list[str] = Field(min_length=1, description="Texts to classify.")


class ClassifyResponse(BaseModel):
    prompt_id: str
    classes: list[str]
    labels: list[str]
    scores: list[list[float]]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send sampling options this endpoint ignores

    model: str = Field(max_length=200, description="MODEL:<prompt-id>, e.g. smollm2-135m:p-...")
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=0)


class PromptOut(BaseModel):
    id: str
    kind: str
    model: str
    n_tokens: int
    classes: list[str]
    epsilon: float | None
    delta: float | None
    sha256: str
    job_id: str | None
    created_at: float


class JobOut(BaseModel):
    id: str
    prompt_id: str
    status: str
    options: dict[str, Any]
    cancel_requested: bool
    attempts: int
    error: str | None
    result_prompt_id: str | None
    progress: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None


def _error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(int(err.retry_after + 0.999))} if err.retry_after is not None else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError("malformed_json", "the request body is not valid JSON.")
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return ApiError("bad_request", f"{where}: {first.get('msg', 'invalid')}" + (
        f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""))


def create_app(service: Service) -> FastAPI:
    """The FastAPI application over a :class:`~post.service.state.Service`."""
    cfg = service.cfg
    app = FastAPI(title="POST provider service", version=__version__,
                  description="Upload DP soft prompts tuned on the published student, transfer them to the "
                  "target as jobs, and classify with your transferred prompts.")
    app.add_middleware(BodyLimit, max_body=cfg.max_body, max_upload=cfg.max_upload, upload_path=UPLOAD_PATH)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error_response(ApiError("not_found", "no such route; see /docs."))
        if exc.status_code == 413:
            return _error_response(ApiError("body_too_large", str(exc.detail)))
        if exc.status_code == 405:
            return _error_response(ApiError("method_not_allowed", "this route does not take that method."))
        return _error_response(ApiError("bad_request", str(exc.detail)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(ApiError("internal", "the server failed on this request; the provider's log has "
                                        "the details."))

    def tenant(request: Request) -> Tenant:
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError("unauthorized", "send your API key as 'Authorization: Bearer KEY'.")
        with service.sessions() as s:
            t = tenant_for_key(s, key.strip())
        if t is None:
            raise ApiError("unauthorized", "that API key is not valid.")
        service.limiter.check(t.id)
        return t

    Auth = Annotated[Tenant, Depends(tenant)]

    def own(s: Any, model: type, id: str, t: Tenant, what: str) -> Any:
        row = s.get(model, id) if len(id) <= 64 else None
        if row is None or row.tenant_id != t.id:
            raise ApiError("not_found", f"you have no {what} {id[:64]!r}.")
        return row

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        """Liveness and what is served (no key needed)."""
        return {"status": "ok", "version": __version__, "model": service.target_identity.name,
                "student": service.student_identity.name, "backend": cfg.backend,
                "transfer_mode": cfg.mode, "transfer_loss": cfg.loss}

    @app.post(UPLOAD_PATH, status_code=201, response_model=PromptOut,
              openapi_extra={"requestBody": {"content": {"application/octet-stream": {
                  "schema": {"type": "string", "format": "binary"}}}, "required": True}})
    async def upload(request: Request, t: Auth) -> dict[str, Any]:
        """Upload a prompt file tuned on the student (raw safetensors bytes); it is verified before it is kept."""
        data = await request.body()
        if not data:
            raise ApiError("bad_request", "send the prompt file's bytes as the request body.")
        row = await run_in_threadpool(store_upload, service.sessions, service.data_dir, t.id, data,
                                      student=service.student_identity, max_epsilon=cfg.max_epsilon,
                                      require_dp=cfg.require_dp)
        log.info("tenant %s uploaded prompt %s", t.name, row.id)
        return prompt_view(row)

    @app.get("/v1/prompts")
    def list_prompts(t: Auth) -> dict[str, list[PromptOut]]:
        """Your prompts: uploaded (kind student) and transferred (kind target)."""
        with service.sessions() as s:
            rows = s.scalars(select(Prompt).where(Prompt.tenant_id == t.id).order_by(Prompt.created_at)).all()
        return {"prompts": [PromptOut(**prompt_view(r)) for r in rows]}

    @app.get("/v1/prompts/{prompt_id}", response_model=PromptOut)
    def get_prompt(prompt_id: str, t: Auth) -> dict[str, Any]:
        with service.sessions() as s:
            return prompt_view(own(s, Prompt, prompt_id, t, "prompt"))

    @app.post("/v1/jobs", status_code=202, response_model=JobOut)
    def start_job(body: JobRequest, t: Auth) -> dict[str, Any]:
        """Start a transfer of one of your uploaded prompts to the target (the provider's public data)."""
        with service.sessions.begin() as s:
            prompt = own(s, Prompt, body.prompt_id, t, "prompt")
            if prompt.kind != "student":
                raise ApiError("wrong_prompt_kind", f"prompt {prompt.id} is already transferred; start a job from "
                               "a prompt you uploaded.")
            if body.alpha is not None and cfg.loss != "post":
                raise ApiError("bad_request", f"alpha: this provider transfers with {cfg.loss} (see GET /v1/health), "
                               "which weighs no α; leave alpha out.")
            options = {k: v for k, v in body.model_dump().items() if k != "prompt_id" and v is not None}
            job = Job(id=new_id("j"), tenant_id=t.id, prompt_id=prompt.id, status="queued",
                      options=json.dumps(options), steps=cfg.steps, cancel_requested=False, attempts=0,
                      lease_until=0.0, created_at=time.time())
            s.add(job)
        log.info("tenant %s queued job %s", t.name, job.id)
        return job_view(service.data_dir, job)

    @app.get("/v1/jobs")
    def list_jobs(t: Auth) -> dict[str, list[JobOut]]:
        with service.sessions() as s:
            rows = s.scalars(select(Job).where(Job.tenant_id == t.id).order_by(Job.created_at)).all()
            return {"jobs": [JobOut(**job_view(service.data_dir, j)) for j in rows]}

    @app.get("/v1/jobs/{job_id}", response_model=JobOut)
    def get_job(job_id: str, t: Auth) -> dict[str, Any]:
        """A job's status and progress (steps done of steps)."""
        with service.sessions() as s:
            return job_view(service.data_dir, own(s, Job, job_id, t, "job"))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobOut)
    def cancel_job(job_id: str, t: Auth) -> dict[str, Any]:
        """Cancel a job: a queued one at once, a running one within a second or so."""
        with service.sessions.begin() as s:
            job = own(s, Job, job_id, t, "job")
            if job.status in FINAL_STATES:
                raise ApiError("job_finished", f"job {job.id} has already ended ({job.status}).")
            request_cancel(s, job)
            s.flush()
            return job_view(service.data_dir, job)

    def served_prompt(prompt_id: str, t: Tenant) -> Any:
        with service.sessions() as s:
            prompt = own(s, Prompt, prompt_id, t, "prompt")
        if prompt.kind != "target":
            raise ApiError("wrong_prompt_kind", f"prompt {prompt.id} was uploaded for the student; start a transfer "
                           "job and classify with its result_prompt_id.")
        return service.cache.get(prompt.id, service.data_dir / prompt.path)

    def check_texts(texts: list[str]) -> None:
        if len(texts) > cfg.max_texts:
            raise ApiError("too_many_texts", f"at most {cfg.max_texts} texts per request, got {len(texts)}.")

    @app.post("/v1/classify", response_model=ClassifyResponse)
    def classify(body: ClassifyRequest, t: Auth) -> dict[str, Any]:
        """Labels and class scores (the task's class order) of texts under one of your transferred prompts."""
        check_texts(body.texts)
        prompt = served_prompt(body.prompt_id, t)
        scores = service.score(prompt, body.texts)
        classes = prompt.classes
        return {"prompt_id": prompt.id, "classes": classes, "labels": [classes[int(s.argmax())] for s in scores],
                "scores": [[float(x) for x in s] for s in scores]}

    @app.post("/v1/completions")
    def completions(body: CompletionRequest, t: Auth) -> dict[str, Any]:
        """OpenAI-style completions; ``model`` = MODEL:<prompt-id> selects your transferred prompt.

        The completion of each prompt text is the predicted class's first label word (the model's answer
        under the task's template), with the class scores alongside.
        """
        name, sep, prompt_id = body.model.rpartition(":")
        if not sep or name != service.target_identity.name:
            raise ApiError("unknown_model", f"model {body.model!r} is not served; use "
                           f"{service.target_identity.name}:<prompt-id>.")
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not texts:
            raise ApiError("bad_request", "prompt: give at least one text.")
        check_texts(texts)
        prompt = served_prompt(prompt_id, t)
        scores = service.score(prompt, texts)
        words = prompt.task.label_words
        choices = []
        for i, s in enumerate(scores):
            label = prompt.classes[int(s.argmax())]
            choices.append({"index": i, "text": words[label][0], "finish_reason": "stop", "logprobs": None,
                            "label": label, "class_scores": [float(x) for x in s]})
        used = sum(len(ids) for ids in prompt.encoder.encode(texts)[0]) + prompt.tensor.shape[0] * len(texts)
        return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": body.model,
                "choices": choices, "usage": {"prompt_tokens": used, "completion_tokens": len(choices),
                                              "total_tokens": used + len(choices)}}

    return app
