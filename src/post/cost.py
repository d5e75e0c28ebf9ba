"""Cost model of POST (issue #17): FLOPs and time of every stage, the user's and provider's share.

Shapes: S sequences, L a sequence's padded length (soft prompt included), d width, a = heads ·
head_dim the attention width, P the matmul parameters of one layer (attention projections + MLP),
V vocabulary, K the logit columns computed (V, or the W label words).

FLOPs (a multiply-add is 2) of one forward pass over a set of padded sequences:

- per layer: ``2·P·ΣL`` for the projections and the MLP, plus ``4·a·ΣL²`` for the attention scores
  QKᵀ and the weighted sum AV over the full L×L matrix (what eager/SDPA attention computes under a
  padding mask);
- LM head: ``2·d·K`` per position where logits are computed: the answer position only when scoring,
  tuning and transferring (K = W label words; K = V in transfer's vocab mode), every position in
  distillation (K = V, teacher and student);
- embeddings: a lookup, no FLOPs.

Backward (Kaplan et al. 2020's "backward ≈ 2× forward" holds only when weights are trained):

- prompt tuning and transfer train only the prompt, the model is frozen: each matmul needs the
  gradient of its input alone, one matmul, so ``1×`` its forward; attention needs four L² products
  (dS, dV, dQ, dK): ``2×`` its forward; the head ``1×`` at the positions it ran on;
- distillation trains the student's layers: input + weight gradients, ``2×`` their forward; the
  frozen head and embeddings need the input gradient only (``1×``); the teacher runs forward only,
  logits at every position;
- DP-SGD (:mod:`post.dp`): per-example gradients of the prompt come from the (B, n, d) expanded
  prompt in the same backward pass, so a DP step costs a non-private step (``dp_overhead``, 1 unless
  measured); Poisson sampling keeps the expected batch.

Time = forward FLOPs / forward rate + backward FLOPs / backward rate, per model (target, source):
rates measured on this machine (``post cost --calibrate``: a few scoring and prompt-tuning steps of
the real or a tiny model) or a stated device peak × utilisation. On a CPU the backward runs at a
much lower rate than the forward (elementwise and attention backward dominate a 135M model), which
is why the rates are kept apart.

``compare_run_dirs`` rebuilds the exact batches a finished run took (same seeds, same tokenizer) from
its ``config.yaml`` and predicts its ``train_seconds``; ``report_section`` renders that as Markdown.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from post.config import require
from post.errors import ConfigError, PostError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- architectures

@dataclass(frozen=True)
class Arch:
    """A transformer's shape, as far as FLOPs go.

    Attributes:
        name: For display.
        n_layers: Transformer blocks.
        d_model: Hidden width d.
        n_heads: Query heads.
        n_kv_heads: Key/value heads (grouped-query attention; = n_heads without it).
        head_dim: Width of one head.
        d_ff: MLP inner width.
        vocab: Vocabulary V (LM-head rows).
        gated: SwiGLU/GeGLU MLP with three matrices (Llama, Gemma) rather than two (GPT-2, RoBERTa).
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab: int
    gated: bool = True

    @property
    def attn_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """P: matmul weights of one block (q, k, v, o projections and the MLP; norms and biases left out)."""
        d, a, kv = self.d_model, self.attn_width, self.n_kv_heads * self.head_dim
        return 2 * d * a + 2 * d * kv + (3 if self.gated else 2) * d * self.d_ff

    @property
    def params(self) -> int:
        """Layer matmul weights plus one d×V matrix (tied or not, the head's FLOPs are one matrix)."""
        return self.n_layers * self.layer_params + self.d_model * self.vocab

    def keep(self, n_layers: int) -> Arch:
        """The layer-dropped student: same width, vocabulary and head, ``n_layers`` blocks."""
        return replace(self, n_layers=n_layers, name=f"{self.name} ({n_layers} of {self.n_layers} layers)")


def _llama(name: str, layers: int, d: int, heads: int, kv: int, ff: int, vocab: int) -> Arch:
    return Arch(name, layers, d, heads, kv, d // heads, ff, vocab, True)


# Shapes from the models' published config.json files (offline: no hub needed).
ARCHS: dict[str, Arch] = {
    "smollm2-135m": _llama("smollm2-135m", 30, 576, 9, 3, 1536, 49152),
    "gemma-3-270m": Arch("gemma-3-270m", 18, 640, 4, 1, 256, 2048, 262144, True),
    "gpt2-xl": Arch("gpt2-xl", 48, 1600, 25, 25, 64, 6400, 50257, False),
    "roberta-base": Arch("roberta-base", 12, 768, 12, 12, 64, 3072, 50265, False),
    "llama-2-7b": _llama("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
    "llama-3-8b": _llama("llama-3-8b", 32, 4096, 32, 8, 14336, 128256),
    "llama-3-70b": _llama("llama-3-70b", 80, 8192, 64, 8, 28672, 128256),
}
_HUB_IDS = {
    "huggingfacetb/smollm2-135m": "smollm2-135m", "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "google/gemma-3-270m": "gemma-3-270m", "openai-community/gpt2-xl": "gpt2-xl",
    "facebookai/roberta-base": "roberta-base", "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "meta-llama/llama-2-7b": "llama-2-7b", "meta-llama/meta-llama-3-8b": "llama-3-8b",
    "meta-llama/llama-3.1-8b": "llama-3-8b", "meta-llama/meta-llama-3-70b": "llama-3-70b",
    "meta-llama/llama-3.1-70b": "llama-3-70b",
}
_UNGATED = frozenset({"gpt2", "gpt_neo", "gptj", "opt", "bert", "roberta", "xlm-roberta", "distilbert", "gpt_bigcode",
                      "falcon", "bloom", "electra", "camembert", "deberta", "deberta-v2", "mpnet", "albert"})


def arch_from_config(config: dict[str, Any], name: str = "model") -> Arch:
    """An :class:`Arch` from a Hugging Face ``config.json`` (GPT-2 and Llama-style key names)."""
    if isinstance(config.get("text_config"), dict):  # multimodal wrappers (Gemma 3) keep the LM inside
        config = {"model_type": config.get("model_type"), **config["text_config"]}

    def get(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if config.get(k) is not None:
                return config[k]
        if default is None:
            raise PostError(f"{name}: its config has none of {', '.join(keys)}; give a Hugging Face config.json of "
                            "a decoder or encoder LM.")
        return default

    layers = int(get("num_hidden_layers", "n_layer", "num_layers"))
    d = int(get("hidden_size", "n_embd", "d_model"))
    heads = int(get("num_attention_heads", "n_head"))
    kv = int(get("num_key_value_heads", "n_head_kv", default=heads))
    head_dim = int(get("head_dim", default=d // heads))
    ff = int(get("intermediate_size", "n_inner", "ffn_dim", default=4 * d))
    vocab = int(get("vocab_size"))
    return Arch(name, layers, d, heads, kv, head_dim, ff, vocab, str(config.get("model_type")) not in _UNGATED)


def resolve_arch(spec: str) -> Arch:
    """A preset name, a hub id of a preset, a config JSON file, a model directory, a tiny-* model or a cached hub id."""
    key = spec.strip()
    if key.lower() in ARCHS:
        return ARCHS[key.lower()]
    if key.lower() in _HUB_IDS:
        return replace(ARCHS[_HUB_IDS[key.lower()]], name=key)
    path = Path(key).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        try:
            return arch_from_config(json.loads(path.read_text(encoding="utf-8")), name=key)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
            raise PostError(f"{path} is not a readable config JSON ({e}); give a Hugging Face config.json.") from None
    if key.startswith("tiny-"):
        from post.models import tiny_model

        return arch_from_config(tiny_model(key).model.config.to_dict(), name=key)
    try:
        from transformers import AutoConfig

        return arch_from_config(AutoConfig.from_pretrained(key, local_files_only=True).to_dict(), name=key)
    except (OSError, ValueError):
        raise PostError(f"no architecture known for {spec!r} without the hub; use a preset ({', '.join(ARCHS)}), "
                        "a config.json file or a model directory.") from None


def student_layers(keep_layers: str, n_layers: int) -> int:
    """How many layers a ``--keep-layers`` spec ("0,1,-2,-1", as ``post student`` reads it) keeps."""
    from post.student import parse_keep_layers

    return len(parse_keep_layers(str(keep_layers), n_layers))


# --------------------------------------------------------------------------- FLOP counting

@dataclass(frozen=True)
class Tokens:
    """Sums over a set of padded sequences: S, ΣL and ΣL² (L includes the soft prompt)."""

    seqs: float = 0.0
    tokens: float = 0.0
    squares: float = 0.0

    @classmethod
    def uniform(cls, n: float, length: float) -> Tokens:
        """``n`` sequences of ``length`` tokens each."""
        return cls(n, n * length, n * length**2)

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.seqs + other.seqs, self.tokens + other.tokens, self.squares + other.squares)

    def scale(self, k: float) -> Tokens:
        return Tokens(self.seqs * k, self.tokens * k, self.squares * k)


@dataclass(frozen=True)
class Flops:
    """Forward and backward FLOPs, kept apart because they run at different rates."""

    forward: float = 0.0
    backward: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward)

    def scale(self, k: float) -> Flops:
        return Flops(self.forward * k, self.backward * k)


def _layers(arch: Arch, t: Tokens) -> tuple[float, float]:
    """(matmul, attention-score) forward FLOPs of all layers."""
    return arch.n_layers * 2.0 * arch.layer_params * t.tokens, arch.n_layers * 4.0 * arch.attn_width * t.squares


def _head(arch: Arch, t: Tokens, cols: int, all_positions: bool) -> float:
    return 2.0 * arch.d_model * cols * (t.tokens if all_positions else t.seqs)


def forward_flops(arch: Arch, t: Tokens, *, head_cols: int, all_positions: bool = False) -> Flops:
    """One forward pass (scoring, or a frozen model's constants)."""
    mm, att = _layers(arch, t)
    return Flops(mm + att + _head(arch, t, head_cols, all_positions))


def prompt_step_flops(arch: Arch, t: Tokens, *, head_cols: int, all_positions: bool = False) -> Flops:
    """Forward + backward to the prompt through a frozen model (prompt tuning, a transfer step)."""
    mm, att = _layers(arch, t)
    head = _head(arch, t, head_cols, all_positions)
    return Flops(mm + att + head, mm + 2 * att + head)


def train_step_flops(arch: Arch, t: Tokens, *, head_cols: int, all_positions: bool = True,
                     train_head: bool = False) -> Flops:
    """Forward + backward with weight gradients for the layers (the distilled student)."""
    mm, att = _layers(arch, t)
    head = _head(arch, t, head_cols, all_positions)
    return Flops(mm + att + head, 2 * mm + 2 * att + head * (2 if train_head else 1))


# --------------------------------------------------------------------------- rates

DEVICE_PEAKS: dict[str, float] = {  # dense FLOP/s of one chip
    "a100": 312e12, "a100-bf16": 312e12, "a100-tf32": 156e12, "a100-fp32": 19.5e12,
    "h100": 989e12, "h100-bf16": 989e12, "h200": 989e12, "l4": 121e12,
}


@dataclass(frozen=True)
class Rates:
    """Achieved FLOP/s of forward and backward passes, for the target and the source model.

    ``source_*`` default to the target's. ``dp_overhead``: a DP step's time ÷ a non-private step's.
    ``loss_per_logit``: seconds per logit of distillation's full-vocabulary losses (log-softmax of both models,
    KL, cross-entropy, and their backward) and the rest of its step beyond the matmuls (clipping, the update):
    elementwise work that FLOPs do not describe (measured by :func:`calibrate` on real steps; 0 for a device,
    where it is a small share of the matmuls). ``ledger_write``: seconds to account a DP run's ε with its
    accountant and write the ledger, which a DP run does before its first step and at each checkpoint
    (:func:`dp_ledger_writes`).
    """

    forward: float
    backward: float
    source_forward: float | None = None
    source_backward: float | None = None
    dp_overhead: float = 1.0
    loss_per_logit: float = 0.0
    ledger_write: float = 0.0
    label: str = ""
    dtype: str = "float32"  # the frozen models' dtype the rates were measured in (runs in another are not compared)

    @classmethod
    def device(cls, peak: float, utilisation: float, label: str = "") -> Rates:
        r = peak * utilisation
        return cls(r, r, label=label or f"{peak / 1e12:g} TFLOP/s peak × {utilisation:g} utilisation")

    def seconds(self, flops: Flops, role: Literal["target", "source"] = "target") -> float:
        fwd, bwd = (self.forward, self.backward) if role == "target" else (
            self.source_forward or self.forward, self.source_backward or self.backward)
        return flops.forward / fwd + flops.backward / bwd

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- stage workloads

@dataclass(frozen=True)
class Part:
    """A piece of a stage run on one model (role)."""

    flops: Flops
    role: Literal["target", "source"]
    logits: float = 0.0  # full-vocabulary logits going through distillation's elementwise losses


@dataclass
class StageCost:
    """One stage: who pays, its FLOPs (per role) and its predicted seconds."""

    stage: str
    party: str
    parts: list[Part]
    note: str = ""
    seconds: float = 0.0
    dp: bool = False
    ledger_writes: int = 0

    @property
    def flops(self) -> float:
        return sum(p.flops.total for p in self.parts)

    def timed(self, rates: Rates) -> StageCost:
        s = sum(rates.seconds(p.flops, p.role) + p.logits * rates.loss_per_logit for p in self.parts)
        self.seconds = s * (rates.dp_overhead if self.dp else 1.0) + self.ledger_writes * rates.ledger_write
        return self


def dp_ledger_writes(steps: int, checkpoint_every: int = 50, total_steps: int | None = None) -> int:
    """How often a DP ``post tune`` run of ``steps`` steps (of ``total_steps`` planned) accounts ε and writes its
    ledger while it trains: before the first step, and at each checkpoint short of the planned end (the ledger
    is written ahead of the steps it covers)."""
    total = steps if total_steps is None else total_steps
    if steps < 1 or total < 1:
        return 0
    return 1 + sum(1 for done in range(checkpoint_every, steps + 1, checkpoint_every) if done < total)


def tune_parts(arch: Arch, role: Literal["target", "source"], train: Tokens, evals: Tokens, head_cols: int,
               all_positions: bool) -> list[Part]:
    """Prompt tuning: a frozen-model step per training sequence, forward-only validation."""
    return [Part(prompt_step_flops(arch, train, head_cols=head_cols, all_positions=all_positions), role),
            Part(forward_flops(arch, evals, head_cols=head_cols, all_positions=all_positions), role)]


def transfer_parts(target: Arch, source: Arch, steps_tokens: Tokens, *, plain: Tokens, prompted: Tokens,
                   head_cols: int, all_positions: bool) -> list[Part]:
    """A transfer: target steps with the prompt; the three fixed outputs Φs(ps;x), Φs(x), Φt(x) once per text
    (``prompted``/``plain`` hold the texts they are computed for: the cached public set, or every step's batch
    when recomputed as the paper's code does)."""
    kw = {"head_cols": head_cols, "all_positions": all_positions}
    return [Part(prompt_step_flops(target, steps_tokens, **kw), "target"),
            Part(forward_flops(target, plain, **kw), "target"),
            Part(forward_flops(source, prompted, **kw) + forward_flops(source, plain, **kw), "source")]


def distill_parts(teacher: Arch, student: Arch, blocks: Tokens, *, train_head: bool = False, heads: bool = True,
                  prompted: Tokens | None = None) -> list[Part]:
    """Distillation: teacher forward and student forward+backward over the blocks, with full-vocabulary logits at
    every position when ``heads`` (the KL and LM terms; without them, as with only the cosine, hidden-state and
    answer terms, both models stop at their last hidden state: the answer term's few head rows are left out), and
    over the ``prompted`` texts (the prompted term: whole-vocabulary logits at each text's answer)."""
    t_cols, s_cols = (teacher.vocab, student.vocab) if heads else (0, 0)
    parts = [Part(forward_flops(teacher, blocks, head_cols=t_cols, all_positions=True), "target"),
             Part(train_step_flops(student, blocks, head_cols=s_cols, train_head=train_head), "source",
                  logits=blocks.tokens * s_cols)]
    if prompted is not None and prompted.seqs:
        parts += [Part(forward_flops(teacher, prompted, head_cols=teacher.vocab), "target"),
                  Part(train_step_flops(student, prompted, head_cols=student.vocab, all_positions=False,
                                        train_head=train_head), "source", logits=prompted.seqs * student.vocab)]
    return parts


# --------------------------------------------------------------------------- settings and the estimate

@dataclass(frozen=True)
class Setting:
    """A full workload description; :data:`SETTINGS` names the demo's and the paper's. ``distill_heads``: the
    distillation has logit terms (KL, LM), so both models compute full-vocabulary logits at every position."""

    target: str = "smollm2-135m"
    keep_layers: str = "0,10,20,29"
    n_train: int = 3200
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    target_steps: int | None = None
    target_batch_size: int | None = None
    n_tokens: int = 10
    max_length: int = 64
    text_tokens: float = 40.0
    public_tokens: float = 40.0
    pad_to_max_length: bool = False
    all_positions: bool = False
    label_tokens: int = 11
    eval_examples: int = 0
    transfer_steps: int = 30
    transfer_batch_size: int = 8
    transfer_mode: Literal["vocab", "label-words"] = "label-words"
    public_texts: int = 96
    cache_constants: bool = True
    distill_steps: int = 40
    distill_batch_size: int = 4
    block_size: int = 128
    distill_heads: bool = True
    users: int = 1
    dp: bool = True
    note: str = ""


_PAPER = {"n_tokens": 100, "max_length": 128, "pad_to_max_length": True, "all_positions": True, "batch_size": 32,
          "cache_constants": False, "transfer_mode": "vocab", "public_texts": 0}
SETTINGS: dict[str, Setting] = {
    # src/post/configs/demo.yaml; widths: tokens run per example (prompt aside) in packed forwards of random
    # batches of mr (32, max length 64), measured: 35.8 (real 34.2; padded batches ran 59.1); reviews sentences
    # in mr's template average 33.2 real tokens (800 of them, cut at 64), taken as 35 run.
    "demo": Setting(target="smollm2-135m", keep_layers="0,10,20,29", n_train=3200, epochs=2, max_steps=50,
                    batch_size=128, target_steps=60, target_batch_size=16, n_tokens=10, max_length=64,
                    text_tokens=36.0, public_tokens=35.0, eval_examples=100, transfer_steps=200,
                    transfer_batch_size=16, transfer_mode="label-words", public_texts=1600, distill_steps=500,
                    distill_batch_size=8, block_size=128, distill_heads=False,
                    note="demo.yaml: 50 steps of 128 on Φs; its PT-on-Φt baseline up to 60 steps of 16 (its plateau)"),
    "paper-gpt2xl-sst2": Setting(target="gpt2-xl", keep_layers="0,1,-2,-1", n_train=67349, epochs=20,
                                 transfer_steps=8000, transfer_batch_size=8, distill_steps=20000,
                                 distill_batch_size=16, block_size=256, eval_examples=872,
                                 note="paper Table 4: PT on Φt 2660 min; Φs 310 + transfer 99 = 409 (6.5×)",
                                 **_PAPER),
    "paper-gpt2xl-arisetv": Setting(target="gpt2-xl", keep_layers="0,1,-2,-1", n_train=4660, epochs=40,
                                    transfer_steps=8000, transfer_batch_size=8, distill_steps=20000,
                                    distill_batch_size=16, block_size=256, eval_examples=0,
                                    note="paper Table 4: PT on Φt 368 min; Φs 46 + transfer 99 = 145 (2.5×); "
                                         "N = 4,660 is what 368 vs 2660 min implies at 40 vs 20 epochs",
                                    **_PAPER),
    "paper-llama2-7b-sst2": Setting(target="llama-2-7b", keep_layers="0,-1", n_train=67349, epochs=20,
                                    transfer_steps=6000, transfer_batch_size=4, distill_steps=20000,
                                    distill_batch_size=8, block_size=512, eval_examples=872, **_PAPER),
    "llama3-8b-sst2": Setting(target="llama-3-8b", keep_layers="0,-1", n_train=67349, epochs=20,
                              transfer_steps=6000, transfer_batch_size=4, distill_steps=20000,
                              distill_batch_size=8, block_size=512, eval_examples=872, **_PAPER),
    "llama3-70b-sst2": Setting(target="llama-3-70b", keep_layers="0,-1", n_train=67349, epochs=20,
                               transfer_steps=6000, transfer_batch_size=4, distill_steps=20000,
                               distill_batch_size=8, block_size=512, eval_examples=872, **_PAPER),
}


@dataclass(frozen=True, kw_only=True)
class CostConfig:
    """Estimate FLOPs and time of each POST stage, the user's and the provider's cost and their ratio.

    Every workload option left unset comes from --setting (default: demo).

    Attributes:
        setting: Named workload: demo, paper-gpt2xl-sst2, paper-gpt2xl-arisetv, paper-llama2-7b-sst2,
            llama3-8b-sst2, llama3-70b-sst2.
        target: Target model Φt: a preset (smollm2-135m, gpt2-xl, llama-2-7b, llama-3-8b, llama-3-70b, ...),
            a hub id of one, a Hugging Face config.json or model directory, or tiny-*.
        keep_layers: The student's kept layers ("0,1,-2,-1") or their count.
        n_train: Private training examples N.
        epochs: Epochs of prompt tuning (DP: expected passes).
        max_steps: Cap on the steps of tuning on Φs.
        batch_size: Tuning batch (DP: expected Poisson sample).
        target_steps: Steps of the PT-on-Φt baseline (default: as many examples as tuning on Φs).
        target_batch_size: Batch of the PT-on-Φt baseline (default: --batch-size).
        n_tokens: Soft-prompt length.
        max_length: Maximum input tokens.
        text_tokens: Mean tokens run per private example (template included, prompt not): the padded width
            of a batch, or about the real length where forwards are packed (causal LMs here).
        public_tokens: The same for a public text.
        pad_to_max_length: Pad every input to --max-length (the paper's code does).
        all_positions: Compute LM-head logits at every position when tuning/transferring (the paper's code
            does; ours only at the answer).
        label_tokens: Label-word tokens W (logit columns when scoring).
        eval_examples: Validation examples scored once per epoch while tuning.
        transfer_steps: Transfer steps.
        transfer_batch_size: Public examples per transfer step.
        transfer_mode: vocab (full-vocabulary logits at the answer) or label-words.
        public_texts: Public texts whose fixed outputs are cached once (with --cache-constants).
        cache_constants: Compute Φs(ps;x), Φs(x), Φt(x) once per public text (ours) instead of every step (paper).
        distill_steps: Distillation steps.
        distill_batch_size: Blocks per distillation step.
        block_size: Tokens per distillation block.
        users: Users the one-time distillation is amortised over.
        dp: The user tunes with DP-SGD (the user's cost and the ratio use the DP rows).
        dp_overhead: A DP step's time ÷ a non-private step's (default 1, or measured by --calibrate).
        device: Device whose peak FLOP/s is used without --calibrate (a100, a100-fp32, h100, ...).
        peak_flops: Peak FLOP/s instead of --device.
        utilisation: Fraction of the peak reached.
        calibrate: Measure forward/backward rates here on --calibrate-model and its student.
        rates_file: Read rates saved as JSON (a :class:`Rates`, e.g. bench/cost_validate.py's) instead.
        calibrate_model: Model to measure (default: --target): an alias, a directory or tiny-*.
        calibrate_batch: Sequences per calibration step.
        calibrate_steps: Timed steps per measurement.
        calibrate_dtype: The frozen models' dtype to measure in: float32, bfloat16, or auto (bfloat16 where this
            machine computes it natively, as ``--dtype auto`` runs them).
        threads: torch threads while calibrating (0: leave as is).
        clock: What --calibrate times: wall (elapsed) or cpu (this process's CPU time: an unloaded machine's
            rates when other jobs share this one).
        format: text or json.
    """

    setting: str = "demo"
    target: str | None = None
    keep_layers: str | None = None
    n_train: int | None = None
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    target_steps: int | None = None
    target_batch_size: int | None = None
    n_tokens: int | None = None
    max_length: int | None = None
    text_tokens: float | None = None
    public_tokens: float | None = None
    pad_to_max_length: bool | None = None
    all_positions: bool | None = None
    label_tokens: int | None = None
    eval_examples: int | None = None
    transfer_steps: int | None = None
    transfer_batch_size: int | None = None
    transfer_mode: Literal["vocab", "label-words"] | None = None
    public_texts: int | None = None
    cache_constants: bool | None = None
    distill_steps: int | None = None
    distill_batch_size: int | None = None
    block_size: int | None = None
    users: int | None = None
    dp: bool | None = None
    dp_overhead: float | None = None
    device: str = "a100"
    peak_flops: float | None = None
    utilisation: float = 0.35
    calibrate: bool = False
    rates_file: Path | None = None
    calibrate_model: str | None = None
    calibrate_batch: int = 8
    calibrate_steps: int = 2
    calibrate_dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    threads: int = 1
    clock: Literal["wall", "cpu"] = "wall"
    format: Literal["text", "json"] = "text"

    def __post_init__(self) -> None:
        require(self.setting in SETTINGS, "setting", f"must be one of {', '.join(SETTINGS)}, got {self.setting!r}.")
        for name in ("n_train", "batch_size", "n_tokens", "max_length", "transfer_steps", "transfer_batch_size",
                     "distill_steps", "distill_batch_size", "block_size", "users", "target_batch_size",
                     "target_steps", "max_steps", "calibrate_batch", "calibrate_steps"):
            v = getattr(self, name)
            require(v is None or v >= 1, name, f"must be at least 1, got {v}.")
        for name in ("epochs", "text_tokens", "public_tokens"):
            v = getattr(self, name)
            require(v is None or v > 0, name, f"must be positive, got {v}.")
        for name in ("label_tokens", "eval_examples", "public_texts", "threads"):
            v = getattr(self, name)
            require(v is None or v >= 0, name, f"must be at least 0, got {v}.")
        require(self.transfer_mode in (None, "vocab", "label-words"), "transfer_mode", "must be vocab or label-words.")
        require(self.dp_overhead is None or self.dp_overhead > 0, "dp_overhead", "must be positive.")
        require(self.device.lower() in DEVICE_PEAKS, "device", f"must be one of {', '.join(DEVICE_PEAKS)}.")
        require(self.peak_flops is None or self.peak_flops > 0, "peak_flops", "must be positive.")
        require(0 < self.utilisation <= 1, "utilisation", f"must be in (0, 1], got {self.utilisation}.")
        require(self.format in ("text", "json"), "format", "must be text or json.")
        require(self.clock in ("wall", "cpu"), "clock", "must be wall or cpu.")
        require(self.calibrate_dtype in ("float32", "bfloat16", "auto"), "calibrate_dtype",
                "must be float32, bfloat16 or auto.")

    def workload(self) -> Setting:
        """The named setting with every option given here put over it."""
        base = SETTINGS[self.setting]
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(Setting)
                 if f.name != "note" and getattr(self, f.name, None) is not None}
        return replace(base, **given)


def _tune_steps(w: Setting) -> int:
    per_epoch = max(1, math.ceil(w.n_train / w.batch_size))
    steps = max(1, round(per_epoch * w.epochs))
    return min(steps, w.max_steps) if w.max_steps else steps


def _width(w: Setting, text: float) -> float:
    return float(w.max_length) if w.pad_to_max_length else float(min(text, w.max_length))


def estimate(w: Setting, rates: Rates) -> dict[str, Any]:
    """Every stage's FLOPs and seconds for workload ``w``; the user's, the provider's cost and the ratios.

    Validation is counted with the prompt in front of every example, as the paper's code runs it; this
    project's scoring runs a prompt's start once (:func:`_scored`, which the measured stage costs use), so its
    validations cost a little less than counted here."""
    target = resolve_arch(w.target)
    source = target.keep(student_layers(w.keep_layers, target.n_layers))
    n = w.n_tokens
    priv, pub = _width(w, w.text_tokens) + n, _width(w, w.public_tokens)
    heads = target.vocab if w.all_positions else w.label_tokens  # the paper's code: full logits everywhere
    steps_s = _tune_steps(w)
    examples_s = steps_s * w.batch_size
    evals = max(1, math.floor(examples_s / max(w.n_train, 1))) if w.eval_examples else 0
    eval_tok = Tokens.uniform(w.eval_examples * evals, priv)
    tb = w.target_batch_size or w.batch_size
    steps_t = w.target_steps or max(1, round(examples_s / tb))
    evals_t = max(1, math.floor(steps_t * tb / max(w.n_train, 1))) if w.eval_examples else 0
    rows: list[StageCost] = []
    for dp in (False, True):
        tag = " (DP)" if dp else ""
        rows.append(StageCost(f"PT on Φs{tag}", "user", tune_parts(
            source, "source", Tokens.uniform(examples_s, priv), eval_tok, heads, w.all_positions),
            f"{steps_s} steps × {w.batch_size}, {priv:.0f} tokens", dp=dp,
            ledger_writes=dp_ledger_writes(steps_s) if dp else 0))
    for dp in (False, True):
        tag = " (DP)" if dp else ""
        rows.append(StageCost(f"PT on Φt{tag}", "baseline", tune_parts(
            target, "target", Tokens.uniform(steps_t * tb, priv), Tokens.uniform(w.eval_examples * evals_t, priv),
            heads, w.all_positions), f"{steps_t} steps × {tb}", dp=dp,
            ledger_writes=dp_ledger_writes(steps_t) if dp else 0))
    t_cols = target.vocab if w.transfer_mode == "vocab" or w.all_positions else heads
    pub_p = pub + n
    step_tok = Tokens.uniform(w.transfer_steps * w.transfer_batch_size, pub_p)
    if w.cache_constants:
        plain, prompted = Tokens.uniform(w.public_texts, pub), Tokens.uniform(w.public_texts, pub_p)
        how = f"constants cached for {w.public_texts} texts"
    else:
        count = w.transfer_steps * w.transfer_batch_size
        plain, prompted = Tokens.uniform(count, pub), Tokens.uniform(count, pub_p)
        how = "Φs(ps;x), Φs(x), Φt(x) recomputed every step"
    rows.append(StageCost("transfer", "provider", transfer_parts(
        target, source, step_tok, plain=plain, prompted=prompted, head_cols=t_cols, all_positions=w.all_positions),
        f"{w.transfer_steps} steps × {w.transfer_batch_size}, {w.transfer_mode}, {how}"))
    blocks = Tokens.uniform(w.distill_steps * w.distill_batch_size, w.block_size)
    rows.append(StageCost("distillation (one-time)", "provider", distill_parts(target, source, blocks,
                                                                              heads=w.distill_heads),
                          f"{w.distill_steps} steps × {w.distill_batch_size} × {w.block_size} tokens"
                          + ("" if w.distill_heads else ", no logit terms")))
    for r in rows:
        r.timed(rates)
    by = {r.stage: r for r in rows}
    tag = " (DP)" if w.dp else ""
    user = by[f"PT on Φs{tag}"].seconds
    transfer_s = by["transfer"].seconds
    distill_s = by["distillation (one-time)"].seconds
    provider = transfer_s + distill_s / w.users
    baseline = by[f"PT on Φt{tag}"].seconds
    # The same examples on Φt as on Φs: the like-for-like baseline (the configured one may be shorter).
    equal = StageCost("PT on Φt, same examples", "baseline", tune_parts(
        target, "target", Tokens.uniform(examples_s, priv), eval_tok, heads, w.all_positions), dp=w.dp,
        ledger_writes=dp_ledger_writes(steps_s) if w.dp else 0).timed(rates)
    one = Tokens.uniform(1, priv)
    per_ex_t = StageCost("", "", tune_parts(target, "target", one, Tokens(), heads, w.all_positions),
                         dp=w.dp).timed(rates).seconds
    per_ex_s = StageCost("", "", tune_parts(source, "source", one, Tokens(), heads, w.all_positions),
                         dp=w.dp).timed(rates).seconds
    fixed = transfer_s
    limit = 0.1 * per_ex_t - per_ex_s
    cross = None if limit <= 0 else fixed / (w.epochs * limit)
    return {
        "target": target.name, "source": source.name, "target_params": target.params, "source_params": source.params,
        "rates": rates.to_dict(), "setting": dataclasses.asdict(w),
        "stages": [{"stage": r.stage, "party": r.party, "flops": r.flops, "seconds": r.seconds, "detail": r.note}
                   for r in rows],
        "user_seconds": user, "provider_seconds": provider, "transfer_seconds": transfer_s,
        "distill_seconds": distill_s, "baseline_seconds": baseline, "equal_baseline_seconds": equal.seconds,
        "ratio": (user + transfer_s) / baseline, "ratio_equal": (user + transfer_s) / equal.seconds,
        "ratio_with_distillation": (user + provider) / baseline,
        "student_share": per_ex_s / per_ex_t,
        "crossover_n_train": cross,
    }


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def render(result: dict[str, Any]) -> str:
    """The estimate as a text table."""
    w = result["setting"]
    def m(n: float) -> str:
        return f"{n / 1e6:,.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"

    lines = [f"target {result['target']} ({m(result['target_params'])} matmul params), source "
             f"{result['source']} ({m(result['source_params'])}); N={w['n_train']:,}, {w['epochs']:g} epochs, "
             f"batch {w['batch_size']}, {w['n_tokens']}-token prompt, max length {w['max_length']}",
             f"rates: {result['rates']['label']}", ""]
    lines.append(f"{'stage':<26}{'party':<10}{'FLOPs':>11}{'time':>11}  detail")
    for s in result["stages"]:
        lines.append(f"{s['stage']:<26}{s['party']:<10}{s['flops']:>11.3g}{_fmt_s(s['seconds']):>11}  {s['detail']}")
    dp = " (DP)" if w["dp"] else ""

    def times(r: float) -> str:
        return f"{1 / r:.1f}× cheaper" if r <= 1 else f"{r:.1f}× the cost"

    lines += ["",
              f"user{dp}: PT on Φs {_fmt_s(result['user_seconds'])}; provider: transfer "
              f"{_fmt_s(result['transfer_seconds'])} + distillation {_fmt_s(result['distill_seconds'])} / "
              f"{w['users']} user(s) = {_fmt_s(result['provider_seconds'])}",
              f"(PT on Φs + transfer) ÷ PT on Φt{dp}: {result['ratio']:.3f} ({times(result['ratio'])}); "
              f"with distillation: {result['ratio_with_distillation']:.3f}",
              f"against PT on Φt over the same examples as on Φs: {result['ratio_equal']:.3f} "
              f"({times(result['ratio_equal'])})",
              f"a tuning example on Φs costs {result['student_share']:.3f} of one on Φt"]
    cross = result["crossover_n_train"]
    lines.append("the ratio never reaches 1/10: the student alone costs more than a tenth of the target"
                 if cross is None else
                 f"the ratio falls below 1/10 once N > {cross:,.0f} private examples (at {w['epochs']:g} epochs)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- calibration

def _measure(lm: Any, arch: Arch, *, n_tokens: int, text_tokens: int, batch: int, steps: int,
             clock: Callable[[], float]) -> tuple[float, float, float]:
    """(forward FLOP/s, backward FLOP/s, DP step ÷ step) of one model on synthetic inputs."""
    import torch

    from post.dp import step_generator
    from post.prompt import init_prompt
    from post.scoring import Encoder, examples_hidden, label_scores, packs
    from post.tasks import Task, Verbalizer
    from post.tune import PromptTrainer

    task = Task()
    words = ("good bad movie plot the a great film was and " * (text_tokens // 2 + 4)).split()
    enc = Encoder(task, lm.tokenizer, lm.kind, max_length=text_tokens + 8)
    texts = [" ".join(words[i % 5 : i % 5 + text_tokens]) for i in range(batch)]
    seqs, answers = enc.encode(texts)
    verb = Verbalizer.build(task, lm.tokenizer)
    trainer = PromptTrainer(lm, enc, verb, texts, [i % 2 for i in range(batch)], micro_batch_size=batch)
    prompt = init_prompt(lm, n_tokens, init_text=task.init_text).to(lm.model.device)
    idx = torch.arange(batch)
    cuda = lm.model.device.type == "cuda"
    # the forward runs the batch as the step does (packed where the model packs), and the FLOPs count those rows
    tokens = _run(seqs, [list(range(batch))], n_tokens, packs(lm.model, enc))
    ledger = _stand_in_ledger(sample_rate=0.01, planned_steps=1)

    def fwd() -> None:
        with torch.no_grad():
            hidden = examples_hidden(lm.model, enc, seqs, answers, idx, prompt)
            label_scores(lm.model, hidden, verb)

    def step() -> None:
        trainer.mean_gradient(prompt, idx)

    def dp() -> None:
        trainer.dp_gradient(prompt, idx, ledger=ledger, expected_batch=batch, noise=step_generator(0, 0, 1))

    fwd(), step()  # warm-up
    t = {"f": 0.0, "s": 0.0, "d": 0.0}
    for _ in range(steps):  # interleaved, so drift in machine load hits all three alike
        for k, fn in (("f", fwd), ("s", step), ("d", dp)):
            t0 = clock()
            fn()
            if cuda:
                torch.cuda.synchronize()
            t[k] += clock() - t0
    flops = prompt_step_flops(arch, tokens, head_cols=len(verb.token_ids))
    t_f, t_s = t["f"] / steps, t["s"] / steps
    return flops.forward / t_f, flops.backward / max(t_s - t_f, 1e-9), t["d"] / t["s"]


def _stand_in_ledger(*, sample_rate: float, planned_steps: int) -> Any:
    """A PLD privacy ledger (σ = 1, C = 1, δ = 1e-5) for timing DP steps and accounting: no data behind it."""
    from post.accounting import PrivacyLedger

    return PrivacyLedger(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=sample_rate, steps=0,
                         planned_steps=planned_steps, delta=1e-5, accountant="pld", dataset_size=100,
                         target_epsilon=None, epsilon=0.0)


def _ledger_write(clock: Callable[[], float], steps: int = 50, sample_rate: float = 0.01) -> float:
    """Seconds a DP run takes to account ε (the PLD accountant, as ``post tune`` uses it) and write its ledger: the
    median of two, at the demo's sample rate and a checkpoint's worth of steps."""
    import statistics
    import tempfile

    from post.rundir import write_json

    ledger = _stand_in_ledger(sample_rate=sample_rate, planned_steps=steps)
    took = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):
            t0 = clock()
            write_json(Path(tmp) / "ledger.json", ledger.after(steps).to_dict())
            took.append(clock() - t0)
    return statistics.median(took)


def _distill_per_logit(teacher: Any, student: Any, teacher_arch: Arch, rates: Rates, clock: Callable[[], float],
                       *, batch: int = 4, block: int = 128, steps: int = 3) -> float:
    """Seconds per logit of a distillation step beyond its matmuls: real steps of :func:`post.distill.distill_losses`
    (the shipped loss weights, teacher and student, ``batch`` × ``block`` tokens as the demo's step has them),
    backward, gradient clipping and the AdamW update, timed, less what ``rates`` give for the step's FLOPs, per
    full-vocabulary logit.

    The full-vocabulary losses are memory-bound elementwise work that FLOPs do not describe, and timed apart from
    a step (on random logits) they ran 3-4× faster than inside one; so the step itself is timed. The median of
    ``steps`` timed steps after a warm-up. ``student`` is a throwaway copy: its weights are updated."""
    import statistics

    import torch

    from post.distill import DistillConfig, distill_losses, trainable_parameters

    cfg = DistillConfig()
    model = student.model.train()
    trainable = trainable_parameters(model, cfg)
    opt = torch.optim.AdamW(trainable, lr=1e-6)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(teacher_arch.vocab, (batch, block), generator=g).to(model.device)
    cuda = model.device.type == "cuda"

    def step() -> None:
        loss = distill_losses(model, teacher.model, ids, kind=teacher.kind, cfg=cfg)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up
    took = []
    for _ in range(steps):
        t0 = clock()
        step()
        took.append(clock() - t0)
    student_arch = teacher_arch.keep(model.config.num_hidden_layers)
    parts = distill_parts(teacher_arch, student_arch, Tokens.uniform(batch, block), train_head=not cfg.freeze_head)
    matmuls = sum(rates.seconds(p.flops, p.role) for p in parts)
    logits = sum(p.logits for p in parts)
    return max(statistics.median(took) - matmuls, 0.0) / logits


def calibrate(model: str, keep_layers: str, *, n_tokens: int = 10, text_tokens: int = 40, batch: int = 8,
              steps: int = 2, threads: int = 1, cache_dir: Path | None = None, clock: str = "wall",
              device: str = "auto", dtype: str = "float32") -> Rates:
    """Measured forward/backward FLOP/s of ``model`` and its layer-dropped student, and the DP overhead.

    Runs the real code paths on synthetic inputs of ``text_tokens`` tokens: :func:`post.scoring.examples_hidden`
    and the label-word head under no_grad (forward, packed as the step packs),
    :meth:`post.tune.PromptTrainer.mean_gradient` (forward + backward) and
    ``dp_gradient`` (DP). Backward rate = backward FLOPs ÷ (step time − forward time). ``clock="cpu"`` times
    this process's CPU time: the rates of an unloaded machine, when other jobs share this one. ``dtype``: the
    frozen models' dtype (float32, or bfloat16 as ``--dtype auto`` gives on hardware with native bf16).
    """
    import torch

    from post.config import DTYPES
    from post.models import load_model
    from post.student import build_student

    if threads:
        torch.set_num_threads(threads)
    if dtype not in DTYPES:
        raise PostError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    loaded = load_model(model, cache_dir=cache_dir, dtype=DTYPES[dtype])
    if device != "cpu" and torch.cuda.is_available():  # time the device the runs used
        loaded.model.to(device if device != "auto" else "cuda")
    arch = arch_from_config(loaded.model.config.to_dict(), name=model)
    student = build_student(loaded, keep_layers)
    kw = {"n_tokens": n_tokens, "text_tokens": text_tokens, "batch": batch, "steps": steps,
          "clock": time.process_time if clock == "cpu" else time.perf_counter}
    t = _measure(loaded, arch, **kw)
    s = _measure(student, arch.keep(student.model.config.num_hidden_layers), **kw)
    per_logit = _distill_per_logit(loaded, student, arch, Rates(t[0], t[1], s[0], s[1]), kw["clock"])
    ledger = _ledger_write(kw["clock"])
    return Rates(t[0], t[1], s[0], s[1], dp_overhead=t[2], loss_per_logit=per_logit, ledger_write=ledger,
                 dtype=dtype,
                 label=f"measured on {model} in {dtype} here ({torch.get_num_threads()} thread(s), {clock} clock): "
                       f"forward {t[0] / 1e9:.1f} / backward {t[1] / 1e9:.1f} GFLOP/s, student {s[0] / 1e9:.1f} / "
                       f"{s[1] / 1e9:.1f} GFLOP/s, DP step ÷ step {t[2]:.2f}, distillation loss "
                       f"{per_logit * 1e9:.1f} ns/logit, DP ledger {ledger:.2f} s a write")


def _resolved_dtype(dtype: str, device: str = "auto") -> str:
    """A ``--dtype`` as :class:`post.config.ModelOptions` resolves it here (``auto``: bfloat16 where ``device``
    computes it natively); a device this machine lacks resolves as the CPU."""
    from post.config import ModelOptions, dtype_name

    try:
        resolved = ModelOptions(dtype=dtype, device=device).torch_dtype
    except ConfigError:
        resolved = ModelOptions(dtype=dtype, device="cpu").torch_dtype
    return dtype_name(resolved)


def config_rates(cfg: CostConfig, w: Setting) -> Rates:
    """The rates a :class:`CostConfig` asks for: calibrated here, or peak × utilisation."""
    if cfg.rates_file is not None:
        try:
            rates = Rates(**json.loads(Path(cfg.rates_file).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise PostError(f"--rates-file {cfg.rates_file} is not a saved rates JSON ({e}).") from None
    elif cfg.calibrate:
        rates = calibrate(cfg.calibrate_model or w.target, w.keep_layers, n_tokens=w.n_tokens,
                          text_tokens=int(min(w.text_tokens, w.max_length)), batch=cfg.calibrate_batch,
                          steps=cfg.calibrate_steps, threads=cfg.threads, clock=cfg.clock,
                          dtype=_resolved_dtype(cfg.calibrate_dtype))
    else:
        peak = cfg.peak_flops or DEVICE_PEAKS[cfg.device.lower()]
        rates = Rates.device(peak, cfg.utilisation,
                             f"{cfg.device if cfg.peak_flops is None else 'given'} peak {peak / 1e12:g} TFLOP/s "
                             f"× utilisation {cfg.utilisation:g}")
    return replace(rates, dp_overhead=cfg.dp_overhead) if cfg.dp_overhead is not None else rates


def run_cost(cfg: CostConfig) -> dict[str, Any]:
    """``post cost``: the estimate for ``cfg``."""
    w = cfg.workload()
    return estimate(w, config_rates(cfg, w))


def print_cost(cfg: CostConfig) -> None:
    result = run_cost(cfg)
    print(json.dumps(result, indent=2, default=str) if cfg.format == "json" else render(result))


# --------------------------------------------------------------------------- predicted vs measured runs

def _read_config(run: Path) -> dict[str, Any]:
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        raise PostError(f"{run} has no config.yaml; pass a run directory a post stage wrote.")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    data.pop("stage", None)
    return data


def _build(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    vals = {k: v for k, v in values.items() if k in names}
    for k in ("cache_dir", "prompt", "train_indices"):
        if isinstance(vals.get(k), str):
            vals[k] = Path(vals[k])
    return cls(**vals)


def _tokenizer(name: str, cache_dir: Path | None) -> Any:
    from transformers import AutoTokenizer

    from post.models import BUILTIN_MODELS, TINY_MODELS, fetch_model, tiny_model

    if name in TINY_MODELS:
        return tiny_model(name).tokenizer
    source = fetch_model(name, cache_dir=cache_dir) if name in BUILTIN_MODELS else name
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def _kind(name: str, cache_dir: Path | None) -> str:
    from transformers import AutoConfig

    from post.models import BUILTIN_MODELS, TINY_MODELS, detect_kind, fetch_model, tiny_model

    if name in TINY_MODELS:
        return tiny_model(name).kind
    source = fetch_model(name, cache_dir=cache_dir) if name in BUILTIN_MODELS else name
    return detect_kind(AutoConfig.from_pretrained(source, local_files_only=True))


def _arch_of(name: str, cache_dir: Path | None) -> Arch:
    from post.models import BUILTIN_MODELS, fetch_model

    if name in BUILTIN_MODELS:
        return arch_from_config(json.loads((fetch_model(name, cache_dir=cache_dir) / "config.json").read_text()), name)
    return resolve_arch(name)


def _padded(seqs: Sequence[Sequence[int]], groups: Sequence[Sequence[int]], extra: int) -> Tokens:
    out = Tokens()
    for g in groups:
        if len(g):
            out = out + Tokens.uniform(len(g), max(len(seqs[i]) for i in g) + extra)
    return out


def _run(seqs: Sequence[Sequence[int]], groups: Sequence[Sequence[int]], extra: int, packing: bool) -> Tokens:
    """The tokens the forwards over ``groups`` run, each group as :func:`post.scoring.examples_hidden` runs it:
    packed rows (each as wide as the group's widest row; attention over a whole row) or one padded batch."""
    if not packing:
        return _padded(seqs, groups, extra)
    from post.scoring import tight_rows

    out = Tokens()
    for g in groups:
        if len(g):
            lengths = [len(seqs[i]) + extra for i in g]
            rows = tight_rows(lengths)
            width = max(sum(lengths[j] for j in row) for row in rows)
            out = out + Tokens(len(g), len(rows) * width, len(rows) * width**2)
    return out


def _scored(seqs: Sequence[Sequence[int]], answers: Sequence[int], head: int, size: int, extra: int,
            packing: bool) -> Tokens:
    """The tokens :func:`post.scoring.predict_scores` runs over ``seqs`` with an ``extra``-token prompt: where the
    model packs and the examples share a start (the prompt and the template's ``head`` tokens,
    :class:`post.scoring.SharedStart`), that start once, then the rest of each example packed
    (:func:`post.scoring.prefix_groups`), every row's attention running over the start as well; else :func:`_run`
    over :func:`_buckets`. It takes the start as shared wherever the model packs and the start pays
    (:func:`post.scoring.start_pays`): what :func:`post.scoring.shares_prefix` finds for every built-in causal
    model."""
    from post.scoring import prefix_groups, start_pays, tight_rows

    start = extra + head
    if not (packing and start_pays(len(seqs), start)):
        return _run(seqs, _buckets(seqs, size, extra, packing), extra, packing)

    skips = [min(head, int(a)) for a in answers]  # SharedStart.covers
    rest = [len(s) - k for s, k in zip(seqs, skips, strict=True)]
    out = Tokens(0, start, start**2)
    for g in prefix_groups([len(s) for s in seqs], skips, size):
        rows = tight_rows([rest[i] for i in g])
        width = max(sum(rest[g[j]] for j in row) for row in rows)
        out = out + Tokens(len(g), len(rows) * width, len(rows) * width * (width + start))
    return out


def _buckets(seqs: Sequence[Sequence[int]], size: int, extra: int, packing: bool) -> list[list[int]]:
    """Indices of the groups that scoring without a shared start (``predict_scores``) and the transfer's cached
    constants (``Scorer.constants``) run together: :func:`post.scoring.score_groups`."""
    from post.scoring import score_groups

    return [b.tolist() for b in score_groups([len(s) for s in seqs], size, extra, packing=packing)]


def _micro_batches(seqs: Sequence[Sequence[int]], idx: Sequence[int], micro: int) -> list[list[int]]:
    """Indices (into ``seqs``) of the micro-batches :meth:`post.tune.PromptTrainer._chunks` splits the logical
    batch ``idx`` into, by the same rule (:func:`post.scoring.micro_batches`)."""
    from post.scoring import micro_batches

    idx = [int(i) for i in idx]
    return [[idx[p] for p in pos] for pos in micro_batches([len(seqs[i]) for i in idx], micro)]


def tune_run_cost(run: Path) -> StageCost:
    """The batches a finished ``post tune`` run took (and its in-loop validations) as a stage cost.

    Non-private runs: the exact batches (same seed and order) and micro-batches (a batch larger than
    ``micro_batch_size`` sorted by length first, as ``PromptTrainer._chunks`` does); validation as
    ``predict_scores`` runs it (:func:`_scored`: the prompt's start once, the rest of each example packed).
    DP runs draw their Poisson samples from a secret seed, so a stand-in sample of the same rate is drawn:
    the same expected cost.
    """
    import torch

    from post.dp import poisson_sample, step_generator
    from post.resolve import load_task, subset
    from post.scoring import Encoder, head_ids
    from post.tune import TuneConfig, _epoch_order, make_plan, training_indices

    cfg = _build(TuneConfig, _read_config(run))
    data = load_task(cfg)
    train = data.split("train")
    tr_idx = training_indices(cfg, len(train))
    texts = [train.texts[i] for i in tr_idx]
    plan = make_plan(replace(cfg, noise_multiplier=cfg.noise_multiplier or 1.0), len(texts))
    # a run stopped early (--patience) took fewer steps than planned: its result says how many
    steps = int(_run_result(run).get("steps") or plan.total_steps)
    tok = _tokenizer(cfg.model, cfg.cache_dir)
    arch = _arch_of(cfg.model, cfg.cache_dir)
    enc = Encoder(data.task, tok, _kind(cfg.model, cfg.cache_dir), cfg.max_length)
    seqs, _ = enc.encode(texts)
    groups: list[list[int]] = []
    for step in range(steps):
        if cfg.dp:
            idx = poisson_sample(plan.n_train, cfg.batch_size / plan.n_train, step_generator(cfg.seed, step, 0))
        else:
            epoch, pos = divmod(step, plan.steps_per_epoch)
            idx = _epoch_order(cfg.seed, epoch, plan.n_train)[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
        groups += _micro_batches(seqs, torch.as_tensor(idx).tolist(), cfg.micro_batch_size)
    val = data.split("validation")
    val_seqs, val_answers = enc.encode([val.texts[i] for i in subset(len(val), cfg.eval_limit, cfg.seed)])
    every = cfg.eval_every or plan.steps_per_epoch
    n_evals = sum(1 for d in range(1, steps + 1) if d % every == 0 or d == plan.total_steps)
    from post.tasks import Verbalizer

    cols = len(Verbalizer.build(data.task, tok).token_ids)
    packing = enc.kind == "causal"  # what post.scoring.packs finds for every built-in causal model
    train_tok = _run(seqs, groups, cfg.n_tokens, packing)
    eval_tok = _scored(val_seqs, val_answers, len(head_ids(enc)), cfg.micro_batch_size, cfg.n_tokens,
                       packing).scale(n_evals)
    return StageCost(run.name, "user", tune_parts(arch, _role(run), train_tok, eval_tok, cols, False),
                     f"{steps} steps, {n_evals} validation(s)", dp=cfg.dp,
                     ledger_writes=dp_ledger_writes(steps, cfg.checkpoint_every, plan.total_steps) if cfg.dp else 0)


def _run_result(run: Path) -> dict[str, Any]:
    from post.rundir import RESULT_FILE, read_result

    return read_result(run) if (run / RESULT_FILE).is_file() else {}


def _role(run: Path) -> Literal["target", "source"]:
    return "target" if "target" in run.name else "source"


def transfer_run_cost(run: Path) -> tuple[StageCost, StageCost]:
    """The steps (``train_seconds``) and the constant caching (``cache_seconds``) of a ``post transfer`` run.

    Steps: each step's seeded random batch, as the run drew it. Constants: every public text once, in the
    length-sorted batches ``Scorer.constants`` runs (:func:`post.scoring.length_buckets`), per model.
    """
    import torch

    from post.data import load_texts
    from post.prompt import read_prompt
    from post.resolve import subset
    from post.scoring import Encoder
    from post.tasks import Verbalizer
    from post.transfer import TransferConfig

    cfg = _build(TransferConfig, _read_config(run))
    task = read_prompt(cfg.prompt).task
    n_tokens = read_prompt(cfg.prompt).n_tokens
    public = load_texts(cfg.public, cache_dir=cfg.cache_dir)
    texts = [public[i] for i in subset(len(public), cfg.public_limit, cfg.seed)]
    tgt_tok, src_tok = _tokenizer(cfg.target_model, cfg.cache_dir), _tokenizer(cfg.source_model, cfg.cache_dir)
    target, source = _arch_of(cfg.target_model, cfg.cache_dir), _arch_of(cfg.source_model, cfg.cache_dir)
    t_enc = Encoder(task, tgt_tok, _kind(cfg.target_model, cfg.cache_dir), cfg.max_length)
    s_enc = Encoder(task, src_tok, _kind(cfg.source_model, cfg.cache_dir), cfg.max_length)
    (t_seqs, _), (s_seqs, _) = t_enc.encode(texts), s_enc.encode(texts)
    t_pack, s_pack = t_enc.kind == "causal", s_enc.kind == "causal"
    groups = []
    for step in range(cfg.steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        groups.append(torch.randperm(len(texts), generator=g)[: cfg.batch_size].tolist())
    cols_t = target.vocab if cfg.mode == "vocab" else len(Verbalizer.build(task, tgt_tok).token_ids)
    cols_s = source.vocab if cfg.mode == "vocab" else len(Verbalizer.build(task, src_tok).token_ids)
    steps = StageCost(f"{run.name} (steps)", "provider", [Part(prompt_step_flops(
        target, _run(t_seqs, groups, n_tokens, t_pack), head_cols=cols_t), "target")], f"{cfg.steps} steps")

    def const(arch: Arch, seqs: list[list[int]], extra: int, packing: bool, cols: int) -> Flops:  # Scorer.constants
        groups = _buckets(seqs, cfg.batch_size, extra, packing)
        return forward_flops(arch, _run(seqs, groups, extra, packing), head_cols=cols)

    consts = StageCost(f"{run.name} (constants)", "provider", [
        Part(const(source, s_seqs, n_tokens, s_pack, cols_s) + const(source, s_seqs, 0, s_pack, cols_s), "source"),
        Part(const(target, t_seqs, 0, t_pack, cols_t), "target")],
        f"{len(texts)} public texts")
    return steps, consts


def distill_run_cost(run: Path) -> StageCost:
    """The steps of a ``post distill`` run."""
    from post.distill import DistillConfig

    cfg = _build(DistillConfig, _read_config(run))
    teacher = _arch_of(cfg.teacher, cfg.cache_dir)
    student = teacher.keep(student_layers(cfg.keep_layers, teacher.n_layers))
    steps = int(_run_result(run).get("steps") or cfg.max_steps)  # --max-minutes may have stopped it early
    blocks = Tokens.uniform(steps * cfg.batch_size, cfg.block_size) if cfg.block_terms else Tokens()
    prompted = _prompted_tokens(cfg, steps) if cfg.alpha_prompted > 0 else None
    parts = distill_parts(teacher, student, blocks, train_head=not cfg.freeze_head, heads=cfg.logit_terms,
                          prompted=prompted)
    return StageCost(run.name, "provider", parts, f"{steps} steps × {cfg.batch_size} × {cfg.block_size}"
                     + (" + prompted texts" if prompted is not None else ""))


def _prompted_tokens(cfg: Any, steps: int) -> Tokens:
    """The tokens the prompted term's forwards ran: each step's texts (as the run drew them) in the task's
    template behind their prompts, packed as :func:`post.scoring.examples_hidden` packs them."""
    from post.data import load_texts
    from post.distill import prompted_draw, prompted_encoder

    enc = prompted_encoder(cfg, _tokenizer(cfg.teacher, cfg.cache_dir), _kind(cfg.teacher, cfg.cache_dir))
    seqs, _ = enc.encode(load_texts(cfg.corpus, limit=cfg.corpus_limit, cache_dir=cfg.cache_dir))
    groups = [prompted_draw(cfg, step, len(seqs))[1].tolist() for step in range(steps)]
    return _run(seqs, groups, cfg.prompted_tokens, enc.kind == "causal")


def run_dir_costs(run: Path) -> list[tuple[StageCost, float]]:
    """(predicted stage, measured seconds) for one finished run directory (tune, transfer or distill)."""
    from post.rundir import read_result

    result = read_result(run)
    stage = result.get("stage")
    if stage == "tune":
        return [(tune_run_cost(run), float(result["train_seconds"]))]
    if stage == "transfer":
        steps, consts = transfer_run_cost(run)
        return [(steps, float(result["train_seconds"])), (consts, float(result["cache_seconds"]))]
    if stage == "distill":
        return [(distill_run_cost(run), float(result["train_seconds"]))]
    return []


def run_dtype(run: Path) -> str:
    """The dtype a finished run's frozen models computed in: as its ``result.json`` records it (``model_dtype``), or
    for a run written before that, as its config resolves on this machine (``auto``: bfloat16 where the device has
    it natively; distillation keeps float32 under auto)."""
    from post.rundir import RESULT_FILE, read_json

    if (run / RESULT_FILE).is_file() and isinstance(done := read_json(run / RESULT_FILE), dict) and isinstance(
            done.get("model_dtype"), str):
        return done["model_dtype"]  # recorded by the run, on the machine that ran it
    cfg = _read_config(run)
    dtype = str(cfg.get("dtype") or "float32")
    if dtype == "auto" and "teacher" in cfg:  # a distillation: its student's weights train in float32
        return "float32"
    return _resolved_dtype(dtype, str(cfg.get("device") or "auto"))


def compare_run_dirs(out_dir: str | Path, rates: Rates | None = None, *, calibrate_missing: bool = True,
                     calibrate_fn: Callable[..., Rates] | None = None) -> list[dict[str, Any]]:
    """Predicted vs measured seconds for every tune/transfer/distill run directory under ``out_dir``.

    ``out_dir`` is a pipeline's output directory (or one run directory). Without ``rates`` they are
    read from ``out_dir/cost-calibration.json``, or (``calibrate_missing``) measured once on the target
    named in the runs (:func:`calibrate`, about a minute for a 135M model on a CPU, in the dtype the runs'
    frozen models took) and kept there so later calls (the report) reuse them; with neither, there is nothing
    to compare and the list is empty. A run whose frozen models computed in another dtype than the rates'
    (:func:`run_dtype`) is left out, with a warning.
    Each row: run, party, detail, flops, predicted_seconds, measured_seconds, error (predicted ÷ measured − 1).
    """
    from post.rundir import RESULT_FILE

    out = Path(out_dir)
    runs = [out] if (out / RESULT_FILE).is_file() else sorted(
        p for p in out.iterdir() if p.is_dir() and (p / RESULT_FILE).is_file())
    pairs: list[tuple[StageCost, float, str]] = []
    dtypes: dict[Path, str] = {}  # each run's frozen-model dtype, read once
    for run in runs:
        try:
            dtypes[run] = run_dtype(run)
            pairs += [(stage, measured, dtypes[run]) for stage, measured in run_dir_costs(run)]
        except (PostError, KeyError, OSError, ValueError) as e:
            log.warning("cost: skipping %s (%s)", run, e)
    if not pairs:
        return []
    if rates is None:
        saved = out / "cost-calibration.json"
        if saved.is_file():
            rates = Rates(**json.loads(saved.read_text(encoding="utf-8")))
        wanted = _prompt_runs_dtype(runs, dtypes)
        if rates is None or (calibrate_missing and rates.dtype != wanted):
            if not calibrate_missing:
                return []
            rates = _calibrate_for(runs, calibrate_fn or calibrate, wanted)
            saved.write_text(json.dumps(rates.to_dict(), indent=2) + "\n", encoding="utf-8")
    rows = []
    for stage, measured, dtype in pairs:
        if dtype != rates.dtype:
            log.warning("cost: %s ran its frozen models in %s, the rates are for %s: not compared (calibrate in %s)",
                        stage.stage, dtype, rates.dtype, dtype)
            continue
        stage.timed(rates)
        rows.append({"run": stage.stage, "party": stage.party, "detail": stage.note, "flops": stage.flops,
                     "predicted_seconds": stage.seconds, "measured_seconds": measured,
                     "error": stage.seconds / measured - 1 if measured > 0 else float("nan")})
    return rows


def _calibrate_for(runs: Sequence[Path], calibrate_fn: Callable[..., Rates], dtype: str) -> Rates:
    target, keep = None, "0,-1"
    for run in runs:
        cfg = _read_config(run)
        target = target or cfg.get("target_model") or cfg.get("teacher")
        keep = cfg.get("keep_layers", keep)
    if target is None:
        for run in runs:
            if "target" in run.name:
                target = _read_config(run).get("model")
    if target is None:
        raise PostError("no target model named in these run directories; pass rates to compare_run_dirs.")
    return calibrate_fn(target, keep, dtype=dtype)


def _prompt_runs_dtype(runs: Sequence[Path], dtypes: dict[Path, str]) -> str:
    """The dtype most of the prompt runs (not distillation, which keeps float32 under auto) computed in (``dtypes``:
    each run's :func:`run_dtype`); float32 on a tie or with none."""
    counts = Counter(dtypes[run] for run in runs if run in dtypes and "teacher" not in _read_config(run))
    return max(sorted(counts), key=lambda d: (counts[d], d == "float32"), default="float32")


def report_section(out_dir: str | Path, rates: Rates | None = None, *, calibrate_missing: bool = True) -> str:
    """Markdown: predicted vs measured time of each stage of a pipeline directory (for the report); "" if none.

    See :func:`compare_run_dirs` for where the rates come from (``calibrate_missing=False``: never load a model).
    """
    rows = compare_run_dirs(out_dir, rates, calibrate_missing=calibrate_missing)
    if not rows:
        return ""
    lines = ["## Cost: predicted vs measured", "",
             "Predicted by `post.cost` from each run's own batches (FLOPs ÷ the rates measured on this machine).",
             "", "| run | party | FLOPs | predicted | measured | error |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['party']} | {r['flops']:.3g} | {r['predicted_seconds']:.1f} s | "
                     f"{r['measured_seconds']:.1f} s | {r['error']:+.0%} |")
    return "\n".join(lines) + "\n"


__all__ = ["ARCHS", "SETTINGS", "Arch", "CostConfig", "Flops", "Rates", "Setting", "StageCost", "Tokens",
           "arch_from_config", "calibrate", "compare_run_dirs", "estimate", "forward_flops", "print_cost",
           "prompt_step_flops", "render", "report_section", "resolve_arch", "run_cost", "train_step_flops"]
