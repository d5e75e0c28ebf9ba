"""Bad input, end to end through the ``post`` command: every case is one line on stderr and exit status 2.

Each case runs a real command on tiny models and small files written here, and checks that it ends
with exactly one line, ``post: error: ...`` (what is wrong and what to do), exit status 2, no
traceback, and nothing left in the run directory that a later run would trust as a result.
"""

from __future__ import annotations

import csv
import errno
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import write_sentiment_csv
from post.cli import main
from post.models import LoadedModel, save_model, tiny_model

LW = "negative=bad;positive=good"


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    # stderr then holds only what the tool itself says, not progress bars.
    import tqdm.auto
    import tqdm.std
    from transformers.utils import logging as hf_logging

    class Quiet(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(tqdm.auto, "tqdm", Quiet)
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if enabled:
        hf_logging.enable_progress_bar()


@dataclass
class World:
    """Files shared by the cases: data, a good prompt and the models it does or doesn't fit."""

    root: Path
    data: Path
    prompt: Path
    other_weights: Path
    narrow: Path
    wide_vocab: Path
    word_level: Path
    truncated_weights: Path
    pickled: Path
    corpus: Path


def _word_level_model(root: Path) -> Path:
    """tiny-llama's weights with a word-level tokenizer that knows few words (others are <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>", "<mask>", "It", "was", ".", "good", "bad", "great", "awful"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", mask_token="<mask>")
    base = tiny_model("llama")
    return save_model(LoadedModel(model=base.model, tokenizer=tok, name="word-level", kind="causal", path=None),
                      root / "word-level")


def _narrow_model(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tiny_model("llama")
    cfg = LlamaConfig(**{**base.model.config.to_dict(), "hidden_size": 32, "intermediate_size": 64})
    torch.manual_seed(0)
    return save_model(LoadedModel(model=LlamaForCausalLM(cfg), tokenizer=base.tokenizer, name="narrow",
                                  kind="causal", path=None), root / "narrow")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from post.tune import TuneConfig, tune

    root = tmp_path_factory.mktemp("bad-inputs")
    data = write_sentiment_csv(root / "data.csv", n=40)
    run = tune(TuneConfig(model="tiny-llama", task=str(data), label_words=LW, n_tokens=2, max_steps=1, batch_size=8,
                          test=False, eval_limit=2, device="cpu"), root / "tuned")
    other_weights = save_model(tiny_model("llama", seed=1), root / "other-weights")
    wide = tiny_model("llama")
    wide.model.resize_token_embeddings(600)
    wide_vocab = save_model(wide, root / "wide-vocab")
    truncated = save_model(tiny_model("llama"), root / "truncated-weights")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    pickled = root / "pickled"
    pickled.mkdir()
    tiny = tiny_model("llama")
    tiny.model.config.save_pretrained(pickled)
    tiny.tokenizer.save_pretrained(pickled)
    torch.save(tiny.model.state_dict(), pickled / "pytorch_model.bin")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(["good", "bad", "film", "plot", "was"]) for _ in range(30))
                                for _ in range(60)))
    return World(root, data, Path(run["prompt"]), other_weights, _narrow_model(root), wide_vocab,
                 _word_level_model(root), truncated, pickled, corpus)


# --------------------------------------------------------------------------- helpers that write bad files


def _write_rows(path: Path, rows: list[dict], fields: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)
    return path


def _prompt_parts(w: World) -> tuple[torch.Tensor, dict]:
    with safe_open(str(w.prompt), "pt") as f:
        return f.get_tensor("prompt"), json.loads(f.metadata()["post"])


def _tune(w: World, *extra: str, task: Path | None = None, model: str = "tiny-llama") -> list[str]:
    return ["tune", "--model", model, "--task", str(task or w.data), "--label-words", LW, "--n-tokens", "2",
            "--epochs", "1", "--batch-size", "8", "--test", "false", "--eval-limit", "2", "--device", "cpu", *extra]


def _evaluate(w: World, prompt: Path | str, model: str = "tiny-llama") -> list[str]:
    return ["evaluate", "--model", model, "--task", str(w.data), "--label-words", LW, "--limit", "4",
            "--prompt", str(prompt), "--device", "cpu"]


def _distill(w: World, *extra: str, corpus: Path | None = None) -> list[str]:
    return ["distill", "--teacher", "tiny-llama", "--keep-layers", "0", "--corpus", str(corpus or w.corpus),
            "--block-size", "16", "--batch-size", "4", "--max-steps", "3", "--held-out", "2", "--device", "cpu",
            *extra]


# Each builder gets the shared world and a scratch folder, and returns the command (without --out).
Builder = Callable[[World, Path], list[str]]


def missing_file(w, d):
    return _tune(w, task=d / "no-such-file.csv")


def empty_file(w, d):
    (d / "empty.csv").write_bytes(b"")
    return _tune(w, task=d / "empty.csv")


def header_only(w, d):
    (d / "header.csv").write_text("text,label\n")
    return _tune(w, task=d / "header.csv")


def truncated_jsonl(w, d):
    (d / "cut.jsonl").write_text('{"text": "good", "label": "positive"}\n{"text": "ba')
    return _tune(w, task=d / "cut.jsonl")


def truncated_parquet(w, d):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["good", "bad"] * 20, "label": ["positive", "negative"] * 20}), d / "t.parquet")
    raw = (d / "t.parquet").read_bytes()
    (d / "t.parquet").write_bytes(raw[: len(raw) // 2])
    return _tune(w, task=d / "t.parquet")


def not_json(w, d):
    (d / "rows.json").write_text('{"text": "good"')
    return _tune(w, task=d / "rows.json")


def unsupported_type(w, d):
    (d / "data.xlsx").write_bytes(b"PK\x03\x04")
    return _tune(w, task=d / "data.xlsx")


def wrong_text_column(w, d):
    return _tune(w, "--text-column", "review")


def wrong_label_column(w, d):
    return _tune(w, "--label-column", "stars")


def no_label_words(w, d):
    return [a for a in _tune(w) if a not in ("--label-words", LW)]


def label_without_words(w, d):
    return [*_tune(w), "--label-words", "negative=bad;neutral=meh"]


def class_without_words(w, d):
    return [*_tune(w), "--label-words", "negative=;positive=good"]


def one_class(w, d):
    return [*_tune(w), "--label-words", "positive=good"]


def label_words_without_equals(w, d):
    return [*_tune(w), "--label-words", "negative bad; positive good"]


def label_word_not_in_vocabulary(w, d):
    return [*_tune(w, model=str(w.word_level)), "--label-words", "negative=bad;positive=zebra"]


def label_words_share_a_token(w, d):
    return [*_tune(w), "--label-words", "negative=bad;positive=bad"]


def unlabelled_row(w, d):
    return _tune(w, task=_write_rows(d / "u.csv", [{"text": "good", "label": "positive"},
                                                   {"text": "bad", "label": ""}] * 5, ["text", "label"]))


def too_few_rows(w, d):
    return _tune(w, task=_write_rows(d / "two.csv", [{"text": "good", "label": "positive"},
                                                     {"text": "bad", "label": "negative"}], ["text", "label"]))


def bad_split_value(w, d):
    rows = [{"text": "good", "label": "positive", "split": "train"}, {"text": "bad", "label": "negative",
                                                                      "split": "holdout"}] * 5
    return _tune(w, task=_write_rows(d / "s.csv", rows, ["text", "label", "split"]))


def non_utf8(w, d):
    (d / "latin.csv").write_bytes("text,label\ncaf\xe9 good,positive\nbad,negative\n".encode("latin-1") * 10)
    return _tune(w, task=d / "latin.csv")


def unknown_encoding(w, d):
    return _tune(w, "--encoding", "klingon-8")


def long_text_and_long_template(w, d):
    rows = [{"text": "good " * 20_000, "label": "positive"}, {"text": "bad " * 20_000, "label": "negative"}] * 5
    return _tune(w, "--max-length", "8", "--template", "{text} All in all, after some thought, it was {mask}.",
                 task=_write_rows(d / "long.csv", rows, ["text", "label"]))


def template_without_text(w, d):
    return _tune(w, "--template", "It was {mask}.")


def template_without_mask(w, d):
    return _tune(w, "--template", "{text} It was")


def template_mask_first(w, d):
    return _tune(w, "--template", "{mask}: {text}")


def template_text_twice(w, d):
    return _tune(w, "--template", "{text} {text} It was {mask}.")


def prompt_missing(w, d):
    return _evaluate(w, d / "no-prompt.safetensors")


def prompt_for_other_weights(w, d):
    return _evaluate(w, w.prompt, model=str(w.other_weights))


def prompt_for_other_width(w, d):
    return _evaluate(w, w.prompt, model=str(w.narrow))


def prompt_for_other_vocabulary(w, d):
    return _evaluate(w, w.prompt, model=str(w.wide_vocab))


def prompt_for_other_tokenizer(w, d):
    return _evaluate(w, w.prompt, model=str(w.word_level))


def prompt_truncated(w, d):
    raw = w.prompt.read_bytes()
    (d / "cut.safetensors").write_bytes(raw[: len(raw) - 40])
    return _evaluate(w, d / "cut.safetensors")


def prompt_random_bytes(w, d):
    (d / "noise.safetensors").write_bytes(random.Random(1).randbytes(300))
    return _evaluate(w, d / "noise.safetensors")


def prompt_header_corrupted(w, d):
    raw = bytearray(w.prompt.read_bytes())
    raw[8:40] = b"\xff" * 32  # inside the JSON header
    (d / "header.safetensors").write_bytes(bytes(raw))
    return _evaluate(w, d / "header.safetensors")


def prompt_metadata_edited(w, d):
    tensor, meta = _prompt_parts(w)
    meta["task"]["init_text"] = "edited"  # checksum left as it was
    save_file({"prompt": tensor}, str(d / "edited.safetensors"), metadata={"post": json.dumps(meta)})
    return _evaluate(w, d / "edited.safetensors")


def prompt_tensor_edited(w, d):
    tensor, meta = _prompt_parts(w)
    save_file({"prompt": tensor + 0.01}, str(d / "retuned.safetensors"), metadata={"post": json.dumps(meta)})
    return _evaluate(w, d / "retuned.safetensors")


def safetensors_not_a_prompt(w, d):
    save_file({"weight": torch.zeros(2, 64)}, str(d / "plain.safetensors"))
    return _evaluate(w, d / "plain.safetensors")


def prompt_for_other_classes(w, d):
    rows = [{"text": t, "label": c} for t, c in [("good", "pos"), ("bad", "neg"), ("fine", "mid")] * 6]
    three = _write_rows(d / "three.csv", rows, ["text", "label"])
    return ["evaluate", "--model", "tiny-llama", "--task", str(three), "--label-words",
            "neg=bad;mid=neutral;pos=good", "--prompt", str(w.prompt), "--device", "cpu"]


def transfer_with_corrupt_prompt(w, d):
    raw = w.prompt.read_bytes()
    (d / "cut.safetensors").write_bytes(raw[: len(raw) // 3])
    return ["transfer", "--source-model", "tiny-llama", "--prompt", str(d / "cut.safetensors"), "--target-model",
            "tiny-llama", "--public", str(w.corpus), "--steps", "2", "--alpha", "0.5", "--device", "cpu"]


def transfer_without_alpha_inputs(w, d):
    return ["transfer", "--source-model", "tiny-llama", "--prompt", str(w.prompt), "--target-model", "tiny-llama",
            "--public", str(w.corpus), "--steps", "2", "--alpha-public", "none", "--device", "cpu"]


def transfer_with_unlabelled_alpha_data(w, d):
    return ["transfer", "--source-model", "tiny-llama", "--prompt", str(w.prompt), "--target-model", "tiny-llama",
            "--public", str(w.corpus), "--steps", "2", "--alpha-public", str(w.corpus), "--device", "cpu"]


def model_weights_truncated(w, d):
    return _tune(w, model=str(w.truncated_weights))


def model_weights_pickled(w, d):
    return _tune(w, model=str(w.pickled))


def model_dir_missing(w, d):
    return _tune(w, model="./no-such-model-dir")


def unknown_model_alias(w, d):
    return _tune(w, model="smollm9-135m")


def hub_id_offline(w, d):
    return _tune(w, model="post-tests/no-such-model-anywhere")


def epsilon_zero(w, d):
    return _tune(w, "--dp", "true", "--epsilon", "0")


def epsilon_negative(w, d):
    return _tune(w, "--dp", "true", "--epsilon", "-3")


def delta_one(w, d):
    return _tune(w, "--dp", "true", "--delta", "1")


def delta_not_below_one_over_n(w, d):
    return _tune(w, "--dp", "true", "--delta", "0.1")


def clip_zero(w, d):
    return _tune(w, "--dp", "true", "--max-grad-norm", "0")


def clip_negative(w, d):
    return _tune(w, "--dp", "true", "--max-grad-norm", "-1")


def sampling_rate_above_one(w, d):
    return _tune(w, "--dp", "true", "--batch-size", "1000")


def accountant_finds_no_noise(w, d):
    return _tune(w, "--dp", "true", "--epsilon", "0.0001", "--delta", "1e-12", "--accountant", "rdp")


def negative_noise(w, d):
    return _tune(w, "--dp", "true", "--noise-multiplier", "-1")


def broken_yaml(w, d):
    (d / "c.yaml").write_text("n_tokens: [1, 2\nlr: 0.1\n")
    return [*_tune(w), "--config", str(d / "c.yaml")]


def unknown_yaml_key(w, d):
    (d / "c.yaml").write_text("n_tokens: 2\nlearning_rate_typo: 0.1\n")
    return [*_tune(w), "--config", str(d / "c.yaml")]


def bad_dtype(w, d):
    return _tune(w, "--dtype", "float64")


def bad_device(w, d):
    return _tune(w, "--device", "tpu")


def malformed_device(w, d):
    return _tune(w, "--device", "cuda:x")


def absent_gpu(w, d):
    return [a if a != "cpu" else "cuda:7" for a in _tune(w)]  # no machine here has eight GPUs


def max_length_too_small(w, d):
    return _tune(w, "--max-length", "4")


def bad_train_indices(w, d):
    (d / "idx.json").write_text("[0, 1, 99999]")
    return _tune(w, "--train-indices", str(d / "idx.json"))


def run_dir_of_other_settings(w, d):
    return _tune(w, "--lr", "0.5")  # the run directory holds another run's settings (written below)


def unwritable_out(w, d):
    return _tune(w)  # --out is placed under a regular file below


def disk_full_at_checkpoint(w, d):
    return _tune(w, "--checkpoint-every", "1")


def disk_full_at_metrics(w, d):
    return _tune(w)


def nan_loss(w, d):
    return _tune(w, "--lr", "1e30", "--epochs", "3", "--checkpoint-every", "1", model="tiny-gpt2")


def update_overflows(w, d):
    return _tune(w, "--lr", "1e38", "--checkpoint-every", "1")


def distill_diverges(w, d):
    return ["distill", "--teacher", "tiny-gpt2", "--keep-layers", "0", "--corpus", str(w.corpus), "--block-size",
            "16", "--batch-size", "4", "--max-steps", "4", "--held-out", "2", "--lr", "1e30", "--warmup", "0",
            "--checkpoint-every", "1", "--device", "cpu"]


def transfer_diverges(w, d):
    return ["transfer", "--source-model", "tiny-llama", "--prompt", str(w.prompt), "--target-model", "tiny-gpt2",
            "--public", str(w.corpus), "--steps", "4", "--batch-size", "4", "--alpha", "0.5", "--lr", "1e30",
            "--checkpoint-every", "1", "--device", "cpu"]


def distill_empty_corpus(w, d):
    (d / "empty.txt").write_text("\n\n")
    return _distill(w, corpus=d / "empty.txt")


def distill_corpus_too_short(w, d):
    (d / "short.txt").write_text("good film\n")
    return _distill(w, corpus=d / "short.txt")


def distill_layer_out_of_range(w, d):
    return [a if a != "0" else "7" for a in _distill(w)]


def attack_odd_shadows(w, d):
    return ["attack", "lira", "--model", "tiny-llama", "--task", str(w.data), "--label-words", LW, "--shadows", "3",
            "--device", "cpu"]


CASES: list[tuple[Builder, str]] = [
    # data files
    (missing_file, "no such file"),
    (empty_file, "is empty"),
    (header_only, "no data rows"),
    (truncated_jsonl, "line 2 is not valid JSON"),
    (truncated_parquet, "not a readable parquet file"),
    (not_json, "not valid JSON"),
    (unsupported_type, "unsupported file type"),
    (wrong_text_column, "no column 'review'"),
    (wrong_label_column, "no column 'stars'"),
    (no_label_words, "have no label words; give them with --label-words"),
    (label_without_words, "'positive' have no label words"),
    (class_without_words, "has no label words"),
    (one_class, "at least 2 classes"),
    (label_words_without_equals, "has no '='"),
    (label_word_not_in_vocabulary, "not in the tokenizer's vocabulary"),
    (label_words_share_a_token, "start with the same token"),
    (unlabelled_row, "has no label"),
    (too_few_rows, "too few rows"),
    (bad_split_value, "has split 'holdout'"),
    (non_utf8, "is not valid utf-8.*--encoding latin-1"),
    (unknown_encoding, "unknown --encoding"),
    (long_text_and_long_template, "the template alone takes"),
    # templates
    (template_without_text, r"\{text\} exactly once"),
    (template_without_mask, r"\{mask\} exactly once"),
    (template_mask_first, r"\{text\} before \{mask\}"),
    (template_text_twice, r"\{text\} exactly once"),
    # prompt files
    (prompt_missing, "no prompt file"),
    (prompt_for_other_weights, "fingerprint"),
    (prompt_for_other_width, "width 64.*width 32"),
    (prompt_for_other_vocabulary, "512-token vocabulary.*600"),
    (prompt_for_other_tokenizer, "another tokenizer"),
    (prompt_truncated, "truncated or corrupt"),
    (prompt_random_bytes, "truncated or corrupt"),
    (prompt_header_corrupted, "truncated or corrupt"),
    (prompt_metadata_edited, "fails its checksum"),
    (prompt_tensor_edited, "fails its checksum"),
    (safetensors_not_a_prompt, "not a POST prompt file"),
    (prompt_for_other_classes, "tuned for classes"),
    (transfer_with_corrupt_prompt, "truncated or corrupt"),
    (transfer_without_alpha_inputs, "heuristic α needs"),
    (transfer_with_unlabelled_alpha_data, "alpha"),
    # models
    (model_weights_truncated, "could not load"),
    (model_weights_pickled, "could not load"),
    (model_dir_missing, "no model directory"),
    (unknown_model_alias, "unknown model 'smollm9-135m'"),
    (hub_id_offline, "hub access is off"),
    # privacy settings
    (epsilon_zero, "--epsilon"),
    (epsilon_negative, "--epsilon"),
    (delta_one, "--delta"),
    (delta_not_below_one_over_n, "not below 1/N"),
    (clip_zero, "--max-grad-norm"),
    (clip_negative, "--max-grad-norm"),
    (sampling_rate_above_one, "sampling rate"),
    (accountant_finds_no_noise, "found no noise level"),
    (negative_noise, "--noise-multiplier"),
    # options and config files
    (broken_yaml, "config"),
    (unknown_yaml_key, "learning_rate_typo"),
    (bad_dtype, "dtype"),
    (bad_device, "--device"),
    (malformed_device, "--device"),
    (absent_gpu, "no cuda:7"),
    (max_length_too_small, "--max-length"),
    (bad_train_indices, "--train-indices"),
    (run_dir_of_other_settings, "other settings"),
    # output
    (unwritable_out, "cannot write to the output directory"),
    (disk_full_at_checkpoint, "No space left on device"),
    (disk_full_at_metrics, "No space left on device"),
    # training
    (nan_loss, "the loss became nan.*last good checkpoint"),
    (update_overflows, "overflowed.*last good checkpoint"),
    (distill_diverges, "distillation loss became.*last good checkpoint"),
    (transfer_diverges, "transfer loss became nan.*last good checkpoint"),
    (distill_empty_corpus, "no non-empty texts"),
    (distill_corpus_too_short, "fewer than two blocks"),
    (distill_layer_out_of_range, "--keep-layers"),
    (attack_odd_shadows, "--shadows"),
]


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 25
    assert len({b.__name__ for b, _ in CASES}) == len(CASES)


def _prepare_out(name: str, d: Path, w: World, monkeypatch) -> Path:
    """The run directory of a case (and the fault it needs)."""
    out = d / "run"
    if name == "unwritable_out":
        (d / "a-file").write_text("not a directory")
        return d / "a-file" / "run"
    if name == "run_dir_of_other_settings":
        out.mkdir()
        (out / "config.yaml").write_text("stage: tune\nmodel: tiny-llama\nlr: 0.1\n")
    if name == "disk_full_at_checkpoint":
        from safetensors import SafetensorError

        def full(*a, **k):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr("post.checkpoint.save_file", full)
    if name == "disk_full_at_metrics":
        real_open = open

        def full_open(file, mode="r", *a, **k):
            if str(file).endswith("metrics.jsonl") and "a" in mode:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(file, mode, *a, **k)

        monkeypatch.setattr("post.rundir.open", full_open, raising=False)
    return out


@pytest.mark.parametrize("build, match", CASES, ids=[b.__name__ for b, _ in CASES])
def test_bad_input_is_one_line_and_exit_status_2(world, build, match, tmp_path, capsys, monkeypatch):
    argv = build(world, tmp_path)
    out = _prepare_out(build.__name__, tmp_path, world, monkeypatch)
    capsys.readouterr()
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("post: error: "), err
    assert re.search(match, lines[0]), lines[0]
    # Nothing a later run would take as a result: no result, no prompt, no half-written file.
    if out.exists():
        assert not (out / "result.json").exists()
        assert not (out / "prompt.safetensors").exists()
        assert not [p for p in out.rglob("*.part")], list(out.rglob("*"))
    if build.__name__ in ("nan_loss", "distill_diverges", "transfer_diverges"):  # the last good checkpoint stays
        from safetensors.torch import load_file

        assert json.loads((out / "checkpoint.json").read_text())["step"] >= 1
        assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint.safetensors")).values())


def test_debug_shows_the_traceback(world, tmp_path):
    with pytest.raises(Exception, match="no such file"):
        main([*missing_file(world, tmp_path), "--out", str(tmp_path / "run"), "--debug"])


def test_very_long_and_non_ascii_texts_are_fine(world, tmp_path, capsys):
    """Long texts lose their beginning (the template's end survives); any Unicode is read as is."""
    rows = [{"text": "ünïcödé ✓ " * 5_000 + " good", "label": "positive"},
            {"text": "日本語のテキスト " * 5_000 + " bad", "label": "negative"}] * 6
    data = _write_rows(tmp_path / "long.csv", rows, ["text", "label"])
    code = main(["evaluate", "--model", "tiny-llama", "--task", str(data), "--label-words", LW, "--max-length", "32",
                 "--device", "cpu", "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "result.json").read_text())["n"] >= 1


def test_dp_without_noise_reports_an_unbounded_epsilon(world, tmp_path, capsys):
    """σ = 0 is allowed and honest: ε is infinite, in the result, the ledger and the one-line summary."""
    args = [*_tune(world, "--dp", "true", "--noise-multiplier", "0", "--max-steps", "2"), "--out", str(tmp_path)]
    for _ in range(2):  # the second call returns the finished run (and re-checks its ledger)
        assert main(args) == 0, capsys.readouterr().err
        assert "ε=inf" in capsys.readouterr().out
    assert json.loads((tmp_path / "privacy.json").read_text())["epsilon"] == "inf"
