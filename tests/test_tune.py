"""Prompt tuning end to end on a tiny model: learning, DP noise, determinism, resume, prompt files."""

import json

import pytest
import torch

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
    assert result["validation_curve"][0]["val_accuracy"] <= 0.6  # zero-shot starts near chance
    assert result["test_accuracy"] >= 0.9
    assert result["privacy"] is None and not (out / "privacy.json").exists()
    for name in ("config.yaml", "metrics.jsonl", "result.json", "prompt.safetensors"):
        assert (out / name).is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in x for x in lines) == result["steps"]


def test_enormous_noise_keeps_the_prompt_at_chance(data_csv, tmp_path):
    result = tune(config(data_csv, dp=True, noise_multiplier=1e4, max_grad_norm=1.0), tmp_path)
    assert result["test_accuracy"] <= 0.7
    assert result["privacy"]["noise_multiplier"] == 1e4
    assert result["epsilon"] < 0.01


def test_dp_run_writes_a_ledger_that_recomputes(data_csv, tmp_path):
    result = tune(config(data_csv, dp=True, epsilon=8.0, epochs=2, accountant="rdp"), tmp_path)
    ledger = PrivacyLedger.from_dict(json.loads((tmp_path / "privacy.json").read_text()))
    assert ledger.steps == ledger.planned_steps == result["steps"]
    assert ledger.epsilon == pytest.approx(8.0, abs=0.01) and ledger.epsilon <= 8.0 + 1e-9
    assert ledger.delta < 1 / result["n_train"]
    assert ledger.recompute_epsilon() == pytest.approx(result["epsilon"])
    pf = read_prompt(tmp_path / "prompt.safetensors")
    assert pf.meta["privacy"] == ledger.to_dict()


def test_same_seed_same_prompt_other_seed_other_noise(data_csv, tmp_path):
    kw = dict(dp=True, noise_multiplier=1.0, epochs=1)
    a = tune(config(data_csv, **kw), tmp_path / "a")
    b = tune(config(data_csv, **kw), tmp_path / "b")
    c = tune(config(data_csv, seed=1, **kw), tmp_path / "c")
    pa, pb, pc = (read_prompt(r["prompt"]).tensor for r in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.allclose(pa, pc)


@pytest.mark.parametrize("dp", [False, True])
def test_killed_run_resumes_to_the_same_prompt(data_csv, tmp_path, monkeypatch, dp):
    kw = dict(dp=dp, noise_multiplier=0.5 if dp else None, epochs=2)
    full = tune(config(data_csv, **kw), tmp_path / "full")
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
    resumed = tune(config(data_csv, **kw), tmp_path / "resumed")
    assert torch.equal(read_prompt(full["prompt"]).tensor, read_prompt(resumed["prompt"]).tensor)
    assert resumed["epsilon"] == full["epsilon"]


def test_finished_run_is_not_redone_and_other_settings_are_refused(nonprivate, data_csv):
    out, result = nonprivate
    mtime = (out / "prompt.safetensors").stat().st_mtime_ns
    assert tune(config(data_csv), out) == result
    assert (out / "prompt.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(PostError, match="other settings"):
        tune(config(data_csv, lr=0.5), out)


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
    export_peft(ExportPeftConfig(prompt=result["prompt"], model=str(model_dir)), tmp_path / "adapter")
    from post.models import load_model

    ours = load_model(str(model_dir))
    prompt = read_prompt(result["prompt"]).tensor
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
    assert r["prompt"]["model"] == "tiny-llama" and 0 <= r["accuracy"] <= 1
