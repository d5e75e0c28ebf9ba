"""Progress of a long training loop: a live bar on a terminal, a few plain lines in a log file.

A tqdm bar written to a file (``nohup``, CI, ``post run ... > log``) is a wall of carriage
returns; turned off it says nothing for ten minutes. Off a terminal, :func:`steps` therefore logs
one line every tenth of the run with the rate and the time left.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


class _Lines:
    """tqdm's ``update``/``close`` for a non-terminal: a log line every ``every`` steps."""

    def __init__(self, total: int, initial: int, desc: str, parts: int = 10) -> None:
        self.total, self.n, self.desc = total, initial, desc
        self.every = max(1, (total - initial) // parts)
        self.start, self.t0 = initial, time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.n += k
        done = self.n - self.start
        if done % self.every and self.n != self.total:
            return
        took = time.perf_counter() - self.t0
        rate = took / max(done, 1)
        log.info("%s: step %d/%d, %.2f s/step, %s left", self.desc, self.n, self.total, rate,
                 duration(rate * (self.total - self.n)))

    def close(self) -> None:
        pass


class _Silent:
    def update(self, k: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def duration(seconds: float | None) -> str:
    """The one human-readable duration: ``9`` -> ``9s``, ``75`` -> ``1m15s``, ``3900`` -> ``1h05m``; None -> ``–``."""
    if seconds is None:
        return "–"
    m, s = divmod(int(round(float(seconds))), 60)
    if m >= 60:
        h, m = divmod(m, 60)
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def steps(total: int, *, initial: int = 0, desc: str, enabled: bool = True) -> Any:
    """A progress object with ``update(k)`` and ``close()`` for a loop of ``total`` steps."""
    if not enabled:  # e.g. every process but the main one under accelerate
        return _Silent()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False)
    return _Lines(total, initial, desc)
