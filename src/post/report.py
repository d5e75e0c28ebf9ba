"""The pipeline's report: one self-contained HTML file (images inlined) and a Markdown twin.

It reads run directories only (``pipeline-result.json`` unless the pipeline passes its summary,
each step's ``result.json`` through :mod:`post.results`, ``metrics.jsonl``, ``privacy.json``, the
attack's ROC data) and shows: the results table, the privacy spent (ε, δ, σ, the ledger), the LiRA
audit, whether POST met its goals, accuracy bars per method, loss curves, the cost of each stage,
the distillation's quality figures and the config that produced it all.

It finds the steps it reads through their declarations in :mod:`post.pipeline.steps` (``DISTILL``,
``TUNE_SOURCE``, ``RECONSTRUCT``, every row of the transfer, tune or attack stage), not by their names.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from post.errors import PostError
from post.pipeline.steps import (
    ATTACK_STAGE,
    DISTILL,
    DISTILL_STAGE,
    RECONSTRUCT,
    TRANSFER_STAGE,
    TUNE,
    TUNE_SOURCE,
    rows_of,
    steps_of,
)
from post.progress import duration
from post.results import AttackResult, DistillResult, ReconstructResult, StageResult, TransferResult
from post.rundir import RESULT_FILE, read_json, read_metrics, read_result, write_json
from post.stats import at_chance, format_p
from post.table import METHOD_KEYS

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
PIPELINE_RESULT = "pipeline-result.json"  # the pipeline's summary, written once it has finished (with the report)

R = TypeVar("R", bound=StageResult)


def _maybe(path: Path, kind: type[R]) -> R | None:
    """The ``kind`` result of the run directory ``path``, or None when it has none."""
    return kind.from_dir(path) if (path / RESULT_FILE).is_file() else None


def _cells(out: Path) -> list[dict[str, str]]:
    p = out / "table" / "table.csv"
    return list(csv.DictReader(p.open(encoding="utf-8"))) if p.is_file() else []


def _setting(cell: dict[str, str]) -> str:
    """A table row's privacy setting ("non-private", "DP ε = 8", ...); tables without the column: non-private / DP."""
    return cell.get("setting") or ("DP" if cell.get("dp") == "True" else "non-private")


def _num(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


#: The goals' comparisons: (column, the method POST must beat); a beat counts at McNemar p < SIGNIFICANCE.
BEATS = (("beats PT on Φs", "PT on Φs"), ("beats zero-shot Φt", "zero-shot Φt"),
         ("beats calibrated zero-shot Φt", "calibrated zero-shot Φt"))
SIGNIFICANCE = 0.05


def goals(cells: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Per task and privacy setting: POST against PT on Φs, (calibrated) zero-shot Φt and 95% of PT on Φt.

    Each row carries POST's n and Wilson 95% interval where the table has them, the exact McNemar
    p-value of each comparison where both runs saved predictions on the same sentences,
    ``significant_vs_<method>`` (POST higher with p < 0.05; None without a p-value), and
    ``PT on Φt failed``: True when the PT-on-Φt baseline's interval contains chance (1 / classes),
    so "POST reaches 95% of it" would be a statement about a failed baseline.
    """
    by = {(c["task"], c["method"], _setting(c)): c for c in cells}
    rows = []
    for (task, method, dp), cell in by.items():
        if method != "POST":
            continue
        post = float(cell["accuracy"])
        row: dict[str, Any] = {"task": task, "dp": dp != "non-private", "setting": dp, "post": post,
                               "n": _num(cell.get("n")),
                               "ci_low": _num(cell.get("ci_low")), "ci_high": _num(cell.get("ci_high"))}
        for name, ref_method in BEATS:
            key = METHOD_KEYS[ref_method]
            ref = by.get((task, ref_method, dp))
            p = _num(cell.get(f"p_value_vs_{key}"))
            row[name] = None if ref is None else post > float(ref["accuracy"])
            row[f"p_value_vs_{key}"] = p
            row[f"significant_vs_{key}"] = None if row[name] is None or p is None else row[name] and p < SIGNIFICANCE
        full_cell = by.get((task, "PT on Φt", dp))
        full = None if full_cell is None else float(full_cell["accuracy"])
        row["of PT on Φt"] = None if full is None else post / full
        row["≥ 95% of PT on Φt"] = None if full is None else post >= 0.95 * full
        row["p_value_vs_pt_target"] = _num(cell.get("p_value_vs_pt_target"))
        row["PT on Φt failed"] = _baseline_failed(full_cell)
        rows.append(row)
    return rows


def _baseline_failed(cell: dict[str, str] | None) -> bool | None:
    """Whether a cell's 95% interval contains chance (None when it has no interval or class count)."""
    if cell is None:
        return None
    low, high, classes = _num(cell.get("ci_low")), _num(cell.get("ci_high")), _num(cell.get("num_classes"))
    if low is None or high is None or not classes:
        return None
    return at_chance(low, high, int(classes))


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _percent_with_errors(found: list[dict[str, str] | None]) -> tuple[list[float], list[list[float]]]:
    """Accuracies in % (nan where a cell is missing) and their Wilson 95% intervals as error bars (below, above),
    zero where the table has no interval."""
    vals = [100 * float(c["accuracy"]) if c else float("nan") for c in found]
    err = [[v - 100 * (_num(c.get("ci_low")) or v / 100) if c else 0.0 for c, v in zip(found, vals)],
           [100 * (_num(c.get("ci_high")) or v / 100) - v if c else 0.0 for c, v in zip(found, vals)]]
    return vals, err


def accuracy_bars(cells: list[dict[str, str]]) -> str | None:
    """Grouped bars: one group per method, non-private and DP side by side (first task; with several DP
    settings, the one with the most methods, the largest ε on a tie)."""
    if not cells:
        return None
    from post.table import METHODS

    task = sorted({c["task"] for c in cells})[0]
    mine = [c for c in cells if c["task"] == task]
    dp_settings = [s for s in dict.fromkeys(_setting(c) for c in mine) if s != "non-private"]
    dp = max(dp_settings, key=lambda s: sum(_setting(c) == s for c in mine)) if dp_settings else "DP"
    plt = _plt()
    methods = [m for m in METHODS if any(c["method"] == m for c in mine)]
    fig, ax = plt.subplots(figsize=(7.5, 3.4), dpi=110)
    width = 0.38
    for j, (setting, color) in enumerate((("non-private", "#4C72B0"), (dp, "#DD8452"))):
        found = [next((c for c in mine if c["method"] == m and _setting(c) == setting), None) for m in methods]
        vals, err = _percent_with_errors(found)
        xs = [i + (j - 0.5) * width for i in range(len(methods))]
        bars = ax.bar(xs, vals, width, color=color, label=setting, yerr=err, capsize=2, error_kw={"lw": 0.8})
        for b, v in zip(bars, vals):
            if v == v:
                ax.text(b.get_x() + b.get_width() / 2, v + 0.5, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(methods)), [m.replace(", ", ",\n") for m in methods], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{task}: accuracy per method")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _png(fig)


CURVE_METHODS = ("PT on Φs", "POST", "PT on Φt", "proxy tuning", "direct transfer", "ZST")


def privacy_curve(cells: list[dict[str, str]]) -> tuple[list[str], str | None]:
    """The privacy–utility curve of a pipeline that ran several DP settings (modes: dp-eps<E>).

    Returns Markdown lines (a table per task: one row per ε, ∞ = non-private, a column per method,
    accuracy % with its Wilson 95% interval) and a PNG (base64) of the first task's curves, zero-shot
    Φt as a dashed line. Empty when no task has two or more DP settings.
    """
    md: list[str] = []
    png = None
    for task in sorted({c["task"] for c in cells}):
        mine = [c for c in cells if c["task"] == task]
        eps = {e for c in mine if c.get("setting", "").startswith("DP ε =")
               if math.isfinite(e := float(c["setting"].rpartition("=")[2]))}  # a DP cell without ε has no place
        if len(eps) < 2:
            continue
        xs: list[float] = sorted(eps) + ([math.inf] if any(_setting(c) == "non-private" for c in mine) else [])
        methods = [m for m in CURVE_METHODS if sum(c["method"] == m for c in mine) >= 2]

        def cell(m: str, x: float, mine: list[dict[str, str]] = mine) -> dict[str, str] | None:
            name = "non-private" if x == math.inf else f"DP ε = {x:g}"
            return next((c for c in mine if c["method"] == m and _setting(c) == name), None)

        def show(c: dict[str, str] | None) -> str:
            if c is None:
                return "–"
            lo, hi = _num(c.get("ci_low")), _num(c.get("ci_high"))
            ci = f" [{100 * lo:.1f}–{100 * hi:.1f}]" if lo is not None and hi is not None else ""
            return f"{100 * float(c['accuracy']):.1f}{ci}"

        zs = next((c for c in mine if c["method"] == "zero-shot Φt"), None)
        n = next((c.get("n") for c in mine if c["method"] == "POST" and c.get("n")), None)
        md += [f"{task}: test accuracy % [Wilson 95% interval]" + (f", n = {n} test sentences" if n else "")
               + (f"; zero-shot Φt {show(zs)}" if zs else ""), "",
               "| ε | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        md += [f"| {'∞ (non-private)' if x == math.inf else f'{x:g}'} | "
               + " | ".join(show(cell(m, x)) for m in methods) + " |" for x in xs]
        md.append("")
        if png is None:
            plt = _plt()
            fig, ax = plt.subplots(figsize=(6.0, 3.4), dpi=110)
            pos = list(range(len(xs)))
            for m in methods:
                ys, err = _percent_with_errors([cell(m, x) for x in xs])
                ax.errorbar(pos, ys, yerr=err, marker="o", capsize=3, lw=1.2, label=m)
            if zs is not None:
                ax.axhline(100 * float(zs["accuracy"]), color="grey", ls="--", lw=1, label="zero-shot Φt")
            ax.set_xticks(pos, ["∞" if x == math.inf else f"{x:g}" for x in xs])
            ax.set_xlabel("ε (δ as in the ledgers)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{task}: privacy–utility curve")
            ax.legend(fontsize=8)
            fig.tight_layout()
            png = _png(fig)
    return md, png


def loss_curves(out: Path, steps: list[str]) -> str | None:
    """Training losses from the metrics logs: distillation, tuning, transfer."""
    panels = []
    for stage in (DISTILL_STAGE, TUNE, TRANSFER_STAGE):
        kind, key, names = stage.name, "loss", steps_of(steps, *rows_of(stage))
        series = []
        for name in names:
            pts = [(m["step"], m[key]) for m in read_metrics(out / name) if key in m and "step" in m]
            if pts:
                series.append((name, pts))
        if series:
            panels.append((kind, series))
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), dpi=110, squeeze=False)
    for ax, (kind, series) in zip(axes[0], panels):
        for name, pts in series:
            xs, ys = zip(*pts)
            if len(xs) > 20:  # a running mean: per-step losses on small batches are noisy
                k = max(1, len(xs) // 25)
                ys = [sum(ys[max(0, i - k) : i + 1]) / len(ys[max(0, i - k) : i + 1]) for i in range(len(ys))]
            ax.plot(xs, ys, label=name, lw=1.2)
        ax.set(title=f"{kind} loss", xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _b64_file(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


def _md_tables_to_html(md: str) -> str:
    """The table stage's Markdown (bold titles and pipe tables) as HTML."""
    out, rows = [], []

    def flush() -> None:
        if rows:
            head, body = rows[0], rows[2:]
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead>"
                       "<tbody>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                                           for r in body) + "</tbody></table>")
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.strip():
            text = html.escape(line)
            out.append("<p>" + re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text) + "</p>")
    flush()
    return "\n".join(out)


def _yes(v: Any, p: float | None = None, failed: bool | None = False) -> str:
    """A goal's cell: "yes"/"no"/a ratio, with its McNemar p; "baseline failed" when the reference is at chance.

    A higher accuracy whose McNemar p is not below 0.05 reads "higher, not significant": the bar is
    a significant gain, and a bare "yes" would claim it.
    """
    if failed:
        return "baseline failed"
    text = "–" if v is None else ("yes" if v is True else "no" if v is False else f"{100 * v:.0f}%")
    if v is True and p is not None and p >= SIGNIFICANCE:
        text = "higher, not significant"
    return text + (f" (p {format_p(p)})" if p is not None and v is not None else "")


def _post_cell(g: dict[str, Any]) -> str:
    if g.get("n") and g.get("ci_low") is not None:
        return f"{100 * g['post']:.1f} [{100 * g['ci_low']:.1f}–{100 * g['ci_high']:.1f}] n={int(g['n'])}"
    return f"{100 * g['post']:.1f}"


_LOSS = {"vocab": "full-vocabulary distributions (the paper's loss)",
         "label-words": "class distributions over the label words"}


def _transfer_lines(out: Path, steps: dict[str, Any]) -> list[str]:
    """How each POST cell's prompt was transferred: the loss, α and its source, steps, public texts."""
    lines = []
    for name in steps_of(steps, *rows_of(TRANSFER_STAGE)):
        if (r := _maybe(out / name, TransferResult)) is None:
            continue
        if r.alpha is None:  # --loss proxy-labels
            shares = ", ".join(f"{c} {v:.0%}" for c, v in (r.proxy_label_shares or {}).items())
            calibrated = ", calibrated on the public texts" if r.calibrate_labels else ""
            how = (f"fitted to proxy tuning's class on each public text{calibrated} (cross-entropy; {shares}; "
                   f"{(r.proxy_labels_as_target or 0):.0%} as the target answers alone)")
        else:
            how = f"matched {_LOSS.get(r.mode, r.mode)}, α = {float(r.alpha):.2f} ({r.alpha_source or 'given'})"
        lines.append(f"- `{name}`: {how}, {r.steps} steps on {r.public_texts} public texts of `{r.public}`")
    return ["Transfers:", "", *lines, ""] if lines else []


def write_report(out: str | Path, summary: Mapping[str, Any] | None = None) -> Path:
    """Write ``report.html`` and ``report.md`` for a pipeline directory; return the HTML path.

    ``summary``: the pipeline's summary (out, target, task, public, steps, seconds, table), as the pipeline
    passes it before writing ``pipeline-result.json``; by default read from that file (``post report DIR``).
    """
    out = Path(out)
    if summary is None:
        summary_path = out / PIPELINE_RESULT
        if not summary_path.is_file():
            raise PostError(f"{out} is not a finished pipeline directory (no {PIPELINE_RESULT}); run post run "
                            "first.")
        summary = read_json(summary_path)
    config = read_json(out / "pipeline-config.json") if (out / "pipeline-config.json").is_file() else {}
    steps: dict[str, Any] = summary.get("steps", {})
    cells = _cells(out)
    table_md = (out / "table" / "table.md").read_text(encoding="utf-8") if (out / "table" / "table.md").is_file() \
        else summary.get("table", "")
    # every DP ps (one per privacy level): its ledger, as the user's run directory keeps it
    ledgers = {name: read_json(out / name / "privacy.json") for name in steps_of(steps, TUNE_SOURCE)
               if (out / name / "privacy.json").is_file()}
    distill = _maybe(out / DISTILL.name, DistillResult)
    attacks = {name: r for name in steps_of(steps, *rows_of(ATTACK_STAGE))
               if (r := _maybe(out / name, AttackResult)) is not None}
    goal_rows = goals(cells)

    seconds = {name: _step_seconds(out, name, s) for name, s in steps.items()}
    compute = sum(float(v or 0) for v in seconds.values())
    md: list[str] = [f"# POST report: {_short(summary.get('task'))} → {_short(summary.get('target'))}", "",
                     f"Private task `{summary.get('task')}`, target Φt `{summary.get('target')}`, public text "
                     f"`{summary.get('public')}`{_precision(summary)}; all steps together took {duration(compute)} "
                     f"(this last invocation {duration(summary.get('seconds'))}; finished steps are not run "
                     "again).", "",
                     "## Results", "", table_md, ""]
    md += _transfer_lines(out, steps)
    if goal_rows:
        md += ["## Goals", "", "POST: test accuracy % [Wilson 95% interval] n = test sentences; p: exact McNemar "
               "test against that method on the same sentences; a beat counts at p < 0.05 (\"higher, not "
               "significant\" otherwise); \"baseline failed\": PT on Φt is within its 95% "
               "interval of chance (1 / classes), so no ratio to it means anything. Each row is one draw: the "
               "user's tuning and the transfer move with the seed (and a DP run with its secret noise); "
               "`python bench/seed_spread.py --pipeline DIR` re-runs them with other seeds and counts how often "
               "each goal holds.", "",
               "| task | setting | POST | " + " | ".join(name for name, _ in BEATS) + " | POST ÷ PT on Φt "
               "| ≥ 95% of PT on Φt |", "|---|---|---|" + "---|" * len(BEATS) + "---|---|"]
        md += [f"| {g['task']} | {g['setting']} | {_post_cell(g)} | "
               + "".join(f"{_yes(g[name], g['p_value_vs_' + METHOD_KEYS[ref]])} | " for name, ref in BEATS)
               + f"{_yes(g['of PT on Φt'], failed=g['PT on Φt failed'])} | "
               f"{_yes(g['≥ 95% of PT on Φt'], failed=g['PT on Φt failed'])} |"
               for g in goal_rows]
        md.append("")
    curve_md, curve_png = privacy_curve(cells)
    if curve_md:
        md += ["## Privacy–utility curve", "", "The same pipeline at each ε of `modes` (dp-eps<E>; ∞ = non-private): "
               "every DP prompt's ledger is in its tune run directory; the transfer adds no privacy cost "
               "(post-processing of the DP prompt with public data).", "", *curve_md]
    md += ["## Privacy", ""]
    for name, ledger in ledgers.items():
        md += [f"DP-SGD on the prompt (`{name}`): ε = {_eps(ledger['epsilon'])} at δ = {ledger['delta']:.1e} "
               f"({ledger['accountant']} accountant), σ = {ledger['noise_multiplier']:.4f}, clip C = "
               f"{ledger['max_grad_norm']}, sampling rate q = {ledger['sample_rate']:.4f}, {ledger['steps']} steps, "
               f"N = {ledger['dataset_size']}. The transferred DP prompt carries the same guarantee "
               "(post-processing: the transfer sees only the prompt and public text).", ""]
        md += [_RANDOMNESS.get(ledger.get("randomness", "seeded"), ""), ""]
    if not ledgers:
        md += ["No DP run in this pipeline.", ""]
    if attacks:
        md += ["| LiRA (online) | shadows | pool | AUC | TPR@0.1%FPR | TPR@1%FPR | empirical ε ≥ | ε spent |",
               "|---|---|---|---|---|---|---|---|"]
        for name, a in attacks.items():
            for label, figs in (("ps", a.source_prompt), ("pt (transferred)", a.transferred_prompt)):
                if figs:
                    o = figs["online"]
                    eps = _eps(a.epsilon)
                    md.append(f"| {name}: {label} | {a.shadows} | {a.pool} | {o['auc']:.3f} | "
                              f"{o['tpr_at_0.1%_fpr']:.3f} | {o['tpr_at_1%_fpr']:.3f} | "
                              f"{o['epsilon_lower_bound']:.2f} | {eps} |")
        md.append("")
    if (recon := _maybe(out / RECONSTRUCT.name, ReconstructResult)) is not None:  # rendered by post.reconstruct
        from post.reconstruct import markdown as reconstruct_md

        md += ["Prompt reconstruction check (each prompt vector read as its nearest vocabulary token; cells: "
               "n-grams found in the private texts / projected / found in no public text, init text or template):",
               "", *reconstruct_md(recon).splitlines()[2:]]
    if distill:
        t, u, d = distill.teacher_quality, distill.undistilled_quality, distill.distilled_quality
        md += ["## Distillation", "",
               f"Layers {distill.keep_layers} of {summary.get('target')}: {distill.student_params / 1e6:.1f}M "
               f"of {distill.teacher_params / 1e6:.1f}M parameters, {distill.steps} steps, "
               f"{distill.tokens_seen:,} tokens, {duration(distill.train_seconds)}.", "",
               "| model | held-out perplexity | KL to teacher (nats/token) |", "|---|---|---|",
               f"| teacher | {t['perplexity']:.1f} | 0 |",
               f"| kept layers, undistilled | {u['perplexity']:.1f} | {u['kl_to_teacher']:.3f} |",
               f"| kept layers, distilled | {d['perplexity']:.1f} | {d['kl_to_teacher']:.3f} |", ""]
    md += ["## Cost of each stage", "", "| step | party | what | time |", "|---|---|---|---|"]
    md += [f"| {name} | {s.get('party')} | {s.get('what', '')} | {duration(seconds[name])} |"
           for name, s in steps.items()]
    md += ["", *_predicted_costs(out)]
    md += ["", "## Config", "", "```json", json.dumps(config, indent=2, ensure_ascii=False), "```", ""]
    (out / REPORT_MD).write_text("\n".join(md), encoding="utf-8")

    bars, losses = accuracy_bars(cells), loss_curves(out, list(steps))
    rocs = {name: _b64_file(Path(a.roc_png)) for name, a in attacks.items()}
    rocs.update({f"{name} (transferred)": _b64_file(Path(a.roc_transferred_png))
                 for name, a in attacks.items() if a.roc_transferred_png})
    html_text = _html(md, bars, losses, {k: v for k, v in rocs.items() if v}, curve_png)
    path = out / REPORT_HTML
    path.write_text(html_text, encoding="utf-8")
    write_json(out / "report.json", {"goals": goal_rows, "cells": cells})
    return path


def _predicted_costs(out: Path) -> list[str]:
    """post.cost's predicted vs measured time of each training run, when rates measured here are at hand
    (the report never loads a model to calibrate; ``post cost --calibrate`` saves them)."""
    from post import cost

    try:
        section = cost.report_section(out, calibrate_missing=False)
    except (PostError, OSError, KeyError, ValueError):
        return []
    return section.splitlines() if section else []


_RANDOMNESS = {
    "secret": "Sampling and noise came from a secret seed drawn from OS entropy and kept only in the user's "
              "checkpoint: the guarantee holds against an adversary who knows the code, the data but one example, "
              "and the config.",
    "secure": "Sampling and noise came straight from the OS CSPRNG, each Gaussian a sum of four draws (hardened "
              "against floating-point attacks on Gaussian sampling).",
    "seeded": "**Warning: this DP run used an explicit, reproducible seed (--dp-seed). Anyone who knows it can replay "
              "every sample and noise draw, and against them the run has no privacy at all.**",
}


def _eps(value: Any) -> str:
    """ε as written in ledgers: a number, or "inf" (σ = 0), or None (non-private)."""
    if value is None:
        return "∞ (non-private)"
    v = float(value)
    return "∞" if v == float("inf") else f"{v:.3f}"


def _short(name: Any) -> str:
    """A file path's name, anything else as it is (titles stay readable)."""
    text = str(name)
    return Path(text).name if "/" in text and Path(text).suffix else text


def _precision(summary: Mapping[str, Any]) -> str:
    """"; frozen models in bfloat16 on cpu" (distillation trains in float32), or "" for a summary written before the
    dtype was recorded."""
    if not summary.get("dtype"):
        return ""
    return f"; frozen models in {summary['dtype']} on {summary.get('device', '?')}"


def _step_seconds(out: Path, name: str, s: dict[str, Any]) -> Any:
    """A step's seconds from its run directory's result, else as the summary has them.

    Any stage's result has ``seconds``; it is read as is, not as a typed result, so a run whose other
    fields an older version wrote still reports its time."""
    return read_result(out / name).get("seconds") if (out / name / RESULT_FILE).is_file() else s.get("seconds")


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em;border-bottom:2px solid #4C72B0}h2{font-size:1.25em;
margin-top:1.6em;color:#2a4d8f}table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid
#ccc;padding:.3em .6em;text-align:left}th{background:#eef2f9}tr:nth-child(even) td{background:#fafafa}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.8em}img{max-width:100%;margin:.4em .6em .4em 0}
.figs{display:flex;flex-wrap:wrap;align-items:flex-start}"""


def _html(md: list[str], bars: str | None, losses: str | None, rocs: dict[str, str],
          curve: str | None = None) -> str:
    """Render the Markdown lines (headings, paragraphs, pipe tables, one code block) with figures."""
    text = "\n".join(md)
    sections = re.split(r"^## ", text, flags=re.M)
    title_block, rest = sections[0], sections[1:]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>POST report</title><style>{_CSS}</style>"
             "</head><body>"]
    for line in title_block.splitlines():
        if line.startswith("# "):
            parts.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            parts.append(f"<p>{html.escape(line.replace('`', ''))}</p>")
    for sec in rest:
        heading, _, body = sec.partition("\n")
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if "```" in body:
            code = body.split("```json", 1)[1].split("```", 1)[0]
            parts.append(f"<pre>{html.escape(code.strip())}</pre>")
        else:
            parts.append(_md_tables_to_html(re.sub(r"`([^`]*)`", r"\1", body)))
        if heading == "Results" and bars:
            parts.append(f"<div class='figs'><img alt='accuracy per method' src='data:image/png;base64,{bars}'></div>")
        if heading == "Privacy–utility curve" and curve:
            parts.append(f"<div class='figs'><img alt='privacy-utility curve' src='data:image/png;base64,{curve}'>"
                         "</div>")
        if heading == "Privacy" and rocs:
            parts.append("<div class='figs'>" + "".join(
                f"<figure><img alt='ROC {html.escape(k)}' src='data:image/png;base64,{v}' width='380'>"
                f"<figcaption>{html.escape(k)}</figcaption></figure>" for k, v in rocs.items()) + "</div>")
        if heading == "Cost of each stage" and losses:
            parts.append(f"<h2>Loss curves</h2><div class='figs'><img alt='loss curves' "
                         f"src='data:image/png;base64,{losses}'></div>")
    parts.append("</body></html>")
    return "\n".join(parts)
