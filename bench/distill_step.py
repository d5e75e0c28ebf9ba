"""Benchmark: a distillation step vs its floor (student forward+backward + teacher forward).

    python bench/distill_step.py [--teacher smollm2-135m] [--keep-layers 0,15,29] [--batch-size 8] [--block-size 128]

Both are measured side by side, interleaved, in one process on the same batches of packed
offline-corpus text. The floor is what any distillation step must pay: the teacher's forward
(no grad) and the student's forward and backward with an ordinary LM loss. The step adds the
temperature-scaled KL over the full vocabulary and the cosine term.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from post.data import load_texts
from post.distill import DistillConfig, distill_losses, pack_blocks
from post.models import load_model
from post.student import build_student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--keep-layers", default="0,15,29")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    teacher = load_model(args.teacher)
    student = build_student(teacher, args.keep_layers)
    model = student.model
    model.requires_grad_(True)
    model.get_input_embeddings().requires_grad_(False)
    model.train()
    blocks = pack_blocks(load_texts("news", limit=200), teacher.tokenizer, args.block_size)
    batches = [blocks[i * args.batch_size : (i + 1) * args.batch_size] for i in range(args.steps + 1)]
    cfg = DistillConfig(teacher=args.teacher)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(ids: torch.Tensor) -> None:
        distill_losses(model, teacher.model, ids, kind=teacher.kind, cfg=cfg)["loss"].backward()
        opt.step()
        opt.zero_grad()

    def floor(ids: torch.Tensor) -> None:
        with torch.no_grad():
            teacher.model(input_ids=ids, use_cache=False)
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()

    step(batches[0])  # warm-up
    floor(batches[0])
    t_step = t_floor = 0.0
    for ids in batches[1:]:
        t0 = time.perf_counter()
        step(ids)
        t_step += time.perf_counter() - t0
        t0 = time.perf_counter()
        floor(ids)
        t_floor += time.perf_counter() - t0
    tokens = args.steps * args.batch_size * args.block_size
    print(f"teacher {args.teacher}, student layers {args.keep_layers}, batch {args.batch_size}x{args.block_size}, "
          f"{args.steps} steps, {torch.get_num_threads()} threads")
    print(f"distillation step: {t_step / args.steps:.2f} s/step, {tokens / t_step:.0f} tokens/s")
    print(f"floor (teacher fwd + student fwd/bwd): {t_floor / args.steps:.2f} s/step, {tokens / t_floor:.0f} tokens/s")
    print(f"step throughput / floor throughput: {t_floor / t_step:.3f}  (1.0 = no overhead beyond the floor)")


if __name__ == "__main__":
    main()
