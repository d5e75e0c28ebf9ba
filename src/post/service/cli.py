"""The service's commands, added to ``post provider`` and ``post user`` by :mod:`post.cli`.

- ``post provider serve ...``: start the service (:class:`~post.service.config.ServiceConfig` flags);
  ``--backend vllm --vllm-url URL [--vllm-model NAME] [--vllm-logprobs K]`` scores through a vLLM server
  (:mod:`post.service.vllm`) instead of this process's forward.
- ``post provider tenants add NAME`` (prints the new key once) and ``post provider tenants list``.
- ``post user upload FILE [--transfer true]``, ``post user transfer-status [JOB] [--wait SECONDS]``,
  ``post user classify --prompt-id ID TEXT...`` (all with ``--server URL --key KEY``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from post.cliparse import Parser, config_parser
from post.errors import PostError

PROVIDER = ("serve", "tenants")
USER = ("upload", "transfer-status", "classify")


def _client_parser(description: str) -> Any:
    p = Parser(description=description, exit_on_error=False)
    p.add_argument("--server", type=str, default="http://127.0.0.1:8000", help="The service's base URL.")
    p.add_argument("--key", type=str | None, default=None, help="Your API key (default: $POST_API_KEY).")
    p.add_argument("--json", type=bool, default=False, help="Print the server's JSON answer.")
    return p


def add_command(psub: Any, name: str) -> None:
    """Add the service command ``name`` under ``post provider`` or ``post user``."""
    from post.service.config import ServiceConfig, TenantsConfig

    if name == "serve":
        psub.add_subcommand("serve", config_parser(ServiceConfig, "Serve the target model to many users."),
                            help="Serve the target to many users' prompts: uploads, transfer jobs, queries (/v1).")
    elif name == "tenants":
        tenants = Parser(description="Manage tenants and API keys.", exit_on_error=False)
        psub.add_subcommand("tenants", tenants, help="Add or list the service's tenants (API keys).")
        tsub = tenants.add_subcommands(dest="tenants_command", required=True)
        add = config_parser(TenantsConfig, "Add a tenant and print its API key once.")
        add.add_argument("name", type=str, help="Tenant name (letters, digits, '.', '_', '-').")
        tsub.add_subcommand("add", add, help="Add a tenant and print its API key (shown this once).")
        tsub.add_subcommand("list", config_parser(TenantsConfig, "List tenants."), help="List tenants.")
    elif name == "upload":
        p = _client_parser("Upload a prompt file tuned on the provider's student; optionally start its transfer.")
        p.add_argument("file", type=str, help="The prompt.safetensors post tune wrote.")
        p.add_argument("--transfer", type=bool, default=False, help="Also start a transfer job for it.")
        p.add_argument("--alpha", type=float | None, default=None, help="α for the transfer (default: heuristic).")
        psub.add_subcommand("upload", p, help="Upload a prompt file to a provider's service (and start a transfer).")
    elif name == "transfer-status":
        p = _client_parser("Show your transfer jobs, or one job (optionally waiting for it to end).")
        p.add_argument("job", type=str | None, default=None, nargs="?", help="A job id (default: list all).")
        p.add_argument("--wait", type=float, default=0.0, help="Wait up to this many seconds for the job to end.")
        psub.add_subcommand("transfer-status", p, help="Status of your transfer jobs on a provider's service.")
    elif name == "classify":
        p = _client_parser("Classify texts with one of your transferred prompts on a provider's service.")
        p.add_argument("texts", type=str, nargs="*", default=[], help="Texts to classify.")
        p.add_argument("--prompt_id", type=str, required=True, help="Your transferred prompt's id.")
        p.add_argument("--file", type=str | None, default=None, help="A file with one text per line.")
        psub.add_subcommand("classify", p, help="Classify texts with your transferred prompt on a provider's service.")


def run(command: str, ns: Any) -> None:
    """Run service command ``command`` with its parsed namespace."""
    if command == "serve":
        from post.service.config import ServiceConfig
        from post.service.server import serve

        serve(ServiceConfig(**_build_config_values(ServiceConfig, ns)))
    elif command == "tenants":
        _tenants(ns)
    else:
        _user(command, ns)


def _build_config_values(config: type, ns: Any) -> dict[str, Any]:
    import dataclasses

    values = {f.name: ns.get(f.name) for f in dataclasses.fields(config) if f.init}
    for key in ("data_dir", "cache_dir"):
        if isinstance(values.get(key), str):
            values[key] = Path(values[key])
    return values


def _tenants(ns: Any) -> None:
    from post.service.auth import add_tenant, list_tenants
    from post.service.config import TenantsConfig
    from post.service.db import open_db

    which = ns.tenants_command
    sub = ns[which]
    cfg = TenantsConfig(**_build_config_values(TenantsConfig, sub))
    sessions = open_db(cfg.db_url)
    if which == "add":
        tenant_id, key = add_tenant(sessions, sub.name)
        print(f"tenant {sub.name} ({tenant_id})")
        print(f"API key (shown only now; the service keeps only its hash): {key}")
    else:
        for t in list_tenants(sessions):
            print(f"{t['id']}  {t['name']}")


def _user(command: str, ns: Any) -> None:
    from post.service.client import Client, job_line

    client = Client(ns.server, ns.key)
    if command == "upload":
        prompt = client.upload(Path(ns.file))
        out: dict[str, Any] = {"prompt": prompt}
        lines = [f"uploaded prompt {prompt['id']} (ε = {prompt['epsilon']}, {prompt['n_tokens']} tokens, classes "
                 f"{', '.join(prompt['classes'])})"]
        if ns.transfer:
            job = client.start_job(prompt["id"], alpha=ns.alpha)
            out["job"] = job
            lines.append(f"transfer job {job['id']} {job['status']}; follow it with post user transfer-status "
                         f"{job['id']}")
        _say(ns, out, lines)
    elif command == "transfer-status":
        if ns.job:
            job = client.wait(ns.job, ns.wait) if ns.wait > 0 else client.job(ns.job)
            _say(ns, job, [job_line(job)])
        else:
            jobs = client.jobs()
            _say(ns, {"jobs": jobs}, [job_line(j) for j in jobs] or ["no transfer jobs"])
    elif command == "classify":
        texts = list(ns.texts or [])
        if ns.file:
            try:
                texts += [t for t in Path(ns.file).read_text(encoding="utf-8").splitlines() if t.strip()]
            except OSError as e:
                raise PostError(f"cannot read {ns.file} ({e.strerror}); give a text file, one text per line.") from None
        if not texts:
            raise PostError("no texts: give them as arguments or with --file.")
        answer = client.classify(ns.prompt_id, texts)
        _say(ns, answer, [f"{label}\t{text}" for label, text in zip(answer["labels"], texts)])


def _say(ns: Any, body: dict[str, Any], lines: list[str]) -> None:
    print(json.dumps(body, indent=1) if ns.json else "\n".join(lines))
