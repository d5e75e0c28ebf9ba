"""Benchmark: batched verbalized scoring vs a one-at-a-time loop vs the raw model forward.

    python bench/scoring.py [--model smollm2-135m] [--n 256] [--batch-size 32]

All three run in this one process on the same texts. "raw forward" is the plain
``model(input_ids, attention_mask, use_cache=False)`` over the same padded batches (full-vocabulary
logits at every position), i.e. what scoring would cost done naively. Targets: batched ≥ 3× the
loop and ≥ 0.8× the raw forward.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from post.data import load_labelled
from post.models import load_model
from post.scoring import Encoder, predict_scores
from post.tasks import Verbalizer


def timed(fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="mr")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--loop-n", type=int, default=64, help="examples for the one-at-a-time loop")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    data = load_labelled(args.task)
    texts = list(data.split("test").texts[: args.n])
    loaded = load_model(args.model)
    enc = Encoder(data.task, loaded.tokenizer, loaded.kind, args.max_length)
    verb = Verbalizer.build(data.task, loaded.tokenizer)
    model = loaded.model

    predict_scores(model, enc, verb, texts[:8], batch_size=8, progress=False)  # warm-up
    t_batched = timed(lambda: predict_scores(model, enc, verb, texts, batch_size=args.batch_size, progress=False))
    loop_texts = texts[: args.loop_n]

    def loop() -> None:
        for t in loop_texts:
            predict_scores(model, enc, verb, [t], batch_size=1, progress=False)

    t_loop = timed(loop, repeat=1) * len(texts) / len(loop_texts)
    batches = [b for _, b in enc.batches(texts, args.batch_size)]

    @torch.no_grad()
    def raw() -> None:
        for b in batches:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    t_raw = timed(raw)
    n_tok = int(sum(int(b.attention_mask.sum()) for b in batches))
    rate = lambda t: len(texts) / t  # noqa: E731
    threads = torch.get_num_threads()
    print(f"model {args.model}  n={len(texts)}  tokens={n_tok}  batch={args.batch_size}  threads={threads}")
    print(f"{'method':<26}{'seconds':>10}{'examples/s':>14}{'tokens/s':>12}")
    for name, t in [("batched scoring", t_batched), ("one-at-a-time loop", t_loop), ("raw model forward", t_raw)]:
        print(f"{name:<26}{t:>10.2f}{rate(t):>14.1f}{n_tok / t:>12.0f}")
    print(f"batched / loop throughput: {t_loop / t_batched:.2f}x  (target >= 3)")
    print(f"batched / raw forward throughput: {t_raw / t_batched:.2f}x  (target >= 0.8)")
    assert np.isfinite(t_batched)


if __name__ == "__main__":
    main()
