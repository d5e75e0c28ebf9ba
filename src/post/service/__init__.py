"""The provider's service: many users' soft prompts, transfer jobs and queries behind one authenticated API.

Modules (each small, each tested in ``tests/test_service*.py``):

- :mod:`post.service.config`: :class:`ServiceConfig`, the flags of ``post provider serve``.
- :mod:`post.service.db`: SQLAlchemy tables (tenants, API keys, prompts, jobs) and the Alembic
  migrations that create them (``post/service/migrations``).
- :mod:`post.service.auth`: API keys (random, shown once, stored as SHA-256 hashes).
- :mod:`post.service.store`: verifying an uploaded prompt file and storing it as safetensors on disk.
- :mod:`post.service.engine`: mixed-prompt batched scoring of the target model and the dynamic batcher.
- :mod:`post.service.jobs` / :mod:`post.service.worker`: transfer jobs, leased from the database and
  run in worker processes that resume from the transfer stage's checkpoints.
- :mod:`post.service.app`: the FastAPI routes (``/v1/...``), JSON errors with stable codes, limits.
- :mod:`post.service.client`: the user's side (``post user upload|transfer-status|classify``).
- :mod:`post.service.vllm`: request building for a vLLM server started with ``--enable-prompt-embeds``.
"""
