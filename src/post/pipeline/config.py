"""The pipeline's config: one YAML file (or a built-in one) with ``key=value`` overrides, and the privacy modes.

:class:`PipelineConfig` holds the target, the private task, the public text, which modes and
baselines to run and one mapping of options per stage (its *section*: ``distill``, ``tune``,
``transfer``, ...); :mod:`post.pipeline.steps` turns it into the steps' stage configs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from post.config import ModelOptions, TaskOptions, require
from post.errors import ConfigError, PostError

SECTIONS = ("distill", "tune", "tune_target", "dp", "transfer", "zst", "evaluate", "attack", "reconstruct")
OPTIONAL_SECTIONS = ("attack", "reconstruct")  # null skips the step
MODES = ("non-private", "dp")  # and dp-eps<E>: DP at ε = E instead of the dp section's ε (privacy–utility curves)
_DP_AT = re.compile(r"dp-eps(\d+(?:\.\d+)?)")


def mode_suffix(mode: str) -> str:
    """The step-name suffix of a privacy mode: "" (non-private), "-dp", "-dp-eps1", ..."""
    return "" if mode == "non-private" else f"-{mode}"


def mode_epsilon(mode: str) -> float | None:
    """The ε a ``dp-eps<E>`` mode asks for (None for non-private and for dp, which takes the dp section's)."""
    m = _DP_AT.fullmatch(mode)
    return float(m.group(1)) if m else None


def _valid_mode(mode: object) -> bool:
    if not isinstance(mode, str):
        return False
    return mode in MODES or (mode_epsilon(mode) or 0) > 0


@dataclass(frozen=True, kw_only=True)
class PipelineConfig(TaskOptions, ModelOptions):
    """The whole pipeline: one target, one private task, one public text, each stage's options.

    Attributes:
        out: Directory holding every step's run directory, the state file and the report.
        target: The provider's large model Φt (teacher of the distillation).
        public: Public text for the transfer (never the private task).
        student: Use this student directory instead of distilling one.
        modes: Which privacy settings to run: non-private, dp (at the dp section's ε), and any number of
            dp-eps<E> (DP at ε = E, e.g. dp-eps1, dp-eps0.5: a privacy–utility curve; step names get
            the mode as suffix, e.g. tune-source-dp-eps1).
        undistilled: Also run the same layers without distillation as a source (isolates what
            distillation buys).
        baselines: Baselines to run besides POST: zero-shot, calibrated (zero-shot calibrated on
            the public texts), target-tuning, source-tuning, direct, zst, proxy.
        attack_transfer: Also attack the shadows' transferred prompts through the target (each shadow transferred
            as the transfer section says, unless the attack section sets its transfer_* options).
        seed: Seed of every stage.
        distill: Options of post distill (teacher = target).
        tune: Options of post tune shared by every tuning (source, target, shadows).
        tune_target: Options that differ for the prompt tuned on the target (an expensive baseline).
        dp: DP options (epsilon, delta, max_grad_norm, accountant, ...) of the DP runs.
        transfer: Options of post transfer.
        zst: Options of post zst.
        evaluate: Options of the test-split evaluations (limit, batch_size).
        attack: Options of post attack lira (shadows, pool_size, workers, ...); ``attack: null`` skips it.
        reconstruct: Options of post attack reconstruct (top_k, max_n, ...) plus ``reference_task``,
            the public labelled set the control prompt is tuned on (default: ``public``), and
            ``reference_label_words`` (default: ``label_words``; give the set's own words when its
            classes differ); ``null`` (the default) skips the check.
    """

    out: Path = Path("runs/pipeline")
    target: str = "smollm2-135m"
    public: str = "airline"
    student: str | None = None
    modes: list[str] = field(default_factory=lambda: list(MODES))
    undistilled: bool = False
    baselines: list[str] = field(default_factory=lambda: ["zero-shot", "target-tuning", "source-tuning", "direct",
                                                          "zst", "proxy"])
    attack_transfer: bool = False
    seed: int = 0
    distill: dict[str, Any] = field(default_factory=dict)
    tune: dict[str, Any] = field(default_factory=dict)
    tune_target: dict[str, Any] = field(default_factory=dict)
    dp: dict[str, Any] = field(default_factory=dict)
    transfer: dict[str, Any] = field(default_factory=dict)
    zst: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    attack: dict[str, Any] | None = field(default_factory=dict)
    reconstruct: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        TaskOptions.__post_init__(self)
        ModelOptions.__post_init__(self)
        require(bool(self.target), "target", "must name the provider's model.")
        require(bool(self.modes) and all(_valid_mode(m) for m in self.modes), "modes",
                f"must list some of {', '.join(MODES)} or dp-eps<E> (E > 0, e.g. dp-eps1), got {self.modes}.")
        from post.tune import TuneConfig

        dp_section = section(self, "dp") if isinstance(self.dp, Mapping) else {}
        dp_eps = float(dp_section.get("epsilon", TuneConfig.epsilon))
        levels = [mode_epsilon(m) or dp_eps if m != "non-private" else None for m in self.modes]
        require(len(set(levels)) == len(levels), "modes",
                f"lists one privacy level twice: {self.modes} (dp runs at the dp section's ε, {dp_eps:g}).")
        require(not (dp_section.get("noise_multiplier") is not None and any(mode_epsilon(m) for m in self.modes)),
                "modes", "dp-eps<E> calibrates σ to each ε, but the dp section fixes noise_multiplier; remove one.")
        from post.data import dataset_key, is_unlabelled_text

        private = dataset_key(str(self.task))
        require(all(dataset_key(part) != private for part in str(self.public).split("+")), "public",
                f"holds the private task {self.task!r}: the provider's public data must not be the user's private "
                "data.")
        if self.reconstruct is not None and isinstance(self.reconstruct, Mapping) \
                and not section(self, "reconstruct").get("reference_task"):
            require(not is_unlabelled_text(str(self.public)), "public",
                    f"{self.public!r} is unlabelled text, and the reconstruction check tunes its control prompt on "
                    "the public set's labels; set reconstruct.reference_task (e.g. airline), or reconstruct: null.")
        known = ("zero-shot", "calibrated", "target-tuning", "source-tuning", "direct", "zst", "proxy")
        bad = [b for b in self.baselines if b not in known]
        require(not bad, "baselines", f"unknown {bad}; choose from {', '.join(known)}.")
        for name in SECTIONS:
            value = getattr(self, name)
            require(value is None and name in OPTIONAL_SECTIONS or isinstance(value, Mapping), name,
                    f"must be a mapping of options, got {type(value).__name__}.")


# --------------------------------------------------------------------------- loading configs


def builtin_configs() -> dict[str, Path]:
    """Shipped configs by name (``demo``, ``demo-quick``, ``cpu-full``, ``cross-vocab``, ``privacy-curve``,
    ``paper-*``)."""
    root = resources.files("post") / "configs"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".yaml")}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``tune.n_tokens=16`` -> (['tune', 'n_tokens'], 16); the value is read as YAML."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise ConfigError(f"override {text!r} must look like key=value or section.key=value.")
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError:
        parsed = value
    return [k.replace("-", "_") for k in key.split(".")], parsed


def load_pipeline_config(source: str | Path, overrides: list[str] | None = None,
                         out: Path | None = None) -> PipelineConfig:
    """A PipelineConfig from a YAML file or a built-in name, with ``key=value`` overrides."""
    path = Path(source)
    if not path.is_file():
        shipped = builtin_configs()
        if str(source) not in shipped:
            raise PostError(f"no config file {source} and no built-in config of that name; built in: "
                            f"{', '.join(sorted(shipped))}.")
        path = shipped[str(source)]
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise PostError(f"{path} is not a readable YAML file ({type(e).__name__}); fix it and run again.") from None
    if not isinstance(raw, dict):
        raise PostError(f"{path} must hold a mapping of options at the top level.")
    raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
    for text in overrides or []:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    if out is not None:
        raw["out"] = out
    fields = {f.name: f for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}.")
    if "out" in raw:
        raw["out"] = Path(str(raw["out"]))
    if raw.get("cache_dir") is not None:
        raw["cache_dir"] = Path(str(raw["cache_dir"]))
    try:
        return PipelineConfig(**raw)
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None


def section(cfg: PipelineConfig, name: str) -> dict[str, Any]:
    """The options of the config's section ``name`` (``-`` in keys read as ``_``; a null section is empty)."""
    return {str(k).replace("-", "_"): v for k, v in (getattr(cfg, name) or {}).items()}
