"""Stage: collect run directories into the paper's results table (Markdown and CSV).

Rows are private tasks; columns are the methods of the paper's tables, each without and with DP:
zero-shot Φt, PT on Φt, PT on Φs, direct transfer, ZST, POST. Each run directory is placed by
what its ``result.json`` says (stage, model, prompt provenance; read as :mod:`post.results` types),
so the table reads run directories only. A cell's time is the cost of producing it: tuning for PT
cells; tuning on Φs plus the transfer for transferred prompts (followed through the prompt files'
run directories).

Every accuracy carries its test-set size n and its Wilson 95% interval (:mod:`post.stats`). Where
runs saved per-example predictions (``predictions.json``: evaluate runs, and tune runs that write
one), each POST cell gets an exact McNemar p-value against every other method scored on exactly
the same sentences (CSV columns ``p_value_vs_<method key>``, blank otherwise).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from post.config import require
from post.errors import PostError
from post.results import (
    DistillResult,
    EvaluateResult,
    StudentResult,
    TableResult,
    TransferResult,
    TuneResult,
    ZstResult,
    load_result,
)
from post.rundir import RESULT_FILE, RunDir
from post.stats import accuracy_interval, format_p, paired_mcnemar

METHODS = ("zero-shot Φt", "calibrated zero-shot Φt", "PT on Φt", "PT on Φs", "direct transfer", "ZST", "proxy tuning",
           "POST", "PT on Φs, undistilled", "POST, undistilled Φs")
# shown only when some run fills them
OPTIONAL = ("calibrated zero-shot Φt", "proxy tuning", "PT on Φs, undistilled", "POST, undistilled Φs")
# ASCII keys of the methods, for CSV column names (p_value_vs_<key>).
METHOD_KEYS = {"zero-shot Φt": "zero_shot_target", "calibrated zero-shot Φt": "calibrated_zero_shot_target",
               "PT on Φt": "pt_target", "PT on Φs": "pt_source",
               "direct transfer": "direct", "ZST": "zst", "proxy tuning": "proxy", "POST": "post",
               "PT on Φs, undistilled": "pt_source_undistilled", "POST, undistilled Φs": "post_undistilled"}
# no prompt trained, no privacy cost: one figure heads every setting's table
UNTRAINED = ("zero-shot Φt", "calibrated zero-shot Φt")
TESTED = ("POST", "POST, undistilled Φs")  # the methods whose cells get McNemar p-values against the others


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
    """One table cell. ``predictions``: example index -> (label, predicted), when the run saved them."""

    task: str
    method: str
    dp: bool
    accuracy: float
    epsilon: float | None
    delta: float | None
    seconds: float | None
    run: str
    n: int | None = None
    num_classes: int | None = None
    user_seconds: float | None = None
    provider_seconds: float | None = None
    target_epsilon: float | None = None
    predictions: dict[int, tuple[int, int]] | None = None

    @property
    def setting(self) -> float | None:
        """The privacy setting the cell belongs to: None (non-private), else the ε its run asked for (ledgers
        spend a hair under it: 7.9995 is the ε = 8 setting); see :func:`setting_of`."""
        return setting_of(self.dp, self.epsilon, self.target_epsilon)

    @property
    def interval(self) -> tuple[float, float] | None:
        """Wilson 95% interval of the accuracy (None without n)."""
        return accuracy_interval(self.accuracy, self.n) if self.n else None


def setting_of(dp: bool, epsilon: float | None, target_epsilon: float | None = None) -> float | None:
    """None for non-private; otherwise the ε the run asked for (its ledger's target), or, for a run given σ
    directly, the ε it spent to three significant digits; math.inf when neither is known."""
    if not dp:
        return None
    if target_epsilon is not None:
        return float(target_epsilon)
    return math.inf if epsilon is None else float(f"{float(epsilon):.3g}")


def settings_order(settings: set[float | None]) -> list[float | None]:
    """Non-private first, then DP from the largest ε to the smallest."""
    return ([None] if None in settings else []) + sorted((s for s in settings if s is not None), reverse=True)


def setting_title(setting: float | None) -> str:
    return "non-private" if setting is None else f"DP ε = {setting:g}"


def _with_size(cell: Cell, n: int | None, class_names: list[str] | None, run: Path) -> Cell:
    """Fill n, the class count and the saved predictions of a cell from its run."""
    from post.evaluate import read_predictions

    if n is not None:
        cell.n = int(n)
    if class_names:
        cell.num_classes = len(class_names)
    cell.predictions = read_predictions(run)
    return cell


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


def _prompt_cost(prompt_path: str | None, target: str | None = None) -> tuple[float, float] | None:
    """(user, provider) seconds of training spent producing a prompt: its tuning run (the provider's when it
    tuned the target ``target``: the PT-on-Φt baseline), plus the transfer or ZST run that produced it
    (the provider's). Evaluation is not counted, for any method."""
    if not prompt_path:
        return None
    run = Path(prompt_path).parent
    try:
        r = load_result(run)
    except PostError:
        return None
    if isinstance(r, TuneResult):
        seconds = float(r.train_seconds)  # type: ignore[arg-type]
        return (0.0, seconds) if target is not None and r.model == target else (seconds, 0.0)
    if isinstance(r, (TransferResult, ZstResult)):
        source = json.loads(json.dumps(_config(run))).get("prompt")
        user, provider = _prompt_cost(source, target) or (0.0, 0.0)
        # the provider's work on it: measuring α, caching the public outputs, training (a ZST run has
        # only its total)
        own = r.train_seconds + r.cache_seconds + (r.alpha_seconds or 0) \
            if isinstance(r, TransferResult) else r.seconds or 0
        return user, provider + float(own)
    return None


def _config(run: Path) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except OSError:
        return {}


def _same_model(prompt_model: str | None, model: str | None) -> bool:
    """Whether a prompt file's model name is ``model``: prompt files name a local directory ``local:<its name>``."""
    if not prompt_model or not model:
        return False
    if prompt_model == model:
        return True
    from post import prompt

    public = getattr(prompt, "public_model_name", None)
    return public is not None and prompt_model == public(str(model))


def _undistilled(model: str | None) -> bool:
    """Whether ``model`` is a student directory written by ``post student`` (layers kept, no training)."""
    if not model:
        return False
    run = Path(model).parent
    try:
        return (run / RESULT_FILE).is_file() and isinstance(load_result(run), StudentResult)
    except PostError:
        return False


def classify(run: Path, target: str) -> Cell | None:
    """The table cell a finished run fills, or None when it is not a table cell."""
    r = load_result(run)
    if isinstance(r, TuneResult):
        cell = _tune_cell(r, run, target)
        test = r.test or {}  # the test split's metrics, when the run scored it
        return None if cell is None else _with_size(cell, test.get("n"), test.get("class_names"), run)
    if isinstance(r, EvaluateResult):
        cell = _evaluate_cell(r, run, target)
        return None if cell is None else _with_size(cell, r.n, r.class_names, run)
    return None


def _prompt_cell(r: EvaluateResult, method: str, run: Path, target: str) -> Cell:
    """A cell scored with a prompt file: its privacy from the prompt's ledger, its cost from the runs behind it."""
    p = r.prompt
    assert p is not None
    cost = _prompt_cost(p.path, target)
    return Cell(r.task, method, p.epsilon is not None, r.accuracy, p.epsilon, p.delta,
                None if cost is None else sum(cost), str(run), user_seconds=None if cost is None else cost[0],
                provider_seconds=None if cost is None else cost[1], target_epsilon=p.target_epsilon)


def _pt_method(model: str, target: str) -> str:
    """The PT column of a prompt tuned (and scored) on ``model``."""
    return "PT on Φt" if model == target else "PT on Φs, undistilled" if _undistilled(model) else "PT on Φs"


def _tune_cell(r: TuneResult, run: Path, target: str) -> Cell | None:
    """A tune run that scored the test split: a PT cell, costed by its own training."""
    if r.test_accuracy is None:
        return None
    seconds = r.train_seconds
    on_target = r.model == target
    return Cell(r.task, _pt_method(r.model, target), bool(r.dp), r.test_accuracy, r.epsilon, r.delta,
                seconds, str(run), user_seconds=None if seconds is None else 0.0 if on_target else seconds,
                provider_seconds=None if seconds is None else seconds if on_target else 0.0,
                target_epsilon=(r.privacy or {}).get("target_epsilon"))


def _untrained_cell(r: EvaluateResult, method: str, run: Path) -> Cell:
    """Nothing trained: no cost to produce it (evaluation is not counted for any method), no privacy cost."""
    return Cell(r.task, method, False, r.accuracy, None, None, 0.0, str(run), user_seconds=0.0, provider_seconds=0.0)


def _evaluate_cell(r: EvaluateResult, run: Path, target: str) -> Cell | None:
    """A test-split evaluation: zero-shot Φt, a PT cell, or a transferred prompt's cell (by the prompt's origin)."""
    if r.split != "test":
        return None
    p = r.prompt
    if r.method == "calibrated":  # Φt divided by its mean answer on public texts: a baseline without a prompt only
        if r.model != target or p is not None:
            return None
        return _untrained_cell(r, "calibrated zero-shot Φt", run)
    if r.method == "proxy":  # the target plus the prompt's change on the small model, at query time
        if r.model != target or p is None:
            return None
        return _prompt_cell(r, "proxy tuning", run, target)
    if p is not None and p.method == "tuned" and _same_model(p.model, r.model):
        # A prompt scored on the model it was tuned on: a PT cell, costed by its tuning run.
        return _prompt_cell(r, _pt_method(r.model, target), run, target)
    if r.model != target:
        return None
    if p is None:
        return _untrained_cell(r, "zero-shot Φt", run)
    direct = None if _same_model(p.model, target) else "direct transfer"
    method = {"post": "POST", "zst": "ZST"}.get(p.method or "", direct)
    # Prompt files name a local source only as local:NAME; the transfer run's config holds its directory.
    source = _config(Path(p.path).parent).get("source_model") if p.path else None
    if method == "POST" and _undistilled(source or p.source_model):
        method = "POST, undistilled Φs"
    if method is None:
        return None
    return _prompt_cell(r, method, run, target)


def _label(task: str) -> str:
    """A task's row label: a file's name rather than its whole path."""
    return Path(task).name if "/" in task and Path(task).suffix else task


def p_values(grid: dict[tuple[str, str, float | None], Cell]) -> dict[tuple[str, str, float | None], dict[str, float]]:
    """Exact McNemar p-values of each POST cell against every other method of its task and privacy setting.

    Only pairs whose runs saved predictions on exactly the same test sentences get a value.
    """
    out: dict[tuple[str, str, float | None], dict[str, float]] = {}
    for (task, method, setting), cell in grid.items():
        if method not in TESTED or cell.predictions is None:
            continue
        row = {}
        for other in METHODS:
            ref = grid.get((task, other, setting))
            if other == method or ref is None or ref.predictions is None:
                continue
            test = paired_mcnemar(cell.predictions, ref.predictions)
            if test is not None:
                row[other] = float(test["p_value"])
        out[(task, method, setting)] = row
    return out


def show_cell(c: Cell | None) -> str:
    """``70.0 [60.4–78.1] n=100 (0.9 min)``: accuracy %, its Wilson 95% interval and n, then the cost."""
    if c is None:
        return "–"
    text = f"{100 * c.accuracy:.1f}"
    if c.n and (ci := c.interval) is not None:
        text += f" [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}] n={c.n}"
    return text + (f" ({c.seconds / 60:.1f} min)" if c.seconds else "")


def cost_lines(cells: list[Cell], distill_seconds: float | None) -> list[str]:
    """Markdown: each method's training cost to produce its prompt, the user's and the provider's apart.

    The same things are counted for every method: training runs only (tuning, transfer, ZST), never
    evaluation; the PT-on-Φt baseline's tuning is the provider's (the data goes to it). Distillation is
    the provider's one-time cost, shown once and amortised over the users it serves.
    """
    rows = [c for c in cells if c.user_seconds is not None and c.provider_seconds is not None]
    if not rows:
        return []
    settings = settings_order({c.setting for c in rows})
    methods = [m for m in METHODS if any(c.method == m for c in rows)]
    tasks = sorted({c.task for c in rows})
    grid = {(c.task, c.method, c.setting): c for c in rows}
    out = ["**Cost** to produce each cell's prompt: training minutes on this machine, user + provider "
           "(evaluation not counted for any method)", "",
           "| task | setting | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for t in tasks:
        for s in settings:
            cells_here = [grid.get((t, m, s)) or (grid.get((t, m, None)) if m in UNTRAINED else None)
                          for m in methods]
            if not any(c is not None and c.method not in UNTRAINED for c in cells_here):
                continue
            out.append(f"| {_label(t)} | {setting_title(s)} | " + " | ".join(
                "–" if c is None else f"{c.user_seconds / 60:.1f} + {c.provider_seconds / 60:.1f}"
                for c in cells_here) + " |")
    if distill_seconds is not None:
        out += ["", f"Distillation (the provider's, one-time, shared by every user of the student): "
                f"{distill_seconds / 60:.1f} min; amortised over 10 users {distill_seconds / 600:.2f} min each, "
                f"over 100 users {distill_seconds / 6000:.3f} min each."]
    return [*out, ""]


def build_table(cells: list[Cell], distill_seconds: float | None = None) -> tuple[str, str]:
    """(Markdown, CSV) of the cells: one table per privacy setting (non-private, then each DP ε from the largest),
    one row per task, a column per method; then what each cell's prompt cost (:func:`cost_lines`)."""
    tasks = sorted({c.task for c in cells})
    grid: dict[tuple[str, str, float | None], Cell] = {}
    for c in cells:
        grid[(c.task, c.method, c.setting)] = c  # later runs of the same cell win
    settings = settings_order({k[2] for k in grid if k[1] not in UNTRAINED} or {None})
    for c in cells:
        if c.method in UNTRAINED:  # no training, no privacy cost: the same figure heads every table
            for s in settings:
                grid.setdefault((c.task, c.method, s), c)
    methods = [m for m in METHODS if m not in OPTIONAL or any(k[1] == m for k in grid)]
    tests = p_values(grid)

    md = []
    for setting in settings:
        eps = sorted({f"ε = {c.epsilon:.2f}, δ = {c.delta:.1e}" for k, c in grid.items()
                      if k[2] == setting and c.epsilon is not None and c.delta is not None})
        title = "Non-private" if setting is None else "DP" + (f" ({'; '.join(eps)})" if eps else "")
        md += [f"**{title}**: test accuracy % [Wilson 95% interval] n = test sentences (cost to produce the prompt)",
               "", "| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        md += [f"| {_label(t)} | " + " | ".join(show_cell(grid.get((t, m, setting))) for m in methods) + " |"
               for t in tasks]
        for (t, m, d), row in sorted(tests.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            if d == setting and row:
                md.append("")
                md.append(f"{_label(t)}, {m} vs each method on the same test sentences, exact McNemar p: "
                          + ", ".join(f"{o} {format_p(p)}" for o, p in row.items()))
        md.append("")
    md += cost_lines(cells, distill_seconds)
    buf = io.StringIO()
    w = csv.writer(buf)
    p_cols = list(METHODS)  # POST, undistilled Φs is tested against POST too
    w.writerow(["task", "method", "dp", "accuracy", "n", "ci_low", "ci_high", "num_classes", "epsilon", "delta",
                "seconds", "run", "setting", "user_seconds", "provider_seconds",
                *(f"p_value_vs_{METHOD_KEYS[m]}" for m in p_cols)])
    for (task, method, setting), c in sorted(grid.items(), key=lambda kv: (
            kv[0][0], METHODS.index(kv[0][1]), settings.index(kv[0][2]) if kv[0][2] in settings else -1)):
        ci = c.interval
        row = tests.get((task, method, setting), {})
        w.writerow([task, method, setting is not None, f"{c.accuracy:.4f}", c.n if c.n else "",
                    f"{ci[0]:.4f}" if ci else "", f"{ci[1]:.4f}" if ci else "", c.num_classes or "", c.epsilon,
                    c.delta, c.seconds, c.run, setting_title(setting), c.user_seconds, c.provider_seconds,
                    *(f"{row[m]:.6g}" if m in row else "" for m in p_cols)])
    return "\n".join(md), buf.getvalue()


def table(cfg: TableConfig, run_dir: str | Path) -> TableResult:
    run = RunDir(run_dir, stage="table", config=cfg)
    dirs = _result_dirs(cfg.runs)
    cells = [c for d in dirs if (c := classify(d, cfg.target)) is not None]
    distills = [float(r.train_seconds) for d in dirs
                if isinstance(r := load_result(d), DistillResult) and r.train_seconds is not None]
    if not cells:
        raise PostError("none of the runs is a table cell (finished tune runs, or test-split evaluate runs on "
                        f"the target {cfg.target}).")
    md, csv_text = build_table(cells, sum(distills) if distills else None)
    (run.path / "table.md").write_text(md, encoding="utf-8")
    (run.path / "table.csv").write_text(csv_text, encoding="utf-8")
    return TableResult.from_dict(run.finish({"cells": len(cells), "markdown": str(run.path / "table.md"),
                                             "csv": str(run.path / "table.csv"), "table": md}),
                                 source=str(run.result_path))


def summarize(result: TableResult) -> str:
    return f"{result.table}\n{result.cells} cells; {result.markdown}, {result.csv}"
