"""Running the pipeline: every step in turn, skipped, resumed or re-run by its key, then the table and the report.

Each step's *key* is a hash of its resolved config and its deps' keys, kept in ``pipeline.json``.
A step whose result exists under the same key is skipped; a step whose key changed (its own
options, or anything upstream) is re-run from scratch and the pipeline says why; a step interrupted
half-way resumes from its own checkpoint. The summary (``pipeline-result.json``) is written once,
with the report, when every step has finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from post.config import dtype_name
from post.errors import ConfigError, PostError
from post.pipeline.config import PipelineConfig
from post.pipeline.steps import EVALUATE, StepDecl, check_steps, placeholder
from post.progress import duration
from post.results import StageResult, load_result
from post.rundir import RESULT_FILE, read_json, to_plain, write_json

STATE_FILE = "pipeline.json"


def _key(config: Any, deps: list[str], keys: dict[str, str]) -> str:
    blob = json.dumps({"config": to_plain(config), "deps": [keys[d] for d in deps]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _recorded_keys(out: Path) -> dict[str, str]:
    """The step keys the last run of ``out`` recorded (``pipeline.json``), or none."""
    state_path = out / STATE_FILE
    return dict(read_json(state_path).get("keys", {})) if state_path.exists() else {}


def _status(d: Path, recorded: str | None, key: str) -> str:
    """What a step whose directory is ``d`` needs: ``done`` (its result is there under ``key``), ``rerun`` (it ran
    under another key: its options or an input changed), ``resume`` (started, unfinished) or ``run``."""
    finished = (d / RESULT_FILE).exists()
    if finished and recorded == key:
        return "done"
    if d.exists() and recorded not in (None, key):
        return "rerun"
    return "resume" if d.exists() and not finished else "run"


_PLANNED = {"done": "done earlier", "rerun": "would re-run", "resume": "would run", "run": "would run"}


def plan_pipeline(cfg: PipelineConfig, rows: Sequence[StepDecl] | None = None) -> list[dict[str, Any]]:
    """What ``post run`` would do now, without running anything: each step's name, party, what it does and
    ``would run``, ``done earlier`` (its result is there under the same key) or ``would re-run`` (its options or
    an input changed). A step that would run stands in for its result with a placeholder, so every step after it
    whose config reads that result shows as running too. Bad options fail here, as they would in the run."""
    out = Path(cfg.out)
    keys = _recorded_keys(out)
    results: dict[str, StageResult] = {}
    new_keys: dict[str, str] = {}
    plan = []
    for step in check_steps(cfg, rows):
        key = _key(step.build(results), step.deps, new_keys)
        new_keys[step.name] = key
        d = out / step.name
        status = _status(d, keys.get(step.name), key)
        results[step.name] = load_result(d) if status == "done" else placeholder(
            step.decl.stage.result, step.stage, step.name)
        plan.append({"step": step.name, "party": step.party, "what": step.what, "status": _PLANNED[status]})
    return plan


def run_pipeline(cfg: PipelineConfig, *, only: list[str] | None = None, echo: Callable[[str], None] | None = None,
                 rows: Sequence[StepDecl] | None = None) -> dict[str, Any]:
    """Run (or resume) every step; write the table and the report; return the pipeline's result.

    ``rows``: the table of steps (default: :data:`post.pipeline.steps.STEPS`)."""
    from post.report import PIPELINE_RESULT, write_report
    from post.table import TableConfig, table

    say = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PostError(f"cannot create the output directory {out} ({e.strerror}); choose another --out.") from None
    state_path = out / STATE_FILE
    recorded = _recorded_keys(out)
    keys = dict(recorded)
    steps = check_steps(cfg, rows)
    write_json(out / "pipeline-config.json", to_plain(cfg))
    if only:
        names = {s.name for s in steps}
        bad = sorted(set(only) - names)
        if bad:
            raise ConfigError(f"--only: no step {', '.join(bad)}; steps: {', '.join(s.name for s in steps)}.")
    results: dict[str, StageResult] = {}
    new_keys: dict[str, str] = {}
    timings: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    n = len(steps)
    for i, step in enumerate(steps, 1):
        config = step.build(results)
        key = _key(config, step.deps, new_keys)
        new_keys[step.name] = key
        d = out / step.name
        head = f"[{i:2d}/{n}] {step.name:<24} {step.party:<8}"
        status = _status(d, keys.get(step.name), key)
        if status == "done":
            results[step.name] = load_result(d)
            say(f"{head} done earlier ({step.what})")
            timings[step.name] = {"party": step.party, "seconds": results[step.name].seconds, "skipped": True}
            continue
        if only and step.name not in only:
            if not (d / RESULT_FILE).exists():
                raise PostError(f"step {step.name} has not run yet and --only leaves it out; run without --only first.")
            results[step.name] = load_result(d)
            continue
        if status == "rerun":
            changed = [dep for dep in step.deps if recorded.get(dep) not in (None, new_keys[dep])]
            why = f"its input {', '.join(changed)} changed" if changed else "its options changed"
            say(f"{head} re-running: {why}")
            shutil.rmtree(d)
        elif status == "resume":
            say(f"{head} resuming ({step.what})")
        else:
            say(f"{head} running ({step.what})")
        keys[step.name] = key  # before running: an interrupted step resumes under the same key
        write_json(state_path, {"keys": keys})
        t0 = time.perf_counter()
        results[step.name] = step.run(config, d)
        took = time.perf_counter() - t0
        timings[step.name] = {"party": step.party, "seconds": round(took, 3), "skipped": False}
        say(f"{'':7} {step.name:<24} finished in {duration(took)} (pipeline {duration(time.perf_counter() - t_start)})")
    stale = sorted(set(keys) - set(new_keys))
    for name in stale:  # a step this config no longer asks for: its results would mislead the table
        if (out / name).exists():
            shutil.rmtree(out / name)
        keys.pop(name)
    write_json(state_path, {"keys": keys})
    say(f"[table] collecting {len(results)} run directories")
    if (out / "table").exists():  # always rebuilt from the run directories
        shutil.rmtree(out / "table")
    tab = table(TableConfig(runs=[out / s.name for s in steps if s.stage == EVALUATE.name],
                            target=cfg.target), out / "table")
    summary = {"out": str(out), "target": cfg.target, "task": cfg.task, "public": cfg.public,
               "device": cfg.torch_device.type, "dtype": dtype_name(cfg.torch_dtype),
               "steps": {s.name: {"party": s.party, "stage": s.stage, "key": new_keys[s.name],
                                  "what": s.what, **timings.get(s.name, {})} for s in steps},
               "seconds": round(time.perf_counter() - t_start, 3), "table": tab.table}
    summary["report"] = str(write_report(out, summary))
    write_json(out / PIPELINE_RESULT, summary)  # once, with the report: a pipeline-result.json marks a finished run
    return summary
