"""``post provider serve``: kept as an import path; the service itself lives in :mod:`post.service`.

The single-model, single-prompt stdlib server this module used to be is replaced by the
multi-tenant FastAPI service (uploads, transfer jobs, mixed-prompt batching; see
:mod:`post.service`). ``ServeConfig`` and ``serve`` are its config and entry point.
"""

from __future__ import annotations

from post.service.config import ServiceConfig as ServeConfig
from post.service.server import serve

__all__ = ["ServeConfig", "serve"]
