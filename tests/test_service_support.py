"""Shared pieces of the service tests: prompt files with DP ledgers, a real server on loopback, a client.

(No tests here; ``tests/test_service*.py`` import from it.)
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from post.accounting import PrivacyLedger, compute_epsilon
from post.models import load_model
from post.prompt import init_prompt, save_prompt
from post.tasks import Task

STUDENT, TARGET = "tiny-llama", "tiny-gpt2"
SENTIMENT = Task(label_words={"negative": (" bad",), "positive": (" good",)}, init_text="good or bad")
TOPICS = Task(template="{text} Topic: {mask}", label_words={"neg": (" terrible",), "mid": (" neutral",),
                                                           "pos": (" great", " amazing")}, init_text="topic")


def ledger(noise_multiplier: float = 1.5, steps: int = 50) -> dict:
    """A consistent DP-SGD ledger (ε recomputed by the accountant, as the server will)."""
    kw = dict(noise_multiplier=noise_multiplier, max_grad_norm=1.0, sample_rate=0.05, steps=steps,
              planned_steps=steps, delta=1e-4, accountant="rdp", dataset_size=1000, target_epsilon=None)
    eps = compute_epsilon(noise_multiplier=noise_multiplier, sample_rate=0.05, steps=steps, delta=1e-4,
                          accountant="rdp")
    led = PrivacyLedger(**kw, epsilon=eps)
    return led.public() if hasattr(led, "public") else led.to_dict()  # the ledger as it leaves the user


def write_prompt(path: Path, model: str = STUDENT, *, task: Task = SENTIMENT, n_tokens: int = 4, seed: int = 0,
                 privacy: dict | None | str = "default") -> Path:
    """A prompt file for ``model`` (a DP ledger with ε ≈ 1.4 unless told otherwise)."""
    loaded = load_model(model)
    tensor = init_prompt(loaded, n_tokens, init="random", seed=seed)
    return save_prompt(path, tensor, loaded=loaded, task=task, privacy=ledger() if privacy == "default" else privacy)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def public_file(root: Path) -> Path:
    path = root / "public.txt"
    path.write_text("\n".join(["a good day", "bad service", "great flight", "awful delay", "ok trip",
                               "the seats were fine", "lost my bag", "friendly crew"] * 6))
    return path


class Server:
    """``post provider serve`` as a child process on 127.0.0.1 with tiny models; its output goes to a log file."""

    def __init__(self, data_dir: Path, public: Path, *extra: str, steps: int = 40, checkpoint_every: int = 5) -> None:
        self.data_dir, self.public, self.extra, self.steps = data_dir, public, extra, steps
        self.checkpoint_every = checkpoint_every
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"{data_dir.name}-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "Server":
        args = [sys.executable, "-m", "post", "provider", "serve", "--model", TARGET, "--student", STUDENT,
                "--data-dir", str(self.data_dir), "--port", str(self.port), "--device", "cpu",
                "--public", str(self.public), "--public-limit", "32", "--steps", str(self.steps),
                "--transfer-batch-size", "4", "--lr", "0.01", "--checkpoint-every", str(self.checkpoint_every),
                "--job-lease", "2",
                "--max-texts", "8", "--max-body", "20000", "--max-upload", "200000", *self.extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/v1/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not answer within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def add_tenant(data_dir: Path, name: str) -> str:
    """A new tenant's key, through the real command (it prints the key once)."""
    out = subprocess.run([sys.executable, "-m", "post", "provider", "tenants", "add", name, "--data-dir",
                          str(data_dir)], capture_output=True, text=True, timeout=120, check=True).stdout
    return out.split("API key")[1].split(":", 1)[1].strip()


def client(url: str, key: str | None) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60)


def wait_job(c: httpx.Client, job_id: str, *, until=("done", "failed", "cancelled"), timeout: float = 240) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")
