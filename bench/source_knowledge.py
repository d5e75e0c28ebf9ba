"""What crosses in the transfer: a source that knows the task, and public text from the task's domain.

    python bench/source_knowledge.py [--student runs/demo/distill/student] [--sources prompt norms layers]
                                     [--publics airline reviews] [--public-limit 96] [--transfer-steps 30]
                                     [--out runs/source-knowledge]

POST copies the change that the user's adaptation makes to the student's answers on public texts. On the demo's
student a 10-token prompt stays at chance on Φs, so only the private data's label balance can cross. This bench
asks what crosses when the source *does* know the task, and whether the public text has to come from the task's
domain for it to cross. Three adaptations of the student on the private ``mr`` train split (non-private):

- ``prompt``: the demo's ps (10 tokens, 50 steps of 32, Adam lr 3e-3), through ``post tune``;
- ``norms``: the student's RMSNorm scales (5,184 numbers, as few as the prompt's 5,760), 100 steps of 32, lr 1e-2;
- ``layers``: the student's four transformer layers (14.2M numbers; embeddings and head stay frozen), one epoch
  (100 steps of 32), AdamW lr 3e-4.

Each is transferred to Φt as the demo transfers (a 10-token pt from the task's init text, 30 Adam steps of 8 at
lr 3e-3 on 96 public texts, label-word loss, α = 1: only the change that the adaptation makes is matched, as the
public-data heuristic gives for every source here) with each public text set, and scored on the **validation**
split (never the test split: this chooses between settings). Every row: accuracy with its Wilson 95% interval and
n, per-class accuracy, exact McNemar p against zero-shot Φt on the same sentences. The sources' own accuracy is
given on Φs (validation) and on 400 class-balanced public airline tweets (what the transfer can see). Results go
to ``OUT/source-knowledge.json``. About 11 minutes on 2 CPU cores (fp32) with all sources and publics.

The ``norms`` and ``layers`` sources are not POST's private path: nothing here trains them with DP, and their
weights (or their answers on public text) would be what leaves the user.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from post.data import load_labelled, load_texts
from post.models import load_model
from post.prompt import init_prompt, load_prompt
from post.resolve import subset
from post.scoring import Encoder, examples_hidden, label_scores, predict_scores
from post.stats import accuracy_interval, format_p, mcnemar_exact
from post.tasks import Verbalizer
from post.transfer import Scorer, post_loss, public_labelled
from post.tune import TuneConfig, tune

MAX_LENGTH, BATCH = 64, 32
SOURCES = ["prompt", "norms", "layers"]
ADAPT = {"norms": (100, 1e-2), "layers": (100, 3e-4)}  # steps of 32, lr


def _predict(model, enc, verb, texts, prompt=None) -> np.ndarray:
    return np.asarray(predict_scores(model, enc, verb, list(texts), prompt=prompt, progress=False)).argmax(1)


def _adapt(student, enc, verb, train, which: str) -> torch.nn.Module:
    """A copy of the student with its norm scales or its layers tuned on the private train split."""
    steps, lr = ADAPT[which]
    model = copy.deepcopy(student.model)
    params = [p for n, p in model.named_parameters()
              if "embed" not in n and "lm_head" not in n and (which == "layers" or "norm" in n)]
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    seqs, answers = enc.encode(list(train.texts))
    labels = torch.tensor(train.labels)
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        idx = order[(step * BATCH) % len(seqs):][:BATCH]
        loss = F.cross_entropy(label_scores(model, examples_hidden(model, enc, seqs, answers, idx), verb).float(),
                               labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned = sum(p.numel() for p in params)
    print(f"  {which}: {tuned:,} numbers tuned, {steps} steps, last loss {float(loss.detach()):.3f}", flush=True)
    return model.requires_grad_(False).eval()


def _transfer(target, task, texts, s_prompted, s_plain, steps: int, seed: int = 0) -> torch.Tensor:
    """pt fitted so that Φt's change matches the source's (α = 1), ``steps`` of 8 at lr 3e-3 (the demo: 30)."""
    tgt = Scorer(target, task, texts, mode="label-words", max_length=MAX_LENGTH)
    t_plain = tgt.constants(None, 8)
    pt = init_prompt(target, 10, init="text", init_text=task.init_text, seed=seed).requires_grad_(True)
    opt = torch.optim.Adam([pt], lr=3e-3)
    for step in range(steps):
        idx = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))[:8]
        terms = post_loss(tgt(idx, pt), t_plain[idx], s_prompted[idx], s_plain[idx], alpha=1.0, temperature=2.0)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    return pt.detach()


def _row(pred: np.ndarray, labels: np.ndarray, zs_pred: np.ndarray) -> dict:
    acc = float((pred == labels).mean())
    low, high = accuracy_interval(acc, len(labels))
    test = mcnemar_exact(list(pred == labels), list(zs_pred == labels))
    return {"accuracy": acc, "low": low, "high": high, "n": len(labels), "p_vs_zero_shot": test["p_value"],
            "per_class": [float((pred[labels == k] == k).mean()) for k in range(int(labels.max()) + 1)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="runs/demo/distill/student")
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--sources", nargs="+", default=SOURCES, choices=SOURCES)
    ap.add_argument("--publics", nargs="+", default=["airline", "reviews"])
    ap.add_argument("--public-limit", type=int, default=96, help="public texts for the transfer (the demo: 96)")
    ap.add_argument("--transfer-steps", type=int, default=30, help="transfer steps of 8 (the demo: 30)")
    ap.add_argument("--out", type=Path, default=Path("runs/source-knowledge"))
    args = ap.parse_args()
    if not Path(args.student).exists():
        sys.exit(f"{args.student} is missing: distil the demo's student first (post run demo --only distill).")
    start = time.perf_counter()
    torch.manual_seed(0)
    data = load_labelled("mr")
    task, train, val = data.task, data.split("train"), data.split("validation")
    labels = np.asarray(val.labels)
    student, target = load_model(args.student), load_model(args.target)
    enc, verb = Encoder(task, student.tokenizer, student.kind, MAX_LENGTH), Verbalizer.build(task, student.tokenizer)
    pub_texts, pub_labels = public_labelled("airline", task, limit=400, seed=0)
    zs = _predict(target.model, enc, verb, val.texts)
    out = {"n": len(labels), "public_limit": args.public_limit, "transfer_steps": args.transfer_steps,
            "zero_shot": _row(zs, labels, zs), "sources": {}}
    print(f"zero-shot Φt on validation: {out['zero_shot']['accuracy']:.1%} (n = {len(labels)})", flush=True)
    publics = {}
    for name in args.publics:
        texts = load_texts(name)
        publics[name] = [texts[i] for i in subset(len(texts), args.public_limit, 0)]  # the transfer's draw (seed 0)
    for which in args.sources:
        prompt = None
        if which == "prompt":
            cfg = TuneConfig(model=args.student, task="mr", max_length=MAX_LENGTH, n_tokens=10, max_steps=50,
                             lr=3e-3, batch_size=BATCH, eval_limit=100, test=False)
            run = tune(cfg, args.out / "ps")
            prompt, adapted = load_prompt(run.prompt, student).tensor, student
        else:
            adapted = dataclasses.replace(student, model=_adapt(student, enc, verb, train, which))
        on_s = float((_predict(adapted.model, enc, verb, val.texts, prompt) == labels).mean())
        on_pub = float((_predict(adapted.model, enc, verb, pub_texts, prompt) == np.asarray(pub_labels)).mean())
        rec = {"on_student_validation": on_s, "on_public_airline": on_pub, "post": {}}
        for name, texts in publics.items():
            s_plain = Scorer(student, task, texts, mode="label-words", max_length=MAX_LENGTH).constants(None, 8)
            s_prompted = Scorer(adapted, task, texts, mode="label-words", max_length=MAX_LENGTH).constants(prompt, 8)
            pt = _transfer(target, task, texts, s_prompted, s_plain, args.transfer_steps)
            rec["post"][name] = _row(_predict(target.model, enc, verb, val.texts, pt), labels, zs)
            r = rec["post"][name]
            print(f"  {which} → POST with public {name}: {r['accuracy']:.1%} [{r['low']:.1%}–{r['high']:.1%}] "
                  f"p vs zero-shot {format_p(r['p_vs_zero_shot'])}", flush=True)
        out["sources"][which] = rec
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "source-knowledge.json").write_text(json.dumps(out, indent=1))
    z = out["zero_shot"]
    print(f"\nValidation split, n = {len(labels)}; zero-shot Φt {z['accuracy']:.1%} [{z['low']:.1%}–{z['high']:.1%}] "
          f"(per class {' / '.join(f'{a:.1%}' for a in z['per_class'])})")
    print("| source | on Φs (val) | on public tweets | " + " | ".join(f"POST, public {p}" for p in publics) + " |")
    print("|---|---|---|" + "---|" * len(publics))
    for which, rec in out["sources"].items():
        cells = [f"{r['accuracy']:.1%} [{r['low']:.1%}–{r['high']:.1%}] p {format_p(r['p_vs_zero_shot'])} "
                 f"({' / '.join(f'{a:.0%}' for a in r['per_class'])})" for r in rec["post"].values()]
        print(f"| {which} | {rec['on_student_validation']:.1%} | {rec['on_public_airline']:.1%} | "
              + " | ".join(cells) + " |")
    print(f"\n{time.perf_counter() - start:.0f} s; results in {args.out / 'source-knowledge.json'}")


if __name__ == "__main__":
    main()
