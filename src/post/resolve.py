"""Turn a stage config's option groups into loaded things: the task's data, a model, a subset."""

from __future__ import annotations

import logging

import numpy as np
import torch

from post.config import ModelOptions, TaskOptions, dtype_name
from post.data import LabelledDataset, load_labelled
from post.models import LoadedModel, load_model

log = logging.getLogger("post")


def load_task(cfg: TaskOptions) -> LabelledDataset:
    """The labelled dataset and task a config names."""
    return load_labelled(cfg.task, text_column=cfg.text_column, label_column=cfg.label_column,
                         template=cfg.template, label_words=cfg.label_words, init_text=cfg.init_text,
                         split_seed=cfg.split_seed, encoding=cfg.encoding,
                         cache_dir=getattr(cfg, "cache_dir", None))


def load_configured_model(cfg: ModelOptions, name: str) -> LoadedModel:
    """Load ``name`` with a config's dtype, cache, device and remote-code setting."""
    dtype = cfg.torch_dtype
    loaded = load_model(name, dtype=dtype, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code)
    loaded.model.to(cfg.torch_device)
    if cfg.dtype == "auto":
        how = "native" if dtype == torch.bfloat16 else "not native, or weights that train"
        log.info("%s: dtype auto -> %s on %s (bf16 %s)", name, dtype_name(dtype),
                 cfg.torch_device.type, how)
    return loaded


def subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of size ``limit`` (all of them when None)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])
