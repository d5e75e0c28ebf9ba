"""``post provider serve``: the service on uvicorn (loopback by default)."""

from __future__ import annotations

import logging

from post.errors import PostError
from post.service.config import ServiceConfig

log = logging.getLogger(__name__)


def serve(cfg: ServiceConfig) -> None:
    """Load the models, open the database, start the job runner and answer requests until interrupted."""
    import uvicorn

    from post.service.app import create_app
    from post.service.state import Service

    service = Service(cfg)
    try:
        app = create_app(service)
        server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                                               access_log=True, server_header=False))
        print(f"serving {service.target_identity.name} (student {service.student_identity.name}) on "
              f"http://{cfg.host}:{cfg.port} (API under /v1, docs at /docs; data in {service.data_dir})", flush=True)
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind
            server.started = False
        if not server.started:
            raise PostError(f"cannot listen on {cfg.host}:{cfg.port} (in use or not allowed); choose another --port.")
    finally:
        service.close()
