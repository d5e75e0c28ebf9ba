"""Progress of a long training loop: a live bar on a terminal, a few plain lines in a log file.

A tqdm bar written to a file (``nohup``, CI, ``post run ... > log``) is a wall of carriage
returns; turned off it says nothing for ten minutes. Off a terminal, :func:`steps` therefore logs
one line every tenth of the run with the rate and the time left. Every progress object is a
context manager that closes itself, however the loop ends.

The training loops (tune, distill, transfer) share the rest of their shell here too: one
finiteness check (:func:`check_finite`) and one error for a run that diverged (:func:`diverged`),
which names the checkpoint kept and what to do.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from post.errors import PostError

log = logging.getLogger(__name__)


class _Closing:
    """``with``: close on the way out, whatever ends the loop."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass


class _Lines(_Closing):
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



class _Silent(_Closing):
    def update(self, k: int = 1) -> None:
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


def diverged(what: str, run_path: str | Path) -> PostError:
    """The error of a training run that stopped being finite: what happened, where the last good checkpoint is."""
    return PostError(f"{what}; the last good checkpoint is kept in {run_path}. Lower --lr and run again with a new "
                     "--out.")


def check_finite(what: str, value: Any, *, step: int, run_path: str | Path, also: Any = None) -> None:
    """Raise :func:`diverged` unless ``value`` (a number or tensor) and ``also`` (a tensor) are finite.

    The message reads "the <what> became <value> at step <step>" (a tensor shows as "non-finite").
    """
    import torch

    def finite(v: Any) -> bool:
        return v is None or (bool(torch.isfinite(v).all()) if isinstance(v, torch.Tensor) else math.isfinite(v))

    if not finite(value) or not finite(also):
        shown = "non-finite" if isinstance(value, torch.Tensor) and value.numel() > 1 else float(value)
        raise diverged(f"the {what} became {shown} at step {step}", run_path)


def steps(total: int, *, initial: int = 0, desc: str, enabled: bool = True) -> Any:
    """A progress object with ``update(k)`` and ``close()`` for a loop of ``total`` steps; use it in ``with``."""
    if not enabled:  # e.g. every process but the main one under accelerate
        return _Silent()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False)
    return _Lines(total, initial, desc)
