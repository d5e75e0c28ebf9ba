"""SIGKILL at random moments, then the same command again: the result equals an uninterrupted run's."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

WORDS = "the film was a good movie and the plot was bad but it is great to see this amazing story".split()


def run_post(args: list[str], kill_after: float | None = None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "post", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    if kill_after is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
        return 0
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def interrupted_then_finished(args: list[str], out: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(kills):
        run_post([*args, "--out", str(out)], kill_after=rng.uniform(3.0, 9.0))
        assert not (out / "result.json").exists() or json.loads((out / "result.json").read_text())
    run_post([*args, "--out", str(out)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(400)))
    return path


def test_distill_survives_sigkill(corpus, tmp_path):
    args = ["distill", "--teacher", "tiny-llama", "--keep-layers", "0", "--corpus", str(corpus), "--block-size", "32",
            "--batch-size", "8", "--max-steps", "300", "--checkpoint-every", "7", "--held-out", "8", "--device", "cpu"]
    run_post([*args, "--out", str(tmp_path / "clean")])
    interrupted_then_finished(args, tmp_path / "killed", kills=3, seed=1)
    a = load_file(str(tmp_path / "clean" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tune_survives_sigkill(tmp_path):
    from helpers import write_sentiment_csv

    data = write_sentiment_csv(tmp_path / "d.csv", n=400)
    args = ["tune", "--model", "tiny-llama", "--task", str(data), "--label-words", "negative=bad;positive=good",
            "--n-tokens", "4", "--epochs", "6", "--batch-size", "8", "--lr", "0.1", "--dp", "true",
            "--noise-multiplier", "0.8", "--accountant", "rdp", "--checkpoint-every", "5",
            "--dp-seed", "7"]  # a replayable seed, so that the clean and the killed run draw the same noise
    run_post([*args, "--out", str(tmp_path / "clean")])
    interrupted_then_finished(args, tmp_path / "killed", kills=3, seed=2)
    a = load_file(str(tmp_path / "clean" / "prompt.safetensors"))["prompt"]
    b = load_file(str(tmp_path / "killed" / "prompt.safetensors"))["prompt"]
    assert torch.equal(a, b)
    la = json.loads((tmp_path / "clean" / "privacy.json").read_text())
    lb = json.loads((tmp_path / "killed" / "privacy.json").read_text())
    assert la == lb  # every step before each kill is accounted: the ledger equals the clean run's
