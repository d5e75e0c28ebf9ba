"""Tenants and API keys.

A key is ``post_`` + 32 random bytes (URL-safe base64), printed once when made. Only its SHA-256
is stored: a key has 256 bits of entropy, so a fast hash is enough (no salt or slow KDF is needed
against guessing), and lookup is one indexed equality. Keys travel in the ``Authorization:
Bearer`` header only, never in URLs, so access logs never hold them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from post.errors import PostError
from post.service.db import ApiKey, Tenant, new_id

KEY_PREFIX = "post_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def add_tenant(sessions: sessionmaker[Session], name: str) -> tuple[str, str]:
    """Create tenant ``name`` with one new key; returns (tenant id, the key: shown this once)."""
    if not _NAME.fullmatch(name):
        raise PostError(f"tenant name {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-'.")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    tenant = Tenant(id=new_id("t"), name=name)
    with sessions.begin() as s:
        if s.scalar(select(Tenant).where(Tenant.name == name)) is not None:
            raise PostError(f"a tenant called {name!r} exists already; pick another name.")
        s.add(tenant)
        s.flush()
        s.add(ApiKey(id=new_id("k"), tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:9]))
    return tenant.id, key


def list_tenants(sessions: sessionmaker[Session]) -> list[dict[str, str]]:
    with sessions() as s:
        return [{"id": t.id, "name": t.name} for t in s.scalars(select(Tenant).order_by(Tenant.created_at))]


def tenant_for_key(s: Session, key: str) -> Tenant | None:
    """The tenant owning ``key`` (not revoked), or None."""
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        return None
    digest = hash_key(key)
    row = s.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked.is_(False)))
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return s.get(Tenant, row.tenant_id)

