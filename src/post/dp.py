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

from collections.abc import Callable

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
              generator: torch.Generator) -> torch.Tensor:
    """``summed`` + N(0, (σ·C)²) noise drawn on the CPU from ``generator``."""
    if noise_multiplier == 0:
        return summed.clone()
    std = noise_multiplier * max_grad_norm
    noise = torch.normal(0.0, std, size=tuple(summed.shape), generator=generator, dtype=torch.float32)
    return summed + noise.to(summed.device, summed.dtype)


def poisson_sample(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample: each of ``n`` examples is in independently with prob. q (may be empty)."""
    return torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten()


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A generator for one step and one purpose (0: sampling, 1: noise), independent of history.

    Deriving it from (seed, step, stream) makes a resumed run draw exactly what an uninterrupted
    one would have, with no RNG state to checkpoint.
    """
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7 + stream) % (2**63 - 1))
    return g
