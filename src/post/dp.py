"""DP-SGD kernels for a soft prompt: per-example gradients, clipping, noise, Poisson sampling.

Shapes: B examples, n prompt tokens, d width.

The language model is frozen, so the gradient of example i's loss with respect to the prompt is
exactly the gradient reaching example i's own copy of it. Expanding the prompt to (B, n, d) as a
leaf and back-propagating the summed loss therefore yields all B per-example gradients at the
cost of one ordinary step, with no hooks (PEFT's prompt module repeats a batch-of-one prompt,
which makes hook-based per-sample gradients clip the *batch* gradient instead).

Reference: Abadi et al. 2016 (DP-SGD); Duan et al. 2023 (PromptDPSGD).
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable

import numpy as np
import torch

CLIP_EPS = 1e-6


def per_example_grads(loss_fn: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor,
                      batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients of ``loss_fn`` w.r.t. the prompt.

    Args:
        loss_fn: maps a (B, n, d) prompt (one copy per example) to (B,) per-example losses.
        prompt: (n, d) current prompt.
        batch_size: B.

    Returns:
        grads (B, n, d) and losses (B,), both detached.
    """
    copies = prompt.detach().unsqueeze(0).repeat(batch_size, 1, 1).requires_grad_(True)
    losses = loss_fn(copies)
    if losses.shape != (batch_size,):
        raise ValueError(f"loss_fn must return ({batch_size},) per-example losses, got {tuple(losses.shape)}")
    (grads,) = torch.autograd.grad(losses.sum(), copies)
    return grads, losses.detach()


def clip_per_example(grads: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each example's gradient (B, ...) to L2 norm at most ``max_norm``.

    Returns the clipped gradients and the original norms (B,). ``max_norm = inf`` leaves them as
    they are.
    """
    norms = grads.flatten(1).norm(dim=1)
    factor = (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    return grads * factor.view(-1, *([1] * (grads.dim() - 1))), norms


def add_noise(summed: torch.Tensor, *, noise_multiplier: float, max_grad_norm: float,
              generator: np.random.Generator) -> torch.Tensor:
    """``summed`` + N(0, (σ·C)²) noise drawn (in float64, on the CPU) from ``generator``."""
    if noise_multiplier == 0:
        return summed.clone()
    std = noise_multiplier * max_grad_norm
    noise = torch.from_numpy(generator.standard_normal(tuple(summed.shape)) * std)
    return summed + noise.to(summed.device, summed.dtype)


def poisson_sample(n: int, sample_rate: float, generator: np.random.Generator) -> torch.Tensor:
    """Indices of a Poisson sample: each of ``n`` examples is in independently with prob. q (may be empty)."""
    return torch.from_numpy(np.flatnonzero(generator.random(n) < sample_rate))


def step_generator(seed: int, step: int, stream: int) -> np.random.Generator:
    """A generator for one step and one purpose (0: sampling, 1: noise), independent of history.

    numpy's PCG64 keyed by a SeedSequence over the whole (128-bit) seed with (step, stream) as its
    spawn key: every step and purpose gets its own stream, derived from all the seed's bits (torch's
    CPU generator keeps only 32 bits of a seed, so it is not used here). A resumed run draws exactly
    what an uninterrupted one would have, with no RNG state to checkpoint. What protects privacy is
    that ``seed`` is secret (:func:`new_secret_seed`): anyone who knows it can replay every sample
    and every noise draw, and against them the run has no privacy at all.
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(step, stream))))


def new_secret_seed() -> int:
    """A 128-bit seed from the operating system's entropy source (``secrets``), never derived from a config."""
    return secrets.randbits(128)


# --- secure mode: noise and sampling straight from the OS CSPRNG ------------------------------------------
# In the spirit of Opacus' secure_mode: the uniforms come from os.urandom (not a seedable PRNG), and
# each Gaussian is the scaled sum of four draws, which smooths the low-order bits of floating-point
# Gaussian samplers that Mironov (CCS 2012) showed can leak the unnoised value. It is not replayable:
# a resumed secure run draws fresh randomness for the steps after its checkpoint (those steps were
# accounted before they ran, and nothing from the discarded draws ever leaves the user).

SECURE_DRAWS = 4


def _os_uniform(n: int) -> torch.Tensor:
    """``n`` float64 uniforms in the open interval (0, 1), 52 random bits each, from os.urandom."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(12)  # 52 bits: exact in float64
    return torch.from_numpy((raw.astype(np.float64) + 0.5) / float(1 << 52))


def secure_normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
    """N(0, std²) samples: Box–Muller on CSPRNG uniforms, float64, the sum of 4 draws scaled by 1/2."""
    n = math.prod(shape)
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(SECURE_DRAWS):
        u1, u2 = _os_uniform(n), _os_uniform(n)
        total += torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return (total * (std / math.sqrt(SECURE_DRAWS))).reshape(shape).float()


def secure_add_noise(summed: torch.Tensor, *, noise_multiplier: float, max_grad_norm: float) -> torch.Tensor:
    """``summed`` + N(0, (σ·C)²) noise from :func:`secure_normal`."""
    if noise_multiplier == 0:
        return summed.clone()
    noise = secure_normal(tuple(summed.shape), noise_multiplier * max_grad_norm)
    return summed + noise.to(summed.device, summed.dtype)


def secure_poisson_sample(n: int, sample_rate: float) -> torch.Tensor:
    """Like :func:`poisson_sample`, with CSPRNG uniforms."""
    return torch.nonzero(_os_uniform(n) < sample_rate).flatten()
