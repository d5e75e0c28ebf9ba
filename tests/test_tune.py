"""Prompt tuning end to end on a tiny model: learning, DP noise, determinism, resume, prompt files."""

import json

import numpy as np
import pytest
import torch
import yaml

from helpers import write_sentiment_csv
from post.accounting import PrivacyLedger
from post.cli import main
from post.errors import PostError
from post.models import tiny_model
from post.prompt import load_prompt, read_prompt
from post.tune import PromptTrainer, TuneConfig, tune

LABEL_WORDS = "negative=bad;positive=good"


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "sentiment.csv")


def config(data_csv, **kw):
    base = dict(model="tiny-llama", task=str(data_csv), label_words=LABEL_WORDS, n_tokens=4, epochs=5,
                batch_size=8, lr=0.1, eval_every=1000, checkpoint_every=7)
    return TuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def nonprivate(data_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("np")
    return out, tune(config(data_csv), out)


def test_nonprivate_prompt_learns(nonprivate):
    out, result = nonprivate
    assert result.validation_curve[0]["val_accuracy"] <= 0.6  # zero-shot starts near chance
    assert result.test_accuracy >= 0.9
    assert result.privacy is None and not (out / "privacy.json").exists()
    for name in ("config.yaml", "metrics.jsonl", "result.json", "prompt.safetensors"):
        assert (out / name).is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in x for x in lines) == result.steps


def test_enormous_noise_drowns_the_data(data_csv, tmp_path):
    """At σ = 1e4 the released prompt is noise: flipping every label moves it far less than new noise does.

    (An accuracy threshold would be a coin toss here: with secret noise a random prompt can score
    anything on a small test split.)
    """
    flipped = tmp_path / "flipped.csv"
    rows = data_csv.read_text().splitlines()
    swap = {"positive": "negative", "negative": "positive"}
    body = [r.rsplit(",", 1)[0] + "," + swap[r.rsplit(",", 1)[1]] for r in rows[1:]]
    flipped.write_text("\n".join([rows[0], *body]) + "\n")
    kw = dict(dp=True, noise_multiplier=1e4, max_grad_norm=1.0, epochs=1)
    a = tune(config(data_csv, dp_seed=3, **kw), tmp_path / "a")
    b = tune(config(flipped, dp_seed=3, **kw), tmp_path / "b")
    c = tune(config(data_csv, dp_seed=4, **kw), tmp_path / "c")
    pa, pb, pc = (read_prompt(r.prompt).tensor for r in (a, b, c))
    assert not torch.equal(pa, pb)  # the data does reach the prompt ...
    assert (pa - pb).norm() < 1e-3 * (pa - pc).norm()  # ... but the noise swamps it
    assert a.privacy["noise_multiplier"] == 1e4
    assert a.epsilon < 0.01


def test_dp_run_writes_a_ledger_that_recomputes(data_csv, tmp_path):
    result = tune(config(data_csv, dp=True, epsilon=8.0, epochs=2, accountant="rdp"), tmp_path)
    ledger = PrivacyLedger.from_dict(json.loads((tmp_path / "privacy.json").read_text()))
    assert ledger.steps == ledger.planned_steps == result.steps
    assert ledger.epsilon == pytest.approx(8.0, abs=0.01) and ledger.epsilon <= 8.0 + 1e-9
    assert ledger.delta <= 0.1 / result.n_train  # δ ≪ 1/N by default
    assert ledger.recompute_epsilon() == pytest.approx(result.epsilon)
    assert ledger.randomness == "secret"
    pf = read_prompt(tmp_path / "prompt.safetensors")
    assert pf.meta["privacy"] == ledger.public() and "dataset_size" not in pf.meta["privacy"]
    assert PrivacyLedger.from_dict(pf.meta["privacy"]).epsilon == ledger.epsilon  # the provider can recompute ε


def test_dp_runs_log_no_loss_or_batch_size(data_csv, tmp_path):
    tune(config(data_csv, dp=True, noise_multiplier=1.0, epochs=1), tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines and not any("loss" in x or "batch" in x for x in lines)


def test_default_dp_runs_on_identical_inputs_give_different_prompts(data_csv, tmp_path):
    """The DP noise is secret: re-running the public code on the same data does not replay it."""
    kw = dict(dp=True, noise_multiplier=1.0, epochs=1)
    a = tune(config(data_csv, **kw), tmp_path / "a")
    b = tune(config(data_csv, **kw), tmp_path / "b")
    assert not torch.allclose(read_prompt(a.prompt).tensor, read_prompt(b.prompt).tensor)


def test_explicit_dp_seed_replays_and_says_the_guarantee_does_not_hold_against_its_holder(data_csv, tmp_path):
    kw = dict(dp=True, noise_multiplier=1.0, epochs=1)
    a = tune(config(data_csv, dp_seed=5, **kw), tmp_path / "a")
    b = tune(config(data_csv, dp_seed=5, **kw), tmp_path / "b")
    c = tune(config(data_csv, dp_seed=6, **kw), tmp_path / "c")
    pa, pb, pc = (read_prompt(r.prompt).tensor for r in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.allclose(pa, pc)
    ledger = PrivacyLedger.from_dict(read_prompt(a.prompt).meta["privacy"])
    assert ledger.randomness == "seeded" and not ledger.holds_against_seed_holders


def test_secure_mode_runs_and_is_not_replayable(data_csv, tmp_path):
    kw = dict(dp=True, noise_multiplier=1.0, epochs=1, secure_mode=True)
    a = tune(config(data_csv, **kw), tmp_path / "a")
    b = tune(config(data_csv, **kw), tmp_path / "b")
    assert not torch.allclose(read_prompt(a.prompt).tensor, read_prompt(b.prompt).tensor)
    assert read_prompt(a.prompt).meta["privacy"]["randomness"] == "secure"
    with pytest.raises(PostError, match="dp_seed|dp-seed"):
        config(data_csv, secure_mode=True, dp_seed=1, dp=True)


def _secret_seed(run_dir):
    """The secret DP seed a run keeps in its private checkpoint."""
    from safetensors.torch import load_file

    from post.tune import _secret_from

    return _secret_from(load_file(str(run_dir / "checkpoint.safetensors"))["t.dp_secret"])


@pytest.mark.parametrize("dp", [False, True])
def test_killed_run_resumes_to_the_same_prompt(data_csv, tmp_path, monkeypatch, dp):
    """A killed default DP run resumes with the secret seed from its checkpoint: the prompt is exactly the one
    an uninterrupted run with that seed gives."""
    kw = dict(dp=dp, noise_multiplier=0.5 if dp else None, epochs=2)
    method = "dp_gradient" if dp else "mean_gradient"
    original = getattr(PromptTrainer, method)
    calls = {"n": 0}

    def dies_at_step_17(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 17:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(PromptTrainer, method, dies_at_step_17)
    with pytest.raises(KeyboardInterrupt):
        tune(config(data_csv, **kw), tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())["step"] == 14
    assert not (tmp_path / "resumed" / "result.json").exists()
    monkeypatch.setattr(PromptTrainer, method, original)
    twin = dict(dp_seed=_secret_seed(tmp_path / "resumed")) if dp else {}
    full = tune(config(data_csv, **kw, **twin), tmp_path / "full")
    resumed = tune(config(data_csv, **kw), tmp_path / "resumed")
    assert torch.equal(read_prompt(full.prompt).tensor, read_prompt(resumed.prompt).tensor)
    assert resumed.epsilon == full.epsilon


def test_prompt_file_holds_no_seed_private_accuracy_path_or_n(data_csv, tmp_path):
    """Every byte of a DP prompt file's metadata is in the 'what leaves the user' list."""
    from safetensors import safe_open

    from post.prompt import LEAVES_USER, LEDGER_KEYS, MODEL_KEYS, TASK_KEYS

    out = tmp_path / "run"
    tune(config(data_csv, dp=True, noise_multiplier=1.0, epochs=1), out)
    with safe_open(str(out / "prompt.safetensors"), framework="pt") as f:
        header = f.metadata()
    assert set(header) == {"post"}
    raw = header["post"]
    meta = json.loads(raw)
    assert set(meta) <= set(LEAVES_USER)
    assert set(meta["model"]) <= MODEL_KEYS and set(meta["task"]) <= TASK_KEYS
    assert set(meta["privacy"]) <= LEDGER_KEYS
    secret = _secret_seed(out)
    assert str(secret) not in raw and str(secret) not in (out / "result.json").read_text()
    assert str(secret) not in (out / "metrics.jsonl").read_text()
    assert str(tmp_path) not in raw and str(data_csv) not in raw and "sentiment.csv" not in raw
    for key in ("val_accuracy", "test_accuracy", "accuracy", "measured", "dataset_size", "n_train", "seed"):
        assert key not in raw


def test_a_prompt_file_with_extra_fields_is_refused_on_write_and_read(data_csv, tmp_path):
    from post.prompt import check_leaves_user

    with pytest.raises(PostError, match="must not leave the user"):
        check_leaves_user({"format": "x", "measured": {"val_accuracy": 0.8}})
    with pytest.raises(PostError, match="must not leave the user"):
        check_leaves_user({"privacy": {"dataset_size": 3200}})
    with pytest.raises(PostError, match="local path"):
        check_leaves_user({"model": {"name": "/home/me/runs/student"}})


def test_finished_run_is_not_redone_and_other_settings_are_refused(nonprivate, data_csv):
    out, result = nonprivate
    mtime = (out / "prompt.safetensors").stat().st_mtime_ns
    assert tune(config(data_csv), out) == result
    assert (out / "prompt.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(PostError, match="other settings"):
        tune(config(data_csv, lr=0.5), out)


def test_a_run_saved_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """A config.yaml written before a field was added matches that field's default, and nothing else."""
    import yaml

    from post.rundir import RunDir
    from post.transfer import TransferConfig

    cfg = TransferConfig(source_model="s", prompt=tmp_path / "p", target_model="t", alpha=1.0)
    RunDir(tmp_path / "run", stage="transfer", config=cfg)
    saved = tmp_path / "run" / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["loss"]  # as a version without --loss wrote it
    saved.write_text(yaml.safe_dump(old))
    RunDir(tmp_path / "run", stage="transfer", config=cfg)
    with pytest.raises(PostError, match=r"changed: alpha, loss, mode\)"):
        RunDir(tmp_path / "run", stage="transfer",
               config=TransferConfig(source_model="s", prompt=tmp_path / "p", target_model="t", mode="label-words",
                                     loss="proxy-labels"))
    with pytest.raises(PostError, match="changed: lr"):
        RunDir(tmp_path / "run", stage="transfer", config=TransferConfig(
            source_model="s", prompt=tmp_path / "p", target_model="t", alpha=1.0, lr=0.5))


def test_micro_batches_accumulate_to_the_same_gradients(data_csv):
    loaded = tiny_model("llama")
    from post.data import load_labelled
    from post.prompt import init_prompt
    from post.scoring import Encoder
    from post.tasks import Verbalizer

    d = load_labelled(str(data_csv), label_words=LABEL_WORDS)
    split = d.split("train")
    enc, verb = Encoder(d.task, loaded.tokenizer, "causal", 32), Verbalizer.build(d.task, loaded.tokenizer)
    prompt = init_prompt(loaded, 4, init_text=d.task.init_text)
    idx = torch.arange(13)
    big = PromptTrainer(loaded, enc, verb, split.texts, split.labels, micro_batch_size=32)
    small = PromptTrainer(loaded, enc, verb, split.texts, split.labels, micro_batch_size=3)
    torch.testing.assert_close(big.mean_gradient(prompt, idx)[0], small.mean_gradient(prompt, idx)[0])
    torch.testing.assert_close(big.clipped_sum(prompt, idx, 0.1)[0], small.clipped_sum(prompt, idx, 0.1)[0])
    empty = torch.zeros(0, dtype=torch.long)  # an empty Poisson sample still yields a (zero) sum
    summed, loss, norms = big.clipped_sum(prompt, empty, 1.0)
    assert torch.equal(summed, torch.zeros_like(prompt)) and loss == 0.0 and len(norms) == 0


def test_prompt_file_refuses_edits_other_models_and_garbage(nonprivate, tmp_path):
    out, _ = nonprivate
    path = out / "prompt.safetensors"
    llama = tiny_model("llama")
    pf = load_prompt(path, llama)
    assert pf.n_tokens == 4 and pf.task.class_names == ("negative", "positive")
    narrow = tiny_model("llama")
    narrow.model.set_input_embeddings(torch.nn.Embedding(512, 32))
    with pytest.raises(PostError, match="width"):
        load_prompt(path, narrow)
    with pytest.raises(PostError, match="fingerprint"):
        load_prompt(path, tiny_model("llama", seed=1))  # same shape, other weights
    raw = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PostError, match="truncated|corrupt"):
        read_prompt(tmp_path / "truncated.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["post"])
        tensor = f.get_tensor("prompt")
    meta["model"]["fingerprint"] = "0" * 64  # metadata edited, checksum left as it was
    save_file({"prompt": tensor}, str(tmp_path / "edited.safetensors"), metadata={"post": json.dumps(meta)})
    with pytest.raises(PostError, match="checksum"):
        read_prompt(tmp_path / "edited.safetensors")
    save_file({"prompt": tensor + 1e-3}, str(tmp_path / "retuned.safetensors"),
              metadata={"post": json.dumps({**meta, "model": pf.meta["model"]})})
    with pytest.raises(PostError, match="checksum"):
        read_prompt(tmp_path / "retuned.safetensors")  # tensor changed under the same metadata
    with pytest.raises(PostError, match="no prompt file"):
        read_prompt(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("arch", ["llama", "roberta"])
def test_peft_export_gives_identical_logits(data_csv, tmp_path, arch):
    from peft import PeftModel

    from post.export import ExportPeftConfig, export_peft
    from post.models import save_model

    model_dir = save_model(tiny_model(arch), tmp_path / "model")
    result = tune(config(data_csv, model=str(model_dir), epochs=1, test=False), tmp_path / "tune")
    export_peft(ExportPeftConfig(prompt=result.prompt, model=str(model_dir)), tmp_path / "adapter")
    from post.models import load_model

    ours = load_model(str(model_dir))
    prompt = read_prompt(result.prompt).tensor
    ids = ours.tokenizer(["a good film It was"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        emb = ours.model.get_input_embeddings()(ids)
        expected = ours.model(inputs_embeds=torch.cat([prompt[None], emb], 1)).logits
        base = load_model(str(model_dir)).model
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        got = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got[:, -ids.shape[1]:], expected[:, -ids.shape[1]:], rtol=0, atol=0)


def test_cli_tune_and_evaluate_with_prompt(data_csv, tmp_path, capsys):
    args = ["--model", "tiny-llama", "--task", str(data_csv), "--label-words", LABEL_WORDS]
    assert main(["tune", *args, "--n-tokens", "4", "--epochs", "1", "--batch-size", "8", "--lr", "0.1",
                 "--out", str(tmp_path / "t")]) == 0
    assert main(["evaluate", *args, "--prompt", str(tmp_path / "t" / "prompt.safetensors"),
                 "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "result:" in out
    e = json.loads((tmp_path / "e" / "result.json").read_text())
    t = json.loads((tmp_path / "t" / "result.json").read_text())
    assert e["accuracy"] == t["test_accuracy"] and e["prompt"]["n_tokens"] == 4


def test_a_run_is_rerun_from_its_saved_config(data_csv, tmp_path, capsys):
    """A run directory's config.yaml (it starts with 'stage: tune') re-runs the run; flags override it."""
    args = ["--model", "tiny-llama", "--task", str(data_csv), "--label-words", LABEL_WORDS, "--n-tokens", "4",
            "--max-steps", "3", "--batch-size", "8", "--lr", "0.1", "--test", "false", "--eval-limit", "4"]
    assert main(["tune", *args, "--out", str(tmp_path / "t")]) == 0
    saved = tmp_path / "t" / "config.yaml"
    assert saved.read_text().startswith("stage: tune\n")
    assert main(["user", "tune", "--config", str(saved), "--out", str(tmp_path / "again")]) == 0
    assert main(["tune", f"--config={saved}", "--seed", "1", "--out", str(tmp_path / "seed1")]) == 0
    prompt = {d: read_prompt(tmp_path / d / "prompt.safetensors").tensor for d in ("t", "again", "seed1")}
    assert torch.equal(prompt["again"], prompt["t"])  # the same settings: the same prompt
    assert not torch.equal(prompt["seed1"], prompt["t"])  # the flag overrode the file's seed
    assert yaml.safe_load((tmp_path / "seed1" / "config.yaml").read_text())["seed"] == 1
    capsys.readouterr()
    assert main(["evaluate", "--config", str(saved), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "holds the settings of a 'post tune' run, not 'post evaluate'" in err and not (tmp_path / "e").exists()
    other = tmp_path / "reconstruct.yaml"  # a run directory's stage name is not always its command's
    other.write_text("stage: reconstruct\nprompt: p.safetensors\n")
    assert main(["tune", "--config", str(other), "--out", str(tmp_path / "r")]) == 2
    assert "a 'post attack reconstruct' run, not 'post tune': give it to post attack reconstruct" in \
        capsys.readouterr().err
    assert main(["attack", "lira", "--config", str(saved), "--out", str(tmp_path / "l")]) == 2
    assert "a 'post tune' run, not 'post attack lira'" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (["--dp", "true", "--epsilon", "-1"], "--epsilon"),
    (["--dp", "true", "--delta", "0.5"], "--delta"),
    (["--dp", "true", "--max-grad-norm", "0"], "--max-grad-norm"),
    (["--n-tokens", "0"], "--n-tokens"),
    (["--batch-size", "0"], "--batch-size"),
    (["--no-such-option", "1"], "no_such_option"),
    (["--template", "{text} It was"], "{mask}"),
])
def test_cli_rejects_bad_options_in_one_line(data_csv, tmp_path, capsys, bad, message):
    code = main(["tune", "--model", "tiny-llama", "--task", str(data_csv), "--label-words", LABEL_WORDS, *bad,
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("post: error:") and "\n" not in err and message in err
    assert "Traceback" not in err


def test_direct_transfer_needs_the_explicit_flag(nonprivate, data_csv, tmp_path):
    from post.evaluate import EvaluateConfig, evaluate
    from post.models import save_model

    out, _ = nonprivate
    other = save_model(tiny_model("llama", seed=1), tmp_path / "other")
    kw = dict(model=str(other), task=str(data_csv), label_words=LABEL_WORDS, prompt=out / "prompt.safetensors")
    with pytest.raises(PostError, match="fingerprint"):
        evaluate(EvaluateConfig(**kw), tmp_path / "refused")
    r = evaluate(EvaluateConfig(**kw, allow_other_model=True), tmp_path / "direct")
    assert r.prompt.model == "tiny-llama" and 0 <= r.accuracy <= 1


def test_micro_batches_are_length_sorted_with_the_same_gradients():
    """A logical batch is sorted by token length before it is split into micro-batches: each pads less, and the
    mean gradient, the per-example clipped sum (with its norms, in batch order) and the DP gradient are those of
    input-order micro-batches up to float summation order."""
    from post.dp import step_generator
    from post.prompt import init_prompt
    from post.scoring import Encoder
    from post.tasks import Task, Verbalizer

    loaded = tiny_model("llama")
    words = ["bad", "good", "awful", "great"]
    texts = [" ".join(words[(i + j) % 4] for j in range(1 + (7 * i) % 23)) for i in range(24)]
    labels = [i % 2 for i in range(24)]
    task = Task(label_words={"negative": (" bad",), "positive": (" good",)}, init_text="good or bad")
    enc, verb = Encoder(task, loaded.tokenizer, "causal", 64), Verbalizer.build(task, loaded.tokenizer)
    prompt = init_prompt(loaded, 4, init_text=task.init_text)
    idx = torch.from_numpy(np.random.default_rng(3).permutation(24)[:17])
    trainer = PromptTrainer(loaded, enc, verb, texts, labels, micro_batch_size=4)
    plain = PromptTrainer(loaded, enc, verb, texts, labels, micro_batch_size=4)
    plain._chunks = lambda ix: [torch.arange(i, min(i + 4, len(ix))) for i in range(0, len(ix), 4)]  # input order

    chunks = trainer._chunks(idx)
    assert sorted(torch.cat(chunks).tolist()) == list(range(len(idx))) and max(len(c) for c in chunks) == 4
    lengths = [[len(trainer.seqs[int(i)]) for i in idx[c]] for c in chunks]
    assert all(min(a) >= max(b) for a, b in zip(lengths, lengths[1:], strict=False))  # longest first

    def padded(t):
        return sum(len(c) * max(len(t.seqs[int(i)]) for i in idx[c]) for c in t._chunks(idx))

    assert padded(trainer) < padded(plain)
    g, loss = trainer.mean_gradient(prompt, idx)
    g0, loss0 = plain.mean_gradient(prompt, idx)
    torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(loss0, rel=1e-5)
    c = 1.8
    summed, loss, norms = trainer.clipped_sum(prompt, idx, c)
    summed0, loss0, norms0 = plain.clipped_sum(prompt, idx, c)
    assert (norms0 > c).any() and (norms0 < c).any()  # some are clipped, some not
    torch.testing.assert_close(summed, summed0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norms, norms0, rtol=1e-5, atol=1e-6)
    ledger = PrivacyLedger(noise_multiplier=0.7, max_grad_norm=c, sample_rate=0.5, steps=0, planned_steps=1,
                           delta=1e-5, accountant="rdp", dataset_size=24, target_epsilon=None, epsilon=0.0,
                           randomness="seeded")
    dp = trainer.dp_gradient(prompt, idx, ledger=ledger, expected_batch=12.0, noise=step_generator(5, 0, 1))[0]
    dp0 = plain.dp_gradient(prompt, idx, ledger=ledger, expected_batch=12.0, noise=step_generator(5, 0, 1))[0]
    torch.testing.assert_close(dp, dp0, rtol=1e-5, atol=1e-6)


def test_patience_stops_at_a_plateau_and_a_resume_keeps_the_stop(data_csv, tmp_path):
    from post.config import ConfigError
    from post.tune import plateaued

    acc = lambda *v: [{"val_accuracy": a} for a in v]  # noqa: E731
    assert not plateaued(acc(0.5, 0.6, 0.7), 1) and plateaued(acc(0.5, 0.7, 0.7), 1)
    assert not plateaued(acc(0.5, 0.7, 0.6, 0.8), 2) and plateaued(acc(0.5, 0.8, 0.6, 0.8), 2)
    assert not plateaued(acc(0.5, 0.5), None) and not plateaued(acc(0.5), 1)
    # an lr too small to move the prompt: validation 1 equals validation 0, a plateau with patience 1
    frozen = config(data_csv, lr=1e-12, epochs=1, max_steps=6, eval_every=1, patience=1, test=False)
    result = tune(frozen, tmp_path / "a")
    assert (result.steps, result.planned_steps, result.stopped_early) == (1, 6, True)
    assert len(result.validation_curve) == 2
    full = tune(config(data_csv, lr=1e-12, epochs=1, max_steps=6, eval_every=1, test=False), tmp_path / "b")
    assert (full.steps, full.stopped_early) == (6, False)
    # killed after the stop's checkpoint but before its result: the resume does not train on
    (tmp_path / "a" / "result.json").unlink()
    again = tune(frozen, tmp_path / "a")
    assert (again.steps, again.stopped_early) == (1, True)
    with pytest.raises(ConfigError, match="patience"):
        config(data_csv, dp=True, patience=2)


def test_a_run_that_finished_its_plan_is_not_reported_as_stopped_early_on_resume(data_csv, tmp_path):
    cfg = config(data_csv, lr=1e-12, epochs=1, max_steps=1, eval_every=1, patience=1, test=False)
    first = tune(cfg, tmp_path)
    assert (first.steps, first.stopped_early) == (1, False)  # flat, but it took every planned step
    (tmp_path / "result.json").unlink()
    again = tune(cfg, tmp_path)
    assert (again.steps, again.stopped_early) == (1, False)


def test_patience_keeps_the_best_validated_prompt_across_a_resume(data_csv, tmp_path, monkeypatch):
    """Validation 0.5, 0.9, 0.6, 0.6 at steps 0-3 with patience 2: the run stops at step 3 and keeps step 1's prompt,
    the same prompt a run planned for 1 step ends with; a resume after the stop keeps it too."""
    import post.tune as t

    real = t.classification_metrics
    script = iter([0.5, 0.9, 0.6, 0.6, 0.5, 0.9, 0.6, 0.6])

    def scripted(scores, labels, names):
        m = real(scores, labels, names)
        return {**m, "accuracy": next(script)} if len(labels) == 7 else m  # the 7 validation texts only

    monkeypatch.setattr(t, "classification_metrics", scripted)
    cfg = config(data_csv, epochs=1, max_steps=8, eval_every=1, patience=2, eval_limit=7, test=False)
    r = tune(cfg, tmp_path / "a")
    assert (r.steps, r.stopped_early, r.kept_step, r.val_accuracy) == (3, True, 1, 0.9)
    assert [p["val_accuracy"] for p in r.validation_curve] == [0.5, 0.9, 0.6, 0.6]
    one = tune(config(data_csv, epochs=1, max_steps=1, eval_every=1000, eval_limit=7, test=False), tmp_path / "one")
    kept = read_prompt(r.prompt).tensor
    assert torch.equal(kept, read_prompt(one.prompt).tensor)
    three = tune(config(data_csv, epochs=1, max_steps=3, eval_every=1000, eval_limit=7, test=False), tmp_path / "3")
    assert not torch.equal(kept, read_prompt(three.prompt).tensor)  # the last prompt was a different one
    (tmp_path / "a" / "result.json").unlink()
    again = tune(cfg, tmp_path / "a")
    assert again.kept_step == 1 and torch.equal(read_prompt(again.prompt).tensor, kept)
    # without patience nothing is selected: the last prompt is kept
    assert tune(config(data_csv, epochs=1, max_steps=2, test=False), tmp_path / "b").kept_step is None


def test_patience_on_a_tie_keeps_the_earliest_best_prompt_and_says_so(data_csv, tmp_path, monkeypatch):
    """Validation 0.5, 0.9, 0.9: the prompt kept and the step reported are the same one (step 1)."""
    import post.tune as t

    real = t.classification_metrics
    script = iter([0.5, 0.9, 0.9, 0.5, 0.9])

    def scripted(scores, labels, names):
        m = real(scores, labels, names)
        return {**m, "accuracy": next(script)} if len(labels) == 7 else m

    monkeypatch.setattr(t, "classification_metrics", scripted)
    cfg = config(data_csv, epochs=1, max_steps=2, eval_every=1, patience=2, eval_limit=7, test=False)
    r = tune(cfg, tmp_path / "a")
    assert (r.steps, r.kept_step, r.val_accuracy) == (2, 1, 0.9)
    one = tune(config(data_csv, epochs=1, max_steps=1, eval_every=1000, eval_limit=7, test=False), tmp_path / "one")
    assert torch.equal(read_prompt(r.prompt).tensor, read_prompt(one.prompt).tensor)
