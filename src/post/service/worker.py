"""A transfer job's worker process: ``python -m post.service.worker --job ID --owner OWNER --parent PID``.

Started by :class:`post.service.jobs.JobRunner` with the service's options in the environment
(``POST_SERVICE_CONFIG``, JSON). It dies with its server (PR_SET_PDEATHSIG on Linux, a watcher
thread elsewhere), holds an exclusive lock on the job's run directory while it runs, runs the
transfer stage there (which resumes from its checkpoint) and records the outcome only while its
server still owns the job.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

from post.errors import PostError
from post.service.config import ServiceConfig
from post.service.db import Job, Prompt, open_db
from post.service.jobs import job_dir, output_prompt_id
from post.service.store import register_output

log = logging.getLogger("post.service.worker")


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    if os.getppid() != parent:  # the server died before the death signal was armed
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


@contextlib.contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock (a worker of a dead server may still be exiting)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def transfer_config(cfg: ServiceConfig, prompt_path: Path, steps: int, options: dict):  # noqa: ANN201
    """The transfer stage's config for a job: the provider's public data, loss and options, the user's α if given
    (a job queued with α under the paper's loss and run by a server now set to proxy labels fails: that loss
    refuses an α)."""
    from post.transfer import TransferConfig

    return TransferConfig(
        source_model=cfg.student, prompt=prompt_path, target_model=cfg.model, public=cfg.public,
        public_limit=cfg.public_limit, steps=steps, batch_size=cfg.transfer_batch_size, lr=cfg.lr,
        alpha=options.get("alpha"), mode=cfg.mode, loss=cfg.loss,
        max_length=cfg.max_length, checkpoint_every=cfg.checkpoint_every, cache_dir=cfg.cache_dir, dtype=cfg.dtype,
        device=cfg.device, trust_remote_code=cfg.trust_remote_code)


def run_job(cfg: ServiceConfig, job_id: str, owner: str) -> int:
    """Run (or resume) one job and record its outcome; returns the exit status."""
    from post.transfer import transfer

    sessions = open_db(cfg.db_url)
    data_dir = Path(cfg.data_dir)
    with sessions() as s:
        job, prompt = s.get(Job, job_id), None
        if job is not None:
            prompt = s.get(Prompt, job.prompt_id)
    if job is None or prompt is None or job.owner != owner:
        log.error("job %s is not this server's to run", job_id)
        return 1
    run_dir = job_dir(data_dir, job_id)
    with _exclusive(run_dir):
        try:
            result = transfer(transfer_config(cfg, data_dir / prompt.path, job.steps, json.loads(job.options)),
                              run_dir)
        except PostError as e:
            with sessions.begin() as s:
                row = s.get(Job, job_id)
                if row is not None and row.status == "running" and row.owner == owner:
                    message = str(e).replace(str(data_dir), "DATA_DIR")  # the provider's paths stay its own
                    row.status, row.error, row.finished_at, row.owner = "failed", message, time.time(), None
            log.error("job %s failed: %s", job_id, e)
            return 3
        with sessions.begin() as s:
            row = s.get(Job, job_id)
            if row is None or row.status != "running" or row.owner != owner:
                log.warning("job %s was taken over or cancelled; its result is not recorded here", job_id)
                return 0
            out = register_output(s, data_dir, Path(result.prompt), id=output_prompt_id(job_id),
                                  tenant_id=row.tenant_id, job_id=job_id)
            row.status, row.result_prompt_id, row.finished_at, row.owner = "done", out.id, time.time(), None
    log.info("job %s done: prompt %s", job_id, output_prompt_id(job_id))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m post.service.worker")
    p.add_argument("--job", required=True)
    p.add_argument("--owner", required=True)
    p.add_argument("--parent", type=int, required=True)
    args = p.parse_args(argv)
    _die_with_parent(args.parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s post-worker: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raw = json.loads(os.environ["POST_SERVICE_CONFIG"])
    paths = {f.name for f in fields(ServiceConfig) if "Path" in str(f.type)}
    cfg = ServiceConfig(**{k: (Path(v) if k in paths and v is not None else v) for k, v in raw.items()})
    return run_job(cfg, args.job, args.owner)


if __name__ == "__main__":
    sys.exit(main())
