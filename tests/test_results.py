"""Typed stage results: read back from real tiny runs, errors that name what is wrong, and frozenness."""

import dataclasses
import json

import pytest

from helpers import write_sentiment_csv
from post.errors import PostError
from post.evaluate import EvaluateConfig, evaluate
from post.results import (
    RESULT_TYPES,
    DistillResult,
    EvaluateResult,
    PromptInfo,
    StageResult,
    TransferResult,
    TuneResult,
    load_result,
    result_from_dict,
)
from post.rundir import read_result
from post.transfer import TransferConfig, transfer
from post.tune import TuneConfig, tune

LABEL_WORDS = "negative=bad;positive=good"


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """A tune, an evaluation of its prompt and a transfer of it, on tiny-llama, each a few steps; what each returned."""
    root = tmp_path_factory.mktemp("results")
    data = write_sentiment_csv(root / "d.csv", n=60)
    public = root / "public.txt"
    public.write_text("\n".join(["a good day", "bad service", "great flight", "awful delay"] * 5))
    ps = tune(TuneConfig(model="tiny-llama", task=str(data), label_words=LABEL_WORDS, n_tokens=4, max_steps=2,
                         batch_size=8, test=False), root / "tune")
    ev = evaluate(EvaluateConfig(model="tiny-llama", task=str(data), label_words=LABEL_WORDS, prompt=ps.prompt,
                                 limit=4), root / "evaluate")
    pt = transfer(TransferConfig(source_model="tiny-llama", prompt=ps.prompt, target_model="tiny-llama",
                                  public=str(public), steps=2, batch_size=4, alpha=0.0, device="cpu"),
                  root / "transfer")
    return root, {"tune": ps, "evaluate": ev, "transfer": pt}


@pytest.fixture(scope="module")
def runs(stage_runs):
    return stage_runs[0]


@pytest.mark.parametrize("kind", [TuneResult, EvaluateResult, TransferResult])
def test_a_stage_returns_the_result_its_directory_holds(stage_runs, kind):
    root, returned = stage_runs
    r = returned[kind.STAGE]
    assert type(r) is kind and r == kind.from_dir(root / kind.STAGE)


@pytest.mark.parametrize("kind", [TuneResult, EvaluateResult, TransferResult])
def test_a_real_run_reads_back_field_by_field(runs, kind):
    run = runs / kind.STAGE
    raw = read_result(run)
    r = kind.from_dir(run)
    assert type(load_result(run)) is kind and result_from_dict(raw) == r
    named = {f.name for f in dataclasses.fields(kind)} - {"extra"}
    for name in named & set(raw):
        value = getattr(r, name)
        assert (PromptInfo.from_dict(raw[name]) if isinstance(value, PromptInfo) else raw[name]) == value, name
    assert dict(r.extra) == {k: v for k, v in raw.items() if k not in named}  # nothing in the file is lost
    assert r.stage == kind.STAGE and r.seconds == raw["seconds"]


def test_attributes_the_readers_use(runs):
    ps, ev, pt = (TuneResult.from_dir(runs / "tune"), EvaluateResult.from_dir(runs / "evaluate"),
                  TransferResult.from_dir(runs / "transfer"))
    assert ps.prompt.endswith("prompt.safetensors") and ps.n_train > 0 and ps.dp is False and ps.test is None
    assert ev.prompt is not None and ev.prompt.path == ps.prompt and ev.prompt.method == "tuned"
    assert ev.split == "test" and ev.n == 4 and 0 <= ev.accuracy <= 1 and ev.method is None
    assert pt.alpha == 0.0 and pt.alpha_source == "given" and pt.steps == 2 and pt.prompt != ps.prompt


def test_a_missing_file_names_the_directory(tmp_path):
    with pytest.raises(PostError, match=r"is not a finished tune run directory \(no result.json\)") as e:
        TuneResult.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PostError, match="no result.json"):
        load_result(tmp_path / "nowhere")


def test_a_missing_field_is_named(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"stage": "tune", "model": "m", "task": "t", "dp": False,
                                                      "train_seconds": 1.0}))
    with pytest.raises(PostError, match="lacks prompt, n_train") as e:
        TuneResult.from_dir(tmp_path)
    assert str(tmp_path / "result.json") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PostError, match="lacks prompt, n_train"):
        load_result(tmp_path)  # picked by its stage, checked the same way
    with pytest.raises(PostError, match="the prompt lacks model"):
        EvaluateResult.from_dict({"stage": "evaluate", "model": "m", "task": "t", "split": "test", "accuracy": 0.5,
                                  "prompt": {"path": "p"}})


def test_another_stage_or_no_object_is_refused(tmp_path):
    with pytest.raises(PostError, match="is a 'evaluate' result, not a distill result"):
        DistillResult.from_dict({"stage": "evaluate"})
    (tmp_path / "result.json").write_text("[1, 2]")
    with pytest.raises(PostError, match="not a result"):
        StageResult.from_dir(tmp_path)


def test_other_stages_read_as_plain_results():
    r = result_from_dict({"stage": "a-stage-without-a-type", "seconds": 1.5, "cells": 3})
    assert type(r) is StageResult and r.seconds == 1.5 and r.extra["cells"] == 3
    assert set(RESULT_TYPES) == {"distill", "student", "tune", "transfer", "zst", "evaluate", "attack-lira",
                                 "reconstruct", "attack-canary", "table", "export-peft", "choose-template"}


def test_results_are_frozen():
    r = EvaluateResult.from_dict({"stage": "evaluate", "model": "m", "task": "t", "split": "test", "accuracy": 0.5,
                                  "prompt": {"model": "m", "method": "tuned"}, "macro_f1": 0.4,
                                  "per_class_accuracy": {"negative": 0.5}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.accuracy = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.prompt.method = "post"
    with pytest.raises(TypeError):
        r.extra["per_class_accuracy"] = {}  # the keys no field names are read-only too
