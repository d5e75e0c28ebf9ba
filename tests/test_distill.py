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

from helpers import launch_failure
from post.distill import (
    DistillConfig,
    answer_kl,
    answer_positions,
    answer_token_ids,
    distill,
    distill_losses,
    hidden_matching,
    pack_blocks,
)
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


def test_hidden_matching_pairs_each_kept_layer_with_the_next_kept_input():
    g = torch.Generator().manual_seed(0)
    teacher_states = tuple(torch.randn(2, 3, 4, generator=g) for _ in range(6))  # 5 layers: inputs 0..4, final
    student_states = tuple(torch.randn(2, 3, 4, generator=g) for _ in range(3))  # kept 1 and 3

    def rel(a, b):
        return float((((a - b) ** 2).sum(-1) / (b**2).sum(-1)).mean())

    want = (rel(student_states[1], teacher_states[3]) + rel(student_states[2], teacher_states[5])) / 2
    assert hidden_matching(student_states, teacher_states, [1, 3]).item() == pytest.approx(want, rel=1e-6)
    # A student whose outputs are the teacher's states at those places matches exactly.
    exact = (student_states[0], teacher_states[3], teacher_states[5])
    assert hidden_matching(exact, teacher_states, [1, 3]).item() == 0.0
    with pytest.raises(ValueError):  # one kept layer too many for the student's states
        hidden_matching(student_states, teacher_states, [0, 1, 3])


def test_hidden_term_vanishes_for_a_copy_of_the_teacher_and_is_logged_only_when_weighted():
    teacher = tiny_model("llama").model
    ids = torch.randint(5, 500, (2, 16))
    keep = list(range(teacher.config.num_hidden_layers))
    terms = distill_losses(teacher, teacher, ids, kind="causal", cfg=DistillConfig(teacher="x", alpha_hidden=1.0),
                           keep=keep)
    assert terms["hidden"].item() == pytest.approx(0.0, abs=1e-6)
    assert "hidden" not in distill_losses(teacher, teacher, ids, kind="causal", cfg=DistillConfig(teacher="x"))


def test_hidden_only_distillation_skips_the_heads_and_moves_the_student(corpus, tmp_path, monkeypatch):
    calls = []
    real = torch.nn.Linear.forward

    def spy(self, x):
        if self.out_features == tiny_model("llama").model.config.vocab_size:
            calls.append(x.shape)
        return real(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    cfg = config(corpus, alpha_ce=0.0, alpha_lm=0.0, alpha_cos=0.0, alpha_hidden=1.0, max_steps=40, lr=3e-3,
                 checkpoint_every=100)
    n_quality = 3 * 2  # undistilled, teacher and distilled quality: two models each, one held-out batch
    r = distill(cfg, tmp_path)
    assert len(calls) == n_quality  # no vocabulary projection in the 40 training steps
    assert r.distilled_quality["kl_to_teacher"] < 0.7 * r.undistilled_quality["kl_to_teacher"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"hidden", "cos", "loss"} <= set(lines[0]) and not {"ce", "lm"} & set(lines[0])
    assert lines[-1]["hidden"] < 0.5 * lines[0]["hidden"]


def test_answer_positions_are_where_templated_texts_end():
    tok = tiny_model("llama").tokenizer
    eos = tok.eos_token_id
    ids = torch.tensor([[5, 6, eos, 7, 8, 9, eos, 10]])
    assert answer_positions(ids, tok).tolist() == [[False, True, False, False, False, True, False, False]]


def test_answer_kl_is_the_kl_of_the_head_at_marked_positions_only():
    teacher = tiny_model("llama").model
    student = tiny_model("llama", seed=1).model
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(2, 5, student.config.hidden_size, generator=g)
    h_t = torch.randn(2, 5, teacher.config.hidden_size, generator=g)
    marks = torch.zeros(2, 5, dtype=torch.bool)
    marks[0, 2] = marks[1, 4] = True
    got = answer_kl(student, teacher, h_s, h_t, marks, temperature=2.0)
    s_logp = torch.log_softmax(student.get_output_embeddings()(h_s[marks]) / 2, -1)
    t_logp = torch.log_softmax(teacher.get_output_embeddings()(h_t[marks]) / 2, -1)
    want = 4 * (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert answer_kl(teacher, teacher, h_t, h_t, marks, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert answer_kl(student, teacher, h_s, h_t, torch.zeros_like(marks), temperature=2.0).item() == 0.0
    # Over two tokens only: the renormalised distributions of those two. (Student states scaled up so that
    # the KL is far from zero and float32 rounding stays below the tolerance; the reference is float64.)
    ids, h_far = [3, 7], 8 * h_s
    got = answer_kl(student, teacher, h_far, h_t, marks, temperature=2.0, token_ids=torch.tensor(ids))
    w_s, w_t = (m.get_output_embeddings().weight.double()[ids] for m in (student, teacher))
    s_logp = torch.log_softmax(h_far[marks].double() @ w_s.T / 2, -1)
    t_logp = torch.log_softmax(h_t[marks].double() @ w_t.T / 2, -1)
    assert got.item() == pytest.approx(4 * (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean().item(), rel=1e-5)


def test_answer_words_are_first_tokens_and_must_differ():
    tok = tiny_model("llama").tokenizer
    ids = answer_token_ids(" bad; good", tok)
    assert ids == [tok(w, add_special_tokens=False)["input_ids"][0] for w in (" bad", " good")]
    with pytest.raises(PostError, match="same token"):
        answer_token_ids(" bad; bad", tok)
    with pytest.raises(ConfigError, match="answer_words|answer-words"):
        DistillConfig(teacher="x", answer_words=" bad; good")  # without --alpha-answer


def test_answer_distillation_needs_a_template_and_a_causal_teacher(corpus, tmp_path):
    with pytest.raises(ConfigError, match="corpus-template"):
        config(corpus, alpha_answer=1.0)
    with pytest.raises(PostError, match="masked LM"):
        distill(config(corpus, teacher="tiny-roberta", alpha_answer=1.0, corpus_template="{text} is {mask}"), tmp_path)


def test_answer_distillation_moves_the_answer_distribution(corpus, tmp_path):
    cfg = config(corpus, alpha_ce=0.0, alpha_lm=0.0, alpha_cos=0.0, alpha_answer=1.0,
                 corpus_template="{text} so {mask}", max_steps=40, lr=3e-3, checkpoint_every=100)
    distill(cfg, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "answer" in lines[0] and lines[-1]["answer"] < 0.5 * lines[0]["answer"]


def test_answer_task_frames_the_corpus_as_its_template_and_label_words(corpus, tmp_path):
    from post.data import default_task

    task = default_task("sst2")  # its label words start with distinct tokens in the tiny model's vocabulary
    words = [w for ws in task.label_words.values() for w in ws]
    cfg = DistillConfig(teacher="x", alpha_answer=1.0, answer_task="sst2")
    assert cfg.effective_template == task.template and cfg.effective_answer_words.split(";") == words
    assert config(corpus).effective_template is None and config(corpus).effective_answer_words is None
    kw = dict(alpha_ce=0.0, alpha_lm=0.0, alpha_cos=0.0, alpha_answer=1.0, max_steps=5, log_every=1,
              checkpoint_every=100)

    def answers(name, **options):
        distill(config(corpus, **kw, **options), tmp_path / name)
        return [json.loads(x)["answer"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    by_task = answers("task", answer_task="sst2")
    assert by_task == answers("spelled", corpus_template=task.template, answer_words=";".join(words))
    assert by_task != answers("other", corpus_template="{text} so {mask}", answer_words=";".join(words))


@pytest.mark.parametrize("options, match", [
    (dict(alpha_answer=1.0, answer_task="mr", corpus_template="{text} so {mask}"), "answer.task"),
    (dict(alpha_answer=1.0, answer_task="mr", answer_words=" bad; good"), "answer.task"),
    (dict(answer_task="mr"), "alpha-answer"),
    (dict(alpha_answer=1.0, answer_task="nonesuch"), "built-in task"),
])
def test_answer_task_refuses_what_it_cannot_mean(options, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(teacher="x", **options)


def test_kl_only_distillation_moves_the_student_toward_the_teacher(corpus, tmp_path):
    r = distill(config(corpus, alpha_lm=0.0, alpha_cos=0.0, max_steps=40, lr=3e-3), tmp_path)
    assert r.distilled_quality["kl_to_teacher"] < 0.7 * r.undistilled_quality["kl_to_teacher"]
    for name in ("config.yaml", "metrics.jsonl", "result.json"):
        assert (tmp_path / name).is_file()
    student = AutoModelForCausalLM.from_pretrained(r.student_dir)  # an ordinary HF model directory
    assert student.config.num_hidden_layers == 1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert {"ce", "lm", "cos", "loss", "lr"} <= set(lines[0])


def test_frozen_embeddings_and_head_stay_the_teachers(corpus, tmp_path):
    r = distill(config(corpus, max_steps=5), tmp_path)
    teacher = tiny_model("llama").model
    student = AutoModelForCausalLM.from_pretrained(r.student_dir)
    torch.testing.assert_close(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert r.trainable_params < r.student_params


def test_masked_lm_distillation(corpus, tmp_path):
    r = distill(config(corpus, teacher="tiny-roberta", max_steps=10), tmp_path)
    assert r.distilled_quality["perplexity"] > 1
    assert AutoModelForMaskedLM.from_pretrained(r.student_dir).config.num_hidden_layers == 1


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
    a = load_file(os.path.join(full.student_dir, "model.safetensors"))
    b = load_file(os.path.join(resumed.student_dir, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.distilled_quality == full.distilled_quality
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
    assert proc.returncode == 0, launch_failure(proc)
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["processes"] == 2 and one.processes == 1
    for key in ("perplexity", "kl_to_teacher"):
        assert two["distilled_quality"][key] == pytest.approx(one.distilled_quality[key], rel=1e-4)
    a = load_file(os.path.join(one.student_dir, "model.safetensors"))
    b = load_file(os.path.join(two["student_dir"], "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_bad_distill_options():
    with pytest.raises(ConfigError, match="--max-steps"):
        DistillConfig(teacher="x", max_steps=0)
    with pytest.raises(ConfigError, match="--alpha-ce"):
        DistillConfig(teacher="x", alpha_ce=0, alpha_lm=0, alpha_cos=0)


def test_held_out_curve_is_measured_every_n_steps_and_ends_at_the_final_quality(corpus, tmp_path):
    r = distill(config(corpus, alpha_lm=0.0, alpha_cos=0.0, max_steps=30, lr=3e-3, eval_every=10), tmp_path)
    assert [p["step"] for p in r.held_out_curve] == [10, 20, 30]
    assert r.held_out_curve[-1]["kl_to_teacher"] == pytest.approx(r.distilled_quality["kl_to_teacher"], rel=1e-5)
    assert r.held_out_curve[0]["kl_to_teacher"] < r.undistilled_quality["kl_to_teacher"]
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if "held_out_kl_to_teacher" in x] == [10, 20, 30]
    assert distill(config(corpus, max_steps=5), tmp_path / "plain").held_out_curve == []


def test_time_limit_stops_early_and_reports_the_steps_taken(corpus, tmp_path, monkeypatch):
    import post.distill as d

    clock = {"t": 0.0}

    def fake_clock():  # each call advances 10 s: the limit of 1 minute is passed within a few steps
        clock["t"] += 10.0
        return clock["t"]

    monkeypatch.setattr(d.time, "perf_counter", fake_clock)
    r = distill(config(corpus, max_steps=30, max_minutes=1.0, eval_every=100), tmp_path)
    assert 1 <= r.steps < 30 and r.planned_steps == 30
    assert r.tokens_seen == r.steps * 8 * 32
    assert [p["step"] for p in r.held_out_curve] == [r.steps]  # the stopping step is measured too
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == r.steps
    assert "planned: time limit" in d.summarize(r)
    assert (tmp_path / "student" / "model.safetensors").is_file()


def test_bf16_mixed_precision_runs_the_losses_in_bf16_and_keeps_fp32_weights(corpus, tmp_path):
    fp32 = distill(config(corpus, max_steps=4, log_every=1), tmp_path / "fp32")
    bf16 = distill(config(corpus, max_steps=4, log_every=1, mixed_precision="bf16"), tmp_path / "bf16")
    assert bf16.mixed_precision == "bf16" and fp32.mixed_precision == "no"
    first = [json.loads((tmp_path / m / "metrics.jsonl").read_text().splitlines()[0]) for m in ("fp32", "bf16")]
    assert first[0]["loss"] != first[1]["loss"]  # the forwards ran in bf16 ...
    assert first[1]["loss"] == pytest.approx(first[0]["loss"], rel=0.05)  # ... and compute the same losses
    weights = load_file(os.path.join(bf16.student_dir, "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_bad_time_and_curve_options():
    with pytest.raises(ConfigError, match="--eval-every"):
        DistillConfig(teacher="x", eval_every=0)
    with pytest.raises(ConfigError, match="--max-minutes"):
        DistillConfig(teacher="x", max_minutes=0)
    with pytest.raises(ConfigError, match="--mixed-precision"):
        DistillConfig(teacher="x", mixed_precision="fp8")


def test_prompted_term_vanishes_for_a_copy_of_the_teacher_and_draws_prompts_from_seed_and_step(corpus):
    from post.distill import PromptedAnswers

    cfg = config(corpus, keep_layers="0,1", alpha_prompted=1.0, prompted_task="mr", prompted_tokens=3)
    teacher = tiny_model("llama")
    prompted = PromptedAnswers(cfg, teacher, ["a good film", "a bad plot", "great acting", "awful story"] * 4)
    assert float(prompted.term(teacher.model, teacher.model, 0)) == pytest.approx(0.0, abs=1e-6)
    idx, prompts = prompted.batch(3)
    again = prompted.batch(3)
    assert torch.equal(idx, again[0]) and torch.equal(prompts, again[1])
    assert prompts.shape == (8, 3, prompted.init.shape[1]) and not torch.equal(prompts, prompted.batch(4)[1])
    # every prompt is the init-text prompt plus noise, or rows of the vocabulary
    rows = prompted.rows
    for p in prompts:
        is_vocab = all(bool((rows == r).all(-1).any()) for r in p)
        assert is_vocab or (p - prompted.init).abs().max() <= 2.0 * prompted.rms * 6


def test_prompted_distillation_moves_the_prompted_answers_toward_the_teacher(corpus, tmp_path):
    cfg = config(corpus, alpha_ce=0.0, alpha_lm=0.0, alpha_cos=0.0, alpha_prompted=1.0, prompted_task="mr",
                 prompted_tokens=4, max_steps=40, lr=3e-3, log_every=1, checkpoint_every=100)
    r = distill(cfg, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(x["prompted"] for x in lines[:5]) / 5, sum(x["prompted"] for x in lines[-5:]) / 5
    assert last < 0.5 * first
    assert r.tokens_seen == 0 and r.prompted_texts == 40 * 8  # the block terms are off: no block was run
    assert "cos" not in lines[0]


def test_init_student_continues_from_a_student_and_checks_it(corpus, tmp_path):
    first = distill(config(corpus, max_steps=10), tmp_path / "first")
    again = distill(config(corpus, max_steps=5, init_student=first.student_dir), tmp_path / "again")
    assert again.undistilled_quality == pytest.approx(first.distilled_quality, rel=1e-5)
    with pytest.raises(PostError, match="layers, not the 2 of --keep-layers"):
        distill(config(corpus, keep_layers="0,1", max_steps=5, init_student=first.student_dir), tmp_path / "bad")


def test_bad_prompted_options():
    with pytest.raises(ConfigError, match="--prompted-task"):
        DistillConfig(teacher="x", alpha_prompted=1.0)
    with pytest.raises(ConfigError, match="not a built-in task"):
        DistillConfig(teacher="x", alpha_prompted=1.0, prompted_task="nonesuch")
    with pytest.raises(ConfigError, match="--prompted-tokens"):
        DistillConfig(teacher="x", alpha_prompted=1.0, prompted_task="mr", prompted_tokens=0)
