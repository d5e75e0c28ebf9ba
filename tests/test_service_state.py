"""The service's state without HTTP: migrations, hashed keys, upload verification, rate limits, job leases."""

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect, select

from post.models import load_model
from post.prompt import read_prompt
from post.service.auth import add_tenant, hash_key, tenant_for_key
from post.service.config import ServiceConfig
from post.service.db import ApiKey, Job, Prompt, migrate, open_db, open_engine
from post.service.errors import CODES, ApiError
from post.service.jobs import JobRunner
from post.service.limits import RateLimiter
from post.service.store import ModelIdentity, store_upload
from test_service_support import STUDENT, ledger, write_prompt


@pytest.fixture
def sessions(tmp_path):
    return open_db(f"sqlite:///{tmp_path / 'db' / 'service.db'}")


def test_migrations_create_the_schema_and_are_idempotent(tmp_path):
    engine = open_engine(f"sqlite:///{tmp_path / 's.db'}")
    assert migrate(engine) == "0001" and migrate(engine) == "0001"
    tables = set(inspect(engine).get_table_names())
    assert {"tenants", "api_keys", "prompts", "jobs", "alembic_version"} <= tables


def test_keys_are_shown_once_and_stored_hashed(sessions):
    tenant_id, key = add_tenant(sessions, "alice")
    with sessions() as s:
        rows = s.scalars(select(ApiKey)).all()
        assert [r.key_hash for r in rows] == [hash_key(key)] and key not in json.dumps([r.prefix for r in rows]) + \
            rows[0].key_hash
        assert tenant_for_key(s, key).id == tenant_id
        assert tenant_for_key(s, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert tenant_for_key(s, "not-a-key") is None
    with pytest.raises(Exception, match="exists already"):
        add_tenant(sessions, "alice")
    with pytest.raises(Exception, match="not allowed"):
        add_tenant(sessions, "../etc")


@pytest.fixture(scope="module")
def student():
    return ModelIdentity.of(load_model(STUDENT))


def _upload(sessions, data_dir, data, student, **kw):
    return store_upload(sessions, data_dir, "t-1", data, student=student, max_epsilon=kw.get("max_epsilon", 8.0),
                        require_dp=kw.get("require_dp", True))


def _nothing_stored(sessions, data_dir: Path):
    with sessions() as s:
        assert s.scalars(select(Prompt)).all() == []
    assert not list((data_dir / "prompts").rglob("*")) and not list((data_dir / "tmp").glob("*"))


def test_a_good_upload_is_stored_as_the_same_safetensors_file(sessions, tmp_path, student):
    from post.service.db import Tenant

    src = write_prompt(tmp_path / "ps.safetensors")
    with sessions.begin() as s:  # a tenant row for the foreign key
        s.add(Tenant(id="t-1", name="t1"))
    row = _upload(sessions, tmp_path / "data", src.read_bytes(), student)
    stored = tmp_path / "data" / row.path
    assert stored.read_bytes() == src.read_bytes() and stored.suffix == ".safetensors"
    assert row.kind == "student" and row.epsilon == pytest.approx(read_prompt(src).meta["privacy"]["epsilon"])


@pytest.mark.parametrize("case, code", [
    ("garbage", "bad_prompt_file"), ("truncated", "bad_prompt_file"), ("edited", "bad_prompt_file"),
    ("other-student", "wrong_student"), ("over-policy", "privacy_policy"), ("no-ledger", "privacy_policy"),
    ("forged-ledger", "bad_prompt_file"),
])
def test_bad_uploads_get_their_code_and_nothing_is_stored(sessions, tmp_path, student, case, code):
    good = write_prompt(tmp_path / "ps.safetensors").read_bytes()
    if case == "garbage":
        data = b"\x80\x04 not a safetensors file, maybe a pickle"
    elif case == "truncated":
        data = good[: len(good) // 2]
    elif case == "edited":  # one byte of the tensor flipped: the checksum no longer matches
        data = bytearray(good)
        data[-3] ^= 0x55
        data = bytes(data)
    elif case == "other-student":
        data = write_prompt(tmp_path / "o.safetensors", "tiny-gpt2").read_bytes()
    elif case == "over-policy":
        data = write_prompt(tmp_path / "o.safetensors", privacy=ledger(noise_multiplier=0.6, steps=400)).read_bytes()
    elif case == "no-ledger":
        data = write_prompt(tmp_path / "o.safetensors", privacy=None).read_bytes()
    else:  # a ledger claiming a smaller ε than its own numbers give
        forged = {**ledger(noise_multiplier=0.6, steps=400), "epsilon": 1.0}
        data = write_prompt(tmp_path / "o.safetensors", privacy=forged).read_bytes()
    with pytest.raises(ApiError) as err:
        _upload(sessions, tmp_path / "data", data, student, max_epsilon=5.0)
    assert err.value.code == code and err.value.status == CODES[code] and 400 <= err.value.status < 500
    assert str(tmp_path) not in str(err.value)  # server paths never reach the client
    _nothing_stored(sessions, tmp_path / "data")


def test_the_rate_limiter_is_per_tenant_and_refills():
    now = [100.0]  # a clock that moves only when told (a real one refills during a slow check)
    limiter = RateLimiter(rate=20.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(ApiError) as err:
        limiter.check("a")
    assert err.value.code == "rate_limited" and err.value.retry_after >= 1
    limiter.check("b")  # another tenant has its own bucket
    now[0] += 0.125  # 20/s: two and a half tokens back
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(ApiError):
        limiter.check("a")


def _job(sessions, job_id="j-1", **kw):
    from post.service.db import Tenant

    with sessions.begin() as s:
        if s.get(Tenant, "t-1") is None:
            s.add(Tenant(id="t-1", name="t1"))
            s.flush()
            s.add(Prompt(id="p-1", tenant_id="t-1", kind="student", path="x", sha256="0", model="m", n_tokens=1,
                         classes="[]"))
            s.flush()
        s.add(Job(id=job_id, tenant_id="t-1", prompt_id="p-1", status=kw.get("status", "queued"), options="{}",
                  steps=10, cancel_requested=kw.get("cancel", False), attempts=kw.get("attempts", 0),
                  lease_until=kw.get("lease_until", 0.0), owner=kw.get("owner")))


def _runner(sessions, tmp_path, **kw):
    cfg = ServiceConfig(model="tiny-gpt2", student="tiny-llama", data_dir=tmp_path, job_lease=kw.get("lease", 30.0),
                        max_attempts=kw.get("max_attempts", 3))
    return JobRunner(cfg, sessions)


def test_a_job_is_claimed_by_exactly_one_server(sessions, tmp_path):
    _job(sessions)
    a, b = _runner(sessions, tmp_path), _runner(sessions, tmp_path)
    assert a._claim() == "j-1" and b._claim() is None
    with sessions() as s:
        job = s.get(Job, "j-1")
        assert job.status == "running" and job.owner == a.owner and job.attempts == 1


def test_an_expired_lease_is_taken_over_and_a_live_one_is_not(sessions, tmp_path):
    _job(sessions, "j-live", status="running", owner="dead-or-alive", lease_until=time.time() + 60, attempts=1)
    _job(sessions, "j-dead", status="running", owner="dead", lease_until=time.time() - 1, attempts=1)
    r = _runner(sessions, tmp_path)
    assert r._claim() == "j-dead" and r._claim() is None
    with sessions() as s:
        assert s.get(Job, "j-dead").attempts == 2 and s.get(Job, "j-live").owner == "dead-or-alive"


def test_claims_stop_after_max_attempts_and_cancelled_jobs_are_not_run(sessions, tmp_path):
    _job(sessions, "j-tired", status="running", owner="dead", lease_until=0.0, attempts=2)
    _job(sessions, "j-cancel", status="running", owner="dead", lease_until=0.0, attempts=1, cancel=True)
    r = _runner(sessions, tmp_path, max_attempts=2)
    assert r._claim() is None
    with sessions() as s:
        assert s.get(Job, "j-tired").status == "failed" and "2 times" in s.get(Job, "j-tired").error
        assert s.get(Job, "j-cancel").status == "cancelled"


def test_a_job_that_fails_records_its_one_line_error(sessions, tmp_path, student):
    from post.service.db import Tenant
    from post.service.worker import run_job

    with sessions.begin() as s:
        s.add(Tenant(id="t-1", name="t1"))
    data = tmp_path / "data"
    row = _upload(sessions, data, write_prompt(tmp_path / "ps.safetensors").read_bytes(), student)
    with sessions.begin() as s:
        s.add(Job(id="j-1", tenant_id="t-1", prompt_id=row.id, status="running", options="{}", steps=3,
                  cancel_requested=False, attempts=1, lease_until=time.time() + 60, owner="me"))
    cfg = ServiceConfig(model="tiny-gpt2", student=STUDENT, data_dir=data, public=str(tmp_path / "missing.txt"),
                        db=f"sqlite:///{tmp_path / 'db' / 'service.db'}", device="cpu")
    assert run_job(cfg, "j-1", "someone-else") == 1  # not this server's job: nothing runs
    with sessions() as s:
        assert s.get(Job, "j-1").status == "running"
    assert run_job(cfg, "j-1", "me") == 3
    with sessions() as s:
        job = s.get(Job, "j-1")
        assert job.status == "failed" and "missing.txt" in job.error and "\n" not in job.error and job.owner is None
        assert str(data) not in job.error
