"""Tests that would catch a wrong DP-SGD implementation (in the spirit of Opacus' own)."""

import math

import pytest
import torch

from post.accounting import PrivacyLedger, calibrate_noise, compute_epsilon, default_delta
from post.dp import add_noise, clip_per_example, per_example_grads, poisson_sample, step_generator
from post.errors import ConfigError, PostError
from post.models import tiny_model
from post.prompt import init_prompt
from post.scoring import Encoder
from post.tasks import Task, Verbalizer
from post.tune import PromptTrainer

TEXTS = ["a good film", "bad acting , awful plot", "great", "poor and terrible", "an amazing film", "bad"]
LABELS = [1, 0, 1, 0, 1, 0]


@pytest.fixture(scope="module", params=["llama", "roberta"])
def trainer(request):
    loaded = tiny_model(request.param)
    task = Task()
    enc = Encoder(task, loaded.tokenizer, loaded.kind, max_length=24)
    verb = Verbalizer.build(task, loaded.tokenizer)
    t = PromptTrainer(loaded, enc, verb, TEXTS, LABELS, micro_batch_size=4)
    prompt = init_prompt(loaded, 5, init="text", init_text=task.init_text)
    return t, prompt


def test_per_example_gradients_equal_one_at_a_time_loop(trainer):
    t, prompt = trainer
    idx = torch.arange(len(TEXTS))
    grads, losses = per_example_grads(lambda c: t._losses(idx, c), prompt, len(idx))
    for i in range(len(TEXTS)):
        g, loss = t.mean_gradient(prompt, idx[i : i + 1])
        torch.testing.assert_close(grads[i], g, rtol=1e-5, atol=1e-7)
        assert losses[i].item() == pytest.approx(loss, rel=1e-5)


def test_zero_noise_infinite_clip_equals_plain_sgd(trainer):
    t, prompt = trainer
    idx = torch.arange(len(TEXTS))
    ledger = PrivacyLedger(noise_multiplier=0.0, max_grad_norm=math.inf, sample_rate=0.5, steps=0,
                           planned_steps=1, delta=1e-5, accountant="pld", dataset_size=6, target_epsilon=None,
                           epsilon=0.0)
    private, _ = t.dp_gradient(prompt, idx, ledger=ledger, expected_batch=len(idx), noise=step_generator(0, 0, 1))
    plain, _ = t.mean_gradient(prompt, idx)
    torch.testing.assert_close(private, plain, rtol=1e-6, atol=1e-8)
    # The resulting SGD updates agree too.
    p1 = prompt.clone().requires_grad_(True)
    p2 = prompt.clone().requires_grad_(True)
    for p, g in ((p1, private), (p2, plain)):
        opt = torch.optim.SGD([p], lr=0.1)
        p.grad = g
        opt.step()
    torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-8)


def test_clipped_norms_are_at_most_c_and_equal_c_when_larger():
    torch.manual_seed(0)
    grads = torch.randn(16, 5, 8) * torch.logspace(-2, 1, 16).view(-1, 1, 1)
    c = 1.0
    clipped, norms = clip_per_example(grads, c)
    after = clipped.flatten(1).norm(dim=1)
    assert (after <= c + 1e-6).all()
    big = norms > c
    assert big.any() and (~big).any()
    torch.testing.assert_close(after[big], torch.full_like(after[big], c), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clipped[~big], grads[~big])  # small ones untouched


def test_trainer_clipped_sum_respects_c(trainer):
    t, prompt = trainer
    idx = torch.arange(len(TEXTS))
    grads, _ = per_example_grads(lambda c: t._losses(idx, c), prompt, len(idx))
    c = float(grads.flatten(1).norm(dim=1).median())
    summed, _, norms = t.clipped_sum(prompt, idx, c)
    clipped, _ = clip_per_example(grads, c)
    torch.testing.assert_close(summed, clipped.sum(0), rtol=1e-5, atol=1e-7)
    assert summed.norm() <= c * len(idx) + 1e-5


def test_noise_has_std_sigma_c_and_is_seeded():
    zeros = torch.zeros(200, 100)
    a = add_noise(zeros, noise_multiplier=2.0, max_grad_norm=0.5, generator=step_generator(1, 3, 1))
    b = add_noise(zeros, noise_multiplier=2.0, max_grad_norm=0.5, generator=step_generator(1, 3, 1))
    c = add_noise(zeros, noise_multiplier=2.0, max_grad_norm=0.5, generator=step_generator(2, 3, 1))
    assert a.std().item() == pytest.approx(1.0, rel=0.02)
    assert abs(a.mean().item()) < 0.02
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(add_noise(zeros, noise_multiplier=0.0, max_grad_norm=1.0,
                                         generator=step_generator(0, 0, 1)), zeros)


def test_poisson_sampling_rate_and_empty_batches():
    sizes = [len(poisson_sample(1000, 0.05, step_generator(0, s, 0))) for s in range(200)]
    assert sum(sizes) / len(sizes) == pytest.approx(50, rel=0.05)
    assert len(set(sizes)) > 5  # the batch size varies: it is not fixed-size sampling
    empties = sum(len(poisson_sample(10, 0.01, step_generator(0, s, 0))) == 0 for s in range(100))
    assert empties > 50


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibrated_sigma_round_trips_to_epsilon(accountant):
    q, steps, delta = 32 / 3200, 300, 1e-4
    for target in (1.0, 8.0):
        sigma = calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q, steps=steps, accountant=accountant)
        eps = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=accountant)
        assert eps <= target + 1e-9
        assert eps == pytest.approx(target, abs=0.01)


def test_accountant_matches_published_values():
    # Reference values checked with Opacus (PRV) and dp-accounting (PLD) for q = 1/32, 96 steps.
    eps = compute_epsilon(noise_multiplier=0.598, sample_rate=1 / 32, steps=96, delta=1e-5)
    assert eps == pytest.approx(8.0, abs=0.05)
    assert compute_epsilon(noise_multiplier=0.638, sample_rate=1 / 32, steps=96, delta=1e-5, accountant="rdp") == \
        pytest.approx(8.0, abs=0.1)


def test_more_noise_less_epsilon_and_more_steps_more_epsilon():
    def eps(sigma, steps):
        return compute_epsilon(noise_multiplier=sigma, steps=steps, sample_rate=0.01, delta=1e-5)

    assert eps(2.0, 100) < eps(1.0, 100) < eps(1.0, 200)
    assert eps(1.0, 0) == 0.0


def test_ledger_recomputes_and_refuses_edits():
    ledger = PrivacyLedger(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.01, steps=0, planned_steps=100,
                           delta=1e-5, accountant="pld", dataset_size=3200, target_epsilon=None, epsilon=0.0).after(100)
    again = PrivacyLedger.from_dict(ledger.to_dict())
    assert again.epsilon == pytest.approx(ledger.recompute_epsilon())
    edited = {**ledger.to_dict(), "epsilon": ledger.epsilon / 2}
    with pytest.raises(PostError, match="edited"):
        PrivacyLedger.from_dict(edited)
    missing = {k: v for k, v in ledger.to_dict().items() if k != "steps"}
    with pytest.raises(PostError, match="incomplete"):
        PrivacyLedger.from_dict(missing)


def test_default_delta_is_below_one_over_n():
    for n in (1, 9, 10, 11, 3200, 10000, 123457):
        d = default_delta(n)
        assert d < 1 / n and d >= 0.01 / n


def test_impossible_privacy_settings_are_rejected():
    with pytest.raises(ConfigError, match="epsilon"):
        calibrate_noise(target_epsilon=0, delta=1e-5, sample_rate=0.01, steps=10)
    with pytest.raises(ConfigError, match="delta"):
        calibrate_noise(target_epsilon=1, delta=1.0, sample_rate=0.01, steps=10)
    with pytest.raises(ConfigError, match="sampling rate"):
        calibrate_noise(target_epsilon=1, delta=1e-5, sample_rate=1.5, steps=10)


def test_remembered_sigma_is_reused_but_never_trusted(tmp_path, monkeypatch):
    """calibrate_noise remembers σ in the cache; a remembered σ whose ε exceeds the target (an edited or
    stale cache) is ignored and σ searched again."""
    import json

    monkeypatch.setenv("POST_CACHE_DIR", str(tmp_path))
    kw = dict(target_epsilon=3.0, delta=1e-5, sample_rate=0.02, steps=50, accountant="rdp")
    sigma = calibrate_noise(**kw)
    memo = tmp_path / "accounting" / "calibrations.json"
    table = json.loads(memo.read_text())
    assert list(table.values()) == [sigma]
    assert calibrate_noise(**kw) == sigma
    table = {k: sigma / 2 for k in table}  # too little noise for ε = 3
    memo.write_text(json.dumps(table))
    again = calibrate_noise(**kw)
    assert again == pytest.approx(sigma, rel=1e-6)
    assert compute_epsilon(noise_multiplier=again, sample_rate=0.02, steps=50, delta=1e-5, accountant="rdp") <= 3.0

