"""Resumable checkpoints: tensors and optimizer state in safetensors, progress in JSON.

Both files are written through a temporary name and a rename. The progress is also stored in the
safetensors header and read from there, so the tensors and the step they belong to are replaced
by one rename: a kill at any moment leaves either the previous checkpoint or the new one, never a
mix. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from post.cache import atomic_path
from post.rundir import to_plain, write_json

log = logging.getLogger(__name__)

TENSORS = "checkpoint.safetensors"
META = "checkpoint.json"


def save_checkpoint(run_dir: Path, *, tensors: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, meta: Mapping[str, Any]) -> None:
    """Save ``tensors`` (e.g. a prompt or a state dict), the optimizer state of ``params`` and ``meta``."""
    names = {id(p): n for n, p in params.items()}
    out = {f"t.{k}": v.detach() for k, v in tensors.items()}
    for p, state in optimizer.state.items():
        for field, value in state.items():
            out[f"opt.{names[id(p)]}.{field}"] = value if torch.is_tensor(value) else torch.tensor(float(value))
    # Fresh contiguous CPU copies: safetensors refuses tensors that share storage (tied weights).
    out = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}
    with atomic_path(Path(run_dir) / TENSORS) as tmp:
        save_file(out, str(tmp), metadata={"meta": json.dumps(to_plain(dict(meta)))})
    write_json(Path(run_dir) / META, dict(meta))  # for people and tools; resuming reads the header


def load_checkpoint(run_dir: Path, *, params: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The saved tensors and meta (optimizer state restored into ``optimizer``), or None if there is none."""
    tensors_path, meta_path = Path(run_dir) / TENSORS, Path(run_dir) / META
    if not tensors_path.exists():
        return None
    try:
        with safe_open(str(tensors_path), framework="pt") as f:
            header = f.metadata() or {}
        raw = load_file(str(tensors_path))
        # The header's copy belongs to these tensors; checkpoint.json may be one save behind them.
        meta = json.loads(header["meta"] if "meta" in header else meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            raise ValueError("no step recorded")
        state = []
        for key, value in raw.items():
            if key.startswith("opt."):
                name, field = key[4:].rsplit(".", 1)
                state.append((params[name], field, value))
    except Exception as e:  # unreadable: start over rather than trust it
        log.warning("ignoring unreadable checkpoint in %s (%s); starting from the beginning", run_dir, e)
        return None
    for param, field, value in state:
        optimizer.state[param][field] = value.to(param.device)
    return {k[2:]: v for k, v in raw.items() if k.startswith("t.")}, meta
