"""Distillation on tiny teachers: loss terms, figures, resume, and 1 vs 2 processes."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from post.distill import DistillConfig, distill, distill_losses, pack_blocks
from post.errors import ConfigError, PostError
from post.models import tiny_model

WORDS = ("the film was a good movie and the plot was bad but it is great to see this amazing story with awful "
         "acting").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)))
    return path


def config(corpus, **kw):
    base = dict(teacher="tiny-llama", keep_layers="0", corpus=str(corpus), block_size=32, batch_size=8,
                max_steps=30, lr=1e-3, held_out=8, checkpoint_every=10, log_every=5, device="cpu")
    return DistillConfig(**{**base, **kw})


def test_pack_blocks_cuts_full_blocks():
    tok = tiny_model("llama").tokenizer
    blocks = pack_blocks(["a good film"] * 50, tok, 16)
    assert blocks.shape[1] == 16 and blocks.shape[0] >= 2
    assert (blocks == tok.eos_token_id).any()  # documents are separated
    with pytest.raises(PostError, match="fewer than two blocks"):
        pack_blocks(["a"], tok, 16)


def test_loss_terms_vanish_for_a_copy_of_the_teacher():
    teacher = tiny_model("llama").model
    ids = torch.randint(5, 500, (2, 16))
    cfg = DistillConfig(teacher="x")
    terms = distill_losses(teacher, teacher, ids, kind="causal", cfg=cfg)
    assert terms["ce"].item() == pytest.approx(0.0, abs=1e-5)
    assert terms["cos"].item() == pytest.approx(0.0, abs=1e-5)
    assert terms["lm"].item() > 0
    assert terms["loss"].item() == pytest.approx(2.0 * terms["lm"].item(), rel=1e-4)


def test_kl_only_distillation_moves_the_student_toward_the_teacher(corpus, tmp_path):
    r = distill(config(corpus, alpha_lm=0.0, alpha_cos=0.0, max_steps=40, lr=3e-3), tmp_path)
    assert r["distilled_quality"]["kl_to_teacher"] < 0.7 * r["undistilled_quality"]["kl_to_teacher"]
    for name in ("config.yaml", "metrics.jsonl", "result.json"):
        assert (tmp_path / name).is_file()
    student = AutoModelForCausalLM.from_pretrained(r["student_dir"])  # an ordinary HF model directory
    assert student.config.num_hidden_layers == 1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert {"ce", "lm", "cos", "loss", "lr"} <= set(lines[0])


def test_frozen_embeddings_and_head_stay_the_teachers(corpus, tmp_path):
    r = distill(config(corpus, max_steps=5), tmp_path)
    teacher = tiny_model("llama").model
    student = AutoModelForCausalLM.from_pretrained(r["student_dir"])
    torch.testing.assert_close(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert r["trainable_params"] < r["student_params"]


def test_masked_lm_distillation(corpus, tmp_path):
    r = distill(config(corpus, teacher="tiny-roberta", max_steps=10), tmp_path)
    assert r["distilled_quality"]["perplexity"] > 1
    assert AutoModelForMaskedLM.from_pretrained(r["student_dir"]).config.num_hidden_layers == 1


def test_killed_run_resumes_to_the_same_student(corpus, tmp_path, monkeypatch):
    full = distill(config(corpus), tmp_path / "full")
    import post.distill as d

    original = d.distill_losses
    calls = {"n": 0}

    def dies_at_step_23(*a, **k):
        calls["n"] += 1
        if calls["n"] == 23:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(d, "distill_losses", dies_at_step_23)
    with pytest.raises(KeyboardInterrupt):
        distill(config(corpus), tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())["step"] == 20
    monkeypatch.setattr(d, "distill_losses", original)
    resumed = distill(config(corpus), tmp_path / "resumed")
    a = load_file(os.path.join(full["student_dir"], "model.safetensors"))
    b = load_file(os.path.join(resumed["student_dir"], "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["distilled_quality"] == full["distilled_quality"]
    assert distill(config(corpus), tmp_path / "resumed") == resumed  # a finished run is not redone


def test_two_processes_match_one(corpus, tmp_path):
    one = distill(config(corpus, max_steps=20), tmp_path / "one")
    args = ["--teacher", "tiny-llama", "--keep-layers", "0", "--corpus", str(corpus), "--block-size", "32",
            "--batch-size", "8", "--max-steps", "20", "--lr", "1e-3", "--held-out", "8", "--checkpoint-every", "10",
            "--log-every", "5", "--device", "cpu", "--out", str(tmp_path / "two")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "post", "distill", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    for key in ("perplexity", "kl_to_teacher"):
        assert two["distilled_quality"][key] == pytest.approx(one["distilled_quality"][key], rel=1e-4)
    a = load_file(os.path.join(one["student_dir"], "model.safetensors"))
    b = load_file(os.path.join(two["student_dir"], "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_bad_distill_options():
    with pytest.raises(ConfigError, match="--max-steps"):
        DistillConfig(teacher="x", max_steps=0)
    with pytest.raises(ConfigError, match="--alpha-ce"):
        DistillConfig(teacher="x", alpha_ce=0, alpha_lm=0, alpha_cos=0)
