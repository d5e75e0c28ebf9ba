"""Verbalized classification: encode templated inputs, read class scores at the answer position.

Shapes: B batch, L sequence, n prompt tokens, d hidden size, V vocabulary, W label-word tokens,
C classes.

- Inputs are right-padded; text is truncated from the left so the template's end (where the
  answer is read) always survives.
- Causal LM: the answer position is the last real token (the one before ``{mask}``).
  Masked LM: the position of the mask token.
- Only the hidden state at the answer position goes through the LM head, and when the head is a
  plain linear layer only the label-word rows of it are used: the head is a large share of the
  cost of a small model.
- A soft prompt (n, d) or (B, n, d) is prepended to the input embeddings produced by the model's
  own embedding layer (so models that scale embeddings, like Gemma, stay right); the attention
  mask grows by n and the answer index shifts by n.
- Causal LMs run examples packed end to end in rows, with no padding between them
  (:class:`PackedBatch`, :func:`examples_hidden`): position ids restart at each example, and
  transformers turns them into a block-diagonal causal mask, so each example's hidden states (and
  gradients) are those it gets alone. Padded batches of length-sorted examples remain for masked
  LMs and for any model that fails the exactness check (:func:`packs`).
- Scoring without gradients (:func:`predict_scores`, the service) computes what every example starts with
  (the soft prompt, BOS and the template's text before ``{text}``) once and lets each packed example attend
  to it through a KV cache (:class:`SharedStart`, :func:`start_hidden`, :func:`shares_prefix`): a 100-token
  prompt is no longer run once per text. Gradient paths (tuning, DP, the transfer's steps) keep whole
  examples.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import inspect
import logging
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from post.errors import PostError
from post.models import MASKED_HEADS
from post.tasks import Task, Verbalizer

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """A padded batch. input_ids/attention_mask: (B, L); answer_index: (B,) (without prompt)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.answer_index.to(device))


@dataclass
class PackedBatch:
    """Several examples per row, no padding between them (causal LMs only).

    input_ids/position_ids: (R, L); the position ids restart at 0 for each example, which is how
    transformers tells packed examples apart: attention stays inside each example (a block-diagonal
    causal mask), so every example's hidden states are those it gets alone. Each example occupies
    ``n`` soft-prompt slots (``prompt_row``/``prompt_col``, (k·n,), example-major; their ids are
    padding, replaced by the prompt's vectors) followed by its tokens; ``prompt_tokens`` is None when
    the examples' prompts differ in length (the slots are then Σ n_i, in the same order). ``answer_row``/``answer_col``
    (k,): where each example's answer is read. A row's tail after its last example is padding at
    position 0 (one-token blocks nobody reads).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    answer_row: torch.Tensor
    answer_col: torch.Tensor
    prompt_row: torch.Tensor
    prompt_col: torch.Tensor
    prompt_tokens: int | None

    def __len__(self) -> int:
        return int(self.answer_row.shape[0])

    def to(self, device: torch.device | str) -> PackedBatch:
        t = [x.to(device) for x in (self.input_ids, self.position_ids, self.answer_row, self.answer_col,
                                    self.prompt_row, self.prompt_col)]
        return PackedBatch(*t, self.prompt_tokens)


def _find_sublist(haystack: Sequence[int], needle: Sequence[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if list(haystack[i : i + len(needle)]) == list(needle):
            return i
    return -1


class Encoder:
    """Turns raw texts into token ids for one (task, tokenizer, model kind).

    The template's fixed pieces are tokenised once; texts are tokenised in one batched call.
    """

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, kind: str, max_length: int = 128) -> None:
        if kind not in ("causal", "masked"):
            raise PostError(f"model kind must be causal or masked, got {kind!r}.")
        self.task, self.tokenizer, self.kind, self.max_length = task, tokenizer, kind, max_length
        t = task.template
        pre, rest = t.split("{text}", 1)
        mid, after = rest.split("{mask}", 1)
        # A space before {text} belongs to the text (BPE attaches spaces to the following word);
        # a space before {mask} belongs to the label word (label words carry their leading space).
        self.text_prefix = ""
        if pre[-1:].isspace():
            pre, self.text_prefix = pre[:-1], pre[-1]
        if mid[-1:].isspace():
            mid = mid[:-1]
        enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []  # noqa: E731
        self.pre_ids, self.mid_ids, self.after_ids = enc(pre), enc(mid), enc(after)
        probe_plain = enc("x")
        probe_full = list(tokenizer("x", add_special_tokens=True)["input_ids"])
        at = _find_sublist(probe_full, probe_plain)
        self.bos_ids = probe_full[:at] if at > 0 else []
        # Causal LMs read the answer at the last token: an appended EOS would move it.
        self.eos_ids = probe_full[at + len(probe_plain):] if (at >= 0 and kind == "masked") else []
        if kind == "masked":
            if tokenizer.mask_token_id is None:
                raise PostError("this tokenizer has no mask token, so it can't be used as a masked LM.")
            self.answer_ids = [int(tokenizer.mask_token_id)] + self.after_ids
        else:
            self.answer_ids = []
        self.fixed = len(self.bos_ids) + len(self.pre_ids) + len(self.mid_ids) + len(self.answer_ids) + len(
            self.eos_ids)
        if self.fixed >= max_length:
            raise PostError(f"the template alone takes {self.fixed} tokens, more than --max-length "
                            f"{max_length}; shorten the template or raise --max-length.")
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    def encode(self, texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids per text (truncated from the left) and the answer index of each."""
        texts = [self.text_prefix + t for t in texts]
        text_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        budget = self.max_length - self.fixed
        seqs, answers = [], []
        head = self.bos_ids + self.pre_ids
        for ids in text_ids:
            ids = list(ids[-budget:]) if len(ids) > budget else list(ids)
            seq = head + ids + self.mid_ids
            if not seq:
                raise PostError("an input encodes to no tokens; give a non-empty template or text.")
            answer = len(seq) if self.kind == "masked" else len(seq) - 1
            seqs.append(seq + self.answer_ids + self.eos_ids)
            answers.append(answer)
        return seqs, answers

    def collate(self, seqs: Sequence[Sequence[int]], answers: Sequence[int]) -> Batch:
        width = max((len(s) for s in seqs), default=1)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return Batch(ids, mask, torch.tensor(list(answers), dtype=torch.long))

    def batches(self, texts: Sequence[str], batch_size: int) -> Iterator[tuple[np.ndarray, Batch]]:
        """Yield (original indices, batch), grouping texts of similar length to cut padding."""
        seqs, answers = self.encode(texts)
        for idx in length_buckets([len(s) for s in seqs], batch_size):
            yield idx, self.collate([seqs[i] for i in idx], [answers[i] for i in idx])

    def collate_packed(self, rows: Sequence[Sequence[int]], seqs: Sequence[Sequence[int]],
                       answers: Sequence[int], prompt_tokens: int | Sequence[int]) -> PackedBatch:
        """A packed batch: ``rows`` lists, per row, the examples (indices into ``seqs``) laid end to end.

        ``prompt_tokens``: the prompt slots in front of every example, or per example (indexed like ``seqs``:
        prompts of different lengths, whose vectors the caller puts in the slots; the batch's
        ``prompt_tokens`` is then None and :func:`packed_inputs` refuses it)."""
        uniform = np.ndim(prompt_tokens) == 0
        slots = (lambda i: int(prompt_tokens)) if uniform else (lambda i: int(prompt_tokens[i]))  # type: ignore[index,arg-type]
        width = max(sum(len(seqs[i]) + slots(i) for i in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        a_row, a_col, p_row, p_col = [], [], [], []
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                s, n = seqs[i], slots(i)
                end = at + n + len(s)
                ids[r, at + n : end] = torch.tensor(s, dtype=torch.long)
                pos[r, at:end] = torch.arange(n + len(s))
                p_row += [r] * n
                p_col += range(at, at + n)
                a_row.append(r)
                a_col.append(at + n + answers[i])
                at = end
            # the tail is padding: position 0 everywhere makes each pad token a block of its own, so no
            # position grows past the longest example's (GPT-2's table, RoPE scalings that read the max)
        as_t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        n = int(prompt_tokens) if uniform else None  # type: ignore[arg-type]
        return PackedBatch(ids, pos, as_t(a_row), as_t(a_col), as_t(p_row), as_t(p_col), n)


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices of batches of similar length: longest first, each padded to its own longest (ties keep input order).

    Writing each batch's results to ``out[idx]`` restores the input order. Sorting first pads every
    batch to a width close to its members' lengths instead of the longest of a random group.
    """
    if batch_size < 1:
        raise PostError(f"batch size must be at least 1, got {batch_size}.")
    order = np.argsort([-int(n) for n in lengths], kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def packed_rows(lengths: Sequence[int], cap: int | None = None) -> list[list[int]]:
    """Examples (indices) laid end to end in rows of ``cap`` tokens (default: the longest example's length):
    best fit, longest first (each example goes to the fullest row it fits in), so no example is cut and
    the rows come out nearly full."""
    if not len(lengths):
        return []
    cap = max(max(int(n) for n in lengths), int(cap or 0))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the first with enough room is the best fit
    for i in np.argsort([-int(n) for n in lengths], kind="stable"):
        need = int(lengths[i])
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            left, r = free.pop(at)
        else:
            left, r = cap, len(rows)
            rows.append([])
        rows[r].append(int(i))
        if left - need > 0:
            bisect.insort(free, (left - need, r))
    return rows


def tight_rows(lengths: Sequence[int]) -> list[list[int]]:
    """:func:`packed_rows` at the row length that runs the fewest tokens (rows × the widest row).

    A few examples rarely fill rows of the longest one's length (34, 29 and 8 make three rows of 34;
    rows of 42 hold them in two), so longer rows are tried too: the longest plus each other length,
    and lengths that would spread the total evenly, up to twice the longest (attention runs over a
    whole row, so much longer rows would cost more than the padding they save).
    """
    if not len(lengths):
        return []
    ints = [int(n) for n in lengths]
    longest, total = max(ints), sum(ints)
    caps = {longest} | {longest + n for n in set(ints)} | {-(-total // k) for k in range(1, len(ints) + 1)}
    best: tuple[int, int, list[list[int]]] | None = None
    for cap in sorted(c for c in caps if longest <= c <= 2 * longest):
        rows = packed_rows(ints, cap)
        width = max(sum(ints[i] for i in row) for row in rows)
        if best is None or len(rows) * width < best[0] * best[1]:
            best = (len(rows), width, rows)
    assert best is not None  # the longest itself is always a candidate
    return best[2]


def pack_rows(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Examples grouped for packed forwards, each group as indices: rows of :func:`packed_rows`, taken in
    order until a group holds about ``batch_size`` examples' worth of tokens (``batch_size`` × the mean
    length), so a packed forward costs about what a padded batch of ``batch_size`` would, without the
    padding."""
    if batch_size < 1:
        raise PostError(f"batch size must be at least 1, got {batch_size}.")
    if not len(lengths):
        return []
    budget = max(max(int(n) for n in lengths), round(batch_size * float(np.mean(lengths))))
    out: list[list[int]] = []
    group: list[int] = []
    used = 0
    for row in packed_rows(lengths):
        size = sum(int(lengths[i]) for i in row)
        if group and used + size > budget:
            out.append(group)
            group, used = [], 0
        group += row
        used += size
    if group:
        out.append(group)
    return [np.array(g, dtype=np.int64) for g in out]


def score_groups(lengths: Sequence[int], batch_size: int, prompt_tokens: int = 0, *, packing: bool) -> list[np.ndarray]:
    """The examples scored together in one forward, each as indices: with ``packing``, :func:`pack_rows`'
    batches (about ``batch_size`` examples' tokens, end to end; ``lengths`` without the prompt), else
    :func:`length_buckets` (``batch_size`` examples of similar length, padded to their longest)."""
    if packing:
        return pack_rows([int(n) + prompt_tokens for n in lengths], batch_size)
    return length_buckets(lengths, batch_size)


def micro_batches(lengths: Sequence[int], micro_batch_size: int) -> list[np.ndarray]:
    """Positions of the micro-batches a logical batch of these lengths is split into: one, in input order,
    when it fits in ``micro_batch_size``; otherwise :func:`length_buckets` (longest first), so each
    micro-batch pads only to its own longest. No positions, no micro-batches."""
    if len(lengths) <= micro_batch_size:
        return [np.arange(len(lengths))] if len(lengths) else []
    return length_buckets(lengths, micro_batch_size)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (``model.model``, ``.transformer``, ``.roberta``...)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise PostError(f"{type(model).__name__} has no separate backbone; it is not a supported LM.")
    return base


def text_config(model: nn.Module) -> object:
    """The config of the model's language part (a multimodal config's text config; else the config itself)."""
    config = model.config
    return getattr(config, "get_text_config", lambda: config)()


def _lm_head(model: nn.Module) -> nn.Module:
    """The LM head: a masked LM's whole MLM head (one of :data:`post.models.MASKED_HEADS`; a masked LM without one
    is refused at load), else the output embeddings."""
    for name in MASKED_HEADS:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        raise PostError(f"{type(model).__name__} has no LM head; load it as a causal or masked LM.")
    return out


def _fp32_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 rows: int = 8192) -> torch.Tensor:
    """``hidden @ weight.T + bias`` in float32 for a half-precision weight, ``rows`` output rows at a time (each
    block converted on its own: a Llama-3 head in float32 would be 2 GB)."""
    h = hidden.float()
    return torch.cat([nn.functional.linear(h, weight[i:i + rows].float(),
                                           None if bias is None else bias[i:i + rows].float())
                      for i in range(0, weight.shape[0], rows)], -1)


HALF = (torch.bfloat16, torch.float16)


def _rows(linear: nn.Linear, token_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer's weight and bias, only the rows ``token_ids`` if given."""
    weight, bias = linear.weight, linear.bias
    if token_ids is not None:
        weight, bias = weight[token_ids], None if bias is None else bias[token_ids]
    return weight, bias


_DECODER_HOOK_LOCK = threading.Lock()


@contextlib.contextmanager
def _half_decoder_in_fp32(model: nn.Module, head: nn.Module, token_ids: torch.Tensor | None) -> Iterator[bool]:
    """While open, a bf16/fp16 masked-LM head's decoder (its output embeddings, the last step of the head) returns
    its product in float32 (:func:`_fp32_linear`), only the rows ``token_ids`` if given; yields whether it does.
    Without it a bf16 RoBERTa rounds class scores to steps of 1/16 or coarser, and classes tie."""
    decoder = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not (isinstance(decoder, nn.Linear) and decoder is not head and decoder.weight.dtype in HALF
            and any(m is decoder for m in head.modules())):
        yield False
        return
    weight, bias = _rows(decoder, token_ids)
    # The hook sits on a shared module: two threads scoring at once (a service's workers) would each run the
    # other's hook too and get its rows, so the calls through it take turns.
    with _DECODER_HOOK_LOCK:
        handle = decoder.register_forward_hook(lambda _module, args, _output: _fp32_linear(args[0], weight, bias))
        try:
            yield True
        finally:
            handle.remove()


def head_logits(model: nn.Module, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """LM-head logits for hidden states (..., d): all V, or only ``token_ids`` (W,) if given.

    A linear head multiplies in float32 whatever the model's dtype: a bf16 product rounds class scores of ~10 to
    steps of 1/16, so two classes would often tie exactly (and a tie goes to class 0), and it rounds the small
    prompt-induced changes of vocabulary logits that the transfer's vocab loss matches. The few rows of
    ``token_ids`` are taken first; the whole vocabulary of a bf16/fp16 head goes a block of rows at a time
    (:func:`_fp32_linear`), so no float32 copy of the whole head is ever made. A masked LM's head (dense, norm,
    decoder) runs its transform in the model's dtype and, in bf16/fp16, its decoder the same way in float32
    (:func:`_half_decoder_in_fp32`)."""
    head = _lm_head(model)
    if isinstance(head, nn.Linear) and (token_ids is not None or head.weight.dtype in HALF):
        logits = _fp32_linear(hidden, *_rows(head, token_ids))
    else:
        with _half_decoder_in_fp32(model, head, token_ids) as restricted:
            logits = head(hidden)
        if token_ids is not None and not restricted:
            logits = logits[..., token_ids]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _per_example(prompt: torch.Tensor, k: int, width: int) -> torch.Tensor:
    """``prompt`` as (k, n, d): one (n, d) prompt expanded to every example, or per-example copies checked."""
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(k, -1, -1)
    if prompt.shape[0] != k or prompt.shape[-1] != width:
        raise PostError(f"prompt of shape {tuple(prompt.shape)} does not fit a batch of {k} inputs of width {width}.")
    return prompt


def _last_hidden(out: object) -> torch.Tensor:
    """The last hidden states of a backbone's output (a tuple or a model output)."""
    return out[0] if isinstance(out, tuple) else out.last_hidden_state  # type: ignore[attr-defined]


def prepend_prompt(model: nn.Module, batch: Batch, prompt: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Model inputs for ``batch``; with a prompt (n, d) or (B, n, d), embeddings with it in front."""
    if prompt is None:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    embeds = model.get_input_embeddings()(batch.input_ids)
    prompt = _per_example(prompt, len(batch), embeds.shape[-1])
    ones = torch.ones(len(batch), prompt.shape[1], dtype=batch.attention_mask.dtype, device=embeds.device)
    return {"inputs_embeds": torch.cat([prompt.to(embeds.dtype), embeds], dim=1),
            "attention_mask": torch.cat([ones, batch.attention_mask], dim=1)}


def packed_inputs(model: nn.Module, batch: PackedBatch, prompt: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Model inputs for a packed batch: ids and position ids, or with a prompt (n, d) or (k, n, d) embeddings
    with its vectors in each example's prompt slots. No attention mask: the position ids delimit the examples."""
    n = 0 if prompt is None else prompt.shape[-2]
    if batch.prompt_tokens is None:
        raise PostError("this batch was packed for prompts of different lengths; place their vectors in its "
                        "prompt slots (prompt_row, prompt_col) yourself.")
    if n != batch.prompt_tokens:
        raise PostError(f"this batch was packed for a {batch.prompt_tokens}-token prompt, got {n} tokens.")
    if prompt is None:
        return {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    embeds = model.get_input_embeddings()(batch.input_ids)
    vectors = _per_example(prompt, len(batch), embeds.shape[-1]).reshape(len(batch) * n, -1).to(embeds.dtype)
    return {"inputs_embeds": embeds.index_put((batch.prompt_row, batch.prompt_col), vectors),
            "position_ids": batch.position_ids}


def answer_hidden(model: nn.Module, batch: Batch | PackedBatch, prompt: torch.Tensor | None = None) -> torch.Tensor:
    """(B, d) last hidden state at each example's answer position (shifted past the prompt)."""
    batch = batch.to(model.device)
    packed = isinstance(batch, PackedBatch)
    inputs = packed_inputs(model, batch, prompt) if packed else prepend_prompt(model, batch, prompt)
    body = backbone(model)
    if _takes_use_cache(body):  # a KV cache costs 5-7x on CPU and is useless outside generation
        inputs["use_cache"] = False
    hidden = _last_hidden(body(**inputs))
    if packed:
        return hidden[batch.answer_row, batch.answer_col]
    shift = 0 if prompt is None else prompt.shape[-2]
    rows = torch.arange(len(batch), device=hidden.device)
    return hidden[rows, batch.answer_index + shift]


def examples_hidden(model: nn.Module, encoder: Encoder, seqs: Sequence[Sequence[int]], answers: Sequence[int],
                    idx: Sequence[int] | torch.Tensor | np.ndarray, prompt: torch.Tensor | None = None) -> torch.Tensor:
    """(b, d) answer-position hidden states of the encoded examples ``idx``, in that order, in one forward.

    ``prompt`` is (n, d) for all or (b, n, d), row j for ``idx[j]`` (per-example copies for DP). Packed
    (:func:`packs`) where the model scores packed examples exactly as alone, else one padded batch;
    either way example j's output depends only on its own tokens and prompt row, so per-example
    gradients stay per example.
    """
    idx = [int(i) for i in idx]
    if prompt is not None and prompt.dim() == 3 and prompt.shape[0] != len(idx):
        raise PostError(f"{prompt.shape[0]} prompt copies for {len(idx)} examples; give one per example.")
    if not idx:
        width = model.get_input_embeddings().weight.shape[-1]
        return torch.zeros(0, width, device=model.device, dtype=next(model.parameters()).dtype)
    if not packs(model, encoder):
        return answer_hidden(model, encoder.collate([seqs[i] for i in idx], [answers[i] for i in idx]), prompt)
    n = 0 if prompt is None else prompt.shape[-2]
    rows = tight_rows([len(seqs[i]) + n for i in idx])
    flat = torch.tensor([j for row in rows for j in row], dtype=torch.long)
    batch = encoder.collate_packed([[idx[j] for j in row] for row in rows], seqs, answers, n)
    if prompt is not None and prompt.dim() == 3:
        prompt = prompt[flat.to(prompt.device)]
    hidden = answer_hidden(model, batch, prompt)
    return hidden[torch.argsort(flat).to(hidden.device)]


def packs(model: nn.Module, encoder: Encoder) -> bool:
    """Whether ``model`` scores packed examples exactly as alone (checked once per model, attention and dtype).

    Causal LMs whose backbone takes position ids and builds its attention mask from them (transformers'
    packed-sequence masks: Llama, Gemma 3, GPT-2 here) do, with the eager or sdpa attention; flash
    attention separates packed examples only in a batch of one row, so it never packs here. The check
    (:func:`_packs_like_alone`) packs short random examples, with prompt vectors, in two rows with a
    padding tail, and requires every example's hidden states to match its own run alone and not to move
    when a row-mate's tokens change; a model that fails it runs padded batches.

    One example's NaN or inf reaches its row-mates (masked attention multiplies it by zero): a forward
    that overflows spoils its row, where a padded batch would spoil that example only.
    """
    return encoder.kind == "causal" and model_packs(model)


def model_packs(model: nn.Module) -> bool:
    """:func:`packs` for a causal LM, without an encoder (the service checks its target once, at start)."""
    if "position_ids" not in _forward_params(type(backbone(model))):
        return False
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    if attention not in _PACKED_ATTENTION:
        return False
    key = (attention, str(next(model.parameters()).dtype), str(model.device))
    seen = _PACKS.setdefault(model, {})
    if key not in seen:
        seen[key] = _packs_like_alone(model)
    return seen[key]


#: Attention implementations that apply transformers' packed-sequence mask to any number of rows.
_PACKED_ATTENTION = frozenset({"eager", "sdpa"})
_PACKS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str, str], bool]] = weakref.WeakKeyDictionary()


@torch.no_grad()
def _packs_like_alone(model: nn.Module) -> bool:
    """Examples of 5, 1, 3 and 4 tokens with 2-token prompts, packed in two rows of 12 (with padding tails), against
    each run alone; then example 2's tokens changed: its row-mates must not move."""
    body = backbone(model)
    embed = model.get_input_embeddings()
    vocab, dtype = int(embed.weight.shape[0]), embed.weight.dtype
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (m,), generator=g) for m in (5, 1, 3, 4)]
    prompt = embed(torch.randint(0, vocab, (2,), generator=g).to(model.device)).float()
    kw = {"use_cache": False} if _takes_use_cache(body) else {}

    def packed(parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rows (0, 1) and (2, 3) of 12: each example is [prompt; tokens], then a padding tail (2 and 1 tokens)."""
        rows, where = [], []
        for r, members in enumerate(((0, 1), (2, 3))):
            vecs, pos, at = [], [], 0
            for i in members:
                toks = embed(parts[i].to(model.device)).float()
                vecs += [prompt, toks]
                pos.append(torch.arange(2 + len(parts[i])))
                where.append((r, at, at + 2 + len(parts[i])))
                at += 2 + len(parts[i])
            vecs.append(torch.zeros(12 - at, prompt.shape[-1], device=model.device))
            pos.append(torch.zeros(12 - at, dtype=torch.long))
            rows.append((torch.cat(vecs), torch.cat(pos)))
        embeds = torch.stack([e for e, _ in rows]).to(dtype)
        position_ids = torch.stack([p for _, p in rows]).to(model.device)
        h = _last_hidden(body(inputs_embeds=embeds, position_ids=position_ids, **kw)).float()
        return [h[r, a:b] for r, a, b in where]

    def alone(parts: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for t in parts:
            e = torch.cat([prompt, embed(t.to(model.device)).float()]).unsqueeze(0).to(dtype)
            outs.append(_last_hidden(body(inputs_embeds=e, **kw)).float()[0])
        return outs

    was_training = model.training
    model.eval()
    try:
        got, want = packed(seqs), alone(seqs)
        changed = list(seqs)
        changed[2] = torch.randint(0, vocab, (3,), generator=g)
        moved = packed(changed)
    finally:
        model.train(was_training)
    scale = max(float(w.abs().max()) for w in want) + 1e-6
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * scale
    exact = all(float((a - b).abs().max()) <= tol for a, b in zip(got, want, strict=True))
    unmoved = all(float((moved[i] - got[i]).abs().max()) <= tol for i in (0, 1, 3))  # example 2's row-mates
    return exact and unmoved


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _takes_use_cache(body: nn.Module) -> bool:
    return "use_cache" in _forward_params(type(body))


def label_scores(model: nn.Module, hidden: torch.Tensor, verbalizer: Verbalizer) -> torch.Tensor:
    """(B, C) class scores of answer-position hidden states (B, d): the label-word rows of the head, averaged per
    class."""
    return verbalizer.class_scores(head_logits(model, hidden, verbalizer.token_ids.to(hidden.device)))


def class_scores(model: nn.Module, batch: Batch | PackedBatch, verbalizer: Verbalizer,
                 prompt: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) class scores: mean label-word logit per class at the answer position."""
    return label_scores(model, answer_hidden(model, batch, prompt), verbalizer)


def hidden_batches(model: nn.Module, encoder: Encoder, texts: Sequence[str], batch_size: int,
                   prompt: torch.Tensor | None = None, *, share_prefix: bool = True,
                   ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(indices, (b, d) answer-position hidden states) for ``texts``, a forward at a time (:func:`score_groups`:
    packed where the model packs, else length-sorted padded batches); ``prompt`` (n, d) is in front of each.

    Without gradients (and ``share_prefix``), on a model that :func:`shares_prefix`, the start every example
    has in common (the prompt, then the template's :func:`head_ids`) runs once (:func:`shared_start`), and
    each forward packs only the rest of each example, attending to that start through a KV cache
    (:func:`prefix_groups`, :func:`start_hidden`), where that saves enough tokens to pay for its own forward
    (:func:`start_pays`: not for one text, nor for a few with a short start)."""
    seqs, answers = encoder.encode(texts)
    n = 0 if prompt is None else prompt.shape[-2]
    head = head_ids(encoder)
    if (share_prefix and start_pays(len(seqs), n + len(head)) and not torch.is_grad_enabled()
            and (prompt is None or prompt.dim() == 2) and shares_prefix(model, encoder)):
        start = shared_start(model, head, prompt)
        skips = [start.covers(a) for a in answers]
        for idx in prefix_groups([len(s) for s in seqs], skips, batch_size):
            hidden = start_hidden(model, encoder.pad_id, [(seqs[i], answers[i], skips[i], start) for i in idx])
            yield idx, examples_hidden(model, encoder, seqs, answers, idx, prompt) if hidden is None else hidden
        return
    for idx in score_groups([len(s) for s in seqs], batch_size, n, packing=packs(model, encoder)):
        yield idx, examples_hidden(model, encoder, seqs, answers, idx, prompt)


#: The tokens a shared start must save before scoring runs it as a forward of its own (:func:`start_pays`). A
#: forward has a fixed cost (30 layers' kernel launches and Python) and an example run after a KV cache costs a
#: little more than run whole. Measured on smollm2-135m, 2 CPU threads, fp32, 48 MR texts in calls of k with the
#: demo's 13-token start (a 10-token prompt, BOS, "Review:"): whole ÷ shared time 0.65 at k = 1 (one text:
#: nothing saved, a forward more), 0.79 at k = 2, 0.91 at k = 4 (39 tokens saved), 1.05 at k = 8 (91), 1.21 at
#: k = 48; with the 3-token start of no prompt, 0.85 at k = 1 and level (0.92–1.17) from 2 to 48.
SHARE_MIN_SAVED = 64


def start_pays(n_examples: int, start: int) -> bool:
    """Whether scoring ``n_examples`` that share a ``start`` of that many positions should run it once: the
    positions it saves, (n_examples − 1) · start, reach :data:`SHARE_MIN_SAVED`. One text never shares (it
    would only add a forward); a 100-token prompt shares from two texts on, the demo's 13-token start from
    six, a 3-token template head alone from 23."""
    return n_examples > 1 and start > 0 and (n_examples - 1) * start >= SHARE_MIN_SAVED


def head_ids(encoder: Encoder) -> list[int]:
    """The token ids every example of a causal LM starts with: BOS and the template's text before ``{text}``
    (none for a masked LM, whose scoring never shares a start)."""
    return list(encoder.bos_ids) + list(encoder.pre_ids) if encoder.kind == "causal" else []


@dataclass
class SharedStart:
    """The start that examples share, run once: a prompt's n vectors followed by ``head`` token ids.

    ``kv``: per layer (keys, values), each (1, heads, n + head, head dim)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    head: int

    @property
    def length(self) -> int:
        return int(self.kv[0][0].shape[-2])

    def covers(self, answer: int) -> int:
        """How many of an example's own tokens this start stands for: its head, cut short so the example's
        answer (read at ``answer``) stays among the tokens it runs itself (an example that is nothing but the
        template's head reads its answer inside the head)."""
        return min(self.head, int(answer))


def prefix_groups(lengths: Sequence[int], skips: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """The examples scored together after their shared start: :func:`pack_rows` over what is left of each
    (``lengths`` are whole examples without the prompt, ``skips`` the tokens the start stands for)."""
    return pack_rows([int(n) - int(k) for n, k in zip(lengths, skips, strict=True)], batch_size)


def _cache_kwarg(body: nn.Module) -> str | None:
    params = _forward_params(type(body))
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def shared_start(model: nn.Module, ids: Sequence[int], prompt: torch.Tensor | None) -> SharedStart:
    """``prompt`` (n, d) followed by ``ids``, run once through the backbone: its KV cache."""
    body = backbone(model)
    embeds = model.get_input_embeddings()(torch.tensor([list(ids)], dtype=torch.long, device=model.device))
    if prompt is not None:
        embeds = torch.cat([prompt.to(device=embeds.device, dtype=embeds.dtype).unsqueeze(0), embeds], dim=1)
    cache = DynamicCache()
    body(inputs_embeds=embeds, use_cache=True, **{_cache_kwarg(body): cache})  # type: ignore[dict-item]
    return SharedStart([(layer.keys, layer.values) for layer in cache.layers], len(ids))


#: One example for :func:`start_hidden`: its whole token ids, answer index, how many of its first tokens its start
#: stands for, and that start.
StartExample = tuple[Sequence[int], int, int, SharedStart]


def start_hidden(model: nn.Module, pad_id: int, examples: Sequence[StartExample]) -> torch.Tensor | None:
    """(b, d) answer-position hidden states of ``examples`` (in that order), each run after its shared start.

    The rest of each example is packed end to end (:func:`tight_rows`), and each packed row gets the starts
    of its own examples (one, or one per prompt in a service's mixed batch) side by side in its KV cache, so
    the cache holds rows × the widest row's starts, not every start of the batch in every row. A 4-D mask
    lets every token attend to its own start's first n + k positions (k: the tokens of the example that start
    stands for) and causally to its own example, and its position ids continue from n + k, so each example's
    hidden states are those it gets run whole and alone. None where an example run whole would not fit the
    model's sliding window (the 4-D mask does not apply it): the caller runs those examples whole."""
    body = backbone(model)
    if not examples or not all(start.length for *_, start in examples):
        raise PostError("start_hidden needs examples and starts of at least one position.")
    window = getattr(text_config(model), "sliding_window", None)
    if window and max(start.length - start.head + len(ids) for ids, _, _, start in examples) > int(window):
        return None
    rest = [list(ids[k:]) for ids, _, k, _ in examples]
    rows = tight_rows([len(r) for r in rest])
    width = max(sum(len(rest[j]) for j in row) for row in rows)
    # Per row, its examples' distinct starts in first-seen order, each at a column offset.
    row_starts: list[dict[int, tuple[int, SharedStart]]] = []
    for row in rows:
        placed: dict[int, tuple[int, SharedStart]] = {}
        for j in row:
            start = examples[j][3]
            if id(start) not in placed:
                placed[id(start)] = (sum(s.length for _, s in placed.values()), start)
        row_starts.append(placed)
    p = max(sum(s.length for _, s in placed.values()) for placed in row_starts)
    r_count = len(rows)
    ids = torch.full((r_count, width), pad_id, dtype=torch.long)
    pos = torch.zeros((r_count, width), dtype=torch.long)
    block = torch.arange(width).repeat(r_count, 1) + len(examples)  # tail padding: each token a block of its own
    seen = torch.zeros((r_count, width, p), dtype=torch.bool)  # the start columns each token attends to
    seen[:, :, 0] = True  # tail padding attends to something: a row of -inf would make NaN
    a_row, a_col, order = [], [], []
    for r, row in enumerate(rows):
        at = 0
        for j in row:
            _, answer, k, start = examples[j]
            if not 0 <= k <= min(start.head, int(answer)):
                raise PostError(f"an example's start stands for {k} of its tokens; its start has a head of "
                                f"{start.head} and its answer is at {answer} (see SharedStart.covers).")
            offset, _ = row_starts[r][id(start)]
            used = start.length - start.head + k
            toks, end = rest[j], at + len(rest[j])
            ids[r, at:end] = torch.tensor(toks, dtype=torch.long)
            pos[r, at:end] = used + torch.arange(len(toks))
            block[r, at:end] = j
            seen[r, at:end, 0] = False
            seen[r, at:end, offset : offset + used] = True
            a_row.append(r)
            a_col.append(at + int(answer) - k)
            order.append(j)
            at = end
    col = torch.arange(width)
    own = (block[:, :, None] == block[:, None, :]) & (col[None, :, None] >= col[None, None, :])
    allowed = torch.cat([seen, own], dim=-1)
    first = examples[0][3].kv
    dtype = first[0][0].dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)

    def stacked(layer: int, kind: int) -> torch.Tensor:
        """(rows, heads, p, head dim): each row's starts side by side (``kind`` 0: keys, 1: values), padded with
        zeros to p columns that no token of the row attends to."""
        out = []
        for placed in row_starts:
            parts = [s.kv[layer][kind] for _, s in placed.values()]
            if room := p - sum(x.shape[-2] for x in parts):
                parts.append(parts[0].new_zeros(*parts[0].shape[:-2], room, parts[0].shape[-1]))
            out.append(torch.cat(parts, dim=-2))
        return torch.cat(out)

    cache = DynamicCache()
    for layer in range(len(first)):
        cache.update(stacked(layer, 0), stacked(layer, 1), layer)
    device = model.device
    out = body(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask[:, None].to(device),
               use_cache=True, **{_cache_kwarg(body): cache})  # type: ignore[dict-item]
    hidden = _last_hidden(out)[torch.tensor(a_row, device=device), torch.tensor(a_col, device=device)]
    return hidden[torch.argsort(torch.tensor(order)).to(device)]


def shares_prefix(model: nn.Module, encoder: Encoder | None = None) -> bool:
    """Whether scoring may run the examples' shared start once (:func:`hidden_batches`): a causal LM that packs
    (:func:`packs`; ``encoder`` None: :func:`model_packs`), whose backbone takes a KV cache and a 4-D attention
    mask, and whose hidden states that way match each example run whole and alone (checked once per model,
    attention and dtype, by running :func:`start_hidden` itself, with two starts side by side, against each
    example alone, and a row-mate changed)."""
    packing = model_packs(model) if encoder is None else packs(model, encoder)
    if not packing or _cache_kwarg(backbone(model)) is None:
        return False
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    key = (attention, str(next(model.parameters()).dtype), str(model.device))
    seen = _SHARES.setdefault(model, {})
    if key not in seen:
        seen[key] = _shares_like_alone(model)
    return seen[key]


_SHARES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str, str], bool]] = weakref.WeakKeyDictionary()


@torch.no_grad()
def _shares_like_alone(model: nn.Module) -> bool:
    """Two starts (a 2-vector prompt and a 1-token head; a 3-vector prompt and a 2-token head) and examples of
    1, 2, 3 and 6 more tokens after their heads and one that is part of a head only, through
    :func:`start_hidden` against each whole example run alone. They pack into two rows: one holds the first
    start only (its start columns padded to the other's), the other both starts, the second at an offset, and
    a padding tail. Then example 2's tokens are changed: its row-mates must not move."""
    body = backbone(model)
    embed = model.get_input_embeddings()
    vocab, dtype = int(embed.weight.shape[0]), embed.weight.dtype
    g = torch.Generator().manual_seed(0)
    rand = lambda m: torch.randint(0, vocab, (m,), generator=g).tolist()  # noqa: E731
    prompts = [embed(torch.randint(0, vocab, (m,), generator=g).to(model.device)).float() for m in (2, 3)]
    heads = [rand(1), rand(2)]
    owner = [0, 1, 0, 0, 1]
    seqs = [heads[o] + rand(m) for o, m in zip(owner, (1, 2, 3, 6, 2))]
    seqs[4] = heads[1][:1]  # nothing but part of its head: its answer is inside the head
    kw = {"use_cache": False} if _takes_use_cache(body) else {}
    was_training = model.training
    model.eval()
    try:
        starts = [shared_start(model, h, p) for h, p in zip(heads, prompts)]

        def run(seqs: list[list[int]]) -> torch.Tensor | None:
            ex = [(s, len(s) - 1, starts[o].covers(len(s) - 1), starts[o]) for s, o in zip(seqs, owner)]
            return start_hidden(model, 0, ex)

        got = run(seqs)
        want = torch.stack([_last_hidden(body(inputs_embeds=torch.cat(
            [prompts[o], embed(torch.tensor(s, device=model.device)).float()]).unsqueeze(0).to(dtype), **kw))[0, -1]
            for s, o in zip(seqs, owner)]).float()
        changed = [list(s) for s in seqs]
        changed[2] = heads[0] + rand(3)
        moved = run(changed)
        if got is None or moved is None:
            return False
    except Exception as e:  # noqa: BLE001 - any failure means: not this way
        log.warning("shared starts are off for this model: the check failed with %s: %s", type(e).__name__,
                    str(e)[:200])
        return False  # a backbone that does not take a cache or a 4-D mask this way
    finally:
        model.train(was_training)
    got, moved = got.float(), moved.float()
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * (float(want.abs().max()) + 1e-6)
    exact = float((got - want).abs().max()) <= tol
    unmoved = float((moved[[0, 1, 3, 4]] - got[[0, 1, 3, 4]]).abs().max()) <= tol
    return exact and unmoved


@torch.no_grad()
def predict_scores(model: nn.Module, encoder: Encoder, verbalizer: Verbalizer, texts: Sequence[str], *,
                   batch_size: int = 32, prompt: torch.Tensor | None = None, progress: bool | None = None,
                   desc: str = "scoring", share_prefix: bool = True) -> np.ndarray:
    """(N, C) class scores for ``texts`` in their original order, with one ``prompt`` (n, d) for all.

    Causal LMs that pack (:func:`packs`) score about ``batch_size`` texts' worth of tokens per forward,
    end to end with no padding between them (:func:`pack_rows`), the prompt and the template's shared start
    run once per call where the model allows it (:func:`shares_prefix`; ``share_prefix=False`` runs every
    example whole); others score length-sorted batches of ``batch_size``, each padded to its own longest
    (:func:`length_buckets`).
    """
    from tqdm.auto import tqdm

    out = np.zeros((len(texts), verbalizer.class_matrix.shape[1]), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(texts), desc=desc, unit="ex", disable=True if progress is False else None,
                  leave=False) as bar:
            for idx, hidden in hidden_batches(model, encoder, texts, batch_size, prompt, share_prefix=share_prefix):
                out[idx] = label_scores(model, hidden, verbalizer).float().cpu().numpy()
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return out


def classification_metrics(scores: np.ndarray, labels: Sequence[int], class_names: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class accuracy (recall) and the confusion matrix (rows: true)."""
    labels_arr = np.asarray(labels, dtype=int)
    if scores.shape[0] != labels_arr.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows for {labels_arr.shape[0]} labels")
    c = len(class_names)
    pred = scores.argmax(axis=1) if len(labels_arr) else np.zeros(0, dtype=int)
    confusion = np.zeros((c, c), dtype=int)
    np.add.at(confusion, (labels_arr, pred), 1)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    tp = np.diag(confusion)
    recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(c), where=(precision + recall) > 0)
    present = support > 0
    return {
        "n": int(len(labels_arr)),
        "accuracy": float(tp.sum() / max(len(labels_arr), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_accuracy": {name: float(recall[i]) for i, name in enumerate(class_names)},
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
    }
