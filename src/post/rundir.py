"""Run directories: every stage writes the same three files.

- ``config.yaml``: the resolved configuration the stage ran with;
- ``metrics.jsonl``: one JSON object per line, appended as the stage goes;
- ``result.json``: the stage's final figures, written atomically once the stage is done.

A directory holding ``result.json`` is a finished run; nothing else in it is to be trusted
as final. Reports read run directories only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from post.cache import atomic_path
from post.config import dtype_name
from post.errors import PostError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"


def to_plain(value: Any) -> Any:
    """Dataclasses, paths, tuples and numpy/torch scalars -> JSON/YAML-safe Python values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return to_plain(value.item())
    return value


def _dump_json(obj: Any) -> str:
    return json.dumps(to_plain(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename."""
    text = _dump_json(obj)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PostError(f"{path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PostError(f"{path} is not valid JSON ({e}); delete it and re-run the stage.") from None


_ABSENT = object()


def _field_defaults(config: Any) -> dict[str, Any]:
    """The plain default of each field of a dataclass config that has one (nothing for a mapping)."""
    if not dataclasses.is_dataclass(config):
        return {}
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = to_plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = to_plain(f.default_factory())
    return out


class RunDir:
    """One stage's output directory.

    Args:
        path: Directory to create (parents too).
        stage: Stage name written into every metrics line and the result.
        config: The resolved stage config (a dataclass or mapping), saved as ``config.yaml``.
    """

    def __init__(self, path: str | os.PathLike[str], *, stage: str, config: Any) -> None:
        self.path = Path(path)
        self.stage = stage
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".post-write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise PostError(f"cannot write to the output directory {self.path} ({e.strerror}); "
                            "choose another --out.") from None
        self.started = time.time()
        self.config = to_plain(config)
        self._defaults = _field_defaults(config)
        # the dtype the frozen models computed in, as this machine resolved --dtype (auto differs by hardware)
        resolved = getattr(config, "torch_dtype", None)
        self.precision = {"model_dtype": dtype_name(resolved)} if resolved is not None else {}
        saved = self.path / CONFIG_FILE
        if saved.exists():
            self._check_same_config(saved)
        else:
            with atomic_path(saved) as tmp:
                tmp.write_text(yaml.safe_dump({"stage": stage, **self.config}, sort_keys=False), encoding="utf-8")

    def _check_same_config(self, saved: Path) -> None:
        """A run directory belongs to one config: resuming with other settings would mix two runs."""
        try:
            old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict):
            raise PostError(f"{saved} is unreadable; delete the run directory {self.path} or pick another "
                            "--out.") from None
        new = {"stage": self.stage, **self.config}
        # A setting that a later version added, at its default, leaves the run what it was.
        changed = sorted(k for k in set(old) | set(new)
                         if (old[k] if k in old else self._defaults.get(k, _ABSENT)) != new.get(k))
        if changed:
            raise PostError(f"{self.path} holds a {old.get('stage', '?')} run with other settings (changed: "
                            f"{', '.join(changed)}); pick another --out or delete that directory.")

    def existing_result(self) -> dict[str, Any] | None:
        """The result of this run if it already finished (same config), else None."""
        if not self.result_path.exists():
            return None
        result = read_json(self.result_path)
        if not isinstance(result, dict):
            raise PostError(f"{self.result_path} is not a result (a JSON object); delete it and run again.")
        return result

    @property
    def result_path(self) -> Path:
        return self.path / RESULT_FILE

    def log(self, **metrics: Any) -> None:
        """Append one metrics line (with the stage and seconds since start)."""
        line = {"stage": self.stage, "time": round(time.time() - self.started, 3), **to_plain(metrics)}
        try:
            with open(self.path / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:  # a full disk or a vanished directory
            raise PostError(f"could not append to {self.path / METRICS_FILE} ({e.strerror or e}); free some disk "
                            "space or choose another --out, then run the same command again to resume.") from e

    def finish(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``result.json`` (stage, seconds, figures) atomically and return it."""
        full = {"stage": self.stage, "seconds": round(time.time() - self.started, 3), **self.precision,
                **to_plain(result)}
        write_json(self.result_path, full)
        return full


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All lines of a run directory's metrics log (a torn last line is skipped)."""
    out = []
    p = Path(path) / METRICS_FILE
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``result.json`` of a finished run directory."""
    result = read_json(Path(path) / RESULT_FILE)
    if not isinstance(result, dict):
        raise PostError(f"{Path(path) / RESULT_FILE} is not a result (a JSON object); delete it and run again.")
    return result


def default_out(stage: str) -> Path:
    """``runs/<stage>-<timestamp>`` under the current directory."""
    return Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
