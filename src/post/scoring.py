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
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from post.errors import PostError
from post.tasks import Task, Verbalizer


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


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices of batches of similar length: longest first, each padded to its own longest (ties keep input order).

    Writing each batch's results to ``out[idx]`` restores the input order. Sorting first pads every
    batch to a width close to its members' lengths instead of the longest of a random group.
    """
    if batch_size < 1:
        raise PostError(f"batch size must be at least 1, got {batch_size}.")
    order = np.argsort([-int(n) for n in lengths], kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


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


def _lm_head(model: nn.Module) -> nn.Module:
    for name in ("lm_head", "cls"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        raise PostError(f"{type(model).__name__} has no LM head; load it as a causal or masked LM.")
    return out


def head_logits(model: nn.Module, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """LM-head logits for hidden states (..., d): all V, or only ``token_ids`` (W,) if given."""
    head = _lm_head(model)
    if isinstance(head, nn.Linear) and token_ids is not None:
        weight = head.weight[token_ids]
        bias = head.bias[token_ids] if head.bias is not None else None
        logits = nn.functional.linear(hidden, weight, bias)
    else:
        logits = head(hidden)
        if token_ids is not None:
            logits = logits[..., token_ids]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def prepend_prompt(model: nn.Module, batch: Batch, prompt: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Model inputs for ``batch``; with a prompt (n, d) or (B, n, d), embeddings with it in front."""
    if prompt is None:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    embeds = model.get_input_embeddings()(batch.input_ids)
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(len(batch), -1, -1)
    if prompt.shape[0] != len(batch) or prompt.shape[-1] != embeds.shape[-1]:
        raise PostError(f"prompt of shape {tuple(prompt.shape)} does not fit a batch of {len(batch)} "
                        f"inputs of width {embeds.shape[-1]}.")
    ones = torch.ones(len(batch), prompt.shape[1], dtype=batch.attention_mask.dtype, device=embeds.device)
    return {"inputs_embeds": torch.cat([prompt.to(embeds.dtype), embeds], dim=1),
            "attention_mask": torch.cat([ones, batch.attention_mask], dim=1)}


def answer_hidden(model: nn.Module, batch: Batch, prompt: torch.Tensor | None = None) -> torch.Tensor:
    """(B, d) last hidden state at each example's answer position (shifted past the prompt)."""
    batch = batch.to(model.device)
    inputs = prepend_prompt(model, batch, prompt)
    body = backbone(model)
    if _takes_use_cache(body):  # a KV cache costs 5-7x on CPU and is useless outside generation
        inputs["use_cache"] = False
    out = body(**inputs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    shift = 0 if prompt is None else prompt.shape[-2]
    rows = torch.arange(len(batch), device=hidden.device)
    return hidden[rows, batch.answer_index + shift]


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _takes_use_cache(body: nn.Module) -> bool:
    return "use_cache" in _forward_params(type(body))


def class_scores(model: nn.Module, batch: Batch, verbalizer: Verbalizer,
                 prompt: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) class scores: mean label-word logit per class at the answer position."""
    hidden = answer_hidden(model, batch, prompt)
    return verbalizer.class_scores(head_logits(model, hidden, verbalizer.token_ids))


@torch.no_grad()
def predict_scores(model: nn.Module, encoder: Encoder, verbalizer: Verbalizer, texts: Sequence[str], *,
                   batch_size: int = 32, prompt: torch.Tensor | None = None, progress: bool | None = None,
                   desc: str = "scoring") -> np.ndarray:
    """(N, C) class scores for ``texts`` in their original order."""
    from tqdm.auto import tqdm

    out = np.zeros((len(texts), verbalizer.class_matrix.shape[1]), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(texts), desc=desc, unit="ex", disable=True if progress is False else None,
                  leave=False) as bar:
            for idx, batch in encoder.batches(texts, batch_size):
                out[idx] = class_scores(model, batch, verbalizer, prompt).float().numpy()
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
