"""Benchmark: a prompt-tuning step vs the raw model's forward+backward, and the cost model's prediction.

    python bench/tune_step.py [--model smollm2-135m] [--n-tokens 10] [--batch-size 16] [--steps 3]
        [--micro-batch-size 8 --compare-unsorted]

Measured side by side in one process, interleaved, on the same batches of MR training sentences:
- tuning step: :meth:`post.tune.PromptTrainer.mean_gradient` (prompt in each example's slots, class
  scores at the answer position, cross-entropy, gradient to the prompt), packed as the code runs it;
- raw, same inputs: ``model(inputs_embeds=..., position_ids=...).logits`` over the very rows the step
  runs (full-vocabulary logits at every position, as a plain Hugging Face forward gives them) and a
  backward from the answer-position logits to the prompt: the model's own passes on the same tokens;
- padded step: the same step with packing off (each micro-batch padded to its longest), and the raw
  forward+backward over that padded batch: what tuning cost before packing, and done naively.
Prints raw (same inputs) time ÷ tuning-step time (target ≥ 0.9: the step adds nothing to the model's
own passes), padded ÷ packed, and the step time the cost model predicts from a calibration here.

With --micro-batch-size below --batch-size the step accumulates micro-batches, sorted by token length
(``PromptTrainer._chunks``); --compare-unsorted also times the same step with the micro-batches in input
order (as before the sort) and counts the tokens each runs, on the timed batches and over one epoch of
tuning's random batches at this --max-length.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np
import torch

from post import cost
from post.cost import arch_from_config, calibrate, prompt_step_flops
from post.data import load_labelled
from post.models import load_model
from post.prompt import init_prompt
from post.scoring import Encoder, packed_inputs, packs, prepend_prompt, tight_rows
from post.tasks import Verbalizer
from post.tune import PromptTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-tokens", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro-batch-size", type=int, default=None, help="examples per forward (default: the batch)")
    ap.add_argument("--compare-unsorted", action="store_true",
                    help="also time the step with input-order micro-batches (before the length sort)")
    ap.add_argument("--no-cost-model", action="store_true", help="skip the calibration of the cost model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time this process's CPU seconds (a machine shared with other jobs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    data = load_labelled("mr")
    loaded = load_model(args.model)
    enc = Encoder(data.task, loaded.tokenizer, loaded.kind, args.max_length)
    verb = Verbalizer.build(data.task, loaded.tokenizer)
    train = data.split("train")
    micro = args.micro_batch_size or args.batch_size
    trainer = PromptTrainer(loaded, enc, verb, train.texts, train.labels, micro_batch_size=micro)
    unsorted = PromptTrainer(loaded, enc, verb, train.texts, train.labels, micro_batch_size=micro)
    unsorted._chunks = lambda idx: _input_order(len(idx), micro)  # type: ignore[method-assign]
    prompt = init_prompt(loaded, args.n_tokens, init_text=data.task.init_text)
    model = loaded.model
    batches = [torch.arange(i * args.batch_size, (i + 1) * args.batch_size) for i in range(args.steps + 1)]

    packing = packs(model, enc)

    def step(idx: torch.Tensor) -> None:
        trainer.mean_gradient(prompt, idx)

    def padded_step(idx: torch.Tensor) -> None:
        with mock.patch("post.scoring.packs", return_value=False):
            trainer.mean_gradient(prompt, idx)

    def raw(idx: torch.Tensor) -> None:
        """The model's own forward+backward over the rows the step runs (each micro-batch, packed or not)."""
        p = prompt.clone().requires_grad_(True)
        for pos in trainer._chunks(idx):
            ids = [int(i) for i in idx[pos]]
            if packing:
                rows = tight_rows([len(trainer.seqs[i]) + args.n_tokens for i in ids])
                batch = enc.collate_packed([[ids[j] for j in row] for row in rows], trainer.seqs, trainer.answers,
                                           args.n_tokens)
                logits = model(**packed_inputs(model, batch, p), use_cache=False).logits
                picked = logits[batch.answer_row, batch.answer_col, verb.token_ids[0]]
            else:
                picked = _raw_padded(ids, p)
            torch.autograd.grad(picked.sum(), p)

    def _raw_padded(ids: list[int], p: torch.Tensor) -> torch.Tensor:
        batch = enc.collate([trainer.seqs[i] for i in ids], [trainer.answers[i] for i in ids])
        logits = model(**prepend_prompt(model, batch, p), use_cache=False).logits
        return logits[torch.arange(len(batch)), batch.answer_index + args.n_tokens, verb.token_ids[0]]

    def raw_padded(idx: torch.Tensor) -> None:
        p = prompt.clone().requires_grad_(True)
        for pos in trainer._chunks(idx):
            torch.autograd.grad(_raw_padded([int(i) for i in idx[pos]], p).sum(), p)

    jobs = {"step": step, "raw": raw, "padded step": padded_step, "raw padded": raw_padded}
    if args.compare_unsorted:
        jobs["unsorted"] = lambda idx: unsorted.mean_gradient(prompt, idx)
    for fn in jobs.values():  # warm-up
        fn(batches[0])
    took = dict.fromkeys(jobs, 0.0)
    groups: list[list[int]] = []
    for idx in batches[1:]:
        for name, fn in jobs.items():
            t0 = clock()
            fn(idx)
            took[name] += clock() - t0
        groups += [idx[pos].tolist() for pos in trainer._chunks(idx)]
    tokens = cost._run(trainer.seqs, groups, args.n_tokens, packing)
    padded_tokens = cost._run(trainer.seqs, groups, args.n_tokens, False)
    t_step, t_raw, t_unsorted = took["step"], took["raw"], took.get("unsorted", 0.0)
    n = args.steps
    print(f"model {args.model}, {args.n_tokens}-token prompt, batch {args.batch_size} in micro-batches of {micro}, "
          f"{n} interleaved steps, {torch.get_num_threads()} thread(s), {args.clock} clock, packed: {packing}")
    print(f"  prompt-tuning step          {t_step / n:8.3f} s/step  ({tokens.tokens / n:.0f} tokens run per step)")
    print(f"  raw forward+backward        {t_raw / n:8.3f} s/step  (full logits at every position, the same rows)")
    print(f"  padded step                 {took['padded step'] / n:8.3f} s/step  ({padded_tokens.tokens / n:.0f} "
          f"tokens run per step)")
    print(f"  raw forward+backward padded {took['raw padded'] / n:8.3f} s/step")
    print(f"padded step / packed step: {took['padded step'] / t_step:.3f}")
    if not args.no_cost_model:
        width = int(padded_tokens.tokens / padded_tokens.seqs) - args.n_tokens
        rates = calibrate(args.model, "0", n_tokens=args.n_tokens, text_tokens=width, batch=args.batch_size,
                          steps=2, threads=args.threads, clock=args.clock)
        arch = arch_from_config(model.config.to_dict(), args.model)
        predicted = rates.seconds(prompt_step_flops(arch, tokens, head_cols=len(verb.token_ids))) / args.steps
        print(f"  cost model (calibrated)     {predicted:8.3f} s/step  ({predicted / (t_step / n) - 1:+.0%})")
    print(f"raw time / tuning-step time: {t_raw / t_step:.3f}  (target >= 0.9)")
    if args.compare_unsorted:
        print(f"  same step, micro-batches in input order {t_unsorted / n:8.3f} s/step; "
              f"sorted ÷ input order {t_step / t_unsorted:.3f}")
        _print_tokens("timed batches", trainer, batches[1:], args.n_tokens, micro)
        epoch = [torch.from_numpy(b) for b in np.array_split(np.random.default_rng([0, 0]).permutation(len(train)),
                                                                 range(args.batch_size, len(train), args.batch_size))]
        _print_tokens(f"one epoch of random batches of {args.batch_size}", trainer, epoch, args.n_tokens, micro)


def _input_order(n: int, micro: int) -> list[torch.Tensor]:
    """Positions of a batch of ``n`` split into micro-batches in input order (before the length sort)."""
    return [torch.arange(i, min(i + micro, n)) for i in range(0, n, micro)]


def _print_tokens(what: str, trainer: PromptTrainer, batches: list[torch.Tensor], n_tokens: int, micro: int) -> None:
    """Real tokens vs tokens run (padded, prompt included) with input-order and length-sorted micro-batches."""
    seqs = trainer.seqs

    def run(split) -> int:
        return sum(len(p) * (max(len(seqs[int(i)]) for i in idx[p]) + n_tokens) for idx in batches for p in split(idx))

    real = sum(len(seqs[int(i)]) + n_tokens for idx in batches for i in idx)
    whole = run(lambda idx: [torch.arange(len(idx))])
    before, after = run(lambda idx: _input_order(len(idx), micro)), run(trainer._chunks)
    per = sum(len(b) for b in batches)
    print(f"  tokens, {what}: real {real} ({real / per:.1f}/example), whole batch in one forward {whole} "
          f"({whole / real:.2f}x), input-order micro-batches {before} ({before / real:.2f}x), sorted {after} "
          f"({after / real:.2f}x): {1 - after / before:.0%} fewer")


if __name__ == "__main__":
    main()
