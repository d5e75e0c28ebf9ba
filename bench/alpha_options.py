"""How POST's accuracy depends on where α comes from: public data (the default), private queries, or given.

    python bench/alpha_options.py --pipeline runs/demo --out runs/alpha-options [--alphas 0,0.5] [--modes "",-dp]

For each privacy mode of a finished pipeline (``--pipeline``, e.g. ``make demo``'s runs/demo), the
provider re-runs that pipeline's transfer with the same ps, public text, steps and seed, changing
only α:

- ``public`` (the pipeline's own run, re-used): the heuristic (Eq. 6) with ZS and C measured by the
  provider on public labelled data (``--alpha-public``): no private text reaches Φt.
- ``private queries``: the heuristic with ZS = Φt zero-shot on the user's private validation split
  (200 sentences, as the pipeline's old ``zero-shot-val`` step sent them to the provider) and
  C = ps on Φs on the same split; both are statistics of private data outside the DP guarantee.
- ``given α = a`` for each ``--alphas`` value (``0``: only the distribution term; ``1``: only the
  prompt-induced change).

Each transferred prompt is scored on the whole test split. The table gives accuracy, its Wilson 95%
interval, n, and the exact McNemar p-value against the public-α prompt on the same sentences.
Every run directory is kept under ``--out``; re-running skips finished ones.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from post.evaluate import EvaluateConfig, evaluate, read_predictions
from post.results import EvaluateResult, StageResult, TransferResult
from post.rundir import RESULT_FILE
from post.stats import accuracy_interval, format_p, paired_mcnemar
from post.transfer import TransferConfig, heuristic_alpha, transfer

VALIDATION_LIMIT = 200  # what the pipeline's old zero-shot-val step sent to the target


def _config(cls: type, run: Path, **changes: Any) -> Any:
    raw = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in raw.items() if k in names}
    for key in ("prompt", "cache_dir"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    return cls(**{**values, **changes})


def _run(stage: Any, kind: type[StageResult], cfg: Any, run: Path) -> Any:
    """The stage's result in ``run``: read back if it has finished there, else run it (a ``kind``)."""
    return kind.from_dir(run) if (run / RESULT_FILE).is_file() else stage(cfg, run)


def _row(label: str, alpha: float, run: Path, reference: dict[int, tuple[int, int]] | None) -> str:
    r = EvaluateResult.from_dir(run)
    low, high = accuracy_interval(r.accuracy, r.n)
    test = paired_mcnemar(read_predictions(run) or {}, reference or {})
    p = "–" if test is None else format_p(float(test["p_value"]))
    return (f"| {label} | {alpha:.2f} | {100 * r.accuracy:.1f} [{100 * low:.1f}–{100 * high:.1f}] | {r.n} "
            f"| {p} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", type=Path, default=Path("runs/demo"), help="a finished pipeline directory")
    ap.add_argument("--out", type=Path, default=Path("runs/alpha-options"))
    ap.add_argument("--alphas", default="0,0.5", help="comma-separated given α values")
    ap.add_argument("--modes", default=",-dp", help='step suffixes of the modes to run: "" (non-private), -dp, ...')
    args = ap.parse_args()
    lines = []
    for sfx in args.modes.split(","):
        tr_run, post_run = args.pipeline / f"transfer{sfx}", args.pipeline / f"eval-post{sfx}"
        if not (tr_run / RESULT_FILE).is_file() or not (post_run / RESULT_FILE).is_file():
            raise SystemExit(f"{args.pipeline} has no finished transfer{sfx} and eval-post{sfx}; run the pipeline.")
        base = _config(TransferConfig, tr_run)
        if base.loss != "post":
            raise SystemExit(f"{tr_run} ran --loss {base.loss}, which has no α; this bench compares α for the "
                             "paper's loss (transfer.loss: post).")
        out = args.out / (sfx.lstrip("-") or "non-private")
        # The user's side of the old private-query α: Φt zero-shot and ps on Φs, on private validation text.
        ev = _config(EvaluateConfig, post_run, split="validation", limit=VALIDATION_LIMIT)
        zs = _run(evaluate, EvaluateResult, dataclasses.replace(ev, model=base.target_model, prompt=None),
                  out / "zero-shot-val")
        c = _run(evaluate, EvaluateResult, dataclasses.replace(ev, model=base.source_model, prompt=base.prompt),
                 out / "source-val")
        variants = [("private queries", {"alpha_public": None, "target_zero_shot": zs.accuracy,
                                         "source_accuracy": c.accuracy})]
        variants += [(f"given α = {float(a):g}", {"alpha": float(a)}) for a in args.alphas.split(",") if a.strip()]
        public = TransferResult.from_dir(tr_run)
        reference = read_predictions(post_run)
        mode = sfx.lstrip("-") or "non-private"
        lines.append(_row(f"{mode}: public {public.alpha_source.split(' on public ')[-1]} (default)",
                          public.alpha, post_run, None))
        for label, change in variants:
            name = label.replace(" ", "-").replace("=", "").replace("--", "-")
            t = _run(transfer, TransferResult, dataclasses.replace(base, **change), out / f"transfer-{name}")
            e = _config(EvaluateConfig, post_run, prompt=Path(t.prompt))
            _run(evaluate, EvaluateResult, e, out / f"eval-{name}")
            extra = (f" (ZS {zs.accuracy:.3f}, C {c.accuracy:.3f} on {zs.n} validation sentences; "
                     f"Eq. 6 gives {heuristic_alpha(target_zero_shot=zs.accuracy, source_accuracy=c.accuracy, num_classes=len(zs.class_names)):.2f})"  # noqa: E501
                     if label == "private queries" else "")
            lines.append(_row(f"{mode}: {label}{extra}", t.alpha, out / f"eval-{name}", reference))
        lines.append(f"| {mode}: public α's ZS, C on public data | | ZS {public.target_zero_shot:.3f}, "
                     f"C {public.source_accuracy:.3f} | | |")
    table = ["| α from | α | POST test accuracy % [95% CI] | n | McNemar p vs public α |", "|---|---|---|---|---|",
             *lines]
    print("\n".join(table))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(table) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
