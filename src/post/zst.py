"""Baseline: zero-shot continuous prompt transfer (Wu et al., ICLR 2024), no data at all.

Each source prompt vector p is encoded by its cosine similarities to the embeddings of K anchor
tokens that both vocabularies share, r = cos(p, E_s[anchors]). The target vector q is found by
gradient descent so that cos(q, E_t[anchors]) matches r. The relative coordinates are
model-independent, so this works across widths and tokenizers, but it only preserves where the
prompt sits relative to ordinary tokens, which POST's results show is a weak signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from post.config import ModelOptions, require
from post.errors import PostError
from post.models import LoadedModel
from post.prompt import load_prompt, save_prompt
from post.resolve import load_configured_model
from post.results import ZstResult
from post.rundir import RunDir


def shared_anchors(source: LoadedModel, target: LoadedModel, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (in each vocabulary) of up to ``k`` ordinary tokens whose strings both tokenizers have.

    Lower ids first: BPE vocabularies put frequent tokens early.
    """
    vs, vt = source.tokenizer.get_vocab(), target.tokenizer.get_vocab()
    special = set(source.tokenizer.all_special_tokens) | set(target.tokenizer.all_special_tokens)
    rows_s = source.model.get_input_embeddings().weight.shape[0]
    rows_t = target.model.get_input_embeddings().weight.shape[0]
    common = sorted((i, vt[tok]) for tok, i in vs.items()
                    if tok in vt and tok not in special and i < rows_s and vt[tok] < rows_t)
    if len(common) < 8:
        raise PostError(f"{source.name} and {target.name} share only {len(common)} vocabulary tokens; "
                        "zero-shot transfer needs anchors both models know.")
    picked = common[:k]
    return torch.tensor([a for a, _ in picked]), torch.tensor([b for _, b in picked])


def relative_coordinates(vectors: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(n, K) cosine similarities of (n, d) vectors to (K, d) anchor embeddings."""
    return F.normalize(vectors, dim=-1) @ F.normalize(anchors, dim=-1).T


def solve_target(rel: torch.Tensor, target_anchors: torch.Tensor, *, steps: int, lr: float, seed: int
                 ) -> tuple[torch.Tensor, float]:
    """(n, d_t) vectors whose relative coordinates to ``target_anchors`` match ``rel``; final loss."""
    g = torch.Generator().manual_seed(seed)
    scale = target_anchors.norm(dim=-1).mean()
    q = (torch.randn(rel.shape[0], target_anchors.shape[1], generator=g) * scale / target_anchors.shape[1] ** 0.5)
    q.requires_grad_(True)
    opt = torch.optim.Adam([q], lr=lr)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        loss = (relative_coordinates(q, target_anchors) - rel).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # cosines fix directions only: give the vectors the anchors' typical norm
        q = F.normalize(q, dim=-1) * scale
    return q.detach(), float(loss.detach())


@dataclass(frozen=True, kw_only=True)
class ZstConfig(ModelOptions):
    """Zero-shot continuous prompt transfer (Wu et al. 2023): relative coordinates, no data.

    Attributes:
        source_model: The model the prompt was tuned on.
        prompt: The prompt file to transfer.
        target_model: The model to transfer it to.
        anchors: Number of shared anchor tokens.
        steps: Optimisation steps for the target vectors.
        lr: Adam learning rate.
        seed: Seed of the target vectors' start.
    """

    source_model: str
    prompt: Path
    target_model: str
    anchors: int = 512
    steps: int = 2000
    lr: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        require(self.anchors >= 8, "anchors", f"must be at least 8, got {self.anchors}.")
        require(self.steps >= 1, "steps", f"must be at least 1, got {self.steps}.")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}.")


def zst(cfg: ZstConfig, run_dir: str | Path) -> ZstResult:
    run = RunDir(run_dir, stage="zst", config=cfg)
    if (done := run.existing_result()) is not None:
        return ZstResult.from_dict(done, source=str(run.result_path))
    source = load_configured_model(cfg, cfg.source_model)
    ps = load_prompt(cfg.prompt, source)
    target = load_configured_model(cfg, cfg.target_model)
    ids_s, ids_t = shared_anchors(source, target, cfg.anchors)
    with torch.no_grad():
        anchors_s = source.model.get_input_embeddings()(ids_s.to(source.model.device)).float().cpu()
        anchors_t = target.model.get_input_embeddings()(ids_t.to(target.model.device)).float().cpu()
    rel = relative_coordinates(ps.tensor.float(), anchors_s)
    pt, loss = solve_target(rel, anchors_t, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed)
    path = save_prompt(run.path / "prompt.safetensors", pt, loaded=target, task=ps.task, privacy=ps.meta.get("privacy"),
                       extra={"transferred_from": {"model": ps.meta["model"], "method": "zst", "anchors": len(ids_s)}})
    ledger = ps.meta.get("privacy")
    written = run.finish({"source_model": cfg.source_model, "target_model": cfg.target_model, "prompt": str(path),
                          "anchors": len(ids_s), "final_loss": loss,
                          "epsilon": ledger["epsilon"] if ledger else None,
                          "delta": ledger["delta"] if ledger else None})
    return ZstResult.from_dict(written, source=str(run.result_path))


def summarize(result: ZstResult) -> str:
    return (f"zero-shot transfer to {result.target_model} with {result.anchors} anchors "
            f"(relative-coordinate loss {result.final_loss:.2e})\nprompt: {result.prompt}")
