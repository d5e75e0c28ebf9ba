"""How far POST's result moves from one run to the next: the user's and the provider's steps re-run with other seeds.

    python bench/seed_spread.py --pipeline runs/demo [--seeds 1 2 3 4] [--modes non-private dp]
                                [--split test] [--tune-option KEY=VALUE ...] [--out runs/seed-spread]

A pipeline run is one draw. Its DP steps draw fresh secret noise (and a secret Poisson sample) every time they
run, and the non-private ones depend on the seed's prompt initialisation order and batches, so one table says
little about how often POST clears a bar. For each seed and mode this re-runs, from the pipeline's own saved
step configs (each step's ``config.yaml`` with ``--seed S``; nothing else changes):

- the prompt tuning on the student Φs (``tune-source[-dp]``) and its test evaluation on Φs (``eval-source[-dp]``);
- the transfer to Φt with public data (``transfer[-dp]``) and POST's test evaluation (``eval-post[-dp]``).

The student, zero-shot Φt and the PT-on-Φt baseline stay the pipeline's. Each row gives ps on Φs, POST (Wilson
95% interval), POST ÷ PT on Φt and exact McNemar p against zero-shot Φt and against that row's ps on Φs; the
summary gives the mean and standard deviation of POST and how many runs clear each of the demo's three bars
(POST ≥ 95% of PT on Φt; POST above PT on Φs and above zero-shot, each at p < 0.05). Seed 0 is the pipeline's
own run, read as it is. No setting is chosen here: every option is the pipeline's, and the test split is only
scored. Finished steps are kept (re-running the command resumes; a
changed option needs another ``--out``). Results go to ``OUT/seed-spread.json``.

To compare a setting of the user's tuning, do it on the validation split: ``--split validation`` scores ps and
POST on it (and zero-shot Φt, once, into ``OUT/zero-shot-validation``; PT on Φt has no validation score, so no
ratio), and ``--tune-option batch_size=128`` (repeatable) changes ``tune-source[-dp]``'s options. The pipeline's
own run is then not a row (it is another setting or split), and seed 0 may be re-run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from post.evaluate import read_predictions
from post.stats import accuracy_interval, format_p, paired_mcnemar

MODES = {"non-private": "", "dp": "-dp"}


def _accuracy(run: Path) -> tuple[float, int, dict[int, tuple[int, int]]]:
    preds = read_predictions(run)
    if not preds:
        raise SystemExit(f"{run} saved no predictions; is it a finished evaluation?")
    right = sum(y == p for y, p in preds.values())
    return right / len(preds), len(preds), preds


def _step(command: str, config: Path, out: Path, *extra: str) -> None:
    """Run one post stage from a saved config (on a finished run directory of the same options the stage
    returns its result; with other options it refuses)."""
    if not config.is_file():
        raise SystemExit(f"{config} is missing: pass a finished pipeline directory (post run demo --out DIR).")
    cmd = [sys.executable, "-m", "post", command, "--config", str(config), *extra, "--out", str(out)]
    print(f"  $ post {command} --config {config} {' '.join(extra)} --out {out}", flush=True)
    start = time.perf_counter()
    if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode:
        raise SystemExit(f"post {command} failed (its error is above); finished steps are kept, so re-running "
                         "this command resumes.")
    print(f"    {time.perf_counter() - start:.0f} s", flush=True)


def _rerun(pipe: Path, out: Path, sfx: str, seed: int, split: str, tune: list[str]) -> dict[str, Path]:
    """The four steps of one seed and mode; returns their run directories."""
    d = out / f"seed-{seed}"
    runs = {name: d / f"{name}{sfx}" for name in ("tune-source", "eval-source", "transfer", "eval-post")}
    _step("tune", pipe / f"tune-source{sfx}" / "config.yaml", runs["tune-source"], "--seed", str(seed), *tune)
    ps = str(runs["tune-source"] / "prompt.safetensors")
    _step("evaluate", pipe / f"eval-source{sfx}" / "config.yaml", runs["eval-source"], "--prompt", ps,
          "--split", split)
    _step("transfer", pipe / f"transfer{sfx}" / "config.yaml", runs["transfer"], "--prompt", ps, "--seed", str(seed))
    pt = str(runs["transfer"] / "prompt.safetensors")
    _step("evaluate", pipe / f"eval-post{sfx}" / "config.yaml", runs["eval-post"], "--prompt", pt, "--split", split)
    return runs


def _tune_flags(options: list[str]) -> list[str]:
    """``KEY=VALUE`` -> ``--KEY VALUE`` for post tune."""
    flags = []
    for opt in options:
        key, eq, value = opt.partition("=")
        if not eq or not key:
            raise SystemExit(f"--tune-option {opt!r}: write KEY=VALUE, e.g. batch_size=128.")
        flags += [f"--{key.replace('_', '-')}", value]
    return flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", type=Path, default=Path("runs/demo"), help="a finished pipeline's directory")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4], help="seeds to re-run (0 is the pipeline's)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--split", choices=["test", "validation"], default="test")
    ap.add_argument("--tune-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the user's tuning (tune-source[-dp]), e.g. batch_size=128; repeatable")
    ap.add_argument("--out", type=Path, default=Path("runs/seed-spread"))
    args = ap.parse_args()
    pipe, tune = args.pipeline, _tune_flags(args.tune_option)
    if not (pipe / "pipeline-result.json").is_file():
        raise SystemExit(f"{pipe} is not a finished pipeline directory (no pipeline-result.json): run post run "
                         "CONFIG --out DIR first.")
    own = args.split == "test" and not tune  # the pipeline's own run is a row of the same setting
    if own and 0 in args.seeds:
        raise SystemExit("seed 0 is the pipeline's own run and is always included; pass other seeds.")
    if args.split == "test":
        zs_acc, n, zs = _accuracy(pipe / "zero-shot")
    else:
        zs_run = args.out / f"zero-shot-{args.split}"
        _step("evaluate", pipe / "zero-shot" / "config.yaml", zs_run, "--split", args.split)
        zs_acc, n, zs = _accuracy(zs_run)
    report: dict[str, object] = {"pipeline": str(pipe), "split": args.split, "tune_options": args.tune_option,
                                 "n": n, "zero_shot": zs_acc, "modes": {}}
    for mode in args.modes:
        sfx = MODES[mode]
        pt_acc = _accuracy(pipe / f"eval-target{sfx}")[0] if args.split == "test" else None
        rows = []
        for seed in [0, *args.seeds] if own else args.seeds:
            if not own or seed:
                print(f"{mode}, seed {seed}:", flush=True)
                runs = _rerun(pipe, args.out, sfx, seed, args.split, tune)
            else:
                runs = {"eval-source": pipe / f"eval-source{sfx}", "eval-post": pipe / f"eval-post{sfx}"}
            src_acc, _, src = _accuracy(runs["eval-source"])
            post_acc, post_n, post = _accuracy(runs["eval-post"])
            if post_n != n:
                raise SystemExit(f"{runs['eval-post']} scored {post_n} examples, zero-shot {n}: not the same split.")
            vs_zs, vs_src = paired_mcnemar(post, zs), paired_mcnemar(post, src)
            rows.append({"seed": seed, "source": src_acc, "post": post_acc,
                         "post_interval": accuracy_interval(post_acc, n),
                         "of_target": post_acc / pt_acc if pt_acc else None,
                         "p_vs_zero_shot": vs_zs["p_value"] if vs_zs else None,
                         "p_vs_source": vs_src["p_value"] if vs_src else None,
                         "runs": {k: str(v) for k, v in runs.items()}})
        posts = [r["post"] for r in rows]
        bars = {} if pt_acc is None else {"≥ 95% of PT on Φt": sum(r["of_target"] >= 0.95 for r in rows)}
        bars |= {"above PT on Φs, p < 0.05": sum(r["post"] > r["source"] and (r["p_vs_source"] or 1) < 0.05
                                                for r in rows),
                "above zero-shot Φt, p < 0.05": sum(r["post"] > zs_acc and (r["p_vs_zero_shot"] or 1) < 0.05
                                                    for r in rows)}
        report["modes"][mode] = {"target_tuning": pt_acc, "rows": rows, "mean": statistics.fmean(posts),
                                 "sd": statistics.stdev(posts) if len(posts) > 1 else 0.0, "bars_met": bars}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seed-spread.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(f"\n{pipe}: {args.split} split n = {n}; zero-shot Φt {100 * zs_acc:.1f}%"
          + (f"; ps tuned with {', '.join(args.tune_option)}" if tune else ""))
    for mode, m in report["modes"].items():
        target = m["target_tuning"]
        print(f"\n{mode}: PT on Φt " + (f"{100 * target:.1f}%" if target else "not scored on this split"))
        print("| seed | ps on Φs | POST [95%] | ÷ PT on Φt | p vs zero-shot | p vs ps on Φs |")
        print("|---|---|---|---|---|---|")
        for r in m["rows"]:
            lo, hi = r["post_interval"]
            ratio = f"{100 * r['of_target']:.1f}%" if r["of_target"] else ""
            print(f"| {r['seed']}{' (pipeline)' if own and r['seed'] == 0 else ''} | {100 * r['source']:.1f} | "
                  f"{100 * r['post']:.1f} [{100 * lo:.1f}–{100 * hi:.1f}] | {ratio} | "
                  f"{format_p(r['p_vs_zero_shot'])} | {format_p(r['p_vs_source'])} |")
        runs = len(m["rows"])
        print(f"POST mean {100 * m['mean']:.1f}%, sd {100 * m['sd']:.1f} points over {runs} runs; bars met: "
              + "; ".join(f"{k}: {v} of {runs}" for k, v in m["bars_met"].items()))
    print(f"\nwritten: {args.out / 'seed-spread.json'}")


if __name__ == "__main__":
    main()
