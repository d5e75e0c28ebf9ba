"""How far a transfer that only moves the label prior can lift zero-shot: an oracle bound on one split.

    python bench/prior_ceiling.py [--model smollm2-135m] [--task mr] [--split test] [--dtype float32]
                                  [--pipeline runs/demo]

A prompt that only corrects the target's lean towards one class acts like a constant shift ``b`` of the
zero-shot class-score margin (two classes). This scores the split zero-shot once, then tries every shift
that changes a prediction (each margin on the split, and beyond both ends) and reports, against zero-shot on
the same sentences:

- the best accuracy any shift reaches (the *oracle* shift, read off this split's labels: a bound, not a
  setting anyone could pick), with its Wilson 95% interval and exact McNemar p;
- the smallest McNemar p of a shift that beats zero-shot, with that shift's accuracy, and how many of the
  distinct shifts reach p < 0.05.

If that smallest p is above 0.05, no method whose whole effect is a label-prior correction (calibration, a
prompt that only evens out the classes) can be significantly above zero-shot on this split, however it sets
the prior: beating zero-shot significantly needs the private data's task knowledge to cross, not only its
label balance. With ``--pipeline DIR`` it also reads the run's POST evaluations (``eval-post*``) and prints
where they stand against the bound. Two classes only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from post.config import DTYPES
from post.data import load_labelled
from post.models import load_model
from post.scoring import Encoder, predict_scores
from post.stats import format_interval, format_p, prior_shift_bound, wilson_interval
from post.tasks import Verbalizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="mr")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--pipeline", type=Path, default=None, help="a finished pipeline's directory (runs/demo)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = load_labelled(args.task)
    if len(data.class_names) != 2:
        raise SystemExit(f"{args.task} has {len(data.class_names)} classes; the bound is for two.")
    split = data.split(args.split)
    loaded = load_model(args.model, dtype=DTYPES[args.dtype])
    enc = Encoder(data.task, loaded.tokenizer, loaded.kind, args.max_length)
    verb = Verbalizer.build(data.task, loaded.tokenizer)
    scores = predict_scores(loaded.model, enc, verb, list(split.texts), progress=False)
    labels = np.asarray(split.labels)
    out = prior_shift_bound(scores[:, 1] - scores[:, 0], labels)
    n = len(labels)

    def cell(acc: float) -> str:
        k = round(acc * n)
        return format_interval(acc, *wilson_interval(k, n), n)

    print(f"{args.model} zero-shot on {args.task} {args.split} ({args.dtype}): {cell(out['zero_shot']['accuracy'])}")
    b, s = out["best_accuracy"], out["smallest_p"]
    print(f"best constant shift of the class margin (oracle, read off these labels): {cell(b['accuracy'])}, "
          f"McNemar p vs zero-shot {format_p(b['p'])}")
    print(f"smallest p of a shift that beats zero-shot: {format_p(s['p'])} (accuracy {100 * s['accuracy']:.1f}%); "
          f"{out['significant']['shifts']} of the {out['significant']['of']} distinct shifts reach p < 0.05")
    verdict = "can" if s["p"] < 0.05 else "cannot"
    print(f"=> a label-prior correction alone {verdict} be significantly (p < 0.05) above zero-shot on this split"
          + (" (only by landing on one of those shifts)" if verdict == "can" else "") + ".")
    if args.pipeline is not None:
        for res in sorted(args.pipeline.glob("eval-post*/result.json")):
            r = json.loads(res.read_text())
            acc = r.get("accuracy", r.get("test_accuracy"))
            if acc is not None:
                print(f"{res.parent.name}: {100 * acc:.1f}% (n={r.get('n', '?')}) vs the prior-only bound "
                      f"{100 * b['accuracy']:.1f}%")


if __name__ == "__main__":
    main()
