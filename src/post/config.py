"""Option groups shared by the stage configs.

Every stage config is a frozen, keyword-only dataclass built from these groups, so the CLI flags
(``--task``, ``--max-length``...) and YAML keys mean the same thing in every stage. Each
``__post_init__`` rejects impossible values with a message that names the flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from post.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as --dtype spells it: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matmuls in hardware: a CUDA GPU that supports bf16, or a CPU with
    AVX512-BF16 or AMX (there a bf16 matmul runs about 2.2x an fp32 one; on other CPUs it is emulated and slower)."""
    if device.type == "cuda":  # Ampere (8.0) and later; older GPUs emulate bf16 (is_bf16_supported says yes)
        return bool(torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0))
    if device.type == "cpu":
        return any(bool(getattr(torch.cpu, check, lambda: False)())
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def flag(name: str) -> str:
    """The CLI spelling of a config field: ``max_length`` -> ``--max-length``."""
    return "--" + name.replace("_", "-")


def require(ok: bool, option: str, message: str) -> None:
    """Raise a ConfigError naming ``option`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{flag(option)}: {message}")


def require_transfer_loss(loss: str, mode: str, *, option: str = "loss", mode_flag: str = "--mode") -> None:
    """The transfer's loss rule, wherever a transfer is configured (``post transfer``, the service, the audit):
    post or proxy-labels, and proxy-labels only with label-words mode."""
    require(loss in ("post", "proxy-labels"), option, f"must be post or proxy-labels, got {loss!r}.")
    require(loss == "post" or mode == "label-words", option,
            f"proxy-labels labels each public text with a class: it needs {mode_flag} label-words.")


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """How models are loaded.

    Attributes:
        cache_dir: Where built-in models and datasets are cached (default: $POST_CACHE_DIR or the
            user cache directory).
        dtype: Weights and compute dtype of the frozen models: float32 (the default), bfloat16, float16 (GPU), or
            auto: bfloat16 where the device computes it in hardware (:func:`native_bf16`), else float32. Prompts
            stay float32 (their gradients, clipping and DP noise too); stages that train model weights
            (distillation) keep float32 under auto.
        device: cpu, cuda, cuda:N, or auto (cuda when available).
        trust_remote_code: Allow a hub model's own Python code to run. Off unless you trust it.
    """

    cache_dir: Path | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        require(self.dtype in (*DTYPES, "auto"), "dtype",
                f"must be one of {', '.join(DTYPES)} or auto, got {self.dtype!r}.")
        require(self.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", self.device) is not None, "device",
                f"must be auto, cpu or cuda[:N], got {self.device!r}.")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if native_bf16(self.torch_device) else torch.float32
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and (index := device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"--device {self.device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"visible to torch, so there is no cuda:{index}; use --device cpu or auto.")
        return device


@dataclass(frozen=True, kw_only=True)
class TaskOptions:
    """Which labelled data to use and how to ask the model about it.

    Attributes:
        task: Built-in dataset (mr, airline), one of the paper's hub datasets (sst2, imdb,
            tweet_eval, ag_news, trec, mpqa, arisetv, disaster) or a CSV/JSONL/Parquet file.
        text_column: Column holding the text (your own files).
        label_column: Column holding the label (your own files).
        template: Input template with {text} and {mask}, e.g. '{text} It was {mask}.'
            (default: the dataset's own).
        label_words: Label words per class, 'negative=bad,awful;positive=good,great' (or a mapping
            in YAML); class order follows this option (default: the dataset's own).
        init_text: Text that initialises soft prompts (default: the dataset's own).
        split_seed: Seed of the fixed train/validation/test split of datasets that have none.
        encoding: Text encoding of your own files.
        max_length: Maximum tokens per input; longer texts lose their beginning.
    """

    task: str = "mr"
    text_column: str = "text"
    label_column: str = "label"
    template: str | None = None
    label_words: str | dict[str, list[str]] | None = None
    init_text: str | None = None
    split_seed: int = 0
    encoding: str = "utf-8"
    max_length: int = 128

    def __post_init__(self) -> None:
        require(bool(self.task), "task", "must name a dataset or a file.")
        require(8 <= self.max_length <= 1 << 16, "max_length", f"must be between 8 and 65536, got {self.max_length}.")
        if self.template is not None:
            from post.tasks import check_template

            check_template(self.template)


SPLITS = ("train", "validation", "test")


def check_split(split: str, option: str = "split") -> None:
    require(split in SPLITS, option, f"must be one of {', '.join(SPLITS)}, got {split!r}.")
