"""Mixed-prompt batching: one forward for rows of different prompts and tasks equals one-at-a-time scoring."""

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from post.errors import PostError
from post.models import load_model
from post.prompt import init_prompt
from post.scoring import Encoder, head_ids, packed_inputs, packs, predict_scores, shared_start
from post.service.engine import Batcher, MixedScorer, PromptCache
from post.service.errors import ApiError
from post.service.store import ModelIdentity
from post.tasks import Verbalizer
from test_service_support import SENTIMENT, TOPICS, write_prompt

TEXTS = ["good", "a truly awful and very long delay at the gate", "great", "ok", "the crew was friendly and kind",
         "bad bad bad"]


def _reference(loaded, prompt, task, texts):
    enc = Encoder(task, loaded.tokenizer, loaded.kind, 64)
    return predict_scores(loaded.model, enc, Verbalizer.build(task, loaded.tokenizer), texts, batch_size=1,
                          prompt=prompt, progress=False, share_prefix=False)  # each text run whole


HEADED = dataclasses.replace(SENTIMENT, template="Review: {text}\nSentiment:{mask}")  # a start before {text}


@pytest.mark.parametrize(("pack", "share"), [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama", "tiny-roberta"])
def test_mixed_batch_matches_one_at_a_time(model, pack, share):
    loaded = load_model(model)
    scorer = MixedScorer(loaded, max_length=64, pack=pack, share=share)  # the masked LM pads either way
    assert scorer.sharing == (share and model != "tiny-roberta")
    # Four prompts of different lengths, three tasks (2 and 3 classes, different templates, one with text before
    # {text}: a start of 4 vectors and the template's head).
    specs = [(SENTIMENT, 3, 0), (TOPICS, 7, 1), (SENTIMENT, 5, 2), (HEADED, 4, 3)]
    prompts = [scorer.prepare(f"p{i}", init_prompt(loaded, n, init="random", seed=seed), task)
               for i, (task, n, seed) in enumerate(specs)]
    assert all((p.start is not None) == scorer.sharing for p in prompts)
    rows, expected = [], []
    for i, text in enumerate(TEXTS * 2 + [""]):  # interleaved: neighbouring rows have other prompts
        p = prompts[i % 4]
        rows += scorer.rows(p, [text])
        expected.append(_reference(loaded, p.tensor, p.task, [text])[0])
    got = scorer.scores(rows)
    assert [len(g) for g in got] == [len(e) for e in expected] and {len(g) for g in got} == {2, 3}
    np.testing.assert_allclose(np.stack([np.pad(g, (0, 3 - len(g))) for g in got]),
                               np.stack([np.pad(e, (0, 3 - len(e))) for e in expected]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_mixed_batch_of_a_causal_lm_runs_packed(model):
    """Texts of prompts of 3, 7 and 5 tokens share rows: fewer tokens than padded rows, each text's prompt
    vectors in front of its own tokens, its answer read n_i + a_i into its own span."""
    loaded = load_model(model)
    scorer = MixedScorer(loaded, max_length=64)
    prompts = [scorer.prepare(f"p{i}", init_prompt(loaded, n, init="random", seed=i), task)
               for i, (task, n) in enumerate([(SENTIMENT, 3), (TOPICS, 7), (SENTIMENT, 5)])]
    rows = [r for i, text in enumerate(TEXTS * 2) for r in scorer.rows(prompts[i % 3], [text])]
    assert packs(loaded.model, rows[0].prompt.encoder)
    inputs, (a_row, a_col) = scorer.packed_inputs(rows)
    padded, _ = scorer.inputs(rows)
    embeds, pos = inputs["inputs_embeds"], inputs["position_ids"]
    assert embeds.shape[0] < len(rows) and embeds.shape[:2].numel() < padded["inputs_embeds"].shape[:2].numel()
    assert pos[a_row, a_col].tolist() == [r.prompt.tensor.shape[0] + r.answer for r in rows]
    for i, r in enumerate(rows):
        n, start = r.prompt.tensor.shape[0], int(a_col[i]) - r.answer - r.prompt.tensor.shape[0]
        torch.testing.assert_close(embeds[a_row[i], start : start + n], r.prompt.tensor)
        assert pos[a_row[i], start : start + n + len(r.ids)].tolist() == list(range(n + len(r.ids)))


def test_one_texts_overflow_does_not_reach_the_texts_packed_beside_it():
    """A prompt that overflows in the forward (inf here) spoils its row-mates in a packed forward; the scorer then
    runs the batch padded, so only that text's scores are lost and the others equal one-at-a-time scoring."""
    loaded = load_model("tiny-gpt2")
    scorer = MixedScorer(loaded, max_length=64)
    good = scorer.prepare("good", init_prompt(loaded, 3, init="random", seed=0), SENTIMENT)
    broken = good.tensor.clone()
    broken[0, 0] = float("inf")
    with torch.no_grad():  # past prepare()'s check, as an fp16 overflow would be; its start run from it
        bad = dataclasses.replace(good, id="bad", tensor=broken,
                                  start=shared_start(loaded.model, head_ids(good.encoder), broken))
    rows = scorer.rows(bad, ["a"]) + scorer.rows(good, ["good", "great", "bad bad bad"])
    assert scorer.packing() and scorer.sharing and len(scorer.packed_inputs(rows)[0]["position_ids"]) < len(rows)
    with torch.no_grad():
        spread = scorer._answer_states(rows, packed=True)
        spread_shared = scorer._shared_states(rows)
    # without the fallback a clean text would come back NaN, packed whole or after the starts (masked NaN keys)
    assert not torch.isfinite(spread[1:]).all() and not torch.isfinite(spread_shared[1:]).all()
    got = scorer.scores(rows)
    assert not np.isfinite(got[0]).all()
    np.testing.assert_allclose(np.stack(got[1:]), _reference(loaded, good.tensor, SENTIMENT,
                                                             ["good", "great", "bad bad bad"]), atol=1e-5, rtol=0)


def test_a_prompt_that_overflows_the_served_dtype_is_refused():
    loaded = load_model("tiny-gpt2")
    loaded.model.to(torch.bfloat16)
    scorer = MixedScorer(loaded, max_length=64, pack=False)
    width = loaded.model.config.hidden_size
    with pytest.raises(ApiError, match="not finite") as err:
        scorer.prepare("p", torch.full((2, width), 3.4e38), SENTIMENT)  # finite in float32, inf in bfloat16
    assert err.value.code == "bad_prompt_file"
    assert scorer.prepare("q", torch.ones(2, width), SENTIMENT).tensor.dtype == torch.bfloat16
    assert scorer.scores([]) == []


@pytest.mark.parametrize("share", [True, False])
def test_a_prompt_longer_than_the_model_reads_is_refused_with_an_api_error(share):
    """GPT-2 reads at most n_positions positions: a prompt that leaves less room than the longest text
    (max_length tokens) is refused when it is loaded, before any forward, with sharing on or off; one that
    leaves exactly that room is served."""
    loaded = load_model("tiny-gpt2")
    scorer = MixedScorer(loaded, max_length=64, share=share)
    assert scorer.sharing == share and scorer.positions() == loaded.model.config.n_positions
    fits = loaded.model.config.n_positions - 64
    for n in (fits + 1, loaded.model.config.n_positions + 1):
        with pytest.raises(ApiError, match=f"has {n} vectors") as err:
            scorer.prepare("p", init_prompt(loaded, n, init="random", seed=0), SENTIMENT)
        assert err.value.code == "bad_prompt_file"
    served = scorer.prepare("q", init_prompt(loaded, fits, init="random", seed=0), SENTIMENT)
    long_text = " ".join(["awful"] * 200)  # truncated to max_length tokens
    assert np.isfinite(scorer.scores(scorer.rows(served, [long_text]))[0]).all()


def test_a_masked_lms_positions_leave_out_the_padding_offset():
    loaded = load_model("tiny-roberta")
    config = loaded.model.config
    assert MixedScorer(loaded, max_length=64).positions() == config.max_position_embeddings - config.pad_token_id - 1


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_each_packed_row_holds_only_its_own_texts_starts(model, monkeypatch):
    """Eight prompts of 6-9 vectors, one short text each, packed into a few rows: each row's KV cache holds the
    starts of its own texts, padded to the widest row's, not all eight in every row (which would cost rows × all
    starts of memory). Rows with fewer starts than the widest are padded; the scores stay those of each text
    scored whole and alone."""
    import post.scoring as scoring

    loaded = load_model(model)
    scorer = MixedScorer(loaded, max_length=64)
    prompts = [scorer.prepare(f"p{i}", init_prompt(loaded, 6 + i % 4, init="random", seed=i), SENTIMENT)
               for i in range(8)]
    texts = ["good", "a truly awful and very long delay at the gate and then more", "ok", "bad", "great", "fine",
             "the crew was friendly", "meh"]
    rows = [r for p, t in zip(prompts, texts) for r in scorer.rows(p, [t])]
    widths = []

    class Recording(scoring.DynamicCache):
        def update(self, keys, values, layer, *args, **kw):
            if layer == 0 and not widths:
                widths.append(tuple(keys.shape))
            return super().update(keys, values, layer, *args, **kw)

    monkeypatch.setattr(scoring, "DynamicCache", Recording)
    got = scorer.scores(rows)
    (r_count, _, columns, _), = widths
    every = sum(p.start.length for p in prompts)
    assert 1 < r_count < len(rows) and columns < every
    assert columns >= max(p.start.length for p in prompts)
    want = [_reference(loaded, p.tensor, p.task, [t])[0] for p, t in zip(prompts, texts)]
    np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-5, rtol=0)


def test_a_batch_packed_for_prompts_of_different_lengths_needs_its_vectors_placed():
    loaded = load_model("tiny-gpt2")
    enc = Encoder(SENTIMENT, loaded.tokenizer, loaded.kind, 64)
    seqs, answers = enc.encode(["good", "bad"])
    batch = enc.collate_packed([[0, 1]], seqs, answers, [2, 3])
    assert batch.prompt_tokens is None and batch.prompt_row.tolist() == [0] * 5
    assert batch.prompt_col.tolist() == [0, 1, 2 + len(seqs[0]), 3 + len(seqs[0]), 4 + len(seqs[0])]
    with pytest.raises(PostError, match="different lengths"):
        packed_inputs(loaded.model, batch, torch.zeros(2, loaded.model.config.hidden_size))


def test_a_wrong_prefix_would_be_caught():
    """The check above has teeth: scoring a row under another prompt changes its scores far beyond 1e-5."""
    loaded = load_model("tiny-gpt2")
    scorer = MixedScorer(loaded, max_length=64)
    a = scorer.prepare("a", init_prompt(loaded, 4, init="random", seed=0), SENTIMENT)
    b = scorer.prepare("b", init_prompt(loaded, 4, init="random", seed=1), SENTIMENT)
    sa, sb = scorer.scores(scorer.rows(a, ["good"]) + scorer.rows(b, ["good"]))
    assert np.abs(sa - sb).max() > 1e-3


def test_batcher_merges_concurrent_requests_and_keeps_each_answer():
    loaded = load_model("tiny-gpt2")
    scorer = MixedScorer(loaded, max_length=64)
    prompts = [scorer.prepare(f"p{i}", init_prompt(loaded, 2 + i, init="random", seed=i), SENTIMENT)
               for i in range(4)]
    expected = {i: scorer.scores(scorer.rows(prompts[i], [TEXTS[i]]))[0] for i in range(4)}
    # The batch closes when its fourth row arrives; the long wait only keeps a slow submitter in it.
    batcher = Batcher(scorer, max_batch=4, max_wait=5.0, max_queue=16)
    try:
        futures = {i: batcher.submit(scorer.rows(prompts[i], [TEXTS[i]])) for i in range(4)}
        got = {i: f.result(timeout=30)[0] for i, f in futures.items()}
    finally:
        batcher.close()
    for i in range(4):
        np.testing.assert_allclose(got[i], expected[i], atol=1e-5)
    assert batcher.stats.rows == 4 and batcher.stats.forwards == 1  # one mixed forward for four prompts


def test_batcher_splits_at_max_batch():
    loaded = load_model("tiny-gpt2")
    scorer = MixedScorer(loaded, max_length=64)
    p = scorer.prepare("p", init_prompt(loaded, 2, init="random", seed=0), SENTIMENT)
    batcher = Batcher(scorer, max_batch=4, max_wait=0.0, max_queue=4)
    try:
        out = batcher.submit(scorer.rows(p, TEXTS + TEXTS[:4])).result(timeout=30)
    finally:
        batcher.close()
    assert len(out) == 10 and batcher.stats.forwards == 3


def test_full_queue_answers_queue_full_with_retry_after():
    loaded = load_model("tiny-gpt2")
    scorer = MixedScorer(loaded, max_length=64)
    p = scorer.prepare("p", init_prompt(loaded, 2, init="random", seed=0), SENTIMENT)
    gate = threading.Event()
    real = scorer.scores
    scorer.scores = lambda rows: (gate.wait(30), real(rows))[1]  # the model is busy until the gate opens
    batcher = Batcher(scorer, max_batch=1, max_wait=0.0, max_queue=2)
    try:
        first = batcher.submit(scorer.rows(p, ["a"]))
        deadline = time.monotonic() + 10
        while batcher.queue.qsize() and time.monotonic() < deadline:  # the loop has taken the first request
            time.sleep(0.01)
        queued = [batcher.submit(scorer.rows(p, ["b"])) for _ in range(2)]
        with pytest.raises(ApiError) as err:
            batcher.submit(scorer.rows(p, ["c"]))
        assert err.value.code == "queue_full" and err.value.status == 429 and err.value.retry_after >= 1
        gate.set()
        assert len(first.result(timeout=30)) == 1 and all(len(q.result(timeout=30)) == 1 for q in queued)
    finally:
        gate.set()
        batcher.close()


def test_prompt_cache_loads_once_and_refuses_another_models_prompt(tmp_path):
    loaded = load_model("tiny-gpt2")
    scorer = MixedScorer(loaded, max_length=64)
    cache = PromptCache(scorer, ModelIdentity.of(loaded), capacity=1)
    mine = write_prompt(tmp_path / "a.safetensors", "tiny-gpt2", n_tokens=3)
    other = write_prompt(tmp_path / "b.safetensors", "tiny-llama", n_tokens=3)
    first = cache.get("a", mine)
    mine.unlink()  # served from memory from now on
    assert cache.get("a", mine) is first and first.tensor.dtype == torch.float32
    with pytest.raises(ApiError) as err:
        cache.get("b", other)
    assert err.value.code == "wrong_prompt_kind"
