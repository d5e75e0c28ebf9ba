"""Student construction: keep some of a teacher's layers (the provider's step 1, before distillation).

The student shares the teacher's tokenizer, width, embeddings, final norm and LM head; only
transformer blocks are dropped. The config is fixed up so the student is an ordinary Hugging
Face model: the layer count, per-layer lists such as Gemma 3's ``layer_types``, and (by building
the student fresh from that config) each attention module's ``layer_idx``, which cache indexing
relies on.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig

from post.config import ModelOptions, require
from post.errors import ConfigError, PostError
from post.models import LoadedModel, save_model
from post.resolve import load_configured_model
from post.results import StudentResult
from post.rundir import RunDir

log = logging.getLogger(__name__)

# Config keys that hold the number of blocks, by model family.
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def parse_keep_layers(spec: str | int | Sequence[int], n_layers: int) -> list[int]:
    """``"0,1,-2,-1"``, ``[0, -1]`` or ``0`` (a YAML override keep_layers=0) -> sorted, distinct, non-negative
    layer indices."""
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        try:
            raw = [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise ConfigError(f"--keep-layers must be comma-separated integers like 0,1,-2,-1, got {spec!r}.") from None
    else:
        raw = [int(x) for x in spec]
    if not raw:
        raise ConfigError("--keep-layers must name at least one layer.")
    out = set()
    for i in raw:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ConfigError(f"--keep-layers: layer {i} does not exist in a {n_layers}-layer teacher.")
        out.add(j)
    return sorted(out)


def layer_count(config: PretrainedConfig) -> int:
    """The number of blocks a model's config declares (num_hidden_layers, n_layer or num_layers)."""
    return int(getattr(config, _layer_count_key(config)))


def _layer_count_key(config: PretrainedConfig) -> str:
    for key in _LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            return key
    raise PostError(f"{type(config).__name__} has none of {', '.join(_LAYER_COUNT_KEYS)}; this architecture's "
                    "layer count can't be changed, so no student can be cut from it.")


def _block_list(model: nn.Module, n_layers: int) -> str:
    """Dotted path of the ModuleList holding the transformer blocks (e.g. ``model.layers``)."""
    found = [name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n_layers
             and name.count(".") <= 3]
    found = [f for f in found if re.search(r"(layers|layer|h|blocks)$", f)]
    if len(found) != 1:
        raise PostError(f"{type(model).__name__}: can't find its list of {n_layers} transformer blocks (found "
                        f"{found or 'none'}); supported are Llama-style, Gemma 3, GPT-2 and RoBERTa/BERT models.")
    return found[0]


def student_config(config: PretrainedConfig, keep: Sequence[int]) -> PretrainedConfig:
    """The teacher's config with only the ``keep`` layers: layer count and per-layer lists cut."""
    key = _layer_count_key(config)
    n = getattr(config, key)
    new = copy.deepcopy(config)
    setattr(new, key, len(keep))
    for name, value in list(vars(config).items()):
        if name != key and isinstance(value, list | tuple) and len(value) == n and n > 1:
            setattr(new, name, type(value)(value[i] for i in keep))  # e.g. Gemma 3's layer_types
    return new


def build_student(teacher: LoadedModel, keep_layers: str | Sequence[int]) -> LoadedModel:
    """A fresh model with the teacher's embeddings, head and the chosen blocks (weights copied)."""
    config = teacher.model.config
    n = getattr(config, _layer_count_key(config))
    keep = parse_keep_layers(keep_layers, n)
    blocks = _block_list(teacher.model, n)
    new_config = student_config(config, keep)
    auto = AutoModelForCausalLM if teacher.kind == "causal" else AutoModelForMaskedLM
    dtype = next(teacher.model.parameters()).dtype
    student = auto.from_config(new_config, dtype=dtype)
    remap = {old: new for new, old in enumerate(keep)}
    prefix = re.escape(blocks) + r"\.(\d+)\."
    state: dict[str, torch.Tensor] = {}
    for name, tensor in teacher.model.state_dict().items():
        m = re.match(prefix, name)
        if m is None:
            state[name] = tensor
        elif int(m.group(1)) in remap:
            state[f"{blocks}.{remap[int(m.group(1))]}.{name[m.end():]}"] = tensor
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(student)]
    if missing or unexpected:
        raise PostError(f"student weights don't line up with the teacher's (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); this architecture is not supported.")
    student.eval().requires_grad_(False)
    student.config.use_cache = False
    student.to(teacher.model.device)
    return LoadedModel(model=student, tokenizer=teacher.tokenizer, name=f"{teacher.name}[{','.join(map(str, keep))}]",
                       kind=teacher.kind, path=None)


def _tied_keys(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied) if not isinstance(tied, dict) else set(tied)


def param_count(model: nn.Module) -> int:
    """Distinct parameters (tied matrices counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass(frozen=True, kw_only=True)
class StudentConfig(ModelOptions):
    """Cut a student from a teacher by keeping some layers (no training).

    Attributes:
        teacher: Teacher model: alias, hub id or directory.
        keep_layers: Layers to keep, comma-separated, negatives from the end (paper: first and last).
    """

    teacher: str
    keep_layers: str = "0,-1"

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        require(bool(self.teacher), "teacher", "must name a model.")


def make_student(cfg: StudentConfig, run_dir: str | Path) -> StudentResult:
    """Save the undistilled student to ``run_dir/model`` (an ordinary HF model directory)."""
    run = RunDir(run_dir, stage="student", config=cfg)
    if (done := run.existing_result()) is not None:
        return StudentResult.from_dict(done, source=str(run.result_path))
    teacher = load_configured_model(cfg, cfg.teacher)
    student = build_student(teacher, cfg.keep_layers)
    out = save_model(student, run.path / "model")
    n_t = getattr(teacher.model.config, _layer_count_key(teacher.model.config))
    keep = parse_keep_layers(cfg.keep_layers, n_t)
    written = run.finish({"teacher": cfg.teacher, "model_dir": str(out), "keep_layers": keep, "teacher_layers": n_t,
                          "teacher_params": param_count(teacher.model), "student_params": param_count(student.model)})
    return StudentResult.from_dict(written, source=str(run.result_path))


def summarize(result: StudentResult) -> str:
    return (f"student with layers {result.keep_layers} of {result.teacher_layers} "
            f"({result.student_params / 1e6:.1f}M of {result.teacher_params / 1e6:.1f}M parameters): "
            f"{result.model_dir}")
