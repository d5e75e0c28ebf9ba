"""Verbalized scoring on tiny causal and masked LMs: answer index, padding, truncation, scores."""

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
