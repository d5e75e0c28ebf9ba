"""Validate the cost model (post.cost) at 135M: predicted vs measured time of each stage.

    python bench/cost_validate.py calibrate            # rates -> OUT/rates.json (about a minute)
    python bench/cost_validate.py run tune-source      # one short stage run into OUT/<stage> (each < 3 min)
    python bench/cost_validate.py compare              # the table: predicted vs measured

Stages: tune-source, tune-source-dp, tune-target, transfer-label-words, transfer-vocab, distill (the demo's
shapes: smollm2-135m, student layers 0,10,20,29, mr at max length 64, 10-token prompt, airline public), and
distill-framed / distill-prompted (public reviews in mr's frame, hidden-state and answer terms with no logit terms,
the second with the prompted term too).
Every stage runs in this process on one torch thread; with ``--clock cpu`` (the default) every timer,
the stages' own ``train_seconds`` included, reads this process's CPU time instead of the wall clock, so
other jobs on a shared machine (time slices taken away) do not count. ``--clock wall`` keeps the wall
clock. Predictions come from each run's own batches (:func:`post.cost.compare_run_dirs`).

``--dtype bfloat16`` (with its own ``--out``) calibrates and runs the prompt stages with the frozen models in
bf16, as ``--dtype auto`` runs them on a CPU with native bf16; distillation trains in float32 under auto, so
its stage runs only in float32.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

TEACHER, KEEP = "smollm2-135m", "0,10,20,29"


def _stage(name: str, out: Path, dtype: str = "float32") -> None:
    from post.distill import DistillConfig, distill
    from post.student import StudentConfig, make_student
    from post.transfer import TransferConfig, transfer
    from post.tune import TuneConfig, tune

    student = make_student(StudentConfig(teacher=TEACHER, keep_layers=KEEP), out / "student").model_dir
    tune_kw = {"task": "mr", "max_length": 64, "n_tokens": 10, "eval_limit": 32, "test": False, "dtype": dtype}
    if name == "tune-source":
        tune(TuneConfig(model=student, batch_size=32, max_steps=12, **tune_kw), out / name)
    elif name == "tune-source-dp":
        tune(TuneConfig(model=student, batch_size=32, max_steps=12, dp=True, epsilon=8.0, **tune_kw), out / name)
    elif name == "tune-target":
        tune(TuneConfig(model=TEACHER, batch_size=16, micro_batch_size=16, max_steps=5, **tune_kw), out / name)
    elif name.startswith("transfer-"):
        if not (out / "tune-source" / "prompt.safetensors").is_file():
            _stage("tune-source", out, dtype)
        mode = name.removeprefix("transfer-")
        transfer(TransferConfig(source_model=student, prompt=out / "tune-source" / "prompt.safetensors",
                                target_model=TEACHER, mode=mode, steps=8, batch_size=8, public_limit=48,
                                max_length=64, alpha=0.5, dtype=dtype), out / name)
    elif name == "distill":
        if dtype != "float32":
            raise SystemExit("distillation trains its student in float32 (dtype auto keeps it): run it with --dtype "
                             "float32")
        distill(DistillConfig(teacher=TEACHER, keep_layers=KEEP, max_steps=3, batch_size=4, block_size=128,
                              held_out=4), out / name)
    elif name in ("distill-framed", "distill-prompted"):  # no logit terms: the heads are skipped
        if dtype != "float32":
            raise SystemExit("distillation trains its student in float32: run it with --dtype float32")
        prompted = {"alpha_prompted": 20.0, "prompted_task": "mr"} if name == "distill-prompted" else {}
        distill(DistillConfig(teacher=TEACHER, keep_layers=KEEP, max_steps=3, batch_size=4, block_size=128,
                              held_out=4, corpus="reviews", answer_task="mr", alpha_ce=0.0, alpha_lm=0.0,
                              alpha_cos=0.0, alpha_hidden=1.0, alpha_answer=20.0, temperature=1.0, **prompted),
                out / name)
    else:
        raise SystemExit(f"unknown stage {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["calibrate", "run", "compare"])
    ap.add_argument("stage", nargs="?")
    ap.add_argument("--out", type=Path, default=Path("runs/cost-validate"))
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the frozen models' dtype (use another --out for each)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.clock == "cpu":
        time.perf_counter = time.process_time  # type: ignore[assignment]  # every timer: this process's CPU time
    from post import cost

    args.out.mkdir(parents=True, exist_ok=True)
    rates_path = args.out / (f"rates-{args.clock}.json" if args.dtype == "float32"
                             else f"rates-{args.clock}-{args.dtype}.json")
    if args.action == "calibrate":
        rates = cost.calibrate(TEACHER, KEEP, n_tokens=10, text_tokens=36, batch=8, steps=2, threads=1,
                               clock=args.clock, dtype=args.dtype)
        rates_path.write_text(json.dumps(rates.to_dict(), indent=2) + "\n")
        print(rates.label)
    elif args.action == "run":
        t0 = time.perf_counter()
        _stage(args.stage, args.out, args.dtype)
        print(f"{args.stage}: {time.perf_counter() - t0:.1f} s ({args.clock} clock) in {args.out / args.stage}")
    else:
        rates = cost.Rates(**json.loads(rates_path.read_text()))
        print(rates.label)
        print(f"| run | FLOPs | predicted | measured ({args.clock}) | error |\n|---|---:|---:|---:|---:|")
        for r in cost.compare_run_dirs(args.out, rates):
            if r["run"] != "student":
                print(f"| {r['run']} | {r['flops']:.3g} | {r['predicted_seconds']:.1f} s | "
                      f"{r['measured_seconds']:.1f} s | {r['error']:+.0%} |")


if __name__ == "__main__":
    main()
