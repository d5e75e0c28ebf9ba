"""Serving many soft prompts on one target: mixed-prompt batches and a dynamic batcher.

Shapes: B texts in one forward, each text i with its own prompt p_i (n_i, d) and its own token ids
s_i (L_i,); padded, B rows of W = max_i (n_i + L_i); packed, fewer rows of up to 2·W (attention over a
row costs up to twice a padded row's; the tokens run are never more).

One forward serves texts of different prompts (and different tasks). On a causal LM that scores
packed examples exactly (:func:`post.scoring.packs`), the texts are laid end to end in rows, each as
``[p_i, embed(s_i)]`` with position ids restarting at 0 (the layout of :class:`post.scoring.PackedBatch`,
with each text's own prompt length n_i), so no forward runs padding between texts of different
lengths. Texts sharing a row share a forward: a non-finite value in one (an overflow) would reach its
row-mates, so a packed forward with any non-finite answer state is run again padded, each text alone in its
row. Otherwise (masked LMs, models failing the check) row i is ``[p_i, embed(s_i), pad...]``
(right padding), its attention mask 1 on the first n_i + L_i positions. Either way the answer is
read n_i + a_i into the text's span, a_i being the answer index :class:`post.scoring.Encoder` gives
without a prompt, so each text's class scores equal one-at-a-time scoring up to floating-point noise
(``tests/test_service_engine.py`` checks 1e-5). The hidden state at each answer position goes
through the LM head's label-word rows of that text's task (texts are grouped by verbalizer).

Where the model also passes :func:`post.scoring.shares_prefix`, each prompt's start (its n_i vectors, BOS and
its template's text before ``{text}``) is run once, when the prompt is loaded, and kept with it as a KV cache
(:class:`post.scoring.SharedStart`, about 2 · layers · kv width · (n_i + head) values: 0.5 MB for a 10-token
prompt on smollm2-135m in fp32). A forward then packs only the rest of each text, and each text attends to its
own prompt's start (:func:`post.scoring.start_hidden`), so a text no longer pays for its prompt's n_i positions,
whether it arrives alone or in a batch. A forward with a non-finite answer state is run again padded, as above.

:class:`Batcher` turns concurrent requests into such forwards: the first waiting request opens a
batch, which then takes more requests for at most ``max_wait`` seconds or until ``max_batch`` rows;
the queue holds at most ``max_queue`` requests (a full queue is answered 429 with Retry-After).
The target's weights are loaded once; prompts are cached by id (:class:`PromptCache`).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from post.models import LoadedModel
from post.scoring import (
    Encoder,
    SharedStart,
    _last_hidden,
    _takes_use_cache,
    backbone,
    head_ids,
    label_scores,
    model_packs,
    shared_start,
    shares_prefix,
    start_hidden,
    text_config,
    tight_rows,
)
from post.service.errors import ApiError
from post.service.store import ModelIdentity, read_checked
from post.tasks import Task, Verbalizer

log = logging.getLogger(__name__)


@dataclass
class ServedPrompt:
    """A transferred prompt ready to serve: tensor (n, d) on the model's device and dtype, its task's pieces, and
    (where the scorer shares starts) its start run once."""

    id: str
    tensor: torch.Tensor
    task: Task
    encoder: Encoder
    verbalizer: Verbalizer
    start: SharedStart | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.task.class_names)


@dataclass
class Row:
    """One text to score: its prompt, its token ids (without the prompt) and answer index."""

    prompt: ServedPrompt
    ids: list[int]
    answer: int


class MixedScorer:
    """Class scores of rows with different prompts and tasks in one forward of the target."""

    def __init__(self, loaded: LoadedModel, max_length: int, *, pack: bool = True, share: bool = True) -> None:
        """``pack``: lay texts end to end where the model scores packed examples exactly (:func:`post.scoring.packs`);
        False pads every forward (the layout before packing; benchmarks compare the two). ``share``: run each
        prompt's start once, when it is loaded, where the model allows it (:func:`post.scoring.shares_prefix`);
        False runs every text whole."""
        self.loaded, self.max_length, self.pack = loaded, max_length, pack
        self.model = loaded.model.eval()
        # The packing and sharing checks run here, once, rather than inside the first request.
        self.sharing = share and self.packing() and shares_prefix(self.model)
        log.info("mixed-prompt batches: %s", ("packed end to end, each prompt's start run once" if self.sharing
                                              else "packed end to end" if self.packing() else "padded rows"))
        self.dtype = next(self.model.parameters()).dtype
        tok = loaded.tokenizer
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))
        self._pieces: dict[str, tuple[Encoder, Verbalizer]] = {}
        self._lock = threading.Lock()

    def packing(self) -> bool:
        """Whether forwards lay texts end to end (``pack`` and the model scores packed examples exactly)."""
        return self.pack and self.loaded.kind == "causal" and model_packs(self.model)

    def positions(self) -> int | None:
        """How many positions the served model reads (its position table), where its config says."""
        config: Any = text_config(self.model)
        for key in ("n_positions", "max_position_embeddings"):
            if isinstance(n := getattr(config, key, None), int):
                # RoBERTa-style position ids start after the padding index
                return n - (int(config.pad_token_id) + 1 if getattr(config, "model_type", "") in (
                    "roberta", "xlm-roberta") and config.pad_token_id is not None else 0)
        return None

    def prepare(self, id: str, tensor: torch.Tensor, task: Task) -> ServedPrompt:
        """A :class:`ServedPrompt`; encoders and verbalizers are shared by prompts of one task. A prompt that is not
        finite in the model's dtype (a value beyond float16's range, say) is refused: it would spoil its forwards."""
        key = json.dumps(task.to_dict(), sort_keys=True)
        with self._lock:
            if key not in self._pieces:
                self._pieces[key] = (Encoder(task, self.loaded.tokenizer, self.loaded.kind, self.max_length),
                                     Verbalizer.build(task, self.loaded.tokenizer))
            encoder, verbalizer = self._pieces[key]
        served = tensor.to(self.model.device, self.dtype)
        if not bool(torch.isfinite(served).all()):
            raise ApiError("bad_prompt_file", f"prompt {id} is not finite in the served model's {self.dtype}; "
                           "its values overflow that type.")
        reads = self.positions()
        if reads is not None and served.shape[0] + self.max_length > reads:
            raise ApiError("bad_prompt_file", f"prompt {id} has {served.shape[0]} vectors; with texts of up to "
                           f"{self.max_length} tokens the served model would read more than the {reads} positions "
                           "it has. Use a shorter prompt.")
        start = None
        if self.sharing:
            try:
                with torch.no_grad():
                    start = shared_start(self.model, head_ids(encoder), served)
            except torch.cuda.OutOfMemoryError:
                raise  # the server's condition, not the prompt's
            except (IndexError, RuntimeError, ValueError) as e:
                raise ApiError("bad_prompt_file", f"prompt {id} ({served.shape[0]} vectors) could not be run on the "
                               f"served model: {type(e).__name__}: {str(e)[:200]}") from None
        return ServedPrompt(id, served, task, encoder, verbalizer, start)

    def rows(self, prompt: ServedPrompt, texts: Sequence[str]) -> list[Row]:
        seqs, answers = prompt.encoder.encode(texts)
        return [Row(prompt, s, a) for s, a in zip(seqs, answers)]

    def inputs(self, rows: Sequence[Row]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Model inputs (inputs_embeds (B, W, d), attention_mask (B, W)) and answer positions (B,)."""
        device = self.model.device
        lengths = [r.prompt.tensor.shape[0] + len(r.ids) for r in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        answers = torch.empty(len(rows), dtype=torch.long)
        for i, r in enumerate(rows):
            n = r.prompt.tensor.shape[0]
            ids[i, n : n + len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
            mask[i, : lengths[i]] = 1
            answers[i] = n + r.answer
        embeds = self.model.get_input_embeddings()(ids.to(device))
        for i, r in enumerate(rows):
            embeds[i, : r.prompt.tensor.shape[0]] = r.prompt.tensor.to(embeds.dtype)
        return {"inputs_embeds": embeds, "attention_mask": mask.to(device)}, answers.to(device)

    def packed_inputs(self, rows: Sequence[Row]) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Packed model inputs (inputs_embeds (R, W, d), position_ids (R, W)) for the rows' texts laid end to end
        (:func:`post.scoring.tight_rows`), and where each text's answer is read: (row, column), (B,) each, in the
        order of ``rows``."""
        device = self.model.device
        slots = [r.prompt.tensor.shape[0] for r in rows]
        layout = tight_rows([n + len(r.ids) for n, r in zip(slots, rows)])
        batch = rows[0].prompt.encoder.collate_packed(layout, [r.ids for r in rows], [r.answer for r in rows],
                                                      slots).to(device)
        embeds = self.model.get_input_embeddings()(batch.input_ids)
        flat = [i for row in layout for i in row]  # the batch's example order
        vectors = torch.cat([rows[i].prompt.tensor for i in flat]).to(embeds.dtype)
        embeds = embeds.index_put((batch.prompt_row, batch.prompt_col), vectors)
        back = torch.argsort(torch.tensor(flat)).to(device)
        return ({"inputs_embeds": embeds, "position_ids": batch.position_ids},
                (batch.answer_row[back], batch.answer_col[back]))

    def _answer_states(self, rows: Sequence[Row], packed: bool) -> torch.Tensor:
        """(B, d) last hidden states at the rows' answers, in the order of ``rows``, in one forward."""
        body = backbone(self.model)
        if packed:
            inputs, (a_row, a_col) = self.packed_inputs(rows)
        else:
            inputs, a_col = self.inputs(rows)
            a_row = torch.arange(len(rows), device=a_col.device)
        if _takes_use_cache(body):
            inputs["use_cache"] = False
        return _last_hidden(body(**inputs))[a_row, a_col]

    def _shared_states(self, rows: Sequence[Row]) -> torch.Tensor | None:
        """(B, d) answer states with each prompt's start run once (:func:`post.scoring.start_hidden`), in the order
        of ``rows``; None where a row has no start or a text would reach past the model's sliding window (then the
        batch runs whole)."""
        if not all(r.prompt.start is not None for r in rows):
            return None
        return start_hidden(self.model, self.pad_id, [(r.ids, r.answer, r.prompt.start.covers(r.answer),  # type: ignore[union-attr]
                                                       r.prompt.start) for r in rows])

    @torch.no_grad()
    def scores(self, rows: Sequence[Row]) -> list[np.ndarray]:
        """Per row, its (C_i,) class scores in its task's class order (one forward: it succeeds or raises for all;
        a scorer that answers per row may put an exception in a failed row's place instead)."""
        if not rows:
            return []
        packed = self.packing()
        at = self._shared_states(rows) if self.sharing else None
        if at is None:
            at = self._answer_states(rows, packed)
        if packed and not bool(torch.isfinite(at).all()):  # one text's overflow reaches its row-mates: isolate it
            at = self._answer_states(rows, packed=False)
        result: list[np.ndarray | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(id(r.prompt.verbalizer), []).append(i)
        for idx in groups.values():
            verb = rows[idx[0]].prompt.verbalizer
            sel = torch.tensor(idx, device=at.device)
            s = label_scores(self.model, at[sel], verb).float().cpu().numpy()
            for j, i in enumerate(idx):
                result[i] = s[j]
        return result  # type: ignore[return-value]


class PromptCache:
    """Transferred prompts by id (LRU), read from their files once and checked against the target."""

    def __init__(self, scorer: MixedScorer, target: ModelIdentity, capacity: int) -> None:
        self.scorer, self.target, self.capacity = scorer, target, capacity
        self._items: OrderedDict[str, ServedPrompt] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, id: str, path: Path) -> ServedPrompt:
        with self._lock:
            if id in self._items:
                self._items.move_to_end(id)
                return self._items[id]
        pf = read_checked(path, f"stored prompt {id}")
        if (why := self.target.mismatch(pf.meta)) is not None:
            raise ApiError("wrong_prompt_kind", f"prompt {id} is not for the served model {self.target.name} "
                           f"({why}).")
        served = self.scorer.prepare(id, pf.tensor, pf.task)
        with self._lock:
            self._items[id] = served
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return served


@dataclass
class _Request:
    rows: list[Row]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class BatchStats:
    forwards: int = 0
    rows: int = 0
    seconds: float = 0.0


class Batcher:
    """A thread that forms mixed-prompt batches from a bounded queue of requests."""

    def __init__(self, scorer: MixedScorer, *, max_batch: int, max_wait: float, max_queue: int) -> None:
        self.scorer, self.max_batch, self.max_wait = scorer, max_batch, max_wait
        self.queue: queue.Queue[_Request] = queue.Queue(max_queue)
        self.stats = BatchStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="post-batcher", daemon=True)
        self._thread.start()

    def submit(self, rows: list[Row]) -> concurrent.futures.Future:
        """Queue rows; the future gives their class scores. A full queue raises ``queue_full`` (429)."""
        req = _Request(rows)
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise ApiError("queue_full", "the model's queue is full; retry after a moment.",
                           retry_after=self.retry_after()) from None
        return req.future

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained: queued requests × mean seconds per request."""
        per_row = self.stats.seconds / self.stats.rows if self.stats.rows else 0.05
        return max(1.0, round(self.queue.qsize() * per_row, 1))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch, n = [first], len(first.rows)
            deadline = time.monotonic() + self.max_wait
            while n < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    req = self.queue.get(timeout=left)
                except queue.Empty:
                    break
                batch.append(req)
                n += len(req.rows)
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        flat = [(b, j) for b, req in enumerate(batch) for j in range(len(req.rows))]
        flat.sort(key=lambda bj: -(len(batch[bj[0]].rows[bj[1]].ids) + batch[bj[0]].rows[bj[1]].prompt.tensor.shape[0]))
        results: list[list[np.ndarray | BaseException | None]] = [[None] * len(req.rows) for req in batch]
        failed: dict[int, BaseException] = {}
        try:
            for start in range(0, len(flat), self.max_batch):
                chunk = flat[start : start + self.max_batch]
                t0 = time.perf_counter()
                out = self.scorer.scores([batch[b].rows[j] for b, j in chunk])
                self.stats.seconds += time.perf_counter() - t0
                self.stats.forwards += 1
                self.stats.rows += len(chunk)
                for (b, j), s in zip(chunk, out):
                    if isinstance(s, BaseException):  # one row failed alone (a remote backend answers per row):
                        failed.setdefault(b, s)       # only the request it belongs to fails
                    results[b][j] = s
        except Exception as e:  # noqa: BLE001 - every waiting request must get an answer
            log.exception("a batched forward failed")
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(e)
            return
        for b, (req, res) in enumerate(zip(batch, results)):
            if b in failed:
                req.future.set_exception(failed[b])
            else:
                req.future.set_result(res)
