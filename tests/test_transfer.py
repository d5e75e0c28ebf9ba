"""Prompt transfer: the POST loss, the α heuristic, and end-to-end runs on tiny models."""

import json

import numpy as np
import pytest
import torch

from helpers import launch_failure, write_sentiment_csv
from post.errors import ConfigError
from post.models import load_model, save_model, tiny_model
from post.student import build_student
from post.tasks import Task
from post.transfer import (
    Scorer,
    TransferConfig,
    heuristic_alpha,
    post_loss,
    proxy_label_loss,
    proxy_labels,
    transfer,
)
from post.tune import TuneConfig, tune

LABEL_WORDS = "negative=bad;positive=good"


def test_post_loss_terms():
    torch.manual_seed(0)
    s_p, s_0, t_0 = torch.randn(4, 50), torch.randn(4, 50), torch.randn(4, 50)
    same = post_loss(s_p, t_0, s_p, s_0, alpha=0.0, temperature=2.0)
    assert same["l1"].item() == pytest.approx(0.0, abs=1e-6)
    # The change term only sees the prompt-induced shift, up to a constant per row.
    shifted = t_0 + (s_p - s_0) + 3.0
    terms = post_loss(shifted, t_0, s_p, s_0, alpha=1.0, temperature=2.0)
    assert terms["l2"].item() == pytest.approx(0.0, abs=1e-5)
    assert terms["loss"].item() == pytest.approx(terms["l2"].item())
    mixed = post_loss(torch.randn(4, 50), t_0, s_p, s_0, alpha=0.3, temperature=2.0)
    assert mixed["loss"].item() == pytest.approx(0.7 * mixed["l1"].item() + 0.3 * mixed["l2"].item(), rel=1e-6)
    # T² scaling: KL of the tempered distributions times T².
    p, q = torch.randn(1, 5), torch.randn(1, 5)
    manual = (torch.softmax(q / 2, -1) * (torch.log_softmax(q / 2, -1) - torch.log_softmax(p / 2, -1))).sum() * 4
    assert post_loss(p, t_0[:1, :5], q, s_0[:1, :5], alpha=0.0, temperature=2.0)["l1"].item() == pytest.approx(
        manual.item(), rel=1e-5)


def test_proxy_labels_are_proxy_tunings_answer():
    """Each text's label is argmax of Φt(x) + (Φs(ps; x) − Φs(x)): the target's answer moved by ps's change."""
    t_0 = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    s_0 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 0.0]])
    s_p = torch.tensor([[0.0, 3.0], [1.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    # row 0: a change of +3 for class 1 overturns the target's 2-point lead; row 1: +1 does not;
    # row 2: +2 for class 0 overturns a 1-point lead; row 3: the student's absolute scores favour class 0
    # but its change (−1 on class 0) is what counts, and it overturns the target's 0.5-point lead.
    assert proxy_labels(t_0, s_p, s_0).tolist() == [1, 0, 0, 1]
    assert proxy_labels(t_0, s_0, s_0).tolist() == t_0.argmax(1).tolist()  # no change: the target's own answer
    t_p = torch.tensor([[0.0, 1.0], [3.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    terms = proxy_label_loss(t_p, proxy_labels(t_0, s_p, s_0))
    assert terms["loss"].item() == pytest.approx(torch.nn.functional.cross_entropy(
        t_p, torch.tensor([1, 0, 0, 1])).item())
    assert terms["agree"].item() == pytest.approx(0.5)


def test_calibrated_proxy_labels_divide_out_the_mean_answer():
    """calibrate: argmax of log p(c|x) − log mean p(c|·), p proxy tuning's class distribution on the same texts."""
    # Every text leans to class 0 (margins 3, 2.5, 2, 1.5): proxy tuning answers class 0 throughout.
    t_0 = torch.tensor([[3.0, 0.0], [2.5, 0.0], [2.0, 0.0], [1.5, 0.0]])
    s_0 = torch.zeros(4, 2)
    assert proxy_labels(t_0, s_0, s_0).tolist() == [0, 0, 0, 0]
    # By hand: mean p(0|x) over the four texts, then the margin less log(prior0 / prior1).
    p0 = torch.sigmoid(t_0[:, 0]).double()
    shift = float(torch.log(p0.mean() / (1 - p0.mean())))
    assert 2.0 < shift < 2.5  # so texts 0-1 stay class 0 and texts 2-3 turn to class 1
    assert proxy_labels(t_0, s_0, s_0, calibrate=True).tolist() == [0, 0, 1, 1]
    # The change term is calibrated with the rest: ps moving every text towards class 0 by the same amount
    # changes no label here (the mean answer moves with it), and a change on one text alone still decides it.
    lean = torch.tensor([[1.0, 0.0]]).expand(4, 2)
    assert proxy_labels(t_0, s_0 + lean, s_0, calibrate=True).tolist() == [0, 0, 1, 1]
    one = torch.zeros(4, 2)
    one[3, 0] = 3.0
    assert proxy_labels(t_0, s_0 + one, s_0, calibrate=True)[3].item() == 0
    # Already even answers are left as they are.
    even = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    assert proxy_labels(even, s_0, s_0, calibrate=True).tolist() == [0, 1, 0, 1]


def test_calibrate_labels_needs_proxy_labels(setup):
    with pytest.raises(ConfigError, match="needs --loss proxy-labels"):
        cfg(setup, calibrate_labels=True, mode="label-words")


def test_proxy_labels_loss_needs_label_words_and_no_alpha(setup):
    with pytest.raises(ConfigError, match="label-words"):
        cfg(setup, loss="proxy-labels", alpha=None, mode="vocab")
    with pytest.raises(ConfigError, match="no α"):
        cfg(setup, loss="proxy-labels", mode="label-words", alpha=0.5)
    with pytest.raises(ConfigError, match="post or proxy-labels"):
        cfg(setup, loss="labels", mode="label-words")


def test_heuristic_alpha_matches_the_paper():
    # RoBERTa, sst2: zero-shot 72.25, PT on the 2-layer source 79.10 -> the paper used α = 0.8.
    alpha = heuristic_alpha(target_zero_shot=0.7225, source_accuracy=0.791, num_classes=2)
    assert alpha == pytest.approx(0.765, abs=1e-3)
    assert heuristic_alpha(target_zero_shot=0.9, source_accuracy=0.8, num_classes=2) == 1.0
    assert heuristic_alpha(target_zero_shot=0.3, source_accuracy=0.8, num_classes=2) == 0.0
    assert heuristic_alpha(target_zero_shot=0.6, source_accuracy=0.5, num_classes=2) == 1.0


# Very different lengths in a shuffled order: input-order batches of 3 would mix long and short texts.
RAGGED = ["bad", "the flight was late , the crew was rude and the seat was broken , never again with them", "good",
          "ok", "an amazing crew and a great flight , on time and smooth all the way", "awful delay at the gate",
          "fine", "the food was cold and the staff ignored us for the whole trip", "great"]


@pytest.mark.parametrize(("name", "mode"), [("tiny-llama", "vocab"), ("tiny-roberta", "label-words")])
def test_constants_are_packed_or_length_bucketed_and_in_input_order(name, mode, monkeypatch):
    """A causal model runs the constants packed (texts end to end, no padding between them), a masked one
    in length-sorted padded batches; either way row i is text i, as one text at a time gives it."""
    import post.scoring as scoring

    loaded = load_model(name)
    scorer = Scorer(loaded, Task(), RAGGED, mode=mode, max_length=64)
    assert scorer.packing == (name == "tiny-llama")
    run = []  # tokens of every forward the constants ran, the prompt's included
    real = scoring.answer_hidden

    def spy(model, batch, prompt=None):
        rows, width = batch.input_ids.shape
        packed = isinstance(batch, scoring.PackedBatch)
        run.append(rows * (width + (0 if packed or prompt is None else prompt.shape[-2])))
        return real(model, batch, prompt)

    monkeypatch.setattr(scoring, "answer_hidden", spy)
    torch.manual_seed(0)
    prompt = torch.randn(3, loaded.model.config.hidden_size) * 0.1
    for p in (prompt, None):
        run.clear()
        got = scorer.constants(p, 3)
        ran = sum(run)
        # One text at a time: no padding at all, and row i is text i.
        with torch.no_grad():
            alone = torch.cat([scorer(np.array([i]), p) for i in range(len(RAGGED))])
        assert got.shape == alone.shape and torch.allclose(got, alone, atol=1e-5, rtol=1e-5)
        n = 0 if p is None else p.shape[0]
        real_tokens = sum(len(s) + n for s in scorer.seqs)
        lengths = sorted((len(s) + n for s in scorer.seqs), reverse=True)
        bucketed = sum(max(lengths[i:i + 3]) * len(lengths[i:i + 3]) for i in range(0, len(lengths), 3))
        in_order = [len(s) + n for s in scorer.seqs]
        assert bucketed < sum(max(in_order[i:i + 3]) * len(in_order[i:i + 3]) for i in range(0, len(in_order), 3))
        if scorer.packing:
            assert real_tokens <= ran < bucketed
        else:
            assert ran == bucketed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    data = write_sentiment_csv(root / "d.csv")
    public = root / "public.txt"
    public.write_text("\n".join(["a good day", "bad service", "great flight", "awful delay", "ok trip"] * 20))
    teacher = tiny_model("llama")
    target_dir = save_model(teacher, root / "target")
    source_dir = save_model(build_student(teacher, "1"), root / "source")
    ps = tune(TuneConfig(model=str(target_dir), task=str(data), label_words=LABEL_WORDS, n_tokens=4, epochs=3,
                         batch_size=8, lr=0.1, test=False), root / "ps")
    return root, data, public, source_dir, target_dir, ps


def cfg(setup, **kw):
    root, data, public, source_dir, target_dir, ps = setup
    base = dict(source_model=str(target_dir), prompt=ps.prompt, target_model=str(target_dir), public=str(public),
                steps=60, batch_size=8, lr=0.05, alpha=0.0, checkpoint_every=20, device="cpu")
    return TransferConfig(**{**base, **kw})


def losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in x]


def test_transfer_to_the_same_model_recovers_the_prompts_behaviour(setup, tmp_path):
    r = transfer(cfg(setup), tmp_path)
    curve = losses(tmp_path)
    assert len(curve) == 60 and curve[-1] < 0.2 * curve[0]
    pf = json.loads((tmp_path / "result.json").read_text())
    assert pf["alpha"] == 0.0 and r.steps == 60


def test_label_word_mode_and_watch_curve(setup, tmp_path):
    root, data, *_ = setup
    r = transfer(cfg(setup, mode="label-words", alpha=0.5, watch_task=str(data), watch_every=30), tmp_path)
    assert [p["step"] for p in r.watch_curve] == [0, 30, 60]
    assert losses(tmp_path)[-1] < losses(tmp_path)[0]


@pytest.mark.parametrize("calibrate", [False, True])
def test_proxy_labels_transfer_trains_on_proxy_tunings_answers(setup, tmp_path, monkeypatch, calibrate):
    """With --loss proxy-labels each step's targets are proxy tuning's answers on its public texts (calibrated on
    them with --calibrate-labels); no α."""
    import post.transfer as tr
    from post.prompt import read_prompt

    root, data, public, source_dir, target_dir, ps = setup
    # A ps of the source (a 1-layer student of the target), so that Φs(x) and Φt(x) differ.
    ps_s = tune(TuneConfig(model=str(source_dir), task=str(data), label_words=LABEL_WORDS, n_tokens=4, epochs=3,
                           batch_size=8, lr=0.1, test=False), tmp_path / "ps-source")
    seen = []
    real = tr.proxy_label_loss
    monkeypatch.setattr(tr, "proxy_label_loss", lambda t, labels: seen.append(labels.clone()) or real(t, labels))
    run_dir = tmp_path / "transfer"  # as the pipeline names the step, for the report's line below
    r = transfer(cfg(setup, source_model=str(source_dir), prompt=ps_s.prompt, loss="proxy-labels",
                     mode="label-words", alpha=None, alpha_public=None, steps=40, calibrate_labels=calibrate), run_dir)
    assert r.alpha is None and r.loss == "proxy-labels" and r.alpha_source.startswith("not used")
    assert r.calibrate_labels is calibrate
    # The labels, rebuilt independently from the three constants.
    texts = [t for t in public.read_text().splitlines() if t]
    task = read_prompt(ps_s.prompt).task
    src, tgt = (Scorer(load_model(str(d)), task, texts, mode="label-words", max_length=128)
                for d in (source_dir, target_dir))
    t_0, s_0 = tgt.constants(None, 8), src.constants(None, 8)
    labels = proxy_labels(t_0, src.constants(read_prompt(ps_s.prompt).tensor, 8), s_0, calibrate=calibrate)
    # Every step trained on exactly these labels, for its own batch.
    assert len(seen) == 40
    for step, got in enumerate(seen):
        idx = torch.randperm(len(texts), generator=torch.Generator().manual_seed(step))[:8]
        assert got.tolist() == labels[idx].tolist()
    shares = torch.bincount(labels, minlength=2).double() / len(labels)
    assert list(r.proxy_label_shares.values()) == pytest.approx(shares.tolist())
    assert r.proxy_labels_as_target == pytest.approx(float((labels == t_0.argmax(1)).double().mean()))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "ce" in x]
    assert len(rows) == 40 and np.mean([x["ce"] for x in rows[-5:]]) < np.mean([x["ce"] for x in rows[:5]])
    assert read_prompt(r.prompt).meta["transferred_from"]["loss"] == "proxy-labels"
    assert read_prompt(r.prompt).meta["transferred_from"]["calibrate_labels"] is calibrate
    from post.report import _transfer_lines

    (line,) = [x for x in _transfer_lines(tmp_path, {"transfer": {}}) if x.startswith("- `transfer`")]
    assert "proxy tuning's class" in line and "α" not in line and "40 steps" in line
    assert ("calibrated on the public texts" in line) is calibrate


def test_proxy_labels_transfer_moves_the_target_to_the_labels(setup, tmp_path):
    """Where ps changes the answers (source = target, whose ps it is), pt learns the changed answers."""
    from post.prompt import read_prompt

    root, data, public, source_dir, target_dir, ps = setup
    r = transfer(cfg(setup, loss="proxy-labels", mode="label-words", alpha=None, alpha_public=None, steps=40),
                 tmp_path)
    texts = [t for t in public.read_text().splitlines() if t]
    tgt = Scorer(load_model(str(target_dir)), read_prompt(ps.prompt).task, texts, mode="label-words",
                 max_length=128)
    t_0 = tgt.constants(None, 8)
    labels = proxy_labels(t_0, tgt.constants(read_prompt(ps.prompt).tensor, 8), t_0)
    assert (labels != t_0.argmax(1)).any()  # ps changes some answers: there is something to learn
    agree = float((tgt(np.arange(len(texts)), read_prompt(r.prompt).tensor).argmax(1) == labels).double().mean())
    assert agree > float((t_0.argmax(1) == labels).double().mean())


def test_heuristic_alpha_needs_its_inputs(setup, tmp_path, caplog):
    with pytest.raises(ConfigError, match="alpha-public"):
        transfer(cfg(setup, alpha=None, alpha_public=None), tmp_path / "a")
    with pytest.raises(ConfigError, match="source-accuracy"):
        cfg(setup, alpha=None, target_zero_shot=0.6)
    r = transfer(cfg(setup, alpha=None, target_zero_shot=0.6, source_accuracy=0.7, steps=2), tmp_path / "b")
    assert r.alpha_source.startswith("heuristic") and "private" in r.alpha_source
    assert r.alpha == pytest.approx(heuristic_alpha(target_zero_shot=0.6, source_accuracy=0.7, num_classes=2))
    assert "outside the DP guarantee" in caplog.text


def test_heuristic_alpha_from_public_labelled_data(setup, tmp_path):
    """By default the provider measures ZS and C itself, on public labelled data restricted to the task's classes."""
    import csv

    from post.models import load_model
    from post.prompt import read_prompt
    from post.transfer import _accuracy, public_labelled

    root, data, public, source_dir, target_dir, ps = setup
    labelled = root / "public-labelled.csv"
    with labelled.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(30):
            w.writerow([f"a good flight number {i}", "positive"])
            w.writerow([f"a bad delay number {i}", "negative"])
    r = transfer(cfg(setup, alpha=None, alpha_public=str(labelled), alpha_public_limit=40, steps=2), tmp_path)
    assert r.alpha_source.startswith("heuristic (Eq. 6) on public") and 0 <= r.alpha <= 1
    # The two accuracies are the target's zero-shot and ps on the source, on 20 + 20 balanced public examples.
    task = read_prompt(ps.prompt).task
    texts, labels = public_labelled(str(labelled), task, limit=40, seed=0)
    assert sorted(labels) == [0] * 20 + [1] * 20 and all("number" in t for t in texts)
    target = load_model(str(target_dir))
    assert r.target_zero_shot == pytest.approx(_accuracy(target, task, texts, labels, None, 128))
    assert r.source_accuracy == pytest.approx(
        _accuracy(target, task, texts, labels, read_prompt(ps.prompt).tensor, 128))
    assert r.alpha == pytest.approx(heuristic_alpha(target_zero_shot=r.target_zero_shot,
                                                       source_accuracy=r.source_accuracy, num_classes=2))


def test_vocab_mode_refuses_different_tokenizers(setup, tmp_path):
    root, data, public, source_dir, target_dir, ps = setup
    from transformers import PreTrainedTokenizerFast

    other = tiny_model("llama")
    tok = other.tokenizer
    tok.add_tokens(["zzzunseen"])
    other.model.resize_token_embeddings(len(tok))
    other_dir = save_model(other, root / "other")
    with pytest.raises(ConfigError, match="label-words"):
        transfer(cfg(setup, target_model=str(other_dir)), tmp_path)
    assert isinstance(tok, PreTrainedTokenizerFast)


def test_transfer_resumes_after_interruption(setup, tmp_path, monkeypatch):
    full = transfer(cfg(setup), tmp_path / "full")
    import post.transfer as t

    original = t.post_loss
    calls = {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 45:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(t, "post_loss", dies)
    with pytest.raises(KeyboardInterrupt):
        transfer(cfg(setup), tmp_path / "resumed")
    monkeypatch.setattr(t, "post_loss", original)
    resumed = transfer(cfg(setup), tmp_path / "resumed")
    from post.prompt import read_prompt

    assert torch.equal(read_prompt(full.prompt).tensor, read_prompt(resumed.prompt).tensor)


def test_zst_recovers_relative_coordinates(setup, tmp_path):
    from post.prompt import read_prompt
    from post.zst import ZstConfig, relative_coordinates, zst

    root, data, public, source_dir, target_dir, ps = setup
    r = zst(ZstConfig(source_model=str(target_dir), prompt=ps.prompt, target_model=str(target_dir), anchors=64,
                      steps=500, device="cpu"), tmp_path)
    assert r.final_loss < 1e-3
    p, q = read_prompt(ps.prompt).tensor, read_prompt(r.prompt).tensor
    emb = tiny_model("llama").model.get_input_embeddings().weight.detach()
    rel_p, rel_q = relative_coordinates(p, emb[:64]), relative_coordinates(q, emb[:64])
    assert (rel_p - rel_q).abs().max() < 0.1


def test_results_table_places_every_run(setup, tmp_path):
    from post.evaluate import EvaluateConfig, evaluate
    from post.table import TableConfig, table

    root, data, public, source_dir, target_dir, ps_np = setup
    common = dict(task=str(data), label_words=LABEL_WORDS, n_tokens=4, epochs=1, batch_size=8, lr=0.1)
    ps_dp = tune(TuneConfig(model=str(source_dir), dp=True, noise_multiplier=1.0, **common), tmp_path / "ps-dp")
    tune(TuneConfig(model=str(target_dir), **common), tmp_path / "pt-target")
    pt = transfer(cfg(setup, source_model=str(source_dir), prompt=ps_dp.prompt, steps=5), tmp_path / "post-dp")
    ev = dict(model=str(target_dir), task=str(data), label_words=LABEL_WORDS)
    evaluate(EvaluateConfig(**ev), tmp_path / "zs")
    evaluate(EvaluateConfig(**ev, prompt=pt.prompt), tmp_path / "eval-post-dp")
    evaluate(EvaluateConfig(**ev, prompt=ps_dp.prompt, allow_other_model=True), tmp_path / "direct-dp")
    r = table(TableConfig(runs=[tmp_path], target=str(target_dir)), tmp_path / "table")
    rows = list(__import__("csv").DictReader(open(r.csv)))
    placed = {(x["method"], x["dp"]) for x in rows}
    assert placed == {("zero-shot Φt", "False"), ("zero-shot Φt", "True"), ("PT on Φt", "False"),
                      ("PT on Φs", "True"), ("POST", "True"), ("direct transfer", "True")}
    post_row = next(x for x in rows if x["method"] == "POST")
    assert float(post_row["epsilon"]) == pytest.approx(ps_dp.epsilon)
    assert float(post_row["seconds"]) >= ps_dp.train_seconds  # tuning on the source + the transfer
    assert "| " + data.name + " |" in (tmp_path / "table" / "table.md").read_text()


def test_lira_attack_end_to_end_with_transferred_prompts(setup, tmp_path, capsys):
    import numpy as np

    from post.cli import main

    root, data, public, source_dir, target_dir, ps = setup
    code = main(["attack", "lira", "--model", str(source_dir), "--task", str(data), "--label-words", LABEL_WORDS,
                 "--shadows", "4", "--pool-size", "40", "--n-tokens", "4", "--epochs", "1", "--batch-size", "8",
                 "--lr", "0.1", "--transfer-target", str(target_dir), "--public", str(public),
                 "--transfer-steps", "5", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["shadows"] == 4 and r["pool"] == 40
    for figs in (r["source_prompt"], r["transferred_prompt"]):
        assert set(figs) == {"online", "offline", "online, global variance", "offline, global variance"}
        assert all(0 <= f["auc"] <= 1 and f["epsilon_lower_bound"] >= 0 for f in figs.values())
    membership = json.loads((tmp_path / "membership.json").read_text())
    assert (np.array(membership["in"]).sum(1) == 2).all()  # every example in exactly half of the shadows
    assert (tmp_path / "roc.png").stat().st_size > 1000 and (tmp_path / "roc-transferred.png").exists()
    shadow = json.loads((tmp_path / "shadows" / "shadow-000" / "confidence.json").read_text())
    assert len(shadow["source"]) == len(shadow["target"]) == 40
    assert "AUC" in capsys.readouterr().out
    mtime = (tmp_path / "shadows" / "shadow-001" / "confidence.json").stat().st_mtime_ns
    (tmp_path / "result.json").unlink()  # re-running re-scores but never retrains a finished shadow
    assert main(["attack", "lira", "--model", str(source_dir), "--task", str(data), "--label-words", LABEL_WORDS,
                 "--shadows", "4", "--pool-size", "40", "--n-tokens", "4", "--epochs", "1", "--batch-size", "8",
                 "--lr", "0.1", "--transfer-target", str(target_dir), "--public", str(public),
                 "--transfer-steps", "5", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "shadows" / "shadow-001" / "confidence.json").stat().st_mtime_ns == mtime


def test_transfer_two_processes_match_one(setup, tmp_path):
    import os
    import subprocess
    import sys

    from post.prompt import read_prompt

    root, data, public, source_dir, target_dir, ps = setup
    one = transfer(cfg(setup, steps=20), tmp_path / "one")
    args = ["--source-model", str(target_dir), "--prompt", ps.prompt, "--target-model", str(target_dir),
            "--public", str(public), "--steps", "20", "--batch-size", "8", "--lr", "0.05", "--alpha", "0.0",
            "--checkpoint-every", "20", "--device", "cpu", "--out", str(tmp_path / "two")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "post", "transfer", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, launch_failure(proc)
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["processes"] == 2 and one.processes == 1
    # the all-reduce sums the two halves' gradients in another order than one process does, and 20 Adam steps carry
    # that rounding on: up to 8e-5 on AVX2 kernels (1e-5 sufficed under AVX-512). Another batch order (seed 1) moves
    # the prompt by up to 0.14, batches of 4 (a process on its half alone) by 0.35: three orders of magnitude more
    torch.testing.assert_close(read_prompt(two["prompt"]).tensor, read_prompt(one.prompt).tensor,
                               rtol=1e-3, atol=5e-4)
