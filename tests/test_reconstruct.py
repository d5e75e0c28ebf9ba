"""Prompt reconstruction check: nearest-token projection and private n-gram counts."""

import csv
import json

import pytest
import torch

from post.cli import main
from post.data import load_labelled
from post.errors import ConfigError, PostError
from post.models import tiny_model
from post.prompt import save_prompt
from post.reconstruct import (
    ReconstructConfig,
    corpus_ngrams,
    longest_run,
    nearest_tokens,
    ngrams,
    reconstruct,
    reproduction,
)

SECRET = "the quiet lighthouse keeper painted seven violet boats"
PUBLIC = ["flights were delayed again today", "the crew was friendly and the seats were fine"]


def test_nearest_tokens_finds_the_rows_it_was_made_of_and_skips_excluded_ids():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(50, 8, generator=g)
    prompt = emb[[3, 17, 42]] * torch.tensor([[2.0], [0.5], [7.0]])  # cosine ignores scale
    ids, cos = nearest_tokens(prompt, emb, k=2)
    assert ids[:, 0].tolist() == [3, 17, 42]
    assert torch.allclose(cos[:, 0], torch.ones(3), atol=1e-5)
    assert (cos[:, 0] >= cos[:, 1]).all()
    ids, _ = nearest_tokens(prompt, emb, k=3, exclude=[17])
    assert 17 not in ids.flatten().tolist()
    with pytest.raises(PostError, match="width"):
        nearest_tokens(torch.zeros(2, 7), emb, k=1)


def test_ngram_counts_and_longest_run_golden():
    docs = [["a", "b", "c", "d"], ["x", "ab", "c"]]
    grams = corpus_ngrams(docs, 2)
    assert ngrams(["a", "b", "a", "b"], 2) == {("a", "b"), ("b", "a")}
    assert longest_run(["z", "b", "c", "d"], grams, docs) == 3  # runs past max_n are checked in the texts
    assert longest_run(["q"], grams, docs) == 0
    # "b c" must not match across the token boundary of "ab c"
    assert longest_run(["b", "c"], corpus_ngrams([["ab", "c"]], 1), [["ab", "c"]]) == 1
    counts = reproduction(["a", "b", "c", "q"], grams, {1: {("a",)}, 2: {("b", "c")}})
    assert counts == {"1": {"projected": 4, "in_private": 3, "private_only": 2},
                      "2": {"projected": 3, "in_private": 2, "private_only": 1}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reconstruct")
    rows = [{"text": SECRET if i == 7 else ("good film" if i % 2 else "bad film"),
             "label": "positive" if i % 2 else "negative"} for i in range(80)]
    data = root / "private.csv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, ["text", "label"])
        w.writeheader()
        w.writerows(rows)
    public = root / "public.txt"
    public.write_text("\n".join(PUBLIC) + "\n")
    loaded = tiny_model("llama")
    task = load_labelled(str(data), label_words="negative=bad;positive=good").task
    emb = loaded.model.get_input_embeddings()

    def prompt_of(text, name, **extra):
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            vecs = emb(torch.tensor(ids)) + 1e-3 * torch.randn(len(ids), emb.weight.shape[1])
        return save_prompt(root / name / "prompt.safetensors", vecs, loaded=loaded, task=task, extra=extra)

    return {"data": data, "public": public, "root": root,
            "leaky": prompt_of(SECRET, "leaky"), "clean": prompt_of(PUBLIC[0], "clean"),
            "reference": prompt_of(PUBLIC[1], "reference")}


def _config(files, *prompts, **kw):
    base = dict(prompt=list(prompts), reference=[files["reference"]], model="tiny-llama", task=str(files["data"]),
                label_words="negative=bad;positive=good", public=str(files["public"]))
    return ReconstructConfig(**{**base, **kw})


def test_a_prompt_made_of_a_training_sentence_is_caught(files, tmp_path):
    result = reconstruct(_config(files, files["leaky"], files["clean"]), tmp_path)
    leaky, clean, ref = result.prompts
    assert not leaky["reference"] and ref["reference"]
    assert leaky["longest_run"] == leaky["words"] >= 8  # the whole sentence, read back
    assert leaky["mean_top1_cosine"] > 0.99
    assert leaky["ngrams"]["3"]["private_only"] >= 1
    assert clean["ngrams"]["3"]["private_only"] == 0  # public words are not private-only
    assert ref["ngrams"]["2"]["private_only"] == 0
    assert "MORE than a prompt tuned on public data" in result.verdict
    md = (tmp_path / "reconstruct.md").read_text()
    assert "lighthouse" in md and "reference (public)" in md
    assert json.loads((tmp_path / "result.json").read_text())["prompts"][0]["longest_run"] == leaky["longest_run"]


def test_clean_prompts_pass(files, tmp_path):
    result = reconstruct(_config(files, files["clean"]), tmp_path)
    assert "no more than a prompt tuned on public data" in result.verdict


def test_cli_and_bad_inputs(files, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["attack", "reconstruct", "--prompt", str(files["leaky"]), "--reference", str(files["reference"]),
                 "--model", "tiny-llama", "--task", str(files["data"]), "--label-words", "negative=bad;positive=good",
                 "--max-n", "3", "--out", str(out)]) == 0
    assert "longest run" in capsys.readouterr().out
    assert (out / "result.json").is_file()
    with pytest.raises(ConfigError, match="--prompt"):
        ReconstructConfig(task="mr")
    with pytest.raises(ConfigError, match="--top-k"):
        _config(files, files["leaky"], top_k=0)
    with pytest.raises(PostError, match="tuned on"):  # a prompt from another model is refused
        reconstruct(_config(files, files["leaky"], model="tiny-gpt2"), tmp_path / "other")


def test_repeatable_flags_key_on_the_command_words_not_on_values():
    from post.cli import _normalize_flags

    assert _normalize_flags(["attack", "reconstruct", "--prompt", "a", "--prompt", "b"]) == [
        "attack", "reconstruct", "--prompt+", "a", "--prompt+", "b"]
    assert _normalize_flags(["user", "attack", "reconstruct", "--top-k=3"]) == [
        "user", "attack", "reconstruct", "--top_k=3"]
    # "reconstruct" as a path value of another command leaves its --prompt single-valued
    assert _normalize_flags(["evaluate", "--prompt", "reconstruct", "--model", "m"]) == [
        "evaluate", "--prompt", "reconstruct", "--model", "m"]
