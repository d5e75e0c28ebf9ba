"""Stage: distil a teacher into a layer-dropped student (the provider's step 1).

Loss (paper Eq. 1, DistilBERT-style), per token of packed text blocks:

    L = α_ce · T² · KL(softmax(t/T) ‖ softmax(s/T)) + α_lm · LM loss + α_cos · (1 − cos(h_s, h_t))
        [+ α_hidden · mean_j ‖h_s^(j) − h_t^(k_j+1)‖² / ‖h_t^(k_j+1)‖²]     (k_j+1: the next kept layer)
        [+ α_answer · T² · KL(softmax(t/T) ‖ softmax(s/T)) at the answer positions of templated text]
        [+ α_prompted · T² · KL(softmax(t/T) ‖ softmax(s/T)) at the answer of a templated text behind a soft prompt]

with t, s the teacher's and student's logits, h their last hidden states; the teacher runs
under no_grad. The two optional terms (off by default) match every kept layer's output to the
teacher's hidden state at the next kept layer, and the teacher's answer where a templated text
asks its question. The prompted term shows both models each corpus text in a task's template behind a
random soft prompt (the task's init-text prompt plus noise, or random vocabulary rows), so that the
student learns how the teacher's answer responds to a prompt: what a prompt tuned on the student, and
transferred, relies on. Masked LMs see 15% of tokens masked (80/10/10) and their LM loss is on those.

The loop runs under Hugging Face Accelerate: ``accelerate launch`` gives DDP over several
processes or GPUs (FSDP / DeepSpeed configs under ``configs/accelerate/``), and each process
takes its share of the same global batch, so 1 and N processes follow the same trajectory.
Checkpoints (safetensors + JSON, written atomically) are taken every ``checkpoint_every`` steps
and at the end; the batch order and masking derive from (seed, step), so a killed run resumes
exactly where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from post import progress
from post.checkpoint import load_checkpoint, save_checkpoint
from post.config import ModelOptions, require
from post.data import load_texts
from post.errors import PostError
from post.models import LoadedModel, save_model
from post.parallel import open_distributed_run
from post.resolve import load_configured_model
from post.results import DistillResult
from post.rundir import RESULT_FILE
from post.scoring import backbone, head_logits
from post.student import build_student, layer_count, param_count, parse_keep_layers

log = logging.getLogger(__name__)

STUDENT_DIR = "student"
PROMPTED_MAX_LENGTH = 128  # tokens of a templated text in the prompted term (cut from the left)


@dataclass(frozen=True, kw_only=True)
class DistillConfig(ModelOptions):
    """Distil a teacher into a student that keeps some of its layers.

    Attributes:
        teacher: Teacher model: alias, hub id or directory.
        keep_layers: Teacher layers the student starts from (paper: first and last).
        corpus: Unlabelled text: offline (wiki + news), wiki, news, a public labelled set's texts (airline), a
            text/JSONL/CSV file, hf:NAME, or several joined by + (offline+airline).
        corpus_limit: Use at most this many texts of the corpus.
        corpus_template: Wrap each corpus text in a task template with {text} and {mask}, cut at
            {mask} (e.g. 'Review: {text}\nSentiment: {mask}'), so that the student learns the
            teacher's answers where the task asks its question. Use it with the provider's public
            text (e.g. --corpus airline); it needs no labels and no private data.
        block_size: Tokens per packed block.
        batch_size: Blocks per optimizer step (all processes together).
        max_steps: Optimizer steps.
        lr: Peak learning rate (AdamW; paper 2.5e-4).
        warmup: Fraction of steps of linear warm-up.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient-norm clipping (paper 5.0).
        alpha_ce: Weight of the temperature-scaled KL to the teacher.
        alpha_lm: Weight of the language-modelling loss.
        alpha_cos: Weight of the cosine loss on last hidden states.
        alpha_hidden: Weight of per-kept-layer hidden-state matching: after each kept layer the
            student's hidden state should be the teacher's at the input of the next kept layer
            (after the last, the teacher's final normed state), as a squared error relative to
            the teacher state's norm, per token. Each kept layer then learns to stand in for the
            block of layers dropped after it, which converges in far fewer tokens than the logit
            terms alone. With alpha_ce = alpha_lm = 0 the LM heads are skipped (much faster).
        alpha_answer: Weight of T²·KL(teacher ‖ student) over the whole vocabulary at the answer
            positions only: where a --corpus-template text ends, i.e. where the task asks its
            question (causal LMs; needs corpus_template). The head runs at those positions alone.
        answer_words: With alpha_answer, compare the distribution over these words only (their
            first tokens, ';'-separated, spaces kept: e.g. ' negative; positive' -> ' negative',
            ' positive'), i.e. the teacher's answer to the task's question, instead of the whole
            vocabulary. Public: the task's label words.
        answer_task: A built-in task (mr, airline, sst2, ...) that frames the corpus for the answer term: its
            template stands for --corpus-template and its label words for --answer-words (its definition only:
            no labelled data is read). Give this or those two, not both.
        alpha_prompted: Weight of T²·KL(teacher ‖ student) over the whole vocabulary at the answer of each
            corpus text put in --prompted-task's template behind a random soft prompt of --prompted-tokens
            rows: the task's init-text prompt plus Gaussian noise (per-dimension std drawn uniformly up to
            --prompted-noise × the embeddings' RMS), or, for a fifth of the texts, random vocabulary rows.
            A batch of --batch-size such texts per step (causal LMs, one process).
        prompted_task: The task whose template and init text frame the prompted term (its definition only:
            no labelled data is read; the texts are the corpus's), e.g. mr.
        prompted_tokens: Rows of the random soft prompts (the prompt length users tune).
        prompted_noise: Largest noise std of the random prompts, in units of the embeddings' RMS.
        init_student: Start from this student directory (same teacher, tokenizer and number of kept
            layers, e.g. one written by post distill) instead of the teacher's kept layers: continue a
            distillation with other terms. The "undistilled" figures are then this student's.
        temperature: Softmax temperature of the KL term.
        mlm_probability: Fraction of tokens masked (masked LMs only).
        freeze_head: Keep the LM head as the teacher's (paper: slightly better).
        freeze_embeddings: Keep the input embeddings as the teacher's (prompts then live in the same space).
        held_out: Blocks held out for the quality figures (perplexity, KL to the teacher).
        checkpoint_every: Save a resumable checkpoint every this many steps.
        log_every: Log the losses every this many steps.
        eval_every: Measure the held-out perplexity and KL to the teacher every this many steps (the
            curve is in result.json and the run log; watch it for overfitting when the steps make many
            epochs over the corpus). None: before and after only.
        mixed_precision: bf16 runs the teacher's and the student's forwards and the losses under bf16
            autocast, with fp32 weights and optimizer state (GPUs; on a CPU it is slower than fp32).
            None or no: as Accelerate is configured (``accelerate launch --mixed_precision``), else fp32.
        max_minutes: Stop after the step that passes this many minutes of training (the learning-rate
            schedule stays planned for max_steps); the steps and tokens taken are in result.json.
        seed: Seed of the block order, held-out split and masking.
    """

    teacher: str = "smollm2-135m"
    keep_layers: str = "0,-1"
    corpus: str = "offline"
    corpus_limit: int | None = None
    corpus_template: str | None = None
    block_size: int = 128
    batch_size: int = 8
    max_steps: int = 500
    lr: float = 2.5e-4
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 5.0
    alpha_ce: float = 5.0
    alpha_lm: float = 2.0
    alpha_cos: float = 1.0
    alpha_hidden: float = 0.0
    alpha_answer: float = 0.0
    answer_words: str | None = None
    answer_task: str | None = None
    alpha_prompted: float = 0.0
    prompted_task: str | None = None
    prompted_tokens: int = 10
    prompted_noise: float = 2.0
    init_student: str | None = None
    temperature: float = 2.0
    mlm_probability: float = 0.15
    freeze_head: bool = True
    freeze_embeddings: bool = True
    held_out: int = 32
    checkpoint_every: int = 50
    log_every: int = 10
    eval_every: int | None = None
    mixed_precision: Literal["no", "bf16"] | None = None
    max_minutes: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        require(bool(self.teacher), "teacher", "must name a model.")
        require(8 <= self.block_size <= 8192, "block_size", f"must be between 8 and 8192, got {self.block_size}.")
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}.")
        require(self.max_steps >= 1, "max_steps", f"must be at least 1, got {self.max_steps}.")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be a positive number, got {self.lr}.")
        require(0 <= self.warmup < 1, "warmup", f"must be in [0, 1), got {self.warmup}.")
        require(self.max_grad_norm > 0, "max_grad_norm", f"must be positive, got {self.max_grad_norm}.")
        weights = ("alpha_ce", "alpha_lm", "alpha_cos", "alpha_hidden", "alpha_answer", "alpha_prompted")
        for name in weights:
            require(getattr(self, name) >= 0, name, "must be non-negative.")
        require(sum(getattr(self, name) for name in weights) > 0, "alpha_ce",
                "at least one of --alpha-ce, --alpha-lm, --alpha-cos, --alpha-hidden, --alpha-answer, "
                "--alpha-prompted must be positive.")
        require((self.alpha_prompted > 0) == (self.prompted_task is not None), "prompted_task",
                "and --alpha-prompted go together: the prompted term frames the corpus texts in that task's template.")
        from post.data import default_task

        for name in ("prompted_task", "answer_task"):
            if (value := getattr(self, name)) is not None:
                require(default_task(value) is not None, name,
                        f"{value!r} is not a built-in task (mr, airline, sst2, ...).")
        if self.answer_task is not None:
            require(self.corpus_template is None and self.answer_words is None, "answer_task",
                    "sets the corpus template and the answer words from the task; don't also give --corpus-template "
                    "or --answer-words.")
            require(self.alpha_answer > 0, "answer_task", "frames the answer term: it needs --alpha-answer > 0.")
        require(self.prompted_tokens >= 1, "prompted_tokens", "must be at least 1.")
        require(self.prompted_noise >= 0, "prompted_noise", "must be non-negative.")
        require(self.answer_words is None or (self.alpha_answer > 0 and len(self.answer_words.split(";")) >= 2),
                "answer_words", "needs --alpha-answer > 0 and at least two ';'-separated words.")
        require(self.alpha_answer == 0 or self.effective_template is not None, "alpha_answer",
                "needs --corpus-template or --answer-task: the answer positions are where the templated texts end.")
        require(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}.")
        require(0 < self.mlm_probability < 1, "mlm_probability", f"must be in (0, 1), got {self.mlm_probability}.")
        require(self.held_out >= 1, "held_out", f"must be at least 1, got {self.held_out}.")
        require(self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1.")
        require(self.log_every >= 1, "log_every", "must be at least 1.")
        require(self.eval_every is None or self.eval_every >= 1, "eval_every", "must be at least 1.")
        require(self.max_minutes is None or self.max_minutes > 0, "max_minutes", "must be positive.")
        require(self.mixed_precision in (None, "no", "bf16"), "mixed_precision",
                f"must be no or bf16, got {self.mixed_precision!r}.")
        if self.corpus_template is not None:
            from post.tasks import check_template

            check_template(self.corpus_template)

    @property
    def effective_template(self) -> str | None:
        """The corpus template: --corpus-template, or --answer-task's template."""
        return self._answer_task.template if self.answer_task is not None else self.corpus_template

    @property
    def effective_answer_words(self) -> str | None:
        """The answer words (';'-separated): --answer-words, or every label word of --answer-task's classes."""
        if self.answer_task is None:
            return self.answer_words
        return ";".join(w for ws in self._answer_task.label_words.values() for w in ws)

    @property
    def logit_terms(self) -> bool:
        """Whether a term needs the models' logits over the blocks (KL or LM); without one the heads are skipped."""
        return self.alpha_ce > 0 or self.alpha_lm > 0

    @property
    def block_terms(self) -> bool:
        """Whether any term runs over the corpus blocks (all but the prompted one)."""
        return any(getattr(self, f"alpha_{n}") > 0 for n in ("ce", "lm", "cos", "hidden", "answer"))

    @property
    def _answer_task(self) -> Any:
        from post.data import default_task

        return default_task(str(self.answer_task))

    @property
    def torch_dtype(self) -> torch.dtype:
        """``--dtype auto`` keeps float32 here: the student's weights train (use --mixed-precision bf16 for bf16
        compute); an explicit dtype is taken as given."""
        return torch.float32 if self.dtype == "auto" else ModelOptions.torch_dtype.fget(self)


def templated(texts: list[str], template: str | None, mask_token: str | None) -> list[str]:
    """``texts`` wrapped in ``template`` up to its {mask} (causal), or with the mask token in it (masked)."""
    if template is None:
        return texts
    head = template.split("{mask}")[0].rstrip(" ") if mask_token is None else template.replace("{mask}", mask_token)
    return [head.replace("{text}", t) for t in texts]


def _separator(tokenizer: Any) -> int | None:
    """The token put between packed texts: EOS, or SEP for a masked LM without one."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def pack_blocks(texts: list[str], tokenizer: Any, block_size: int) -> torch.Tensor:
    """(N, block_size) token ids: texts joined by EOS (or SEP) and cut into full blocks."""
    sep = _separator(tokenizer)
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        if sep is not None:
            ids.append(int(sep))
    n = len(ids) // block_size
    if n < 2:
        raise PostError(f"the corpus gives {len(ids)} tokens, fewer than two blocks of {block_size}; "
                        "use more text or a smaller --block-size.")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def answer_positions(ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """(B, L) mask of the positions whose next token is the separator ``pack_blocks`` puts after each text.

    With a --corpus-template those are where the task's answer comes (the text is cut at {mask}).
    """
    sep = _separator(tokenizer)
    out = torch.zeros_like(ids, dtype=torch.bool)
    if sep is not None:
        out[:, :-1] = ids[:, 1:] == sep
    return out


def answer_token_ids(words: str, tokenizer: Any) -> list[int]:
    """The first token of each ';'-separated word (spaces kept); distinct words must start differently."""
    ids = []
    for w in words.split(";"):
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise PostError(f"--answer-words: {w!r} gives no token.")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise PostError(f"--answer-words: two of {words.split(';')} start with the same token; the answer KL can't "
                        "tell them apart.")
    return ids


def mask_tokens(ids: torch.Tensor, tokenizer: Any, probability: float, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick ``probability`` of tokens; 80% -> <mask>, 10% random, 10% kept. Returns (inputs, picked)."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    picked = (torch.rand(ids.shape, generator=generator) < probability) & ~torch.isin(ids, special)
    inputs = ids.clone()
    roll = torch.rand(ids.shape, generator=generator)
    inputs[picked & (roll < 0.8)] = tokenizer.mask_token_id
    rand = picked & (roll >= 0.8) & (roll < 0.9)
    inputs[rand] = torch.randint(len(tokenizer), ids.shape, generator=generator)[rand]
    return inputs, picked


def _forward(model: torch.nn.Module, inputs: torch.Tensor, *, kind: str, heads: bool) -> Any:
    """The model's outputs with every hidden state; without ``heads``, the backbone alone (no vocabulary matmul)."""
    kw = {"use_cache": False} if kind == "causal" else {}
    body = model if heads or isinstance(model, torch.nn.parallel.DistributedDataParallel) else backbone(model)
    return body(input_ids=inputs, output_hidden_states=True, **kw)


def hidden_matching(student_states: tuple[torch.Tensor, ...], teacher_states: tuple[torch.Tensor, ...],
                    keep: list[int]) -> torch.Tensor:
    """Mean relative squared error between each kept layer's output and the teacher's state it stands in for.

    Student layer j (teacher layer keep[j]) should output the teacher's input to layer keep[j + 1];
    the last kept layer, the teacher's final (normed) state. Per token, ‖h_s − h_t‖² / ‖h_t‖².
    """
    targets = [teacher_states[k] for k in keep[1:]] + [teacher_states[-1]]
    errs = []
    for h_s, h_t in zip(student_states[1:], targets, strict=True):
        h_s, h_t = h_s.float(), h_t.float()
        errs.append(((h_s - h_t).pow(2).sum(-1) / h_t.pow(2).sum(-1).clamp_min(1e-6)).mean())
    return torch.stack(errs).mean()


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def answer_kl(student: torch.nn.Module, teacher: torch.nn.Module, s_final: torch.Tensor, t_final: torch.Tensor,
              answers: torch.Tensor, temperature: float, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """T²·KL(teacher ‖ student) of the next-token distributions at the positions ``answers`` (B, L) marks.

    ``s_final``/``t_final`` are the final (normed) hidden states; each model's LM head runs on the marked
    positions only (:func:`post.scoring.head_logits`, so a logit soft-cap applies as in the model). With
    ``token_ids`` the distributions are over those tokens alone (renormalised), and only their rows of the
    head are computed.
    Zero (with a gradient path) when nothing is marked.
    """
    if not answers.any():
        return s_final.sum() * 0
    s_logits = head_logits(_unwrapped(student), s_final[answers], token_ids).float()
    with torch.no_grad():
        t_logits = head_logits(_unwrapped(teacher), t_final[answers], token_ids).float()
    kl = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                  log_target=True, reduction="batchmean")
    return kl * temperature**2


def trainable_parameters(model: torch.nn.Module, cfg: DistillConfig) -> list[torch.nn.Parameter]:
    """Make the student trainable but for what ``cfg`` freezes (its embeddings, its head); the parameters left."""
    model.requires_grad_(True)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    if cfg.freeze_head and model.get_output_embeddings() is not None:
        model.get_output_embeddings().requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def distill_losses(student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor, *, kind: str,
                   cfg: DistillConfig, picked: torch.Tensor | None = None, inputs: torch.Tensor | None = None,
                   keep: list[int] | None = None, answers: torch.Tensor | None = None,
                   answer_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The loss terms for a batch of blocks ``ids`` (B, L) and their weighted total.

    ``keep`` (the teacher layers the student kept) is needed only with ``cfg.alpha_hidden``, and
    ``answers`` (a (B, L) mask of answer positions) only with ``cfg.alpha_answer``.
    """
    inputs = ids if inputs is None else inputs
    heads = cfg.logit_terms
    with torch.no_grad():
        t_out = _forward(teacher, inputs, kind=kind, heads=heads)
    s_out = _forward(student, inputs, kind=kind, heads=heads)
    terms: dict[str, torch.Tensor] = {}
    if heads:
        s_logits, t_logits = s_out.logits.float(), t_out.logits.float()
        temp = cfg.temperature
        kl = F.kl_div(F.log_softmax(s_logits / temp, -1), F.log_softmax(t_logits / temp, -1), log_target=True,
                      reduction="none").sum(-1)
        if kind == "causal":
            lm = F.cross_entropy(s_logits[:, :-1].reshape(-1, s_logits.shape[-1]), ids[:, 1:].reshape(-1))
        else:
            lm = F.cross_entropy(s_logits[picked], ids[picked]) if picked.any() else s_logits.sum() * 0
        terms |= {"ce": kl.mean() * temp**2, "lm": lm}
    h_s, h_t = s_out.hidden_states[-1].float(), t_out.hidden_states[-1].float()
    terms["cos"] = (1 - F.cosine_similarity(h_s, h_t, dim=-1)).mean()
    total = cfg.alpha_ce * terms["ce"] + cfg.alpha_lm * terms["lm"] + cfg.alpha_cos * terms["cos"] if heads \
        else cfg.alpha_cos * terms["cos"]
    if cfg.alpha_hidden > 0:
        if keep is None:
            raise ValueError("alpha_hidden needs the kept layers")
        terms["hidden"] = hidden_matching(s_out.hidden_states, t_out.hidden_states, keep)
        total = total + cfg.alpha_hidden * terms["hidden"]
    if cfg.alpha_answer > 0:
        if answers is None:
            raise ValueError("alpha_answer needs the answer positions")
        terms["answer"] = answer_kl(student, teacher, s_out.hidden_states[-1], t_out.hidden_states[-1], answers,
                                    cfg.temperature, answer_ids)
        total = total + cfg.alpha_answer * terms["answer"]
    terms["loss"] = total
    return terms


@torch.no_grad()
def quality(model: torch.nn.Module, teacher: torch.nn.Module, blocks: torch.Tensor, *, kind: str,
            tokenizer: Any, seed: int, batch_size: int = 8) -> dict[str, float]:
    """Held-out perplexity of ``model`` and its mean per-token KL(teacher ‖ model) at T = 1."""
    nll, kl, n_lm, n_tok = 0.0, 0.0, 0, 0
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size].to(next(model.parameters()).device)
        if kind == "masked":
            inputs, picked = mask_tokens(ids.cpu(), tokenizer, 0.15, g)
            inputs, picked = inputs.to(ids.device), picked.to(ids.device)
            logits = model(input_ids=inputs).logits.float()
            t_logits = teacher(input_ids=inputs).logits.float()
            nll += float(F.cross_entropy(logits[picked], ids[picked], reduction="sum"))
            n_lm += int(picked.sum())
        else:
            logits = model(input_ids=ids, use_cache=False).logits.float()
            t_logits = teacher(input_ids=ids, use_cache=False).logits.float()
            nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="sum"))
            n_lm += ids[:, 1:].numel()
        kl += float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                             reduction="sum"))
        n_tok += ids.numel()
    return {"perplexity": math.exp(nll / max(n_lm, 1)), "kl_to_teacher": kl / max(n_tok, 1)}


def prompted_draw(cfg: DistillConfig, step: int, n_texts: int) -> tuple[torch.Generator, torch.Tensor]:
    """The prompted term's generator for ``step`` and the --batch-size text indices it draws first (the cost
    model rebuilds the same batches from them)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 500_009 + step)
    return g, torch.randperm(n_texts, generator=g)[: cfg.batch_size]


def prompted_encoder(cfg: DistillConfig, tokenizer: Any, kind: str) -> Any:
    """The encoder of the prompted term's texts: --prompted-task's template, cut to PROMPTED_MAX_LENGTH."""
    from post.data import default_task
    from post.scoring import Encoder

    task = default_task(str(cfg.prompted_task))
    assert task is not None  # checked by the config
    return Encoder(task, tokenizer, kind, PROMPTED_MAX_LENGTH)


class PromptedAnswers:
    """The prompted term's inputs: corpus texts in a task's template, each behind its own random soft prompt."""

    def __init__(self, cfg: DistillConfig, teacher: LoadedModel, texts: list[str]) -> None:
        from post.prompt import init_prompt

        self.cfg = cfg
        self.encoder = prompted_encoder(cfg, teacher.tokenizer, teacher.kind)
        self.seqs, self.answers = self.encoder.encode(texts)
        self.init = init_prompt(teacher, cfg.prompted_tokens, init_text=self.encoder.task.init_text).float().cpu()
        self.rows = teacher.model.get_input_embeddings().weight.detach().float().cpu()
        self.rms = float(self.rows.pow(2).mean().sqrt())

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices of --batch-size texts, their (B, n, d) prompts), drawn from (seed, step)."""
        g, idx = prompted_draw(self.cfg, step, len(self.seqs))
        b, (n, d) = len(idx), self.init.shape
        std = torch.rand(b, 1, 1, generator=g) * self.cfg.prompted_noise * self.rms
        prompts = self.init.unsqueeze(0) + torch.randn(b, n, d, generator=g) * std
        vocab = torch.rand(b, generator=g) < 0.2
        rows = torch.randint(len(self.rows), (b, n), generator=g)
        prompts[vocab] = self.rows[rows[vocab]]
        return idx, prompts

    def term(self, student: torch.nn.Module, teacher: torch.nn.Module, step: int) -> torch.Tensor:
        """T²·KL(teacher ‖ student) of the answer distributions behind this step's prompts."""
        from post.scoring import examples_hidden

        idx, prompts = self.batch(step)
        param = next(student.parameters())
        prompts = prompts.to(param.device)
        with torch.no_grad():
            t = head_logits(teacher, examples_hidden(teacher, self.encoder, self.seqs, self.answers, idx, prompts))
        s = head_logits(student, examples_hidden(student, self.encoder, self.seqs, self.answers, idx, prompts))
        temp = self.cfg.temperature
        return F.kl_div(F.log_softmax(s.float() / temp, -1), F.log_softmax(t.float() / temp, -1), log_target=True,
                        reduction="batchmean") * temp**2


def _start(cfg: DistillConfig, teacher: LoadedModel, keep: list[int]) -> LoadedModel:
    """The student the run starts from: the teacher's kept layers, or --init-student (checked against them)."""
    if cfg.init_student is None:
        return build_student(teacher, cfg.keep_layers)
    start = load_configured_model(cfg, cfg.init_student)
    sc, tc = start.model.config, teacher.model.config
    layers = layer_count(sc)
    problems = []
    if layers != len(keep):
        problems.append(f"{layers} layers, not the {len(keep)} of --keep-layers {cfg.keep_layers}")
    width, teacher_width = getattr(sc, "hidden_size", None), getattr(tc, "hidden_size", None)
    if width != teacher_width:
        problems.append(f"width {width}, not the teacher's {teacher_width}")
    if start.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        problems.append("another tokenizer than the teacher's")
    if problems:
        raise PostError(f"--init-student {cfg.init_student} has {'; '.join(problems)}: give a student of this teacher "
                        "with these kept layers.")
    return start


def _autocast(acc: Any, cfg: DistillConfig) -> Any:
    """bf16 autocast over the teacher's and student's forwards and the losses with --mixed-precision bf16; else
    Accelerate's own setting (``accelerate launch --mixed_precision``; a no-op when it is "no")."""
    if cfg.mixed_precision == "bf16":
        return torch.autocast(device_type=acc.device.type, dtype=torch.bfloat16)
    return acc.autocast()


def _past(acc: Any, seconds: float, minutes: float) -> bool:
    """Whether any process has trained past ``minutes`` (all processes stop at the same step)."""
    late = torch.tensor([float(seconds > 60 * minutes)], device=acc.device)
    return bool(acc.reduce(late, reduction="sum").item() > 0) if acc.num_processes > 1 else bool(late.item())


def _held_out_point(model: torch.nn.Module, teacher: torch.nn.Module, held: torch.Tensor, step: int,
                    cfg: DistillConfig, kind: str, tokenizer: Any) -> dict[str, float]:
    """One point of the held-out curve: perplexity and KL to the teacher after ``step`` steps (fp32)."""
    model.eval()
    point = quality(model, teacher, held, kind=kind, tokenizer=tokenizer, seed=cfg.seed)
    model.train()
    return {"step": step, **point}


def _lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up then linear decay to zero."""
    w = max(1, int(total * warmup))
    return (step + 1) / w if step < w else max(0.0, (total - step) / max(1, total - w))


def distill(cfg: DistillConfig, run_dir: str | Path) -> DistillResult:
    """Distil ``cfg.teacher`` into a student; save it to ``run_dir/student`` and report its quality."""
    acc, run, done = open_distributed_run(cfg, run_dir, "distill")
    if done is not None:
        return DistillResult.from_dict(done, source=str(Path(run_dir) / RESULT_FILE))
    main_process, run_path = acc.is_main_process, Path(run_dir)

    teacher = load_configured_model(cfg, cfg.teacher)
    teacher.model.to(acc.device)
    tc = teacher.model.config
    keep = parse_keep_layers(cfg.keep_layers, layer_count(tc))
    student = _start(cfg, teacher, keep)
    kind = teacher.kind
    if cfg.alpha_prompted > 0 and (kind != "causal" or acc.num_processes > 1):
        raise PostError("--alpha-prompted is for causal LMs in one process (the prompt goes before the text; "
                        f"{cfg.teacher} is a {kind} LM, {acc.num_processes} process(es)).")
    if kind == "masked" and cfg.alpha_answer > 0:
        raise PostError("--alpha-answer is for causal LMs (their answer comes after the text); "
                        f"{cfg.teacher} is a masked LM.")
    if kind == "masked" and teacher.tokenizer.mask_token_id is None:
        raise PostError(f"{cfg.teacher} is a masked LM without a mask token; it can't be distilled with MLM.")
    torch.manual_seed(cfg.seed)
    words = cfg.effective_answer_words
    answer_ids = torch.tensor(answer_token_ids(words, teacher.tokenizer), device=acc.device) if words else None
    block_terms = cfg.block_terms  # the block terms run only when weighted
    raw = load_texts(cfg.corpus, limit=cfg.corpus_limit, cache_dir=cfg.cache_dir)
    prompted = PromptedAnswers(cfg, teacher, raw) if cfg.alpha_prompted > 0 else None
    texts = templated(raw, cfg.effective_template, teacher.tokenizer.mask_token if kind == "masked" else None)
    blocks = pack_blocks(texts, teacher.tokenizer, cfg.block_size)
    order = torch.from_numpy(np.random.default_rng(cfg.seed).permutation(len(blocks)))
    if len(blocks) <= cfg.held_out + cfg.batch_size:
        raise PostError(f"the corpus gives {len(blocks)} blocks: too few for --held-out {cfg.held_out} and "
                        f"--batch-size {cfg.batch_size}; use more text.")
    held, train = blocks[order[: cfg.held_out]], blocks[order[cfg.held_out :]]

    model = student.model
    trainable = trainable_parameters(model, cfg)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    meta = None
    if (ckpt := load_checkpoint(run_path, params=dict(model.named_parameters()), optimizer=opt)) is not None:
        model.load_state_dict(ckpt[0])
        meta = ckpt[1]
    model.train()
    # Dropout would make 1- and N-process runs (and resumed ones) diverge; distillation here runs without it.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ddp_model, opt = acc.prepare(model, opt)

    if meta is None:
        start, elapsed, curve = 0, 0.0, []
        before = quality(model, teacher.model, held, kind=kind, tokenizer=teacher.tokenizer, seed=cfg.seed)
        teacher_q = quality(teacher.model, teacher.model, held, kind=kind, tokenizer=teacher.tokenizer, seed=cfg.seed)
    else:
        start, elapsed, curve = int(meta["step"]), float(meta["elapsed"]), list(meta.get("curve", []))
        before, teacher_q = meta["undistilled"], meta["teacher"]
        log.info("resuming distillation from step %d", start)
    if main_process:
        log.info("distilling %s into layers %s on %d blocks of %d tokens, %d steps, %d process(es)",
                 cfg.teacher, keep, len(train), cfg.block_size, cfg.max_steps, acc.num_processes)

    done = start
    with progress.steps(cfg.max_steps, initial=start, desc="distill", enabled=main_process) as bar:
        t0 = time.perf_counter()
        per_epoch = len(train) // cfg.batch_size
        for step in range(start, cfg.max_steps):
            epoch, pos = divmod(step, per_epoch)
            perm = torch.from_numpy(np.random.default_rng([cfg.seed, epoch]).permutation(len(train)))
            global_idx = perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
            local_idx = global_idx[acc.process_index :: acc.num_processes]
            ids = train[local_idx].to(acc.device)
            inputs, picked = None, None
            if kind == "masked":
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
                inputs, picked = mask_tokens(train[global_idx], teacher.tokenizer, cfg.mlm_probability, g)
                inputs = inputs[acc.process_index :: acc.num_processes].to(acc.device)
                picked = picked[acc.process_index :: acc.num_processes].to(acc.device)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, cfg.max_steps, cfg.warmup)
            answers = answer_positions(ids, teacher.tokenizer) if cfg.alpha_answer > 0 else None
            with _autocast(acc, cfg):
                terms = distill_losses(ddp_model, teacher.model, ids, kind=kind, cfg=cfg, picked=picked,
                                       inputs=inputs, keep=keep, answers=answers, answer_ids=answer_ids) \
                    if block_terms else {}
                if prompted is not None:
                    terms["prompted"] = prompted.term(model, teacher.model, step)
                    terms["loss"] = terms.get("loss", 0) + cfg.alpha_prompted * terms["prompted"]
            progress.check_finite("distillation loss", terms["loss"].detach(), step=step, run_path=run_path)
            acc.backward(terms["loss"])
            acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
            try:
                opt.step()
            except RuntimeError:  # an update too large for the weights' dtype (e.g. a huge --lr)
                raise progress.diverged(f"the update of step {step} overflowed", run_path) from None
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            done = step + 1
            if main_process and (done % cfg.log_every == 0 or done == cfg.max_steps):
                run.log(step=done, lr=opt.param_groups[0]["lr"], **{k: float(v.detach()) for k, v in terms.items()})
            seconds = elapsed + time.perf_counter() - t0
            out_of_time = cfg.max_minutes is not None and _past(acc, seconds, cfg.max_minutes)
            if cfg.eval_every is not None and (done % cfg.eval_every == 0 or done == cfg.max_steps or out_of_time):
                curve.append(_held_out_point(acc.unwrap_model(ddp_model), teacher.model, held, done, cfg, kind,
                                             teacher.tokenizer))
                if main_process:
                    run.log(step=done, **{f"held_out_{k}": v for k, v in curve[-1].items() if k != "step"})
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps or out_of_time:
                acc.wait_for_everyone()
                if main_process:
                    unwrapped = acc.unwrap_model(ddp_model)
                    save_checkpoint(run_path, tensors=unwrapped.state_dict(), params=dict(unwrapped.named_parameters()),
                                    optimizer=opt, meta={"step": done, "elapsed": elapsed + time.perf_counter() - t0,
                                                         "undistilled": before, "teacher": teacher_q, "curve": curve})
            if out_of_time:
                log.warning("distillation stopped at step %d of %d: --max-minutes %g reached", done, cfg.max_steps,
                            cfg.max_minutes)
                break
    train_seconds = elapsed + time.perf_counter() - t0
    acc.wait_for_everyone()
    model = acc.unwrap_model(ddp_model)
    model.eval()
    if curve and curve[-1]["step"] == done:  # measured on these very weights at the last step
        after = {k: v for k, v in curve[-1].items() if k != "step"}
    else:
        after = quality(model, teacher.model, held, kind=kind, tokenizer=teacher.tokenizer, seed=cfg.seed)
    if main_process:
        model.requires_grad_(False)
        out = save_model(LoadedModel(model=model, tokenizer=teacher.tokenizer, name=student.name, kind=kind,
                                     path=None), run_path / STUDENT_DIR)
        run.finish({
            "teacher": cfg.teacher, "student_dir": str(out), "keep_layers": keep,
            "teacher_params": param_count(teacher.model), "student_params": param_count(model),
            "trainable_params": sum(p.numel() for p in trainable), "steps": done, "planned_steps": cfg.max_steps,
            "tokens_seen": done * cfg.batch_size * cfg.block_size if block_terms else 0,
            "prompted_texts": done * cfg.batch_size if prompted is not None else 0, "processes": acc.num_processes,
            "mixed_precision": "bf16" if cfg.mixed_precision == "bf16" else acc.mixed_precision,
            "held_out_curve": curve,
            "train_seconds": round(train_seconds, 3), "held_out_blocks": len(held),
            "teacher_quality": teacher_q, "undistilled_quality": before, "distilled_quality": after,
        })
    acc.wait_for_everyone()
    return DistillResult.from_dir(run_path)


def summarize(result: DistillResult) -> str:
    t, u, d = result.teacher_quality, result.undistilled_quality, result.distilled_quality
    early = f" (of {result.planned_steps} planned: time limit)" if (result.planned_steps or 0) > result.steps else ""
    return (f"student (layers {result.keep_layers}, {result.student_params / 1e6:.1f}M params) after "
            f"{result.steps} steps{early}, {result.tokens_seen / 1e6:.2f}M tokens"
            f"{f', {result.prompted_texts} prompted texts' if result.prompted_texts else ''}, "
            f"{result.train_seconds:.0f} s\n"
            f"held-out perplexity: teacher {t['perplexity']:.1f}  undistilled {u['perplexity']:.1f}  "
            f"distilled {d['perplexity']:.1f}\n"
            f"KL to teacher: undistilled {u['kl_to_teacher']:.3f}  distilled {d['kl_to_teacher']:.3f}\n"
            f"student: {result.student_dir}")
