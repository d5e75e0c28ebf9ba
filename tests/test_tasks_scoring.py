"""Verbalized scoring on tiny causal and masked LMs: answer index, padding, truncation, scores."""

import weakref

import numpy as np
import pytest
import torch

from post.errors import ConfigError, PostError
from post.models import tiny_model
from post.scoring import Encoder, class_scores, classification_metrics, head_logits, predict_scores
from post.tasks import Task, Verbalizer, parse_label_words

TEXTS = ["a great film", "bad", "the plot was awful and the acting was poor , a terrible waste of time",
         "good", "an amazing and brilliant movie", ""]


@pytest.fixture(scope="module", params=["llama", "gpt2", "roberta", "gemma3"])
def tiny(request):
    return tiny_model(request.param)



def test_template_must_have_slots():
    with pytest.raises(ConfigError, match="mask"):
        Task(template="{text} It was")
    with pytest.raises(ConfigError, match="text"):
        Task(template="It was {mask}.")
    with pytest.raises(ConfigError, match="before"):
        Task(template="{mask} {text}")


def test_label_without_words_is_an_error():
    with pytest.raises(ConfigError, match="no label words"):
        Task(label_words={"neg": (), "pos": (" good",)})
    with pytest.raises(ConfigError, match="no label words"):
        parse_label_words("neg=;pos=good")


def test_parse_label_words_adds_leading_space_and_keeps_order():
    words = parse_label_words("pos=good, great;neg=bad")
    assert list(words) == ["pos", "neg"]
    assert words["pos"] == (" good", " great") and words["neg"] == (" bad",)
    assert parse_label_words({"a": ["x"], "b": "y,z"}) == {"a": (" x",), "b": (" y", " z")}


def test_causal_answer_index_is_last_real_token_and_truncation_keeps_the_end():
    tiny = tiny_model("llama")
    enc = Encoder(Task(), tiny.tokenizer, "causal", max_length=12)
    seqs, answers = enc.encode(TEXTS)
    suffix = tiny.tokenizer(" It was", add_special_tokens=False)["input_ids"]
    for seq, ans in zip(seqs, answers):
        assert len(seq) <= 12
        assert ans == len(seq) - 1
        assert seq[-len(suffix):] == suffix
    long_ids = tiny.tokenizer(" " + TEXTS[2], add_special_tokens=False)["input_ids"]
    # Truncated from the left: the kept text tokens are the end of the text.
    kept = seqs[2][: len(seqs[2]) - len(suffix)]
    assert kept == long_ids[-len(kept):] and len(kept) < len(long_ids)
    batch = enc.collate(seqs, answers)
    assert batch.input_ids.shape == (len(TEXTS), max(len(s) for s in seqs))
    for i, s in enumerate(seqs):  # right padding
        assert batch.attention_mask[i, : len(s)].all() and not batch.attention_mask[i, len(s):].any()


def test_masked_answer_index_is_the_mask_and_specials_wrap():
    tiny = tiny_model("roberta")
    tok = tiny.tokenizer
    enc = Encoder(Task(), tok, "masked", max_length=16)
    seqs, answers = enc.encode(TEXTS)
    for seq, ans in zip(seqs, answers):
        assert seq[ans] == tok.mask_token_id
        assert seq[0] == tok.bos_token_id and seq[-1] == tok.eos_token_id
        assert len(seq) <= 16


def test_template_longer_than_max_length_is_an_error():
    tiny = tiny_model("llama")
    with pytest.raises(PostError, match="max-length"):
        Encoder(Task(template="{text} " + "word " * 20 + "{mask}"), tiny.tokenizer, "causal", max_length=8)


def test_class_score_matches_hand_computation(tiny):
    task = Task()
    enc = Encoder(task, tiny.tokenizer, tiny.kind, max_length=32)
    verb = Verbalizer.build(task, tiny.tokenizer)
    seqs, answers = enc.encode(TEXTS[:4])
    batch = enc.collate(seqs, answers)
    with torch.no_grad():
        scores = class_scores(tiny.model, batch, verb)
        logits = tiny.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for i in range(len(seqs)):
        row = logits[i, answers[i]]
        for c, (_, words) in enumerate(task.label_words.items()):
            ids = [tiny.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
            expected = row[ids].mean()
            torch.testing.assert_close(scores[i, c], expected, rtol=1e-4, atol=1e-5)


def test_batched_scores_equal_one_at_a_time(tiny):
    task = Task()
    enc = Encoder(task, tiny.tokenizer, tiny.kind, max_length=24)
    verb = Verbalizer.build(task, tiny.tokenizer)
    batched = predict_scores(tiny.model, enc, verb, TEXTS, batch_size=4, progress=False)
    single = np.concatenate([predict_scores(tiny.model, enc, verb, [t], batch_size=1, progress=False) for t in TEXTS])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-5)


def test_prompt_shifts_answer_and_matches_manual_embedding(tiny):
    task = Task()
    enc = Encoder(task, tiny.tokenizer, tiny.kind, max_length=24)
    verb = Verbalizer.build(task, tiny.tokenizer)
    seqs, answers = enc.encode(TEXTS[:3])
    batch = enc.collate(seqs, answers)
    torch.manual_seed(0)
    emb = tiny.model.get_input_embeddings()
    prompt = emb(torch.tensor([5, 6, 7, 8])).detach()
    with torch.no_grad():
        scores = class_scores(tiny.model, batch, verb, prompt)
        embeds = torch.cat([prompt.expand(3, -1, -1), emb(batch.input_ids)], 1)
        mask = torch.cat([torch.ones(3, 4, dtype=torch.long), batch.attention_mask], 1)
        logits = tiny.model(inputs_embeds=embeds, attention_mask=mask).logits
        rows = logits[torch.arange(3), batch.answer_index + 4][:, verb.token_ids]
    torch.testing.assert_close(scores, verb.class_scores(rows), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(scores, class_scores(tiny.model, batch, verb))


def test_head_logits_restricted_equals_full_vocab(tiny):
    h = torch.randn(3, tiny.hidden_size)
    ids = torch.tensor([3, 10, 42])
    with torch.no_grad():
        torch.testing.assert_close(head_logits(tiny.model, h, ids), head_logits(tiny.model, h)[:, ids])


def test_verbalizer_multi_token_word_warns_and_shared_first_token_errors():
    tiny = tiny_model("llama")
    with pytest.warns(UserWarning, match="split into"):
        Verbalizer.build(Task(label_words={"n": (" bad",), "p": (" supercalifragilistic",)}), tiny.tokenizer)
    with pytest.raises(PostError, match="same token"):
        Verbalizer.build(Task(label_words={"n": (" bad",), "p": (" bad",)}), tiny.tokenizer)


def test_verbalizer_averages_each_class():
    tiny = tiny_model("llama")
    verb = Verbalizer.build(Task(), tiny.tokenizer)
    assert verb.class_matrix.shape == (11, 2)
    torch.testing.assert_close(verb.class_matrix.sum(0), torch.ones(2))
    logits = torch.arange(11, dtype=torch.float32).unsqueeze(0)
    torch.testing.assert_close(verb.class_scores(logits), torch.tensor([[2.0, 7.5]]))


def test_classification_metrics_by_hand():
    scores = np.array([[1, 0], [0, 1], [0, 1], [1, 0], [0, 1]], dtype=float)
    labels = [0, 1, 0, 0, 1]
    m = classification_metrics(scores, labels, ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["confusion_matrix"] == [[2, 1], [0, 2]]
    assert m["per_class_accuracy"] == {"neg": pytest.approx(2 / 3), "pos": 1.0}
    f1_neg, f1_pos = 2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * (2 / 3) * 1 / (2 / 3 + 1)
    assert m["macro_f1"] == pytest.approx((f1_neg + f1_pos) / 2)


def test_length_buckets_sort_pad_less_and_cover_every_index():
    from post.scoring import length_buckets

    lengths = [5, 30, 7, 30, 2, 18, 9, 1, 25]
    buckets = length_buckets(lengths, 4)
    flat = np.concatenate(buckets)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # a permutation: nothing lost or repeated
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert flat[:2].tolist() == [1, 3]  # ties keep input order
    padded = sum(len(b) * max(lengths[i] for i in b) for b in buckets)
    unsorted = sum(len(lengths[s : s + 4]) * max(lengths[s : s + 4]) for s in range(0, len(lengths), 4))
    assert padded < unsorted
    with pytest.raises(PostError, match="batch size"):
        length_buckets(lengths, 0)


def test_predict_scores_rows_follow_the_input_order(tiny):
    task = Task()
    enc = Encoder(task, tiny.tokenizer, tiny.kind, max_length=24)
    verb = Verbalizer.build(task, tiny.tokenizer)
    perm = [2, 0, 5, 4, 1, 3]
    texts = [TEXTS[i] for i in perm]
    base = predict_scores(tiny.model, enc, verb, TEXTS, batch_size=2, progress=False)
    shuffled = predict_scores(tiny.model, enc, verb, texts, batch_size=2, progress=False)
    np.testing.assert_allclose(shuffled, base[perm], rtol=1e-4, atol=1e-5)
    assert not np.allclose(base[0], base[2])  # rows differ, so a mix-up would show


def test_pack_rows_cover_every_index_fill_rows_and_respect_the_budget():
    from post.scoring import length_buckets, pack_rows, packed_rows

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(3.3, 0.5, size=200).astype(int), 3, 128).tolist()  # a long tail, as sentences
    rows = packed_rows(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # nothing lost or repeated
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows)  # no row longer than the longest example
    padded = len(rows) * max(lengths)
    bucketed = sum(len(b) * max(lengths[i] for i in b) for b in length_buckets(lengths, 16))
    assert padded < 1.05 * sum(lengths) and padded < bucketed  # bucketed batches pad the long tail (8% here)
    groups = pack_rows(lengths, 16)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    budget = round(16 * np.mean(lengths))
    assert all(sum(lengths[i] for i in g) <= budget for g in groups) and len(groups) <= len(lengths) / 16 + 2
    assert pack_rows([], 4) == [] and packed_rows([]) == [] and pack_rows([7], 4)[0].tolist() == [0]
    from post.scoring import tight_rows

    assert packed_rows([34, 8, 29]) == [[0], [2], [1]]  # rows of 34: 8 fits beside neither
    assert tight_rows([34, 8, 29]) == [[0, 1], [2]]  # rows of 42: 84 tokens, not 102 (one row of 71: too long)
    assert tight_rows([10, 10, 10]) == [[0], [1], [2]] and tight_rows([]) == []
    with pytest.raises(PostError, match="batch size"):
        pack_rows(lengths, 0)


def _padded_hidden(tiny, enc, seqs, answers, idx, prompt):
    from post.scoring import answer_hidden

    return answer_hidden(tiny.model, enc.collate([seqs[i] for i in idx], [answers[i] for i in idx]), prompt)


@pytest.mark.parametrize("prompt_tokens", [0, 4])
def test_packed_examples_score_as_padded_ones(tiny, prompt_tokens):
    from post.scoring import examples_hidden, packed_rows, packs

    task = Task()
    enc = Encoder(task, tiny.tokenizer, tiny.kind, max_length=24)
    verb = Verbalizer.build(task, tiny.tokenizer)
    assert packs(tiny.model, enc) == (tiny.kind == "causal")  # a masked LM attends both ways: never packed
    prompt = None
    if prompt_tokens:
        prompt = tiny.model.get_input_embeddings()(torch.arange(5, 5 + prompt_tokens)).detach() + 0.1
    texts = TEXTS * 3
    seqs, answers = enc.encode(texts)
    idx = [7, 2, 0, 16, 5, 11, 3, 9]
    assert max(len(r) for r in packed_rows([len(seqs[i]) + prompt_tokens for i in idx])) >= 2  # rows shared
    with torch.no_grad():
        got = examples_hidden(tiny.model, enc, seqs, answers, idx, prompt)
        want = _padded_hidden(tiny, enc, seqs, answers, idx, prompt)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    padded = np.zeros((len(texts), 2), dtype=np.float32)
    with torch.no_grad():
        for i, b in enc.batches(texts, 4):
            padded[i] = class_scores(tiny.model, b, verb, prompt).numpy()
    np.testing.assert_allclose(predict_scores(tiny.model, enc, verb, texts, batch_size=4, prompt=prompt,
                                              progress=False), padded, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])  # the causal ones: a masked LM is never packed
def test_packed_per_example_gradients_stay_per_example(arch):
    """DP clips each example's gradient: with examples packed in shared rows, example j's loss must still
    depend on its own prompt copy and tokens only. The gradient of Σ loss_j over per-example copies (the
    DP path) equals, row by row, each example's gradient computed alone."""
    from post.scoring import examples_hidden, packed_rows, packs

    tiny = tiny_model(arch)
    task = Task()
    enc = Encoder(task, tiny.tokenizer, tiny.kind, max_length=24)
    verb = Verbalizer.build(task, tiny.tokenizer)
    seqs, answers = enc.encode(TEXTS * 2)
    idx = [2, 6, 1, 3, 0, 9, 4, 8]  # the long text makes the rows wide enough to share
    base = tiny.model.get_input_embeddings()(torch.arange(5, 9)).detach()
    assert packs(tiny.model, enc)
    assert max(len(r) for r in packed_rows([len(seqs[i]) + 4 for i in idx])) >= 2  # examples do share rows

    def loss(copies, which):
        h = examples_hidden(tiny.model, enc, seqs, answers, which, copies)
        return verb.class_scores(head_logits(tiny.model, h, verb.token_ids)).logsumexp(-1)

    copies = base.expand(len(idx), -1, -1).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(copies, idx).sum(), copies)
    for j, i in enumerate(idx):
        one = base.unsqueeze(0).clone().requires_grad_(True)
        (alone,) = torch.autograd.grad(loss(one, [i]).sum(), one)
        torch.testing.assert_close(g[j], alone[0], rtol=1e-4, atol=1e-6)


def test_a_model_that_does_not_pack_exactly_is_scored_padded(monkeypatch):
    """A backbone that ignores position ids would let packed examples attend to each other: the check
    catches it and scoring falls back to padded batches, with the same scores."""
    import post.scoring as scoring

    tiny = tiny_model("llama")
    body = tiny.model.model

    class Leaky(type(body)):
        def forward(self, *args, position_ids=None, **kw):
            return super().forward(*args, **kw)

    monkeypatch.setattr(body, "__class__", Leaky)
    monkeypatch.setattr(scoring, "_PACKS", weakref.WeakKeyDictionary())
    enc = Encoder(Task(), tiny.tokenizer, tiny.kind, max_length=24)
    verb = Verbalizer.build(Task(), tiny.tokenizer)
    assert not scoring.packs(tiny.model, enc)
    got = predict_scores(tiny.model, enc, verb, TEXTS, batch_size=4, progress=False)
    monkeypatch.setattr(body, "__class__", Leaky.__mro__[1])
    np.testing.assert_allclose(got, predict_scores(tiny.model, enc, verb, TEXTS, batch_size=4, progress=False),
                               rtol=1e-4, atol=1e-5)


def test_packed_rows_never_pass_the_longest_examples_position(monkeypatch):
    """Rows run up to twice the longest example; the padding tail sits at position 0, so GPT-2's position
    table (256 here) is never indexed past what the examples alone need."""
    from post.scoring import examples_hidden, tight_rows

    tiny = tiny_model("gpt2")
    enc = Encoder(Task(), tiny.tokenizer, tiny.kind, max_length=250)
    g = torch.Generator().manual_seed(0)
    lengths = [191, 232, 240, 134, 146, 232, 69, 236, 146]
    seqs = [torch.randint(5, 500, (n,), generator=g).tolist() for n in lengths]
    answers = [n - 1 for n in lengths]
    assert max(sum(lengths[i] for i in row) for row in tight_rows(lengths)) > 256  # a row longer than the table
    idx = list(range(len(lengths)))
    with torch.no_grad():
        got = examples_hidden(tiny.model, enc, seqs, answers, idx)
        want = _padded_hidden(tiny, enc, seqs, answers, idx, None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_examples_hidden_refuses_a_wrong_number_of_prompt_copies_and_takes_no_examples():
    from post.scoring import examples_hidden

    tiny = tiny_model("llama")
    enc = Encoder(Task(), tiny.tokenizer, tiny.kind, max_length=24)
    seqs, answers = enc.encode(TEXTS)
    copies = torch.zeros(3, 2, tiny.hidden_size)
    with pytest.raises(PostError, match="3 prompt copies for 2 examples"):
        examples_hidden(tiny.model, enc, seqs, answers, [0, 1], copies)
    assert examples_hidden(tiny.model, enc, seqs, answers, []).shape == (0, tiny.hidden_size)


def test_flash_attention_is_never_packed(monkeypatch):
    """Flash attention applies the packed-sequence mask only to a batch of one row: never packed."""
    import post.scoring as scoring

    tiny = tiny_model("llama")
    enc = Encoder(Task(), tiny.tokenizer, tiny.kind, max_length=24)
    assert scoring.packs(tiny.model, enc)
    monkeypatch.setattr(tiny.model.config, "_attn_implementation", "flash_attention_2")
    assert not scoring.packs(tiny.model, enc)


HEADED = "Review: {text}\nSentiment:{mask}"  # a template with a shared start before {text}


def start_hidden_calls(monkeypatch) -> list[int]:
    """From now on, the size of every post.scoring.start_hidden call: how many examples ran after a shared start."""
    import post.scoring as scoring

    calls: list[int] = []
    real = scoring.start_hidden
    monkeypatch.setattr(scoring, "start_hidden", lambda m, pad, ex: calls.append(len(ex)) or real(m, pad, ex))
    return calls


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("template", [HEADED, "Review:{text}{mask}"])
@pytest.mark.parametrize("prompt_tokens", [0, 4])
def test_shared_start_scores_equal_whole_examples(arch, template, prompt_tokens, monkeypatch):
    """Scoring runs the prompt and the template's head once and packs only the rest of each example; the scores
    are those of every example run whole. The second template with an empty text is nothing but its head, so the
    shared start is cut short to keep that example's answer out of it."""
    import post.scoring as scoring

    tiny = tiny_model(arch)
    task = Task(template=template)
    enc = Encoder(task, tiny.tokenizer, tiny.kind, max_length=24)
    verb = Verbalizer.build(task, tiny.tokenizer)
    prompt = None
    if prompt_tokens:
        prompt = tiny.model.get_input_embeddings()(torch.arange(5, 5 + prompt_tokens)).detach() + 0.1
    texts = TEXTS * 3
    seqs, answers = enc.encode(texts)
    head = scoring.head_ids(enc)
    start = scoring.SharedStart([(torch.zeros(1, 1, len(head), 1),) * 2], len(head))
    skips = {start.covers(a) for a in answers}
    # "" leaves the second template's head alone: that example's answer is read inside it, so its start stands for
    # one token fewer
    assert skips == ({len(head)} if template == HEADED else {len(head), len(head) - 1}) and len(head) >= 2
    assert scoring.shares_prefix(tiny.model, enc)
    calls = start_hidden_calls(monkeypatch)
    got = predict_scores(tiny.model, enc, verb, texts, batch_size=4, prompt=prompt, progress=False)
    assert sum(calls) == len(texts) and len(calls) > 1  # every example went through the shared path
    calls.clear()
    want = predict_scores(tiny.model, enc, verb, texts, batch_size=4, prompt=prompt, progress=False,
                          share_prefix=False)
    assert not calls
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    padded = np.zeros_like(want)
    with torch.no_grad():
        for i, b in enc.batches(texts, 4):
            padded[i] = class_scores(tiny.model, b, verb, prompt).numpy()
    np.testing.assert_allclose(got, padded, rtol=1e-4, atol=1e-5)


def test_a_start_is_shared_only_where_it_saves_more_than_its_forward_costs(monkeypatch):
    """One text never runs its start as a forward of its own (that only adds a forward: the one-at-a-time loop
    paid 1.5x for it); a call shares the start once (n - 1) * start positions reach SHARE_MIN_SAVED. Either way the
    scores are those of whole examples."""
    import post.scoring as scoring

    assert [scoring.start_pays(k, s) for k, s in [(1, 500), (2, 63), (2, 64), (5, 13), (6, 13), (22, 3), (23, 3),
                                                  (1000, 0)]] == [False, False, True, False, True, False, True, False]
    tiny = tiny_model("llama")
    task = Task(template=HEADED)
    enc = Encoder(task, tiny.tokenizer, tiny.kind, max_length=24)
    verb = Verbalizer.build(task, tiny.tokenizer)
    prompt = tiny.model.get_input_embeddings()(torch.arange(5, 9)).detach()
    start = 4 + len(scoring.head_ids(enc))
    assert scoring.shares_prefix(tiny.model, enc)  # the check's own calls come before the count
    calls = start_hidden_calls(monkeypatch)
    few = -(-scoring.SHARE_MIN_SAVED // start)  # the most texts whose start does not pay; one more pays
    texts = (TEXTS * few)[: few + 1]
    whole = predict_scores(tiny.model, enc, verb, texts, batch_size=4, prompt=prompt, progress=False,
                           share_prefix=False)
    for k, shared in [(1, False), (few, False), (few + 1, True)]:
        calls.clear()
        got = predict_scores(tiny.model, enc, verb, texts[:k], batch_size=4, prompt=prompt, progress=False)
        assert (sum(calls) == k) if shared else not calls, (k, calls)
        np.testing.assert_allclose(got, whole[:k], rtol=1e-4, atol=1e-5)


def test_a_backbone_that_ignores_the_4d_mask_never_shares_a_start(monkeypatch):
    """A backbone that drops the 4-D mask would let packed examples attend to their row-mates: the check
    catches it, and scoring runs whole examples, with the same scores as the honest backbone."""
    import post.scoring as scoring

    tiny = tiny_model("llama")
    body = tiny.model.model

    class NoMask(type(body)):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                    use_cache=None, **kw):
            return super().forward(input_ids=input_ids, position_ids=position_ids, cache=cache,
                                   inputs_embeds=inputs_embeds, use_cache=use_cache, **kw)

    task = Task(template=HEADED)
    enc = Encoder(task, tiny.tokenizer, tiny.kind, max_length=24)
    verb = Verbalizer.build(task, tiny.tokenizer)
    monkeypatch.setattr(scoring, "SHARE_MIN_SAVED", 1)  # six texts' short start would not pay otherwise
    assert scoring.shares_prefix(tiny.model, enc)  # the check's own calls come before the count
    calls = start_hidden_calls(monkeypatch)
    want = predict_scores(tiny.model, enc, verb, TEXTS, batch_size=4, progress=False)
    assert sum(calls) == len(TEXTS)  # the honest backbone shares the start
    monkeypatch.setattr(body, "__class__", NoMask)
    monkeypatch.setattr(scoring, "_SHARES", weakref.WeakKeyDictionary())
    assert scoring.packs(tiny.model, enc) and not scoring.shares_prefix(tiny.model, enc)
    calls.clear()
    np.testing.assert_allclose(predict_scores(tiny.model, enc, verb, TEXTS, batch_size=4, progress=False), want,
                               rtol=1e-4, atol=1e-5)
    assert not calls


def test_examples_past_the_sliding_window_run_whole(monkeypatch):
    """The 4-D mask replaces the sliding-window mask, so examples that would reach past the window run whole.
    Tiny Gemma 3's window (8 tokens) fails the check; with it widened the start is shared, and with the check
    forced on, an example longer than the window falls back. Either way the scores are those of whole examples."""
    import post.scoring as scoring

    tiny = tiny_model("gemma3")
    task = Task(template=HEADED)
    enc = Encoder(task, tiny.tokenizer, tiny.kind, max_length=24)
    verb = Verbalizer.build(task, tiny.tokenizer)
    prompt = tiny.model.get_input_embeddings()(torch.arange(5, 9)).detach()
    monkeypatch.setattr(scoring, "SHARE_MIN_SAVED", 1)  # six texts' start would not pay otherwise
    calls = start_hidden_calls(monkeypatch)
    want = predict_scores(tiny.model, enc, verb, TEXTS, batch_size=4, prompt=prompt, progress=False,
                          share_prefix=False)
    assert not scoring.shares_prefix(tiny.model, enc)
    config = tiny.model.config.get_text_config()
    monkeypatch.setattr(scoring, "_SHARES", weakref.WeakKeyDictionary())
    monkeypatch.setattr(config, "sliding_window", 256)
    assert scoring.shares_prefix(tiny.model, enc)  # and stays on for this model: the check is not re-run below
    wide = predict_scores(tiny.model, enc, verb, TEXTS, batch_size=4, prompt=prompt, progress=False,
                          share_prefix=False)
    calls.clear()
    np.testing.assert_allclose(predict_scores(tiny.model, enc, verb, TEXTS, batch_size=4, prompt=prompt,
                                              progress=False), wide, rtol=1e-4, atol=1e-5)
    assert sum(calls) == len(TEXTS)  # widened, every example went through the shared start
    assert not np.allclose(wide, want, rtol=1e-4, atol=1e-5)  # the window matters for these texts
    monkeypatch.setattr(config, "sliding_window", 8)
    seqs, answers = enc.encode(TEXTS)
    with torch.no_grad():
        start = scoring.shared_start(tiny.model, scoring.head_ids(enc), prompt)
        assert scoring.start_hidden(tiny.model, enc.pad_id, [(seqs[2], answers[2], start.head, start)]) is None
    calls.clear()
    np.testing.assert_allclose(predict_scores(tiny.model, enc, verb, TEXTS, batch_size=4, prompt=prompt,
                                              progress=False), want, rtol=1e-4, atol=1e-5)
    assert calls  # the shared path was taken, and its groups past the window fell back to whole examples
