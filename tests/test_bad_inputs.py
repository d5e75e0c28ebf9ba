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
from typing import NamedTuple

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
    return World(root, data, Path(run.prompt), other_weights, _narrow_model(root), wide_vocab,
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


def _transfer(w: World, prompt: Path | str, *extra: str, target: str = "tiny-llama") -> list[str]:
    return ["transfer", "--source-model", "tiny-llama", "--prompt", str(prompt), "--target-model", target,
            "--public", str(w.corpus), *extra, "--device", "cpu"]


def _put(path: Path, content: str | bytes) -> Path:
    """Write a file (text or bytes) and return its path."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _csv(path: Path, rows: list[tuple[str, ...]], fields: tuple[str, ...] = ("text", "label")) -> Path:
    """A CSV with header ``fields`` from rows given as tuples."""
    return _write_rows(path, [dict(zip(fields, row, strict=True)) for row in rows], list(fields))


def _splice(raw: bytes, at: int, patch: bytes) -> bytes:
    """``raw`` with the bytes from ``at`` overwritten by ``patch``."""
    return raw[:at] + patch + raw[at + len(patch):]


def _truncated_parquet(d: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["good", "bad"] * 20, "label": ["positive", "negative"] * 20}), d / "t.parquet")
    return _put(d / "t.parquet", (d / "t.parquet").read_bytes()[: (d / "t.parquet").stat().st_size // 2])


def _edited_prompt(w: World, path: Path, *, metadata: bool) -> Path:
    """The good prompt re-saved with its metadata or its tensor changed and the old checksum kept."""
    tensor, meta = _prompt_parts(w)
    if metadata:
        meta["task"]["init_text"] = "edited"
    else:
        tensor = tensor + 0.01
    save_file({"prompt": tensor}, str(path), metadata={"post": json.dumps(meta)})
    return path


def _plain_safetensors(path: Path) -> Path:
    save_file({"weight": torch.zeros(2, 64)}, str(path))
    return path


# Each builder gets the shared world and a scratch folder, and returns the command (without --out).
Builder = Callable[[World, Path], list[str]]


class Case(NamedTuple):
    """One bad input: its id, a regex its one-line error must match, and the command that hits it."""

    name: str
    match: str
    build: Builder


CASES: list[Case] = [
    # data files
    Case("missing_file", "no such file", lambda w, d: _tune(w, task=d / "no-such-file.csv")),
    Case("empty_file", "is empty", lambda w, d: _tune(w, task=_put(d / "empty.csv", b""))),
    Case("header_only", "no data rows", lambda w, d: _tune(w, task=_put(d / "header.csv", "text,label\n"))),
    Case("truncated_jsonl", "line 2 is not valid JSON",
         lambda w, d: _tune(w, task=_put(d / "cut.jsonl", '{"text": "good", "label": "positive"}\n{"text": "ba'))),
    Case("truncated_parquet", "not a readable parquet file", lambda w, d: _tune(w, task=_truncated_parquet(d))),
    Case("not_json", "not valid JSON", lambda w, d: _tune(w, task=_put(d / "rows.json", '{"text": "good"'))),
    Case("unsupported_type", "unsupported file type",
         lambda w, d: _tune(w, task=_put(d / "data.xlsx", b"PK\x03\x04"))),
    Case("wrong_text_column", "no column 'review'", lambda w, d: _tune(w, "--text-column", "review")),
    Case("wrong_label_column", "no column 'stars'", lambda w, d: _tune(w, "--label-column", "stars")),
    Case("no_label_words", "have no label words; give them with --label-words",
         lambda w, d: [a for a in _tune(w) if a not in ("--label-words", LW)]),
    Case("label_without_words", "'positive' have no label words",
         lambda w, d: [*_tune(w), "--label-words", "negative=bad;neutral=meh"]),
    Case("class_without_words", "has no label words",
         lambda w, d: [*_tune(w), "--label-words", "negative=;positive=good"]),
    Case("one_class", "at least 2 classes", lambda w, d: [*_tune(w), "--label-words", "positive=good"]),
    Case("label_words_without_equals", "has no '='",
         lambda w, d: [*_tune(w), "--label-words", "negative bad; positive good"]),
    Case("label_word_not_in_vocabulary", "not in the tokenizer's vocabulary",
         lambda w, d: [*_tune(w, model=str(w.word_level)), "--label-words", "negative=bad;positive=zebra"]),
    Case("label_words_share_a_token", "start with the same token",
         lambda w, d: [*_tune(w), "--label-words", "negative=bad;positive=bad"]),
    Case("unlabelled_row", "has no label",
         lambda w, d: _tune(w, task=_csv(d / "u.csv", [("good", "positive"), ("bad", "")] * 5))),
    Case("too_few_rows", "too few rows",
         lambda w, d: _tune(w, task=_csv(d / "two.csv", [("good", "positive"), ("bad", "negative")]))),
    Case("bad_split_value", "has split 'holdout'",
         lambda w, d: _tune(w, task=_csv(d / "s.csv",
                                         [("good", "positive", "train"), ("bad", "negative", "holdout")] * 5,
                                         ("text", "label", "split")))),
    Case("non_utf8", "is not valid utf-8.*--encoding latin-1",
         lambda w, d: _tune(w, task=_put(d / "latin.csv",
                                         "text,label\ncaf\xe9 good,positive\nbad,negative\n".encode("latin-1") * 10))),
    Case("unknown_encoding", "unknown --encoding", lambda w, d: _tune(w, "--encoding", "klingon-8")),
    Case("long_text_and_long_template", "the template alone takes",
         lambda w, d: _tune(w, "--max-length", "8",
                            "--template", "{text} All in all, after some thought, it was {mask}.",
                            task=_csv(d / "long.csv", [("good " * 20_000, "positive"),
                                                         ("bad " * 20_000, "negative")] * 5))),
    # templates
    Case("template_without_text", r"\{text\} exactly once", lambda w, d: _tune(w, "--template", "It was {mask}.")),
    Case("template_without_mask", r"\{mask\} exactly once", lambda w, d: _tune(w, "--template", "{text} It was")),
    Case("template_mask_first", r"\{text\} before \{mask\}", lambda w, d: _tune(w, "--template", "{mask}: {text}")),
    Case("template_text_twice", r"\{text\} exactly once",
         lambda w, d: _tune(w, "--template", "{text} {text} It was {mask}.")),
    # prompt files
    Case("prompt_missing", "no prompt file", lambda w, d: _evaluate(w, d / "no-prompt.safetensors")),
    Case("prompt_for_other_weights", "fingerprint", lambda w, d: _evaluate(w, w.prompt, model=str(w.other_weights))),
    Case("prompt_for_other_width", "width 64.*width 32", lambda w, d: _evaluate(w, w.prompt, model=str(w.narrow))),
    Case("prompt_for_other_vocabulary", "512-token vocabulary.*600",
         lambda w, d: _evaluate(w, w.prompt, model=str(w.wide_vocab))),
    Case("prompt_for_other_tokenizer", "another tokenizer",
         lambda w, d: _evaluate(w, w.prompt, model=str(w.word_level))),
    Case("prompt_truncated", "truncated or corrupt",
         lambda w, d: _evaluate(w, _put(d / "cut.safetensors", w.prompt.read_bytes()[:-40]))),
    Case("prompt_random_bytes", "truncated or corrupt",
         lambda w, d: _evaluate(w, _put(d / "noise.safetensors", random.Random(1).randbytes(300)))),
    Case("prompt_header_corrupted", "truncated or corrupt",  # bytes inside the JSON header
         lambda w, d: _evaluate(w, _put(d / "header.safetensors", _splice(w.prompt.read_bytes(), 8, b"\xff" * 32)))),
    Case("prompt_metadata_edited", "fails its checksum",
         lambda w, d: _evaluate(w, _edited_prompt(w, d / "edited.safetensors", metadata=True))),
    Case("prompt_tensor_edited", "fails its checksum",
         lambda w, d: _evaluate(w, _edited_prompt(w, d / "retuned.safetensors", metadata=False))),
    Case("safetensors_not_a_prompt", "not a POST prompt file",
         lambda w, d: _evaluate(w, _plain_safetensors(d / "plain.safetensors"))),
    Case("prompt_for_other_classes", "tuned for classes",
         lambda w, d: ["evaluate", "--model", "tiny-llama",
                       "--task", str(_csv(d / "three.csv", [("good", "pos"), ("bad", "neg"), ("fine", "mid")] * 6)),
                       "--label-words", "neg=bad;mid=neutral;pos=good", "--prompt", str(w.prompt), "--device", "cpu"]),
    Case("transfer_with_corrupt_prompt", "truncated or corrupt",
         lambda w, d: _transfer(w, _put(d / "cut.safetensors", w.prompt.read_bytes()[: w.prompt.stat().st_size // 3]),
                                "--steps", "2", "--alpha", "0.5")),
    Case("transfer_without_alpha_inputs", "heuristic α needs",
         lambda w, d: _transfer(w, w.prompt, "--steps", "2", "--alpha-public", "none")),
    Case("transfer_with_unlabelled_alpha_data", "alpha",
         lambda w, d: _transfer(w, w.prompt, "--steps", "2", "--alpha-public", str(w.corpus))),
    # models
    Case("model_weights_truncated", "could not load", lambda w, d: _tune(w, model=str(w.truncated_weights))),
    Case("model_weights_pickled", "could not load", lambda w, d: _tune(w, model=str(w.pickled))),
    Case("model_dir_missing", "no model directory", lambda w, d: _tune(w, model="./no-such-model-dir")),
    Case("unknown_model_alias", "unknown model 'smollm9-135m'", lambda w, d: _tune(w, model="smollm9-135m")),
    Case("hub_id_offline", "hub access is off", lambda w, d: _tune(w, model="post-tests/no-such-model-anywhere")),
    # privacy settings
    Case("epsilon_zero", "--epsilon", lambda w, d: _tune(w, "--dp", "true", "--epsilon", "0")),
    Case("epsilon_negative", "--epsilon", lambda w, d: _tune(w, "--dp", "true", "--epsilon", "-3")),
    Case("delta_one", "--delta", lambda w, d: _tune(w, "--dp", "true", "--delta", "1")),
    Case("delta_not_below_one_over_n", "not below 1/N", lambda w, d: _tune(w, "--dp", "true", "--delta", "0.1")),
    Case("clip_zero", "--max-grad-norm", lambda w, d: _tune(w, "--dp", "true", "--max-grad-norm", "0")),
    Case("clip_negative", "--max-grad-norm", lambda w, d: _tune(w, "--dp", "true", "--max-grad-norm", "-1")),
    Case("sampling_rate_above_one", "sampling rate", lambda w, d: _tune(w, "--dp", "true", "--batch-size", "1000")),
    Case("accountant_finds_no_noise", "found no noise level",
         lambda w, d: _tune(w, "--dp", "true", "--epsilon", "0.0001", "--delta", "1e-12", "--accountant", "rdp")),
    Case("negative_noise", "--noise-multiplier", lambda w, d: _tune(w, "--dp", "true", "--noise-multiplier", "-1")),
    # options and config files
    Case("broken_yaml", "config",
         lambda w, d: [*_tune(w), "--config", str(_put(d / "c.yaml", "n_tokens: [1, 2\nlr: 0.1\n"))]),
    Case("unknown_yaml_key", "learning_rate_typo",
         lambda w, d: [*_tune(w), "--config", str(_put(d / "c.yaml", "n_tokens: 2\nlearning_rate_typo: 0.1\n"))]),
    Case("bad_dtype", "dtype", lambda w, d: _tune(w, "--dtype", "float64")),
    Case("bad_device", "--device", lambda w, d: _tune(w, "--device", "tpu")),
    Case("malformed_device", "--device", lambda w, d: _tune(w, "--device", "cuda:x")),
    Case("absent_gpu", "no cuda:7",  # no machine here has eight GPUs
         lambda w, d: [a if a != "cpu" else "cuda:7" for a in _tune(w)]),
    Case("max_length_too_small", "--max-length", lambda w, d: _tune(w, "--max-length", "4")),
    Case("bad_train_indices", "--train-indices",
         lambda w, d: _tune(w, "--train-indices", str(_put(d / "idx.json", "[0, 1, 99999]")))),
    # the run directory holds another run's settings (written by _prepare_out)
    Case("run_dir_of_other_settings", "other settings", lambda w, d: _tune(w, "--lr", "0.5")),
    # output (each fault is set up by _prepare_out)
    Case("unwritable_out", "cannot write to the output directory", lambda w, d: _tune(w)),
    Case("disk_full_at_checkpoint", "No space left on device", lambda w, d: _tune(w, "--checkpoint-every", "1")),
    Case("disk_full_at_metrics", "No space left on device", lambda w, d: _tune(w)),
    # training
    Case("nan_loss", "the loss became nan.*last good checkpoint",
         lambda w, d: _tune(w, "--lr", "1e30", "--epochs", "3", "--checkpoint-every", "1", model="tiny-gpt2")),
    Case("update_overflows", "overflowed.*last good checkpoint",
         lambda w, d: _tune(w, "--lr", "1e38", "--checkpoint-every", "1")),
    Case("distill_diverges", "distillation loss became.*last good checkpoint",
         lambda w, d: ["distill", "--teacher", "tiny-gpt2", "--keep-layers", "0", "--corpus", str(w.corpus),
                       "--block-size", "16", "--batch-size", "4", "--max-steps", "4", "--held-out", "2", "--lr", "1e30",
                       "--warmup", "0", "--checkpoint-every", "1", "--device", "cpu"]),
    Case("transfer_diverges", "transfer loss became nan.*last good checkpoint",
         lambda w, d: _transfer(w, w.prompt, "--steps", "4", "--batch-size", "4", "--alpha", "0.5", "--lr", "1e30",
                                "--checkpoint-every", "1", target="tiny-gpt2")),
    Case("distill_empty_corpus", "no non-empty texts", lambda w, d: _distill(w, corpus=_put(d / "empty.txt", "\n\n"))),
    Case("distill_corpus_too_short", "fewer than two blocks",
         lambda w, d: _distill(w, corpus=_put(d / "short.txt", "good film\n"))),
    Case("distill_layer_out_of_range", "--keep-layers",
         lambda w, d: [a if a != "0" else "7" for a in _distill(w)]),
    Case("attack_odd_shadows", "--shadows",
         lambda w, d: ["attack", "lira", "--model", "tiny-llama", "--task", str(w.data), "--label-words", LW,
                       "--shadows", "3", "--device", "cpu"]),
]
BY_NAME = {c.name: c for c in CASES}


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 25
    assert len(BY_NAME) == len(CASES)


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


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_exit_status_2(world, case, tmp_path, capsys, monkeypatch):
    argv = case.build(world, tmp_path)
    out = _prepare_out(case.name, tmp_path, world, monkeypatch)
    capsys.readouterr()
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("post: error: "), err
    assert re.search(case.match, lines[0]), lines[0]
    # Nothing a later run would take as a result: no result, no prompt, no half-written file.
    if out.exists():
        assert not (out / "result.json").exists()
        assert not (out / "prompt.safetensors").exists()
        assert not [p for p in out.rglob("*.part")], list(out.rglob("*"))
    if case.name in ("nan_loss", "distill_diverges", "transfer_diverges"):  # the last good checkpoint stays
        from safetensors.torch import load_file

        assert json.loads((out / "checkpoint.json").read_text())["step"] >= 1
        assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint.safetensors")).values())


def test_debug_shows_the_traceback(world, tmp_path):
    with pytest.raises(Exception, match="no such file"):
        main([*BY_NAME["missing_file"].build(world, tmp_path), "--out", str(tmp_path / "run"), "--debug"])


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
