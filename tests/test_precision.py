"""bf16 frozen models with fp32 prompts (``--dtype bfloat16`` / ``auto``): what resolves to what, and that tuning,
DP clipping, scoring and the transfer keep their meaning when the model computes in bf16."""

import json

import numpy as np
import pytest
import torch

import post.config
import post.errors
from helpers import write_sentiment_csv
from post.config import ModelOptions, native_bf16
from post.distill import DistillConfig
from post.models import save_model, tiny_model
from post.prompt import read_prompt
from post.scoring import Encoder, predict_scores
from post.tasks import Verbalizer
from post.transfer import TransferConfig, transfer
from post.tune import PromptTrainer, TuneConfig, tune

LABEL_WORDS = "negative=bad;positive=good"


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "sentiment.csv")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_where_the_hardware_has_it_and_never_for_weights_that_train(monkeypatch, native):
    monkeypatch.setattr(post.config, "native_bf16", lambda device: native)
    want = torch.bfloat16 if native else torch.float32
    assert ModelOptions(dtype="auto", device="cpu").torch_dtype == want
    assert TuneConfig(model="tiny-llama", task="mr", dtype="auto", device="cpu").torch_dtype == want
    # distillation trains the student's weights: auto keeps them fp32; an explicit dtype is taken as given
    assert DistillConfig(teacher="tiny-llama", dtype="auto", device="cpu").torch_dtype == torch.float32
    assert DistillConfig(teacher="tiny-llama", dtype="bfloat16", device="cpu").torch_dtype == torch.bfloat16
    assert ModelOptions(dtype="float32").torch_dtype == torch.float32  # the default is unchanged by the hardware
    assert ModelOptions().dtype == "float32"


def test_native_bf16_on_cuda_needs_ampere_not_emulation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # says yes when emulating too
    for capability, native in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert native_bf16(torch.device("cuda")) is native


def test_a_pre_v2_prompt_on_a_bf16_model_is_refused_with_a_hint(data_csv, tmp_path):
    from post.models import _fingerprint, load_model
    from post.prompt import check_compatible

    target_dir = save_model(tiny_model("llama"), tmp_path / "m")
    ps = tune(TuneConfig(model=str(target_dir), task=str(data_csv), label_words=LABEL_WORDS, n_tokens=4, epochs=1,
                         batch_size=8, lr=0.1, test=False), tmp_path / "ps")
    pf = read_prompt(ps.prompt)
    fp32 = load_model(str(target_dir))
    pf.meta["model"]["fingerprint"] = _fingerprint(fp32.model, torch.float32, b"post-model-fingerprint-v1\0")
    check_compatible(pf, fp32)  # an old file on the model in float32: accepted
    with pytest.raises(post.errors.PostError, match="try --dtype float32"):
        check_compatible(pf, load_model(str(target_dir), dtype=torch.bfloat16))


def test_native_bf16_reads_the_device():
    assert native_bf16(torch.device("meta")) is False
    if not torch.cuda.is_available():
        assert native_bf16(torch.device("cuda")) is False
    flags = {name: bool(getattr(torch.cpu, name, lambda: False)())
             for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")}
    assert native_bf16(torch.device("cpu")) == any(flags.values())


def test_bad_dtype_names_the_flag():
    with pytest.raises(post.errors.ConfigError, match="--dtype: .*float32, bfloat16, float16 or auto"):
        ModelOptions(dtype="float64")


def _trainers(data_csv):
    from post.data import load_labelled

    data = load_labelled(str(data_csv), label_words=LABEL_WORDS)
    train = data.split("train")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        loaded = tiny_model("llama")
        loaded.model.to(dtype)
        enc = Encoder(data.task, loaded.tokenizer, loaded.kind, 64)
        verb = Verbalizer.build(data.task, loaded.tokenizer)
        out[dtype] = (loaded, PromptTrainer(loaded, enc, verb, list(train.texts[:12]), list(train.labels[:12]), 4))
    return out, data, train


def test_bf16_model_gives_fp32_gradients_that_point_where_fp32_ones_do_and_clipping_holds(data_csv):
    """The prompt stays an fp32 leaf: its gradient through a bf16 model is fp32, close in direction to the fp32
    model's (a cast that cut the graph would give zeros), and every per-example clipped gradient is within C."""
    trainers, *_ = _trainers(data_csv)
    torch.manual_seed(0)
    prompt = torch.randn(4, 64) * 0.5
    idx = torch.arange(12)
    g32, loss32 = trainers[torch.float32][1].mean_gradient(prompt, idx)
    g16, loss16 = trainers[torch.bfloat16][1].mean_gradient(prompt, idx)
    assert g16.dtype == torch.float32 and float(g16.norm()) > 0
    cos = torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0)
    assert float(cos) > 0.98 and loss16 == pytest.approx(loss32, rel=0.05)
    clip = 1e-3  # far below every example's norm, so every example is clipped
    summed, _, norms = trainers[torch.bfloat16][1].clipped_sum(prompt, idx, clip)
    assert summed.dtype == torch.float32 and bool((norms > clip).all())
    for i in range(len(idx)):
        one, _, _ = trainers[torch.bfloat16][1].clipped_sum(prompt, idx[i : i + 1], clip)
        assert float(one.norm()) <= clip * (1 + 1e-5)
    assert float(summed.norm()) <= len(idx) * clip * (1 + 1e-5)


def test_bf16_scores_agree_with_fp32_with_and_without_a_prompt(data_csv):
    trainers, data, train = _trainers(data_csv)
    torch.manual_seed(1)
    prompt = torch.randn(4, 64) * 0.5
    texts = list(train.texts[:24])
    got = {}
    for dtype, (loaded, _) in trainers.items():
        enc = Encoder(data.task, loaded.tokenizer, loaded.kind, 64)
        verb = Verbalizer.build(data.task, loaded.tokenizer)
        got[dtype] = [predict_scores(loaded.model, enc, verb, texts, prompt=p, progress=False) for p in (prompt, None)]
    for a, b in zip(got[torch.float32], got[torch.bfloat16], strict=True):
        assert b.dtype == np.float32
        margin = a[:, 1] - a[:, 0]
        # bf16 keeps ~3 significant digits: the scores move by a few hundredths, and only near-ties flip
        assert np.abs(a - b).max() < 0.1
        clear = np.abs(margin) > 0.1
        assert (a.argmax(1) == b.argmax(1))[clear].all()


def test_bf16_tuning_learns_and_saves_an_fp32_prompt_and_dp_spends_the_same_epsilon(data_csv, tmp_path):
    base = dict(model="tiny-llama", task=str(data_csv), label_words=LABEL_WORDS, n_tokens=4, epochs=5, batch_size=8,
                lr=0.1, eval_every=1000, dtype="bfloat16")
    r = tune(TuneConfig(**base), tmp_path / "np")
    assert r.test_accuracy >= 0.9
    assert read_prompt(r.prompt).tensor.dtype == torch.float32
    dp = dict(base, epochs=1, dp=True, epsilon=8.0, max_grad_norm=1.0)
    a = tune(TuneConfig(**dp), tmp_path / "dp16")
    b = tune(TuneConfig(**{**dp, "dtype": "float32"}), tmp_path / "dp32")
    assert a.privacy["epsilon"] == pytest.approx(b.privacy["epsilon"])
    assert a.privacy["noise_multiplier"] == pytest.approx(b.privacy["noise_multiplier"])
    # each run records the dtype its frozen model computed in, and the cost model reads it from there
    from post.cost import run_dtype

    recorded = {d: json.loads((tmp_path / d / "result.json").read_text())["model_dtype"] for d in ("np", "dp32")}
    assert recorded == {"np": "bfloat16", "dp32": "float32"}
    assert run_dtype(tmp_path / "np") == "bfloat16" and run_dtype(tmp_path / "dp16") == "bfloat16"


def test_transfer_into_a_bf16_target_learns_an_fp32_prompt(data_csv, tmp_path):
    teacher = tiny_model("llama")
    target_dir = save_model(teacher, tmp_path / "target")
    public = tmp_path / "public.txt"
    public.write_text("\n".join(["a good day", "bad service", "great flight", "awful delay", "ok trip"] * 20))
    ps = tune(TuneConfig(model=str(target_dir), task=str(data_csv), label_words=LABEL_WORDS, n_tokens=4, epochs=3,
                         batch_size=8, lr=0.1, test=False), tmp_path / "ps")
    r = transfer(TransferConfig(source_model=str(target_dir), prompt=ps.prompt, target_model=str(target_dir),
                                public=str(public), steps=40, batch_size=8, lr=0.05, alpha=0.0, device="cpu",
                                dtype="bfloat16"), tmp_path / "t")
    curve = [json.loads(x)["loss"] for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
             if "loss" in x]
    assert curve[-1] < 0.3 * curve[0]
    assert read_prompt(r.prompt).tensor.dtype == torch.float32



def test_the_fingerprint_is_the_same_in_fp32_and_bf16_and_older_fp32_fingerprints_still_match():
    from post.models import _fingerprint, fingerprint_matches, model_fingerprint

    a = tiny_model("llama").model
    b = tiny_model("llama").model.to(torch.bfloat16)
    assert model_fingerprint(a) == model_fingerprint(b)
    legacy = _fingerprint(a, torch.float32, b"post-model-fingerprint-v1\0")  # what prompt files carried before
    assert legacy != model_fingerprint(a) and fingerprint_matches(legacy, a)
    other = tiny_model("llama", seed=1).model
    assert not fingerprint_matches(model_fingerprint(a), other) and not fingerprint_matches(legacy, other)
    with torch.no_grad():  # an edit that bf16 can see changes it
        b.get_input_embeddings().weight[7, 3] += 0.05
    assert model_fingerprint(b) != model_fingerprint(a)


def test_label_rows_of_the_head_multiply_in_fp32_on_a_bf16_model():
    """A bf16 product rounds class scores to coarse steps, so classes tie and a tie goes to class 0."""
    from post.scoring import head_logits

    m = tiny_model("llama").model.to(torch.bfloat16)
    torch.manual_seed(0)
    hidden = (torch.randn(6, 64) * 3).to(torch.bfloat16)
    ids = torch.tensor([5, 9, 11])
    got = head_logits(m, hidden, ids)
    w = m.get_output_embeddings().weight[ids]
    assert got.dtype == torch.float32
    assert torch.equal(got, hidden.float() @ w.float().T)
    assert not torch.equal(got, (hidden @ w.T).float())  # the bf16 product is coarser


def test_the_whole_vocabulary_head_multiplies_in_fp32_on_a_bf16_model():
    """The transfer's vocab loss matches small prompt-induced changes of vocabulary logits; a bf16 product rounds
    them. A bf16 head runs in fp32 a block of rows at a time; a float32 model's head is untouched."""
    from post.scoring import _fp32_linear, head_logits

    m = tiny_model("llama").model.to(torch.bfloat16)
    torch.manual_seed(0)
    hidden = (torch.randn(6, 64) * 3).to(torch.bfloat16)
    w = m.get_output_embeddings().weight
    got = head_logits(m, hidden)
    assert got.dtype == torch.float32 and got.shape == (6, w.shape[0])
    assert torch.equal(got, torch.nn.functional.linear(hidden.float(), w.float()))
    assert not torch.equal(got, m.get_output_embeddings()(hidden).float())  # the bf16 product is coarser
    bias = torch.randn(w.shape[0]).to(torch.bfloat16)
    blocks = _fp32_linear(hidden, w, bias, rows=7)  # blocks of 7 rows, the last one short
    torch.testing.assert_close(blocks, hidden.float() @ w.float().T + bias.float(), rtol=0, atol=1e-5)
    m32 = tiny_model("llama").model
    h32 = torch.randn(6, 64)
    assert torch.equal(head_logits(m32, h32), m32.get_output_embeddings()(h32))


def test_a_bf16_masked_lm_head_decodes_in_fp32():
    """RoBERTa's head (dense, gelu, norm, decoder) in bf16: the transform stays bf16, the decoder's product is
    float32 (whole vocabulary, or only the label rows), so class scores do not round to coarse steps and tie."""
    from post.scoring import _lm_head, head_logits

    m = tiny_model("roberta").model.to(torch.bfloat16)
    head, decoder = _lm_head(m), m.get_output_embeddings()
    torch.manual_seed(0)
    hidden = (torch.randn(6, head.dense.in_features) * 3).to(torch.bfloat16)
    with torch.no_grad():
        pre = head.layer_norm(torch.nn.functional.gelu(head.dense(hidden)))  # the transform, in bf16
        full = torch.nn.functional.linear(pre.float(), decoder.weight.float(), decoder.bias.float())
        old = head(hidden)  # no hook outside head_logits: the bf16 product
        ids = torch.tensor([5, 9, 11])
        got, rows = head_logits(m, hidden), head_logits(m, hidden, ids)
    assert old.dtype == torch.bfloat16 and not torch.equal(old.float(), full)
    assert got.dtype == torch.float32 and torch.equal(got, full)
    assert rows.shape == (6, 3) and rows.dtype == torch.float32
    torch.testing.assert_close(rows, full[:, ids], rtol=0, atol=1e-6)  # fewer rows: another summation blocking
    assert not decoder._forward_hooks  # the hook is gone after each call
    m32 = tiny_model("roberta").model  # float32: untouched
    h32 = torch.randn(6, head.dense.in_features)
    with torch.no_grad():
        assert torch.equal(head_logits(m32, h32), _lm_head(m32)(h32))


@pytest.mark.parametrize("arch", ["albert", "distilbert"])
def test_a_masked_lm_whose_head_cannot_be_read_is_refused_at_load(arch):
    """ALBERT's and DistilBERT's MLM heads are not an lm_head/cls module: their output embeddings alone would skip
    the head's dense and norm layers and give wrong answers in every precision."""
    import transformers

    from post.errors import PostError
    from post.models import _ready
    from post.tiny import build_tiny

    _, tokenizer, _ = build_tiny("roberta", 0)
    small = {"vocab_size": len(tokenizer), "max_position_embeddings": 64}
    if arch == "albert":
        cfg = transformers.AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, **small)
        model = transformers.AlbertForMaskedLM(cfg)
    else:
        cfg = transformers.DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, **small)
        model = transformers.DistilBertForMaskedLM(cfg)
    with pytest.raises(PostError, match=f"masked LM \\({arch}\\).*cannot be read"):
        _ready(model, tokenizer, f"tiny-{arch}", "masked", None)


def test_the_fp32_decoder_passes_gradients_and_never_stays_behind():
    from post.scoring import _lm_head, head_logits

    m = tiny_model("roberta").model.to(torch.bfloat16)
    width, decoder = _lm_head(m).dense.in_features, m.get_output_embeddings()
    hidden = torch.randn(4, width).to(torch.bfloat16).requires_grad_(True)
    head_logits(m, hidden, torch.tensor([5, 9])).sum().backward()  # as prompt tuning does through the head
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    with pytest.raises(RuntimeError):  # an error inside the head (a wrong width) still removes the hook
        head_logits(m, torch.randn(4, width + 1).to(torch.bfloat16))
    assert not decoder._forward_hooks


def test_the_fp32_decoder_gives_each_thread_its_own_rows():
    """Threads scoring through one bf16 masked LM (a service's workers) each get their own label rows: the hook
    that makes the decoder's product float32 is registered on the shared module, so calls must not overlap."""
    import threading

    from post.scoring import _lm_head, head_logits

    m = tiny_model("roberta").model.to(torch.bfloat16)
    width = _lm_head(m).dense.in_features
    torch.manual_seed(0)
    hidden = torch.randn(4, width).to(torch.bfloat16)
    asks = [torch.tensor(ids) for ids in ([5, 9], [11, 12, 13], [7], [20, 21, 22, 23])]
    with torch.no_grad():
        want = [head_logits(m, hidden, ids) for ids in asks]
    wrong: list[str] = []

    def worker(k: int) -> None:
        with torch.no_grad():
            for _ in range(60):
                got = head_logits(m, hidden, asks[k % len(asks)])
                if got.shape != want[k % len(asks)].shape or not torch.equal(got, want[k % len(asks)]):
                    wrong.append(f"thread {k}: {tuple(got.shape)}")
                    return

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, wrong
    assert not m.get_output_embeddings()._forward_hooks
