"""Benchmark: a POST transfer step vs a prompt-tuning step on the target, and the whole cost ratio.

    python bench/transfer_step.py [--target smollm2-135m] [--keep-layers 0,10,20,29] [--n-tokens 10]

Measured side by side in one process, interleaved, on the same batches:
- transfer step (target forward+backward with the cached constants) ÷ prompt-tuning step on the
  target, both on the same MR sentences (target ≤ 1.2: the cached Φs(ps;x), Φs(x), Φt(x) make the step
  one target pass), and the step on the public tweets it really takes (longer, so dearer);
- the whole user+provider cost, tuning on Φs for --epochs plus --transfer-steps transfer steps
  (and the one-off constant caching), ÷ tuning on Φt for the same epochs;
- with --compare-unsorted, the one-off caching of Φs(ps;x), Φs(x), Φt(x) as ``Scorer.constants`` does it
  (packed forwards of about --constants-batch texts' tokens) ÷ padded batches of --constants-batch, length-
  bucketed and in input order, and the tokens each runs.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np
import torch

from post import cost
from post.data import load_labelled
from post.models import load_model
from post.prompt import init_prompt
from post.scoring import Encoder, length_buckets, packs, score_groups
from post.student import build_student
from post.tasks import Verbalizer
from post.transfer import Scorer, post_loss
from post.tune import PromptTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--keep-layers", default="0,10,20,29")
    ap.add_argument("--n-tokens", type=int, default=10)
    ap.add_argument("--tune-batch", type=int, default=32)
    ap.add_argument("--transfer-batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--transfer-steps", type=int, default=300)
    ap.add_argument("--public", type=int, default=256, help="public texts whose constants are cached")
    ap.add_argument("--constants-batch", type=int, default=8,
                    help="batch of the constant caching (post transfer uses its --batch-size, default 8)")
    ap.add_argument("--compare-unsorted", action="store_true",
                    help="also time the caching with input-order batches (before length bucketing)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time this process's CPU seconds (a machine shared with other jobs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    data = load_labelled("mr")
    public = list(load_labelled("airline").split("train").texts[: args.public])
    target = load_model(args.target)
    source = build_student(target, args.keep_layers)
    train = data.split("train")

    def trainer(m):
        enc = Encoder(data.task, m.tokenizer, m.kind, 128)
        return PromptTrainer(m, enc, Verbalizer.build(data.task, m.tokenizer), train.texts, train.labels,
                             micro_batch_size=args.tune_batch)

    tune_s, tune_t = trainer(source), trainer(target)
    prompt = init_prompt(target, args.n_tokens, init_text=data.task.init_text)
    tgt = Scorer(target, data.task, public, mode="vocab", max_length=128)
    src = Scorer(source, data.task, public, mode="vocab", max_length=128)
    cb = args.constants_batch
    with torch.no_grad():  # warm-up
        src(np.arange(2), prompt), tgt(np.arange(2), None)
    t0 = clock()
    consts = [src.constants(prompt, cb), src.constants(None, cb), tgt.constants(None, cb)]
    t_cache = clock() - t0
    t_unsorted = t_bucketed = None
    if args.compare_unsorted:
        with mock.patch("post.scoring.packs", return_value=False):
            t0 = clock()
            unsorted = [_input_order(src, prompt, cb), _input_order(src, None, cb), _input_order(tgt, None, cb)]
            t_unsorted = clock() - t0
            for sc in (src, tgt):
                sc.packing = False
            t0 = clock()
            bucketed = [src.constants(prompt, cb), src.constants(None, cb), tgt.constants(None, cb)]
            t_bucketed = clock() - t0
            for sc in (src, tgt):
                sc.packing = packs(sc.loaded.model, sc.encoder)
        worst = max(float((a - b).abs().max()) for other in (unsorted, bucketed)
                    for a, b in zip(consts, other, strict=True))
        scale = max(float(c.abs().max()) for c in consts)
    pt = prompt.clone().requires_grad_(True)
    # The same step on the very texts the tuning step takes (the first --steps batches of MR training
    # sentences): the public tweets are longer, so only this pair isolates the transfer step's overhead.
    same_texts = list(train.texts[: args.steps * args.tune_batch])
    tgt_same = Scorer(target, data.task, same_texts, mode="vocab", max_length=128)
    src_same = Scorer(source, data.task, same_texts, mode="vocab", max_length=128)
    consts_same = [src_same.constants(prompt, cb), src_same.constants(None, cb), tgt_same.constants(None, cb)]

    def transfer_step(idx: np.ndarray, scorer: Scorer = tgt, c: list[torch.Tensor] = consts) -> None:
        out = post_loss(scorer(idx, pt), c[2][idx], c[0][idx], c[1][idx], alpha=0.5, temperature=2.0)
        torch.autograd.grad(out["loss"], pt)

    rng = np.random.default_rng(0)
    big, small = f"tune target (batch {args.tune_batch})", f"tune target (batch {args.transfer_batch})"
    move = f"transfer (batch {args.transfer_batch})"
    same = f"transfer, tuning's texts ({args.transfer_batch})"
    times = dict.fromkeys((big, "tune source", move, small, same), 0.0)
    tune_s.mean_gradient(prompt, torch.arange(4))  # warm-up
    for step in range(args.steps):
        idx = torch.arange(step * args.tune_batch, (step + 1) * args.tune_batch)
        pub = rng.choice(len(public), args.transfer_batch, replace=False)
        jobs = ((big, tune_t.mean_gradient, idx), ("tune source", tune_s.mean_gradient, idx),
                (small, tune_t.mean_gradient, idx[: args.transfer_batch]))
        for name, fn, batch in jobs:
            t = clock()
            fn(prompt, batch)
            times[name] += clock() - t
        t = clock()
        transfer_step(pub)
        times[move] += clock() - t
        t = clock()
        transfer_step(idx[: args.transfer_batch].numpy(), tgt_same, consts_same)
        times[same] += clock() - t
    times = {k: v / args.steps for k, v in times.items()}
    print(f"target {args.target}, source layers {args.keep_layers} of it, {args.n_tokens}-token prompt, "
          f"{args.steps} interleaved steps, {torch.get_num_threads()} threads")
    for k, v in times.items():
        print(f"  {k:<28}{v:8.3f} s/step")
    print(f"  caching constants for {args.public} public texts (batch {cb}): {t_cache:.1f} s (once)")
    if t_unsorted is not None and t_bucketed is not None:
        lengths = {"source": [len(x) for x in src.seqs], "target": [len(x) for x in tgt.seqs]}
        real = 2 * sum(lengths["source"]) + args.n_tokens * args.public + sum(lengths["target"])
        padded = {how: 2 * _padded(lengths["source"], cb, how) + args.n_tokens * args.public
                  + _padded(lengths["target"], cb, how) for how in ("bucketed", "input order")}

        def packed_tokens(sc: Scorer, extra: int) -> float:
            groups = [g.tolist() for g in score_groups([len(x) for x in sc.seqs], cb, extra, packing=sc.packing)]
            return cost._run(sc.seqs, groups, extra, sc.packing).tokens

        packed = int(packed_tokens(src, args.n_tokens) + packed_tokens(src, 0) + packed_tokens(tgt, 0))
        print(f"  same, padded batches bucketed: {t_bucketed:.1f} s, in input order: {t_unsorted:.1f} s; packed ÷ "
              f"bucketed {t_cache / t_bucketed:.3f}, packed ÷ input order {t_cache / t_unsorted:.3f} (largest "
              f"score difference {worst:.1e}, scores up to {scale:.1f})")
        print(f"  tokens run by the caching: real {real}, packed {packed} ({packed / real:.2f}x), bucketed "
              f"{padded['bucketed']} ({padded['bucketed'] / real:.2f}x), input order {padded['input order']} "
              f"({padded['input order'] / real:.2f}x)")
    ratio = times[same] / times[small]
    print(f"transfer step / tuning step on the target, same texts: {ratio:.3f}  (target <= 1.2)")
    print(f"transfer step on public tweets / tuning step on MR sentences: {times[move] / times[small]:.3f} "
          "(the tweets are longer)")
    steps_per_epoch = int(np.ceil(len(train) / args.tune_batch))
    user = args.epochs * steps_per_epoch * times["tune source"]
    provider = t_cache + args.transfer_steps * times[move]
    direct = args.epochs * steps_per_epoch * times[big]
    print(f"tune on Φs ({args.epochs} epochs) {user / 60:.1f} min + transfer ({args.transfer_steps} steps) "
          f"{provider / 60:.1f} min = {(user + provider) / 60:.1f} min vs tune on Φt {direct / 60:.1f} min: "
          f"{(user + provider) / direct:.3f} of the cost ({direct / (user + provider):.1f}x cheaper)")


def _input_order(scorer: Scorer, prompt: torch.Tensor | None, batch: int) -> torch.Tensor:
    """The constants as computed before length bucketing: consecutive batches in input order."""
    n = len(scorer.seqs)
    with torch.no_grad():
        return torch.cat([scorer(np.arange(i, min(i + batch, n)), prompt).cpu() for i in range(0, n, batch)])


def _padded(lengths: list[int], batch: int, how: str) -> int:
    """Tokens run (without a prompt) when ``lengths`` are batched bucketed or in input order."""
    groups = length_buckets(lengths, batch) if how == "bucketed" else [
        np.arange(i, min(i + batch, len(lengths))) for i in range(0, len(lengths), batch)]
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


if __name__ == "__main__":
    main()
