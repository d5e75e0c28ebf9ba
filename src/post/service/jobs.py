"""Transfer jobs: recorded before they start, leased by one server, run in worker processes.

Life of a job (``jobs`` table):

- ``POST /v1/jobs`` inserts it as ``queued`` (committed before anything runs).
- A server's :class:`JobRunner` thread claims it with one conditional UPDATE (``queued``, or
  ``running`` with an expired lease -> ``running``, owner = this server, attempts + 1) and starts
  ``python -m post.service.worker`` for it. While the worker lives the runner renews the lease every
  poll; the worker dies with the server (PR_SET_PDEATHSIG), so a server killed with SIGKILL leaves a
  ``running`` job whose lease runs out and which the next server (or another replica on the same
  database) takes over. The worker's transfer stage resumes from its last checkpoint in
  ``DATA_DIR/jobs/<id>`` and gives the prompt an uninterrupted run gives, bit for bit; an exclusive
  lock on that directory makes sure two workers never run one job at once.
- The worker records the result prompt and ``done`` in one transaction, only if it still owns the
  job; a user error ends it as ``failed`` with the one-line message; a worker that dies is
  restarted until ``--max-attempts``.
- ``POST /v1/jobs/{id}/cancel``: a queued job is cancelled at once; a running one is flagged, and
  its owner kills the worker and marks it ``cancelled``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from post.rundir import read_metrics
from post.service.config import ServiceConfig
from post.service.db import FINAL_STATES, Job

log = logging.getLogger(__name__)


def job_dir(data_dir: Path, job_id: str) -> Path:
    return Path(data_dir) / "jobs" / job_id


def output_prompt_id(job_id: str) -> str:
    """The id the result prompt of a job gets (fixed, so recording it twice is harmless)."""
    return "p-" + job_id.removeprefix("j-")


def progress(data_dir: Path, job: Job) -> dict[str, Any]:
    """Steps done (from the transfer's metrics log) out of the job's steps."""
    if job.status == "done":
        return {"step": job.steps, "steps": job.steps, "fraction": 1.0}
    steps = [int(m["step"]) for m in read_metrics(job_dir(data_dir, job.id)) if "step" in m and "loss" in m]
    step = max(steps, default=0)
    return {"step": step, "steps": job.steps, "fraction": round(step / job.steps, 4)}


def job_view(data_dir: Path, job: Job) -> dict[str, Any]:
    """The public description of a job (no server paths)."""
    return {"id": job.id, "prompt_id": job.prompt_id, "status": job.status, "options": json.loads(job.options),
            "cancel_requested": job.cancel_requested, "attempts": job.attempts, "error": job.error,
            "result_prompt_id": job.result_prompt_id, "progress": progress(data_dir, job),
            "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at}


def request_cancel(s: Session, job: Job) -> None:
    """Cancel a queued job now; flag a running one for its owner."""
    if job.status == "queued":
        job.status, job.finished_at = "cancelled", time.time()
    job.cancel_requested = True


def _claimable(now: float) -> Any:
    return or_(Job.status == "queued", and_(Job.status == "running", Job.lease_until < now))


class JobRunner:
    """The thread of one server that claims jobs, starts their workers, renews leases and cancels."""

    def __init__(self, cfg: ServiceConfig, sessions: sessionmaker[Session], *, poll: float = 0.5) -> None:
        self.cfg, self.sessions, self.poll = cfg, sessions, poll
        self.owner = f"{os.uname().nodename[:30]}-{os.getpid()}-{secrets.token_hex(4)}"
        self.children: dict[str, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="post-jobs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop claiming and kill this server's workers (their jobs resume elsewhere or on restart)."""
        self._stop.set()
        self._thread.join(timeout=10)
        for proc in self.children.values():
            _kill(proc)
        with self.sessions.begin() as s:  # hand the jobs back at once instead of after the lease
            s.execute(update(Job).where(Job.owner == self.owner, Job.status == "running").values(
                status="queued", owner=None, lease_until=0.0))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a database hiccup must not end job handling for good
                log.exception("job runner tick failed")
            self._stop.wait(self.poll)

    def tick(self) -> None:
        """One round: reap finished workers, apply cancels, renew leases, claim new jobs."""
        now = time.time()
        with self.sessions.begin() as s:
            for job_id, proc in list(self.children.items()):
                job = s.get(Job, job_id)
                rc = proc.poll()
                mine = job is not None and job.status == "running" and job.owner == self.owner
                if rc is not None:
                    del self.children[job_id]
                    if mine:  # the worker died without recording an outcome
                        self._died(job, rc, now)
                elif job is not None and job.status in FINAL_STATES and job.owner is None:
                    continue  # the worker recorded its outcome and is exiting
                elif not mine:  # taken over by another server after our lease ran out
                    _kill(proc)
                    del self.children[job_id]
                elif job.cancel_requested:
                    _kill(proc)
                    job.status, job.finished_at, job.owner = "cancelled", now, None
                    del self.children[job_id]
                else:
                    job.lease_until = now + self.cfg.job_lease
        while len(self.children) < self.cfg.job_workers and (job_id := self._claim()) is not None:
            self.children[job_id] = self._spawn(job_id)

    def _died(self, job: Job, rc: int, now: float) -> None:
        if job.attempts >= self.cfg.max_attempts:
            job.status, job.finished_at = "failed", now
            job.error = f"the transfer worker died {job.attempts} times (last exit status {rc}); see the server log."
        else:
            log.warning("worker of job %s exited with %s; it will resume from its checkpoint", job.id, rc)
            job.status, job.owner, job.lease_until = "queued", None, 0.0

    def _claim(self) -> str | None:
        now = time.time()
        with self.sessions.begin() as s:
            candidates = s.scalars(select(Job.id).where(_claimable(now)).order_by(Job.created_at).limit(8)).all()
            for job_id in candidates:
                done = s.execute(update(Job).where(Job.id == job_id, _claimable(now)).values(
                    status="running", owner=self.owner, lease_until=now + self.cfg.job_lease,
                    attempts=Job.attempts + 1))
                if done.rowcount != 1:
                    continue  # another server claimed it first
                job = s.get(Job, job_id)
                s.refresh(job)
                if job.cancel_requested:
                    job.status, job.finished_at, job.owner = "cancelled", now, None
                elif job.attempts > self.cfg.max_attempts:
                    job.status, job.finished_at = "failed", now
                    job.error = f"the job was started {self.cfg.max_attempts} times without finishing."
                else:
                    job.started_at = job.started_at or now
                    return job_id
        return None

    def _spawn(self, job_id: str) -> subprocess.Popen:
        run_dir = job_dir(self.cfg.data_dir, job_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_json = json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items()})
        log.info("starting the worker of job %s", job_id)
        with open(run_dir / "worker.log", "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "post.service.worker", "--job", job_id, "--owner", self.owner,
                 "--parent", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "POST_SERVICE_CONFIG": cfg_json})


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


__all__ = ["FINAL_STATES", "JobRunner", "job_view", "output_prompt_id", "progress", "request_cancel"]
