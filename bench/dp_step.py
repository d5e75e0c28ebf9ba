"""Benchmark: DP-SGD step vs non-private step, and a small student's step vs the full model's.

    python bench/dp_step.py [--model smollm2-135m] [--keep-layers 0,15,29] [--n-tokens 10] [--steps 3]

Measured side by side in one process on the same batches of MR training sentences:
- DP step (per-example gradients of the expanded prompt, clipping, noise) ÷ non-private step
  (gradient of the mean loss), target ≤ 1.15;
- prompt-tuning step on the layer-dropped student ÷ on the full model, which should approach the
  ratio of their layer counts (the embeddings and LM head are shared costs).
"""

from __future__ import annotations

import argparse
import time

import torch

from post.accounting import PrivacyLedger
from post.data import load_labelled
from post.dp import step_generator
from post.models import load_model
from post.prompt import init_prompt
from post.scoring import Encoder
from post.student import build_student, parse_keep_layers
from post.tasks import Verbalizer
from post.tune import PromptTrainer


def step_times(loaded, data, args) -> dict[str, float]:
    enc = Encoder(data.task, loaded.tokenizer, loaded.kind, 128)
    verb = Verbalizer.build(data.task, loaded.tokenizer)
    split = data.split("train")
    trainer = PromptTrainer(loaded, enc, verb, split.texts, split.labels, micro_batch_size=args.batch_size)
    prompt = init_prompt(loaded, args.n_tokens, init_text=data.task.init_text)
    ledger = PrivacyLedger(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.01, steps=0, planned_steps=1,
                           delta=1e-5, accountant="pld", dataset_size=len(split), target_epsilon=None, epsilon=0.0)
    batches = [torch.arange(i * args.batch_size, (i + 1) * args.batch_size) for i in range(args.steps)]
    trainer.mean_gradient(prompt, batches[0])  # warm-up
    out = {"nonprivate": 0.0, "dp": 0.0}
    for idx in batches:  # interleaved, so drift in machine load hits both alike
        t0 = time.perf_counter()
        trainer.mean_gradient(prompt, idx)
        out["nonprivate"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        trainer.dp_gradient(prompt, idx, ledger=ledger, expected_batch=args.batch_size,
                            noise=step_generator(0, 0, 1))
        out["dp"] += time.perf_counter() - t0
    return {k: v / len(batches) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--keep-layers", default="0,15,29")
    ap.add_argument("--n-tokens", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    data = load_labelled("mr")
    full = load_model(args.model)
    n_layers = full.model.config.num_hidden_layers
    keep = parse_keep_layers(args.keep_layers, n_layers)
    small = build_student(full, keep)
    t_full = step_times(full, data, args)
    t_small = step_times(small, data, args)
    print(f"{args.n_tokens}-token prompt, batch {args.batch_size}, {args.steps} steps each, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':<28}{'non-private s/step':>20}{'DP s/step':>12}{'DP / non-private':>18}")
    for name, t in ((f"{args.model} ({n_layers} layers)", t_full), (f"student ({len(keep)} layers)", t_small)):
        print(f"{name:<28}{t['nonprivate']:>20.3f}{t['dp']:>12.3f}{t['dp'] / t['nonprivate']:>18.3f}")
    print(f"DP step / non-private step (full model): {t_full['dp'] / t_full['nonprivate']:.3f}  (target <= 1.15)")
    print(f"student step / full step (DP): {t_small['dp'] / t_full['dp']:.3f}  "
          f"(layer ratio {len(keep)}/{n_layers} = {len(keep) / n_layers:.3f})")


if __name__ == "__main__":
    main()
