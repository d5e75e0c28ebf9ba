"""Benchmark: batched verbalized scoring vs a one-at-a-time loop vs the raw model forward.

    python bench/scoring.py [--model smollm2-135m] [--prompt-tokens 10] [--n 128] [--batch-size 32] [--threads 1]
                            [--clock wall]

All of them run in this one process on the same texts, with the same soft prompt (``--prompt-tokens``,
initialised from the task's init text as ``post tune`` does; 0 for none), interleaved in rounds (the best
round of each counts), so drift in the machine's load hits them alike. "batched" is
:func:`post.scoring.predict_scores` (for a causal LM: the prompt and the template's shared start run once
per call, and the rest of each example is packed end to end in rows attending to it through a KV cache;
results put back in input order); "whole examples" is the same without that sharing (each example packed
whole, prompt included); "bucketed" is the padded alternative (sorted by length, each batch padded to its
own longest); "loop" scores one text per call (one forward of the whole text: a lone text has no start to
share, :func:`post.scoring.start_pays`); "raw forward" is the plain
``model(..., attention_mask, use_cache=False)`` over the bucketed batches (full-vocabulary logits at
every position), i.e. what scoring would cost done naively; "not bucketed" is padded batches in input
order. ``--clock cpu`` times this process's CPU seconds instead of the wall clock (on a machine shared
with other jobs). Targets: batched ≥ 3× the loop and ≥ 0.8× the raw forward.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from post import cost
from post.data import load_labelled
from post.models import load_model
from post.prompt import init_prompt
from post.scoring import (
    Encoder,
    class_scores,
    head_ids,
    packs,
    predict_scores,
    prepend_prompt,
    score_groups,
)
from post.tasks import Verbalizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="mr")
    ap.add_argument("--prompt-tokens", type=int, default=10, help="soft prompt length (the demo's 10; the paper's "
                    "100; 0 for none)")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--loop-n", type=int, default=32, help="examples for the one-at-a-time loop (scaled to --n)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the model's dtype, for every method alike")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    data = load_labelled(args.task)
    texts = list(data.split("test").texts[: args.n])
    loaded = load_model(args.model, dtype=getattr(torch, args.dtype))
    enc = Encoder(data.task, loaded.tokenizer, loaded.kind, args.max_length)
    verb = Verbalizer.build(data.task, loaded.tokenizer)
    model = loaded.model
    n = args.prompt_tokens
    prompt = init_prompt(loaded, n, init_text=data.task.init_text) if n else None
    loop_texts = texts[: args.loop_n]
    batches = [b for _, b in enc.batches(texts, args.batch_size)]
    seqs, answers = enc.encode(texts)
    unsorted = [enc.collate(seqs[i : i + args.batch_size], answers[i : i + args.batch_size])
                for i in range(0, len(seqs), args.batch_size)]
    packing = packs(model, enc)
    groups = [g.tolist() for g in score_groups([len(q) for q in seqs], args.batch_size, n, packing=packing)]
    # the tokens each method runs, as the cost model counts them (tests check it against the forwards)
    shared_tokens = int(cost._scored(seqs, answers, len(head_ids(enc)), args.batch_size, n, packing).tokens)
    whole_tokens = int(cost._run(seqs, groups, n, packing).tokens)

    def batched() -> None:
        predict_scores(model, enc, verb, texts, batch_size=args.batch_size, prompt=prompt, progress=False)

    def whole() -> None:
        predict_scores(model, enc, verb, texts, batch_size=args.batch_size, prompt=prompt, progress=False,
                       share_prefix=False)

    def loop() -> None:
        for t in loop_texts:
            predict_scores(model, enc, verb, [t], batch_size=1, prompt=prompt, progress=False)

    @torch.no_grad()
    def raw() -> None:
        for b in batches:
            model(**prepend_prompt(model, b, prompt), use_cache=False)

    @torch.no_grad()
    def no_buckets() -> None:
        for b in unsorted:
            class_scores(model, b, verb, prompt)

    @torch.no_grad()
    def bucketed() -> None:
        for b in batches:
            class_scores(model, b, verb, prompt)

    predict_scores(model, enc, verb, texts[:8], batch_size=8, prompt=prompt, progress=False)  # warm-up
    jobs = {"batched scoring": batched, "whole examples": whole, "one-at-a-time loop": loop,
            "raw model forward": raw, "padded, bucketed": bucketed, "padded, not bucketed": no_buckets}
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(args.rounds):
        for name, fn in jobs.items():
            t0 = clock()
            fn()
            best[name] = min(best[name], clock() - t0)
    best["one-at-a-time loop"] *= len(texts) / len(loop_texts)
    n_tok = int(sum(int(b.attention_mask.sum()) for b in batches)) + n * len(texts)  # the prompt counted as real
    run = sum(b.input_ids.numel() for b in batches) + n * len(texts)
    padded = {"batched scoring": shared_tokens, "whole examples": whole_tokens, "one-at-a-time loop": n_tok,
              "raw model forward": run, "padded, bucketed": run,
              "padded, not bucketed": sum(b.input_ids.numel() for b in unsorted) + n * len(texts)}
    print(f"model {args.model}  prompt={n} tokens  n={len(texts)}  tokens={n_tok} (prompt included)  "
          f"batch={args.batch_size}  threads={args.threads}  clock={args.clock}  dtype={args.dtype}  "
          f"best of {args.rounds} interleaved rounds")
    print(f"{'method':<26}{'seconds':>10}{'examples/s':>14}{'tokens run':>12}")
    for name, t in best.items():
        print(f"{name:<26}{t:>10.2f}{len(texts) / t:>14.1f}{padded[name]:>12}")
    t_b = best["batched scoring"]
    print(f"batched / loop throughput: {best['one-at-a-time loop'] / t_b:.2f}x  (target >= 3)")
    print(f"batched / raw forward throughput: {best['raw model forward'] / t_b:.2f}x  (target >= 0.8)")
    print(f"batched (shared start) / whole examples throughput: {best['whole examples'] / t_b:.2f}x")
    t_w = best["whole examples"]
    print(f"whole examples (packed) / padded bucketed throughput: {best['padded, bucketed'] / t_w:.2f}x"
          f"  (packed: {packing})")
    print(f"bucketed / not bucketed throughput: {best['padded, not bucketed'] / best['padded, bucketed']:.2f}x")
    assert np.isfinite(t_b)


if __name__ == "__main__":
    main()
