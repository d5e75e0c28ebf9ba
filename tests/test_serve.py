"""``post provider serve``: the command starts the multi-tenant service (post.service); its options are checked."""

import socket

import pytest

from post.cli import main
from post.errors import ConfigError, PostError
from post.serve import ServeConfig, serve
from post.service.config import ServiceConfig


def test_serve_is_the_service():
    assert ServeConfig is ServiceConfig
    cfg = ServeConfig(model="tiny-gpt2", student="tiny-llama")
    assert cfg.host == "127.0.0.1"  # loopback unless told otherwise
    assert cfg.db_url.startswith("sqlite:///") and cfg.db_url.endswith("post-service/service.db")


@pytest.mark.parametrize("kw, flag", [
    ({"port": 70000}, "--port"), ({"max_epsilon": 0}, "--max-epsilon"), ({"max_batch": 0}, "--max-batch"),
    ({"max_wait_ms": 5000}, "--max-wait-ms"), ({"student": ""}, "--student"), ({"job_lease": 0}, "--job-lease"),
    ({"loss": "ce"}, "--loss"), ({"loss": "proxy-labels"}, "--loss"),  # proxy labels need --mode label-words
])
def test_bad_options_name_their_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        ServeConfig(**{"model": "tiny-gpt2", "student": "tiny-llama", **kw})


def test_the_command_needs_a_student(capsys):
    assert main(["provider", "serve", "--model", "tiny-gpt2"]) == 2
    assert "student" in capsys.readouterr().err


def test_a_taken_port_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PostError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(ServeConfig(model="tiny-gpt2", student="tiny-llama", port=port, device="cpu",
                              data_dir=tmp_path / "svc"))


def test_a_job_queued_with_alpha_fails_under_proxy_labels(tmp_path):
    """A job queued with α under the paper's loss, then run by a server restarted with --loss proxy-labels, is
    refused by the transfer's own check instead of silently dropping the user's α."""
    from post.service.worker import transfer_config

    cfg = ServeConfig(model="tiny-gpt2", student="tiny-llama", mode="label-words", loss="proxy-labels")
    assert transfer_config(cfg, tmp_path / "ps.safetensors", 5, {}).loss == "proxy-labels"
    with pytest.raises(ConfigError, match="--loss"):
        transfer_config(cfg, tmp_path / "ps.safetensors", 5, {"alpha": 0.5})
    plain = ServeConfig(model="tiny-gpt2", student="tiny-llama")
    assert transfer_config(plain, tmp_path / "ps.safetensors", 5, {"alpha": 0.5}).alpha == 0.5
