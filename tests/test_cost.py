"""The cost model: FLOP counts by hand and against torch's counter, presets, ratios, run reconstruction, CLI."""

import dataclasses
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from post import cost
from post.cli import main
from post.cost import (
    ARCHS,
    Arch,
    CostConfig,
    Flops,
    Rates,
    Tokens,
    arch_from_config,
    estimate,
    forward_flops,
    prompt_step_flops,
    resolve_arch,
    train_step_flops,
)
from post.errors import ConfigError, PostError
from post.models import tiny_model

LABEL_WORDS = "negative=bad,awful,terrible;positive=good,great,amazing"
SMALL = Arch("small", n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16, vocab=10, gated=True)


def test_flops_of_a_small_config_by_hand():
    # One layer: q 8x8, k 8x4, v 8x4, o 8x8 (GQA: one kv head of 4), gate/up/down 8x16 each.
    p = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16
    assert SMALL.layer_params == p == 576
    t = Tokens.uniform(3, 5)  # three sequences of 5 tokens
    matmul = 2 * p * 15  # 2 FLOPs per weight per token
    qk = 2 * 5 * 5 * 4 * 2 * 3  # QKᵀ: 2·L·L·head_dim per head, 2 heads, 3 sequences
    scores = 2 * qk  # and AV, as many
    assert scores == 4 * 8 * 75  # 4·a·ΣL², a = 8
    head = 2 * 8 * 4 * 3  # 4 label-word rows at the 3 answer positions
    fwd = forward_flops(SMALL, t, head_cols=4)
    assert fwd == Flops(2 * (matmul + scores) + head)
    step = prompt_step_flops(SMALL, t, head_cols=4)
    # Frozen model: 1 matmul per weight (input gradient only), 4 L² products for attention, the head once.
    assert step == Flops(2 * (matmul + scores) + head, 2 * (matmul + 2 * scores) + head)
    train = train_step_flops(SMALL, t, head_cols=10)  # distillation: full vocabulary at all 15 positions
    head_all = 2 * 8 * 10 * 15
    assert train == Flops(2 * (matmul + scores) + head_all, 2 * (2 * matmul + 2 * scores) + head_all)
    assert train_step_flops(SMALL, t, head_cols=10, train_head=True).backward == train.backward + head_all


def test_distillation_flops_count_only_the_terms_that_run():
    """Without the KL and LM terms neither model runs its head over the blocks; the prompted term adds a teacher
    forward and a student step over its texts with the head at each answer (by hand on the small config)."""
    from post.cost import distill_parts

    blocks, prompted = Tokens.uniform(3, 5), Tokens.uniform(2, 4)
    layers_fwd = forward_flops(SMALL, blocks, head_cols=0)
    head_all = 2 * 8 * 10 * 15  # the full vocabulary at all 15 block positions
    full = distill_parts(SMALL, SMALL, blocks)
    assert full[0].flops.total == layers_fwd.total + head_all and full[1].logits == 15 * 10
    bare = distill_parts(SMALL, SMALL, blocks, heads=False)
    assert bare[0].flops == layers_fwd and bare[1].logits == 0
    assert bare[1].flops == train_step_flops(SMALL, blocks, head_cols=0)
    assert full[1].flops.total - bare[1].flops.total == 2 * head_all  # the head forward and its input gradient
    both = distill_parts(SMALL, SMALL, blocks, heads=False, prompted=prompted)
    assert both[:2] == bare and [p.role for p in both[2:]] == ["target", "source"]
    head_answers = 2 * 8 * 10 * 2  # the full vocabulary at the 2 answers
    assert both[2].flops == Flops(forward_flops(SMALL, prompted, head_cols=0).total + head_answers)
    assert both[3].flops.total == train_step_flops(SMALL, prompted, head_cols=0).total + 2 * head_answers
    assert both[3].logits == 2 * 10
    assert distill_parts(SMALL, SMALL, Tokens(), heads=False, prompted=prompted)[0].flops.total == 0


def _eager(model):
    for m in model.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "eager"  # explicit bmm's that torch's counter sees
    return model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_flops_equal_torch_flop_counter(name):
    model = _eager(tiny_model(name).model)
    arch = resolve_arch(name)
    ids = torch.randint(5, 100, (3, 7))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # like a prompt: the only leaf
    with FlopCounterMode(display=False) as fc:
        logits = model(inputs_embeds=emb, use_cache=False).logits
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        logits.sum().backward()
    want = prompt_step_flops(arch, Tokens.uniform(3, 7), head_cols=arch.vocab, all_positions=True)
    assert (fwd, fc.get_total_flops()) == (want.forward, want.backward)
    model.requires_grad_(True)
    logits = model(inputs_embeds=emb.detach(), use_cache=False).logits
    with FlopCounterMode(display=False) as fc:
        logits.sum().backward()
    assert fc.get_total_flops() == train_step_flops(arch, Tokens.uniform(3, 7), head_cols=arch.vocab,
                                                    train_head=True).backward


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def test_layer_params_equal_the_model_weights(name):
    model = tiny_model(name).model
    arch = resolve_arch(name)
    block = next(m for n, m in model.named_modules() if n.endswith((".layers.0", ".h.0")))
    assert sum(p.numel() for p in block.parameters() if p.dim() == 2) == arch.layer_params


@pytest.mark.parametrize("name,published,untied", [("llama-2-7b", 6.738e9, True), ("llama-3-8b", 8.030e9, True),
                                                   ("llama-3-70b", 70.55e9, True), ("gpt2-xl", 1.558e9, False),
                                                   ("smollm2-135m", 134.5e6, False)])
def test_presets_match_published_parameter_counts(name, published, untied):
    a = ARCHS[name]
    total = a.params + (a.d_model * a.vocab if untied else 0)
    assert total == pytest.approx(published, rel=0.01)


def test_arch_from_hf_config_json(tmp_path):
    gpt2 = {"model_type": "gpt2", "n_layer": 48, "n_embd": 1600, "n_head": 25, "n_inner": None, "vocab_size": 50257}
    assert arch_from_config(gpt2, "gpt2-xl") == ARCHS["gpt2-xl"]
    llama = {"model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
             "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(llama))
    for spec in (str(path), str(tmp_path)):
        a = resolve_arch(spec)
        assert (a.n_layers, a.layer_params, a.vocab) == (80, ARCHS["llama-3-70b"].layer_params, 128256)
    assert resolve_arch("meta-llama/Llama-2-7b-hf").layer_params == ARCHS["llama-2-7b"].layer_params
    with pytest.raises(PostError, match="no architecture known"):
        resolve_arch("nobody/no-such-model")
    with pytest.raises(PostError, match="none of"):
        arch_from_config({"model_type": "llama"}, "broken")


def test_estimate_ratios_dp_overhead_and_crossover():
    rates = Rates(1e12, 5e11)
    w = cost.SETTINGS["paper-llama2-7b-sst2"]
    r = estimate(w, rates)
    stages = {s["stage"]: s for s in r["stages"]}
    assert r["ratio"] == pytest.approx((r["user_seconds"] + r["transfer_seconds"]) / r["baseline_seconds"])
    assert stages["PT on Φs (DP)"]["seconds"] == stages["PT on Φs"]["seconds"]  # per-example grads come free
    slow = estimate(w, Rates(1e12, 5e11, dp_overhead=1.5))
    assert {s["stage"]: s for s in slow["stages"]}["PT on Φt (DP)"]["seconds"] == pytest.approx(
        1.5 * stages["PT on Φt"]["seconds"])
    # At the crossover N the (PT on Φs + transfer) / PT on Φt ratio is 1/10 (validation left out: it scales too).
    n = r["crossover_n_train"]
    at = estimate(cost.replace(w, n_train=round(n), eval_examples=0), rates)
    assert at["ratio"] == pytest.approx(0.1, rel=0.01)
    # With the head at the answer only, a student example costs layers kept / layers; logits everywhere add the head.
    answer_only = estimate(cost.replace(w, all_positions=False), rates)
    assert answer_only["student_share"] == pytest.approx(2 / 32, rel=0.01)
    assert r["student_share"] > answer_only["student_share"]


def test_cost_config_names_the_bad_flag():
    with pytest.raises(ConfigError, match="--setting"):
        CostConfig(setting="nope")
    with pytest.raises(ConfigError, match="--utilisation"):
        CostConfig(utilisation=0)
    with pytest.raises(ConfigError, match="--n-train"):
        CostConfig(n_train=0)
    w = CostConfig(setting="paper-gpt2xl-sst2", epochs=3).workload()
    assert (w.epochs, w.n_train, w.target) == (3, 67349, "gpt2-xl")


def test_cli_cost_prints_every_stage(capsys):
    assert main(["cost", "--setting", "paper-gpt2xl-sst2", "--device", "a100-fp32", "--utilisation", "0.5"]) == 0
    out = capsys.readouterr().out
    for stage in ("PT on Φs", "PT on Φt (DP)", "transfer", "distillation (one-time)", "cheaper"):
        assert stage in out
    assert main(["cost", "--target", "tiny-llama", "--keep-layers", "0", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["target"] == "tiny-llama" and math.isfinite(data["ratio"])


def test_calibrate_measures_positive_rates():
    rates = cost.calibrate("tiny-llama", "0", n_tokens=2, text_tokens=8, batch=2, steps=1, threads=0)
    assert rates.forward > 0 and rates.backward > 0 and rates.source_forward > 0 and rates.dp_overhead > 0


def _tokens_run(batch, prompt) -> Tokens:
    """What one forward over ``batch`` runs: padded rows (prompt in front), or packed rows (prompt slots inside)."""
    from post.scoring import PackedBatch

    rows, width = batch.input_ids.shape
    if isinstance(batch, PackedBatch):
        return Tokens(len(batch), rows * width, rows * width**2)
    width += 0 if prompt is None else prompt.shape[-2]
    return Tokens.uniform(rows, width)


def _record_forwards(monkeypatch, owner, method: str) -> list[Tokens]:
    """The tokens of every forward run inside ``owner.method`` from now on (one entry per call of it)."""
    import post.scoring as scoring

    seen: list[Tokens] = []
    inside: list[Tokens] = []
    real_hidden, real = scoring.answer_hidden, getattr(owner, method)

    def hidden_spy(model, batch, prompt=None):
        inside.append(_tokens_run(batch, prompt))
        return real_hidden(model, batch, prompt)

    def spy(self, *a, **kw):
        inside.clear()
        out = real(self, *a, **kw)
        seen.append(sum(inside, Tokens()))
        return out

    monkeypatch.setattr(scoring, "answer_hidden", hidden_spy)
    monkeypatch.setattr(owner, method, spy)
    return seen


def _record_micro_batches(monkeypatch) -> list[Tokens]:
    """The tokens of every micro-batch tuning runs from now on."""
    from post import tune

    return _record_forwards(monkeypatch, tune.PromptTrainer, "_losses")


def test_compare_run_dirs_rebuilds_the_batches_the_run_took(tmp_path, monkeypatch):
    from helpers import write_sentiment_csv
    from post import tune

    data = write_sentiment_csv(tmp_path / "s.csv", n=60)
    seen = _record_micro_batches(monkeypatch)
    for dp in (False, True):
        out = tmp_path / f"run-tune-{dp}"
        tune.tune(tune.TuneConfig(model="tiny-llama", task=str(data), label_words=LABEL_WORDS, n_tokens=3, max_steps=4,
                                  batch_size=8, micro_batch_size=3, eval_limit=5, test=False, dp=dp,
                                  noise_multiplier=1.0), out)
        stage = cost.tune_run_cost(out)
        train = sum(seen, Tokens())
        if not dp:  # the exact batches: same seed, same order, same micro-batches
            assert stage.parts[0].flops == prompt_step_flops(resolve_arch("tiny-llama"), train, head_cols=6)
        else:  # DP sampling is secret: a stand-in Poisson sample of the same rate
            assert stage.dp and 0 < stage.parts[0].flops.forward
        seen.clear()
    rows = cost.compare_run_dirs(tmp_path, Rates(1e9, 1e9))
    assert [r["run"] for r in rows] == ["run-tune-False", "run-tune-True"]
    assert all(r["predicted_seconds"] > 0 and r["measured_seconds"] > 0 for r in rows)
    assert "| run-tune-False |" in cost.report_section(tmp_path, Rates(1e9, 1e9))


def test_the_demo_setting_is_the_shipped_demo_config():
    from importlib import resources

    import yaml

    demo = yaml.safe_load((resources.files("post") / "configs" / "demo.yaml").read_text())
    w, tune, target = cost.SETTINGS["demo"], demo["tune"], demo["tune_target"]
    assert (w.target, w.max_length) == (demo["target"], demo["max_length"])
    assert w.keep_layers == demo["distill"]["keep_layers"]
    assert (w.max_steps, w.batch_size, w.epochs, w.n_tokens, w.eval_examples) == (
        tune["max_steps"], tune["batch_size"], tune["epochs"], tune["n_tokens"], tune["eval_limit"])
    assert (w.target_steps, w.target_batch_size) == (target["max_steps"], target["batch_size"])
    t = demo["transfer"]
    assert (w.transfer_steps, w.transfer_batch_size, w.transfer_mode, w.public_texts) == (
        t["steps"], t["batch_size"], t["mode"], t["public_limit"])
    d = demo["distill"]
    assert (w.distill_steps, w.distill_batch_size, w.block_size) == (d["max_steps"], d["batch_size"], d["block_size"])
    from post.distill import DistillConfig

    assert w.distill_heads == DistillConfig(teacher=demo["target"], **d).logit_terms


def test_distillation_time_adds_the_measured_loss_cost_per_logit():
    w = dataclasses.replace(cost.SETTINGS["demo"], distill_heads=True)
    plain = {s["stage"]: s["seconds"] for s in estimate(w, Rates(1e10, 1e10))["stages"]}
    lossy = {s["stage"]: s["seconds"] for s in estimate(w, Rates(1e10, 1e10, loss_per_logit=1e-9))["stages"]}
    logits = w.distill_steps * w.distill_batch_size * w.block_size * ARCHS["smollm2-135m"].vocab
    assert lossy["distillation (one-time)"] - plain["distillation (one-time)"] == pytest.approx(logits * 1e-9)
    assert lossy["PT on Φs"] == plain["PT on Φs"]  # tuning reads logits at the answer only
    # Without logit terms (hidden-state and answer terms only) no full-vocabulary logits are computed.
    headless = dataclasses.replace(w, distill_heads=False)
    free = {s["stage"]: s["seconds"] for s in estimate(headless, Rates(1e10, 1e10, loss_per_logit=1e-9))["stages"]}
    assert free["distillation (one-time)"] < plain["distillation (one-time)"]


def test_compare_run_dirs_reads_saved_rates_and_never_calibrates_when_told(tmp_path):
    from helpers import write_sentiment_csv
    from post import tune

    data = write_sentiment_csv(tmp_path / "s.csv", n=40)
    tune.tune(tune.TuneConfig(model="tiny-llama", task=str(data), label_words=LABEL_WORDS, n_tokens=2, max_steps=2,
                              batch_size=4, eval_limit=4, test=False), tmp_path / "tune-source")
    assert cost.compare_run_dirs(tmp_path, calibrate_missing=False) == []
    assert cost.report_section(tmp_path, calibrate_missing=False) == ""
    calls = []

    def fake(target, keep, dtype="float32"):
        calls.append(target)
        return Rates(2e9, 1e9)

    with pytest.raises(PostError, match="no target model"):  # a lone tune run on Φs names no target
        cost.compare_run_dirs(tmp_path, calibrate_fn=fake)
    (tmp_path / "cost-calibration.json").write_text(json.dumps(Rates(2e9, 1e9).to_dict()))
    rows = cost.compare_run_dirs(tmp_path, calibrate_fn=fake)
    stage = cost.tune_run_cost(tmp_path / "tune-source")
    want = sum(p.flops.forward / 2e9 + p.flops.backward / 1e9 for p in stage.parts)  # the saved rates, not fake's
    assert not calls and rows[0]["predicted_seconds"] == pytest.approx(want)


# Lengths of five texts in input order; a logical batch of 4 in micro-batches of 2, or cached in batches of 4.
LENGTHS = [10, 3, 7, 2, 9]


def test_padding_by_hand_follows_the_sorted_micro_batches_and_buckets():
    seqs = [[0] * n for n in LENGTHS]
    # Tuning: batch [0, 1, 2, 3] needs two micro-batches, so it is sorted longest first: (10, 7) and (3, 2), padded
    # to 10 and 3 (input order would pad (10, 3) and (7, 2) to 10 and 7). Batch [4] fits one: kept as it is.
    groups = cost._micro_batches(seqs, [0, 1, 2, 3], 2) + cost._micro_batches(seqs, [4], 2)
    assert groups == [[0, 2], [1, 3], [4]]
    assert cost._padded(seqs, groups, 0) == Tokens(5, 2 * 10 + 2 * 3 + 9, 2 * 100 + 2 * 9 + 81)
    assert cost._padded(seqs, groups, 1) == Tokens(5, 2 * 11 + 2 * 4 + 10, 2 * 121 + 2 * 16 + 100)  # + prompt
    assert cost._micro_batches(seqs, [3, 1], 2) == [[3, 1]]  # one micro-batch: input order
    assert cost._micro_batches(seqs, [], 2) == []
    # Constants (and validation), padded: all texts by length, longest first: (10, 9, 7, 3) and (2): 4·10 + 2 = 42
    # tokens instead of input order's (10, 3, 7, 2) and (9): 4·10 + 9 = 49.
    assert cost._buckets(seqs, 4, 0, False) == [[0, 4, 2, 1], [3]]
    assert cost._padded(seqs, cost._buckets(seqs, 4, 0, False), 0) == Tokens(5, 42, 4 * 100 + 4)
    assert cost._buckets(seqs, 2, 0, False) == [[0, 4], [2, 1], [3]]
    assert cost._run(seqs, [[0, 2], [4]], 0, False) == cost._padded(seqs, [[0, 2], [4]], 0)
    # Packed: rows of 10 (the longest), best fit longest first: 10 | 9 | 7 + 3 | 2 (9's row has 1 left).
    # Groups of about 4 examples' tokens (4 × 6.2 → 25): (10, 9) = 19, then 7 + 3 would pass 25: (7, 3, 2).
    assert cost._buckets(seqs, 4, 0, True) == [[0, 4], [2, 1, 3]]
    # Each group repacked in its tightest rows (at most twice the longest): 10 + 9 in one row of 19 (two rows
    # of 10 would run 20 tokens), 7 + 3 + 2 in one of 12 (two of 7: 14). Attention runs over a whole row.
    assert cost._run(seqs, [[0, 4], [2, 1, 3]], 0, True) == Tokens(5, 19 + 12, 19**2 + 12**2)
    # With a 1-token prompt per example: 11 + 10 and 8 + 4 + 3.
    assert cost._run(seqs, [[0, 4], [2, 1, 3]], 1, True) == Tokens(5, 21 + 15, 21**2 + 15**2)
    # 10, 3 and 2: one row of 15 (15 tokens) beats rows of 10 (10 | 3 + 2: 20 tokens).
    assert cost._run(seqs, [[0, 1, 3]], 0, True) == Tokens(3, 15, 15**2)
    # 10, 3, 7 and 9: rows of 10 (10 | 9 | 7 + 3: 30 tokens) beat rows of 19 (10 + 9 | 7 + 3: 38) or 29 (too long).
    assert cost._run(seqs, [[0, 1, 2, 4]], 0, True) == Tokens(4, 30, 3 * 10**2)


def test_micro_batches_and_buckets_are_the_ones_the_code_runs():
    from types import SimpleNamespace

    from post.transfer import Scorer
    from post.tune import PromptTrainer

    class Recorder:  # stands in for a Scorer's model: records the batches constants() runs
        def __init__(self, seqs, packing):
            self.seqs, self.batches, self.packing = seqs, [], packing

        def __call__(self, idx, prompt):
            self.batches.append(list(map(int, idx)))
            return torch.zeros(len(idx), 2)

    rng = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(1, 30, (1,), generator=rng))
        seqs = [[0] * int(k) for k in torch.randint(1, 12, (n,), generator=rng)]  # many ties: order must match
        idx = torch.randperm(n, generator=rng)[: int(torch.randint(1, n + 1, (1,), generator=rng))]
        micro = 1 + trial % 7
        chunks = PromptTrainer._chunks(SimpleNamespace(seqs=seqs, micro=micro), idx)
        assert cost._micro_batches(seqs, idx.tolist(), micro) == [idx[pos].tolist() for pos in chunks]
        for packing in (False, True):
            scorer = Recorder(seqs, packing)
            Scorer.constants(scorer, None, micro)
            assert cost._buckets(seqs, micro, 0, packing) == scorer.batches


def test_transfer_run_cost_counts_the_tokens_the_transfer_ran(tmp_path, monkeypatch):
    from helpers import write_sentiment_csv
    from post import transfer, tune

    data = write_sentiment_csv(tmp_path / "s.csv", n=20)
    ps = tune.tune(tune.TuneConfig(model="tiny-llama", task=str(data), label_words=LABEL_WORDS, n_tokens=2,
                                   max_steps=1, batch_size=4, eval_limit=2, test=False), tmp_path / "ps")
    public = tmp_path / "public.txt"  # ragged and shuffled: input-order batches of 3 mix long and short texts
    public.write_text("\n".join(["bad", "the flight was late and the crew was rude , never again with them", "good",
                                  "ok", "an amazing crew and a great flight , on time all the way", "awful delay",
                                  "fine", "the food was cold and the staff ignored us for the whole trip", "great"]))
    calls = _record_forwards(monkeypatch, transfer.Scorer, "__call__")  # the tokens of each call, in order
    roles, scorers = [], []
    real_call, real_init = transfer.Scorer.__call__, transfer.Scorer.__init__

    def call(self, idx, prompt):
        roles.append("source" if self is scorers[0] else "target")
        return real_call(self, idx, prompt)

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        scorers.append(self)

    monkeypatch.setattr(transfer.Scorer, "__call__", call)
    monkeypatch.setattr(transfer.Scorer, "__init__", init)
    steps = 4
    transfer.transfer(transfer.TransferConfig(source_model="tiny-llama", target_model="tiny-llama",
                                              prompt=ps.prompt, public=str(public), steps=steps, batch_size=3,
                                              mode="label-words", alpha=0.0, device="cpu"), tmp_path / "transfer")
    step_part, const = cost.transfer_run_cost(tmp_path / "transfer")
    seen = {r: [t for t, role in zip(calls, roles, strict=True) if role == r] for r in ("source", "target")}
    assert all(s.packing for s in scorers)  # tiny llama packs: the tokens counted are the packed rows
    arch = resolve_arch("tiny-llama")
    cols = 6  # LABEL_WORDS: three label words per class
    src = sum(seen["source"], Tokens())  # Φs(ps;x) and Φs(x) over every text
    tgt_consts = sum(seen["target"][: len(seen["target"]) - steps], Tokens())  # Φt(x), then one call per step
    tgt_steps = sum(seen["target"][len(seen["target"]) - steps :], Tokens())
    assert const.parts[0].flops == forward_flops(arch, src, head_cols=cols)
    assert const.parts[1].flops == forward_flops(arch, tgt_consts, head_cols=cols)
    assert step_part.parts[0].flops == prompt_step_flops(arch, tgt_steps, head_cols=cols)
    # The constants ran packed: fewer tokens than input-order batches would have padded to.
    seqs = scorers[1].seqs
    in_order = cost._padded(seqs, [list(range(i, min(i + 3, len(seqs)))) for i in range(0, len(seqs), 3)], 0)
    assert tgt_consts.tokens < in_order.tokens


def test_a_run_stopped_early_is_costed_by_the_steps_it_took(tmp_path, monkeypatch):
    from helpers import write_sentiment_csv
    from post import tune

    data = write_sentiment_csv(tmp_path / "s.csv", n=60)
    seen = _record_micro_batches(monkeypatch)
    out = tmp_path / "run-tune"
    result = tune.tune(tune.TuneConfig(model="tiny-llama", task=str(data), label_words=LABEL_WORDS, n_tokens=3,
                                       max_steps=6, batch_size=8, lr=1e-12, eval_every=1, patience=1, eval_limit=5,
                                       test=False), out)
    assert (result.steps, result.planned_steps) == (1, 6)
    stage = cost.tune_run_cost(out)
    train = sum(seen, Tokens())
    assert stage.parts[0].flops == prompt_step_flops(resolve_arch("tiny-llama"), train, head_cols=6)
    assert stage.note.startswith("1 steps, 1 validation")


def test_scoring_with_a_shared_start_by_hand_and_against_the_forwards_it_runs(monkeypatch):
    """predict_scores runs the prompt and the template's head once, then the rest of each example packed, every
    row attending over the start as well: by hand on fixed lengths, then against every forward the code runs.
    Where the start saves too few tokens to pay for its forward (post.scoring.start_pays) every example runs
    whole, in the model as in the code."""
    from post import scoring
    from post.scoring import Encoder, head_ids, predict_scores, shares_prefix
    from post.tasks import Task, Verbalizer

    seqs = [[0] * n for n in LENGTHS]  # 10, 3, 7, 2, 9
    answers = [n - 1 for n in LENGTHS]
    # a 2-token start over 5 examples saves 8 tokens: short of scoring.SHARE_MIN_SAVED, so no start is shared
    whole = cost._run(seqs, cost._buckets(seqs, 4, 1, True), 1, True)
    assert cost._scored(seqs, answers, 1, 4, 1, True) == whole
    assert cost._scored(seqs * 40, answers * 40, 1, 4, 1, True) != cost._run(
        seqs * 40, cost._buckets(seqs * 40, 4, 1, True), 1, True)  # 200 examples save 398: shared
    monkeypatch.setattr(scoring, "SHARE_MIN_SAVED", 1)  # from here on, any saving pays
    # A 2-token start (a 1-vector prompt and 1 head token), run once: 2 tokens, 2² attention. The rest of each
    # example is 9, 2, 6, 1, 8; rows of 9 best fit, longest first: 9 | 8 + 1 | 6 + 2; groups of about 4 examples'
    # rest (4 × 5.2 → 21): 9 + 9 = 18, then 8 more would pass 21: (9, 8, 1) and (6, 2). Each group in its tightest
    # rows: 9 | 8 + 1 (two rows of 9; one row of 18 ties, and the shorter rows win), and 6 + 2 in one row of 8.
    # Every row attends over the 2-token start too: 2 · 9 · (9 + 2) and 8 · (8 + 2).
    want = Tokens(5, 2 + 2 * 9 + 8, 2**2 + 2 * 9 * 11 + 8 * 10)
    assert cost._scored(seqs, answers, 1, 4, 1, True) == want
    no_start = cost._run(seqs, cost._buckets(seqs, 4, 0, True), 0, True)
    assert cost._scored(seqs, answers, 0, 4, 0, True) == no_start
    assert cost._scored(seqs, answers, 1, 4, 1, False) == cost._run(seqs, cost._buckets(seqs, 4, 1, False), 1, False)

    tiny = tiny_model("llama")
    task = Task(template="Review:{text}{mask}")  # "" is nothing but the head: its start stands for one token fewer
    enc = Encoder(task, tiny.tokenizer, tiny.kind, max_length=24)
    texts = ["a great film", "bad", "the plot was awful and the acting was poor", "good", "an amazing movie", ""] * 3
    assert shares_prefix(tiny.model, enc)  # the check's own forwards run before the count starts
    seen: list[Tokens] = []

    def spy(module, args, kwargs):
        x = kwargs.get("input_ids")
        x = kwargs["inputs_embeds"] if x is None else x
        mask = kwargs.get("attention_mask")
        rows, width = x.shape[:2]
        keys = width if mask is None else mask.shape[-1]
        seen.append(Tokens(0, rows * width, rows * width * keys))

    handle = tiny.model.model.register_forward_pre_hook(spy, with_kwargs=True)
    prompt = tiny.model.get_input_embeddings()(torch.arange(5, 8)).detach()
    try:
        predict_scores(tiny.model, enc, Verbalizer.build(task, tiny.tokenizer), texts, batch_size=4, prompt=prompt,
                       progress=False)
    finally:
        handle.remove()
    seqs, answers = enc.encode(texts)
    model = cost._scored(seqs, answers, len(head_ids(enc)), 4, 3, True)
    assert len(seen) > 2 and sum(seen, Tokens()) == Tokens(0, model.tokens, model.squares)


def test_dp_ledger_writes_by_hand_and_against_a_dp_run(tmp_path, monkeypatch):
    """A DP run accounts ε and writes its ledger before its first step and at each checkpoint short of its planned
    end; the cost model counts the same writes and adds the measured time of each."""
    from helpers import write_sentiment_csv
    from post import tune

    assert [cost.dp_ledger_writes(s, 50) for s in (0, 1, 12, 50, 51, 100, 120)] == [0, 1, 1, 1, 2, 2, 3]
    assert cost.dp_ledger_writes(4, 2, total_steps=6) == 3  # stopped early: 0, 2 and 4 were short of 6
    data = write_sentiment_csv(tmp_path / "s.csv", n=40)
    written: list[str] = []
    real = tune.write_json
    monkeypatch.setattr(tune, "write_json", lambda path, obj: (written.append(path.name), real(path, obj))[-1])
    out = tmp_path / "run-tune-dp"
    tune.tune(tune.TuneConfig(model="tiny-llama", task=str(data), label_words=LABEL_WORDS, n_tokens=2, max_steps=7,
                              batch_size=8, eval_limit=4, test=False, dp=True, noise_multiplier=1.0,
                              checkpoint_every=3), out)
    during = written.count(tune.LEDGER_FILE) - 1  # the last: the final ledger, after training
    stage = cost.tune_run_cost(out)
    assert stage.ledger_writes == during == cost.dp_ledger_writes(7, 3) == 3  # before step 1, at 3 and at 6
    plain = dataclasses.replace(stage, ledger_writes=0).timed(Rates(1e9, 1e9)).seconds
    assert stage.timed(Rates(1e9, 1e9, ledger_write=0.5)).seconds == pytest.approx(plain + 1.5)


@pytest.mark.parametrize("native", [True, False])
def test_runs_are_compared_only_with_rates_of_their_own_dtype(tmp_path, monkeypatch, native):
    """A bf16 run (dtype auto on native-bf16 hardware) is not predicted from fp32 rates, nor an fp32 run from bf16
    ones; a distillation under auto trains in fp32, and calibration follows the prompt runs' dtype."""
    import yaml

    import post.config

    monkeypatch.setattr(post.config, "native_bf16", lambda device: native)
    runs = {"tune-target": {"model": "smollm2-135m", "dtype": "auto"},
            "distill": {"teacher": "smollm2-135m", "keep_layers": "0,29", "dtype": "auto"},
            "tune-explicit": {"model": "smollm2-135m", "dtype": "bfloat16"}}
    for name, cfg in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(cfg))
    got = {name: cost.run_dtype(tmp_path / name) for name in runs}
    assert got == {"tune-target": "bfloat16" if native else "float32", "distill": "float32",
                   "tune-explicit": "bfloat16"}
    asked = []
    paths = [tmp_path / n for n in runs]
    wanted = cost._prompt_runs_dtype(paths, {p: cost.run_dtype(p) for p in paths})
    cost._calibrate_for(paths, lambda t, k, dtype: asked.append(dtype) or Rates(1, 1), wanted)
    # the prompt runs' majority dtype (both bf16 on native hardware; else one each, and a tie goes to float32)
    assert asked == ["bfloat16" if native else "float32"]

    stage = cost.StageCost("tune-target", "user", parts=[])
    monkeypatch.setattr(cost, "run_dir_costs", lambda run: [(stage, 1.0)] if run.name == "tune-target" else [])
    for name in runs:
        (tmp_path / name / "result.json").write_text("{}")
    rows = {d: cost.compare_run_dirs(tmp_path, Rates(1e9, 1e9, dtype=d)) for d in ("float32", "bfloat16")}
    kept = "bfloat16" if native else "float32"
    assert [r["run"] for r in rows[kept]] == ["tune-target"]
    assert rows["float32" if native else "bfloat16"] == []
    # rates saved in float32 before the runs took bf16 are measured again, in bf16, and saved
    (tmp_path / "cost-calibration.json").write_text(json.dumps(Rates(1e9, 1e9).to_dict()))
    asked.clear()
    rows = cost.compare_run_dirs(tmp_path, calibrate_fn=lambda t, k, dtype: asked.append(dtype) or Rates(
        1e9, 1e9, dtype=dtype))
    assert asked == (["bfloat16"] if native else [])
    assert [r["run"] for r in rows] == ["tune-target"]
    saved = json.loads((tmp_path / "cost-calibration.json").read_text())["dtype"]
    assert saved == kept
