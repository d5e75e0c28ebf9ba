"""Small synthetic data and fault helpers shared by the tests."""

import contextlib
import csv
import random
from pathlib import Path

POSITIVE = ["good", "great", "amazing"]
NEGATIVE = ["bad", "awful", "terrible"]


def write_sentiment_csv(path: Path, n: int = 200, seed: int = 0) -> Path:
    """A balanced CSV (text,label) that a soft prompt on tiny-llama learns to ~100%."""
    rng = random.Random(seed)
    rows = [{"text": rng.choice(POSITIVE if i % 2 else NEGATIVE), "label": "positive" if i % 2 else "negative"}
            for i in range(n)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


@contextlib.contextmanager
def interrupted_on_call(monkeypatch, owner, name: str, n: int):
    """Within the block, ``owner.name`` raises KeyboardInterrupt on its n-th call: a crash mid-stage."""
    real = getattr(owner, name)
    calls = 0

    def crash(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, crash)
    try:
        yield
    finally:
        monkeypatch.setattr(owner, name, real)


def launch_failure(proc) -> str:
    """What a failed ``accelerate launch`` printed: the start of its stderr (where a rank's own error or abort
    message comes, before the launcher's summary) and the end (the summary), and the end of stdout."""
    err = proc.stderr
    head = err if len(err) <= 6000 else err[:3500] + "\n[...]\n" + err[-2500:]
    return f"{head}\n-- stdout tail --\n{proc.stdout[-1500:]}"
