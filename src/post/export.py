"""Stage: export a prompt file as a PEFT prompt-tuning adapter directory.

``PeftModel.from_pretrained(base_model, out_dir)`` then prepends exactly our prompt, so the
adapter gives the same logits as ``post evaluate --prompt``. Causal LMs export as CAUSAL_LM
adapters; masked LMs as FEATURE_EXTRACTION adapters (PEFT has no masked-LM task type; that
wrapper also prepends the prompt and returns the base model's outputs, logits included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from post.config import ModelOptions, require
from post.prompt import load_prompt
from post.resolve import load_configured_model
from post.results import ExportPeftResult
from post.rundir import RunDir


@dataclass(frozen=True, kw_only=True)
class ExportPeftConfig(ModelOptions):
    """Export a prompt file as a PEFT prompt-tuning adapter.

    Attributes:
        prompt: The prompt file to export.
        model: The model the prompt was tuned on (alias, hub id or directory); its fingerprint is checked.
    """

    prompt: Path
    model: str

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        require(bool(self.model), "model", "must name the model the prompt was tuned on.")


def export_peft(cfg: ExportPeftConfig, run_dir: str | Path) -> ExportPeftResult:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``run_dir``."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    run = RunDir(run_dir, stage="export-peft", config=cfg)
    loaded = load_configured_model(cfg, cfg.model)
    pf = load_prompt(cfg.prompt, loaded)
    config = loaded.model.config
    peft_cfg = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM if loaded.kind == "causal" else TaskType.FEATURE_EXTRACTION,
        num_virtual_tokens=pf.n_tokens, token_dim=loaded.hidden_size, num_transformer_submodules=1,
        num_attention_heads=getattr(config, "num_attention_heads", None),
        num_layers=getattr(config, "num_hidden_layers", None),
        base_model_name_or_path=str(loaded.path or loaded.name))
    peft_model = get_peft_model(loaded.model, peft_cfg)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(pf.tensor)
    peft_model.save_pretrained(str(run.path))
    return ExportPeftResult.from_dict(run.finish({"adapter_dir": str(run.path), "prompt": str(cfg.prompt),
                                                  "model": cfg.model, "n_tokens": pf.n_tokens,
                                                  "task_type": str(peft_cfg.task_type)}),
                                      source=str(run.result_path))


def summarize(result: ExportPeftResult) -> str:
    return (f"PEFT adapter ({result.n_tokens} virtual tokens) in {result.adapter_dir}; load it with "
            f"PeftModel.from_pretrained(base_model, {result.adapter_dir!r})")
