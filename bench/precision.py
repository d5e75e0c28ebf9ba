"""Benchmark: the frozen model in bfloat16 vs float32 (``--dtype bfloat16`` / ``auto``), side by side in one process.

    python bench/precision.py [--model smollm2-135m] [--n 128] [--batch-size 16] [--steps 3] [--threads 1]
                              [--clock wall]

Times, interleaved in rounds (the best round of each counts), on the same MR texts with the same 10-token
fp32 prompt: scoring ``--n`` test texts (:func:`post.scoring.predict_scores`, batch 32) and a prompt-tuning
step (:meth:`post.tune.PromptTrainer.mean_gradient`, ``--batch-size`` training texts) and a DP step's
per-example clipped sum (:meth:`~post.tune.PromptTrainer.clipped_sum`). It also prints how far bf16 moves
what matters: the largest change of a class score, the share of texts whose predicted class flips, and the
cosine between the two tuning gradients. bf16 pays where the CPU has AVX512-BF16 or AMX (``native bf16``
below); elsewhere it is emulated and slower, and ``--dtype auto`` stays float32.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch

from post.config import native_bf16
from post.data import load_labelled
from post.models import load_model
from post.prompt import init_prompt
from post.scoring import Encoder, predict_scores
from post.tasks import Verbalizer
from post.tune import PromptTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="mr")
    ap.add_argument("--n", type=int, default=128, help="test texts scored")
    ap.add_argument("--batch-size", type=int, default=16, help="training texts per tuning step")
    ap.add_argument("--steps", type=int, default=3, help="rounds (each times every method once)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    data = load_labelled(args.task)
    loaded = load_model(args.model)
    enc = Encoder(data.task, loaded.tokenizer, loaded.kind, args.max_length)
    verb = Verbalizer.build(data.task, loaded.tokenizer)
    prompt = init_prompt(loaded, 10, init_text=data.task.init_text)
    texts = list(data.split("test").texts[: args.n])
    train = data.split("train")
    k = args.batch_size * args.steps
    models = {"float32": loaded, "bfloat16": dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to(
        torch.bfloat16))}
    trainers = {name: PromptTrainer(m, enc, verb, list(train.texts[:k]), list(train.labels[:k]), args.batch_size)
                for name, m in models.items()}
    best: dict[tuple[str, str], float] = {}
    scores, grads = {}, {}
    for r in range(args.steps):
        idx = torch.arange(r * args.batch_size, (r + 1) * args.batch_size)
        for name, m in models.items():
            t0 = clock()
            scores[name] = predict_scores(m.model, enc, verb, texts, batch_size=32, prompt=prompt, progress=False)
            t1 = clock()
            grads[name], _ = trainers[name].mean_gradient(prompt, idx)
            t2 = clock()
            trainers[name].clipped_sum(prompt, idx, 1.0)
            t3 = clock()
            for what, t in (("scoring", t1 - t0), ("tuning step", t2 - t1), ("DP step", t3 - t2)):
                best[(what, name)] = min(best.get((what, name), float("inf")), t)
    a, b = scores["float32"], scores["bfloat16"]
    cos = float(torch.nn.functional.cosine_similarity(grads["float32"].flatten(), grads["bfloat16"].flatten(), dim=0))
    print(f"model {args.model}  threads={args.threads}  clock={args.clock}  native bf16 on this CPU: "
          f"{native_bf16(torch.device('cpu'))}  best of {args.steps} interleaved rounds")
    print(f"{'what':<14}{'float32 s':>11}{'bfloat16 s':>12}{'fp32 / bf16':>13}")
    for what in ("scoring", "tuning step", "DP step"):
        f, h = best[(what, "float32")], best[(what, "bfloat16")]
        print(f"{what:<14}{f:>11.2f}{h:>12.2f}{f / h:>12.2f}x")
    print(f"scoring {len(texts)} texts: largest class-score change {np.abs(a - b).max():.3f}, predictions flipped "
          f"{(a.argmax(1) != b.argmax(1)).mean():.1%}; tuning gradient cosine (last round) {cos:.4f}")


if __name__ == "__main__":
    main()
