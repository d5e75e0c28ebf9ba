"""Stage: collect run directories into the paper's results table (Markdown and CSV).

Rows are private tasks; columns are the methods of the paper's tables, each without and with DP:
zero-shot Φt, PT on Φt, PT on Φs, direct transfer, ZST, POST. Each run directory is placed by
what its ``result.json`` says (stage, model, prompt provenance), so the table reads run
directories only. A cell's time is the cost of producing it: tuning for PT cells; tuning on Φs
plus the transfer for transferred prompts (followed through the prompt files' run directories).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from post.config import require
from post.errors import PostError
from post.rundir import RESULT_FILE, RunDir, read_result

METHODS = ("zero-shot Φt", "PT on Φt", "PT on Φs", "direct transfer", "ZST", "POST",
           "PT on Φs, undistilled", "POST, undistilled Φs")
OPTIONAL = METHODS[6:]  # shown only when some run fills them


@dataclass(frozen=True, kw_only=True)
class TableConfig:
    """Collect finished run directories into the results table.

    Attributes:
        runs: Run directories (or folders containing them) to collect.
        target: The target model Φt as named in the runs (e.g. smollm2-135m).
    """

    runs: list[Path]
    target: str

    def __post_init__(self) -> None:
        require(bool(self.runs), "runs", "must list at least one run directory.")
        require(bool(self.target), "target", "must name the target model.")


@dataclass
class Cell:
    task: str
    method: str
    dp: bool
    accuracy: float
    epsilon: float | None
    delta: float | None
    seconds: float | None
    run: str


def _result_dirs(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        p = Path(p)
        if (p / RESULT_FILE).is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(q.parent for q in p.glob(f"*/{RESULT_FILE}")))
        else:
            raise PostError(f"{p} is not a run directory (no {RESULT_FILE}); pass finished run directories.")
    return out


def _prompt_cost(prompt_path: str | None) -> float | None:
    """Seconds spent producing a prompt: its tuning run, plus the transfer run that produced it."""
    if not prompt_path:
        return None
    run = Path(prompt_path).parent
    try:
        r = read_result(run)
    except PostError:
        return None
    if r.get("stage") == "tune":
        return float(r["train_seconds"])
    if r.get("stage") in ("transfer", "zst"):
        source = json.loads(json.dumps(_config(run))).get("prompt")
        return float(r.get("train_seconds", 0) + r.get("cache_seconds", 0)) + (_prompt_cost(source) or 0.0)
    return None


def _config(run: Path) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except OSError:
        return {}


def _undistilled(model: str | None) -> bool:
    """Whether ``model`` is a student directory written by ``post student`` (layers kept, no training)."""
    if not model:
        return False
    run = Path(model).parent
    try:
        return (run / RESULT_FILE).is_file() and read_result(run).get("stage") == "student"
    except PostError:
        return False


def classify(run: Path, target: str) -> Cell | None:
    """The table cell a finished run fills, or None when it is not a table cell."""
    r = read_result(run)
    stage = r.get("stage")
    if stage == "tune" and r.get("test_accuracy") is not None:
        method = "PT on Φt" if r["model"] == target else (
            "PT on Φs, undistilled" if _undistilled(r["model"]) else "PT on Φs")
        return Cell(r["task"], method, bool(r["dp"]), r["test_accuracy"], r.get("epsilon"), r.get("delta"),
                    r.get("train_seconds"), str(run))
    if stage != "evaluate" or r.get("split") != "test":
        return None
    p = r.get("prompt")
    if p is not None and p.get("method") == "tuned" and p["model"] == r.get("model"):
        # A prompt scored on the model it was tuned on: a PT cell, costed by its tuning run.
        method = "PT on Φt" if r["model"] == target else (
            "PT on Φs, undistilled" if _undistilled(r["model"]) else "PT on Φs")
        return Cell(r["task"], method, p.get("epsilon") is not None, r["accuracy"], p.get("epsilon"), p.get("delta"),
                    _prompt_cost(p.get("path")), str(run))
    if r.get("model") != target:
        return None
    if p is None:
        return Cell(r["task"], "zero-shot Φt", False, r["accuracy"], None, None, r.get("seconds"), str(run))
    method = {"post": "POST", "zst": "ZST"}.get(p.get("method"), "direct transfer" if p["model"] != target else None)
    if method == "POST" and _undistilled(p.get("source_model")):
        method = "POST, undistilled Φs"
    if method is None:
        return None
    return Cell(r["task"], method, p.get("epsilon") is not None, r["accuracy"], p.get("epsilon"), p.get("delta"),
                _prompt_cost(p.get("path")), str(run))


def _label(task: str) -> str:
    """A task's row label: a file's name rather than its whole path."""
    return Path(task).name if "/" in task and Path(task).suffix else task


def build_table(cells: list[Cell]) -> tuple[str, str]:
    """(Markdown, CSV) of the cells: a non-private and a DP table, one row per task, a column per method."""
    tasks = sorted({c.task for c in cells})
    grid: dict[tuple[str, str, bool], Cell] = {}
    for c in cells:
        grid[(c.task, c.method, c.dp)] = c  # later runs of the same cell win
        if c.method == "zero-shot Φt":  # no training, no privacy cost: the same figure heads both tables
            grid[(c.task, c.method, True)] = c
    methods = [m for m in METHODS if m not in OPTIONAL or any(k[1] == m for k in grid)]

    def show(c: Cell | None) -> str:
        if c is None:
            return "–"
        return f"{100 * c.accuracy:.1f}" + (f" ({c.seconds / 60:.1f} min)" if c.seconds else "")

    md = []
    for dp in (False, True):
        if not any(k[2] == dp and k[1] != "zero-shot Φt" for k in grid):
            continue
        eps = sorted({f"ε = {c.epsilon:.2f}, δ = {c.delta:.1e}" for k, c in grid.items()
                      if k[2] == dp and c.epsilon is not None and c.delta is not None})
        title = "Non-private" if not dp else "DP" + (f" ({'; '.join(eps)})" if eps else "")
        md += [f"**{title}**: test accuracy % (cost to produce the prompt)", "",
               "| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        md += [f"| {_label(t)} | " + " | ".join(show(grid.get((t, m, dp))) for m in methods) + " |" for t in tasks]
        md.append("")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["task", "method", "dp", "accuracy", "epsilon", "delta", "seconds", "run"])
    for (task, method, dp), c in sorted(grid.items(), key=lambda kv: (kv[0][0], METHODS.index(kv[0][1]), kv[0][2])):
        w.writerow([task, method, dp, f"{c.accuracy:.4f}", c.epsilon, c.delta, c.seconds, c.run])
    return "\n".join(md), buf.getvalue()


def table(cfg: TableConfig, run_dir: str | Path) -> dict[str, Any]:
    run = RunDir(run_dir, stage="table", config=cfg)
    cells = [c for d in _result_dirs(cfg.runs) if (c := classify(d, cfg.target)) is not None]
    if not cells:
        raise PostError("none of the runs is a table cell (finished tune runs, or test-split evaluate runs on "
                        f"the target {cfg.target}).")
    md, csv_text = build_table(cells)
    (run.path / "table.md").write_text(md, encoding="utf-8")
    (run.path / "table.csv").write_text(csv_text, encoding="utf-8")
    return run.finish({"cells": len(cells), "markdown": str(run.path / "table.md"), "csv": str(run.path / "table.csv"),
                       "table": md})


def summarize(result: dict[str, Any]) -> str:
    return f"{result['table']}\n{result['cells']} cells; {result['markdown']}, {result['csv']}"
