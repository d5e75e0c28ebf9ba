"""Stage: the whole POST pipeline from one YAML file (``post run CONFIG``, ``post demo``).

distil → tune (non-private and DP) → transfer → baselines → attack → table → report, every step
calling the same stage function as its own command, each into its own run directory under
``out``. The steps and which party runs each:

========================  ==========  =====================================================
step                      party       what
========================  ==========  =====================================================
distill                   provider    the student Φs (skipped when ``student`` names one)
undistilled               provider    the same layers without distillation (optional)
zero-shot                 user        Φt zero-shot on test                      (table cell)
tune-source[-dp]          user        ps on Φs with the private data            (PT on Φs)
tune-target[-dp]          baseline    prompt tuned on Φt: the data goes to the provider
transfer[-dp]             provider    POST: pt from ps with public data only (α measured on
                                      public labelled data: no private text reaches Φt)
eval-post[-dp]            user        Φt with pt on test                        (POST)
eval-direct[-dp]          user        Φt with ps as it is                       (direct transfer)
eval-proxy[-dp]           user        Φt + (Φs(ps) − Φs) at query time         (proxy tuning)
zst[-dp], eval-zst[-dp]   provider    zero-shot continuous prompt transfer     (ZST)
…-undistilled[-dp]        both        tune on the undistilled layers, transfer, evaluate
attack[-dp]               user        LiRA on prompts tuned like ps
tune-public, reconstruct  user        nearest-token reading of every prompt vs a control
                                      prompt tuned on public data (optional)
table, report             both        the results table and the HTML/Markdown report
========================  ==========  =====================================================

``[-dp]`` stands for the privacy mode's suffix: none (non-private), ``-dp`` (the dp section's ε),
or ``-dp-eps<E>`` for each extra ε of a privacy–utility curve (``modes: [..., dp-eps1]``).

A step's config is built from earlier steps' results, read as :mod:`post.results` types (a step's
output by attribute, e.g. the tune step's ``prompt``). The summary (``pipeline-result.json``) is
written once, with the report, when every step has finished.

Each step's *key* is a hash of its resolved config and its inputs' keys, kept in
``pipeline.json``. A step whose result exists under the same key is skipped; a step whose key
changed (its own options, or anything upstream) is re-run from scratch and the pipeline says
why; a step interrupted half-way resumes from its own checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from post.config import ModelOptions, TaskOptions, require
from post.errors import ConfigError, PostError
from post.progress import duration
from post.results import StageResult, load_result, result_from_dict
from post.rundir import RESULT_FILE, read_json, to_plain, write_json

log = logging.getLogger(__name__)

STATE_FILE = "pipeline.json"
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
        baselines: Baselines to run besides POST: zero-shot, target-tuning, source-tuning,
            direct, zst.
        attack_transfer: Also attack the shadows' transferred prompts through the target.
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

        dp_section = _section(self, "dp") if isinstance(self.dp, Mapping) else {}
        dp_eps = float(dp_section.get("epsilon", TuneConfig.epsilon))
        levels = [mode_epsilon(m) or dp_eps if m != "non-private" else None for m in self.modes]
        require(len(set(levels)) == len(levels), "modes",
                f"lists one privacy level twice: {self.modes} (dp runs at the dp section's ε, {dp_eps:g}).")
        require(not (dp_section.get("noise_multiplier") is not None and any(mode_epsilon(m) for m in self.modes)),
                "modes", "dp-eps<E> calibrates σ to each ε, but the dp section fixes noise_multiplier; remove one.")
        require(str(self.public).strip().lower() != str(self.task).strip().lower(), "public",
                f"is the private task {self.task!r}: the provider's public data must not be the user's private data.")
        known = ("zero-shot", "target-tuning", "source-tuning", "direct", "zst", "proxy")
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


# --------------------------------------------------------------------------- the steps

Results = Mapping[str, StageResult]  # earlier steps' typed results by step name, read by attribute


@dataclass
class Step:
    """One stage run: its run directory name, party, stage function and a config builder."""

    name: str
    party: str
    stage: str
    build: Callable[[Results], Any]  # results of earlier steps -> stage config
    run: Callable[[Any, Path], dict[str, Any]]
    deps: list[str]
    what: str


@dataclass(frozen=True)
class _Deferred:
    """An option whose value comes from earlier steps' results."""

    get: Callable[[Results], Any]

    def __call__(self, results: Results) -> Any:
        return self.get(results)


def _prompt_of(results: Results, step: str) -> Path:
    """The prompt file an earlier tune, transfer or zst step wrote."""
    return Path(results[step].prompt)


def _section(cfg: PipelineConfig, name: str) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in (getattr(cfg, name) or {}).items()}


def _make(config_cls: type, section: str, values: Mapping[str, Any]) -> Any:
    """Build a stage config, naming the YAML section when an option is unknown."""
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{section}: unknown option(s) {', '.join(unknown)} (see post {_COMMAND[section]} --help).")
    try:
        return config_cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{section}: {e}") from None


_COMMAND = {"distill": "distill", "tune": "tune", "tune_target": "tune", "dp": "tune", "transfer": "transfer",
            "zst": "zst", "evaluate": "evaluate", "attack": "attack lira", "student": "student",
            "reconstruct": "attack reconstruct"}


def _no_early_stop_if_dp(step: str, values: dict[str, Any]) -> dict[str, Any]:
    """A DP tuning's options without ``patience``: early stopping reads private validation data, so a DP run
    (and a DP shadow copying it) takes its planned steps."""
    if values.get("dp") and values.pop("patience", None) is not None:
        log.info("%s: patience applies to non-private runs only; the DP run takes its planned steps", step)
    return values


def _common(cfg: PipelineConfig) -> dict[str, Any]:
    return {"cache_dir": cfg.cache_dir, "dtype": cfg.dtype, "device": cfg.device,
            "trust_remote_code": cfg.trust_remote_code}


def _task_opts(cfg: PipelineConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TaskOptions)}


def build_steps(cfg: PipelineConfig) -> list[Step]:
    """The steps this config asks for, in an order where every step follows its inputs."""
    from post import attack, distill, evaluate, student, transfer, tune, zst

    common, task = _common(cfg), _task_opts(cfg)
    steps: list[Step] = []
    base = set(cfg.baselines)

    def student_dir(results: Results) -> str:
        return cfg.student if cfg.student else results["distill"].student_dir

    if not cfg.student:
        steps.append(Step("distill", "provider", "distill", lambda r: _make(distill.DistillConfig, "distill", {
            **common, "teacher": cfg.target, "seed": cfg.seed, **_section(cfg, "distill")}),
            distill.distill, [], "distil the target into the student Φs"))
    src_deps = [] if cfg.student else ["distill"]
    if cfg.undistilled:
        keep = _section(cfg, "distill").get("keep_layers", distill.DistillConfig.keep_layers)
        steps.append(Step("undistilled", "provider", "student", lambda r: _make(student.StudentConfig, "student", {
            **common, "teacher": cfg.target, "keep_layers": keep}), student.make_student, [],
            "the same layers, not distilled"))

    ev = _section(cfg, "evaluate")

    def evaluation(name: str, party: str, model: str | Callable[[Results], str], split: str,
                   prompt_from: str | None, deps: list[str], what: str, **extra: Any) -> Step:
        def build(r: Results) -> Any:
            values = {**common, **task, "model": model if isinstance(model, str) else model(r), "split": split,
                      "seed": cfg.seed, **ev, **{k: v(r) if isinstance(v, _Deferred) else v for k, v in extra.items()}}
            if prompt_from is not None:
                values["prompt"] = _prompt_of(r, prompt_from)
            return _make(evaluate.EvaluateConfig, "evaluate", values)

        return Step(name, party, "evaluate", build, evaluate.evaluate, deps, what)

    if "zero-shot" in base:
        steps.append(evaluation("zero-shot", "user", cfg.target, "test", None, [], "Φt zero-shot on test"))

    def transfer_step(name: str, source: Callable[[Results], str], tuned: str,
                      deps: list[str], what: str) -> Step:
        def build(r: Results) -> Any:
            # α comes from public labelled data (the public set itself when it is labelled): the
            # provider sends no private text to Φt and receives no statistic of private data.
            from post.data import is_dataset_name

            alpha_public = {"alpha_public": cfg.public} if is_dataset_name(cfg.public.lower()) else {}
            values = {**common, "source_model": source(r),
                      "prompt": _prompt_of(r, tuned), "target_model": cfg.target, "public": cfg.public,
                      "max_length": cfg.max_length, "seed": cfg.seed, **alpha_public, **_section(cfg, "transfer")}
            return _make(transfer.TransferConfig, "transfer", values)

        return Step(name, "provider", "transfer", build, transfer.transfer, deps, what)

    tune_opts = _section(cfg, "tune")
    for mode in cfg.modes:
        sfx = mode_suffix(mode)
        dp_opts = {"dp": False} if mode == "non-private" else {"dp": True, **_section(cfg, "dp")}
        if (eps := mode_epsilon(mode)) is not None:
            dp_opts["epsilon"] = eps

        def tune_step(name: str, party: str, model_of: Callable[[Results], str], deps: list[str],
                      what: str, extra: Mapping[str, Any], dp_opts: dict[str, Any] = dp_opts) -> Step:
            values = _no_early_stop_if_dp(name, {**common, **task, "seed": cfg.seed, **tune_opts, **extra, **dp_opts})
            # Test accuracy comes from an evaluate step, on the same test examples as every other cell.
            return Step(name, party, "tune", lambda r: _make(tune.TuneConfig, "tune", {
                **values, "model": model_of(r), "test": False}), tune.tune, deps, what)

        steps.append(tune_step(f"tune-source{sfx}", "user", student_dir, src_deps, f"ps on Φs ({mode})", {}))
        if "source-tuning" in base:
            steps.append(evaluation(f"eval-source{sfx}", "user", student_dir, "test", f"tune-source{sfx}",
                                    [*src_deps, f"tune-source{sfx}"], f"Φs with ps ({mode})"))
        if "target-tuning" in base:
            steps.append(tune_step(f"tune-target{sfx}", "baseline", lambda r: cfg.target, [],
                                   f"prompt tuned on Φt ({mode}; the data goes to the provider)",
                                   _section(cfg, "tune_target")))
            steps.append(evaluation(f"eval-target{sfx}", "baseline", cfg.target, "test", f"tune-target{sfx}",
                                    [f"tune-target{sfx}"], f"Φt with its own prompt ({mode})"))

        steps.append(transfer_step(f"transfer{sfx}", student_dir, f"tune-source{sfx}",
                                   [*src_deps, f"tune-source{sfx}"], f"POST ps → pt ({mode})"))
        steps.append(evaluation(f"eval-post{sfx}", "user", cfg.target, "test", f"transfer{sfx}",
                                [f"transfer{sfx}"], f"Φt with pt ({mode})"))
        if "direct" in base:
            steps.append(evaluation(f"eval-direct{sfx}", "user", cfg.target, "test", f"tune-source{sfx}",
                                    [f"tune-source{sfx}"], f"Φt with ps as it is ({mode})", allow_other_model=True))
        if "proxy" in base:
            # Proxy tuning: Φt's logits plus the change ps causes on Φs, at query time (no transfer training).
            steps.append(evaluation(f"eval-proxy{sfx}", "user", cfg.target, "test", f"tune-source{sfx}",
                                    [*src_deps, f"tune-source{sfx}"], f"Φt + (Φs(ps) − Φs), proxy tuning ({mode})",
                                    proxy_source_model=_Deferred(student_dir)))
        if "zst" in base:
            steps.append(Step(f"zst{sfx}", "provider", "zst", lambda r, sfx=sfx: _make(zst.ZstConfig, "zst", {
                **common, "source_model": student_dir(r), "prompt": _prompt_of(r, f"tune-source{sfx}"),
                "target_model": cfg.target, "seed": cfg.seed, **_section(cfg, "zst")}), zst.zst,
                [*src_deps, f"tune-source{sfx}"], f"zero-shot continuous prompt transfer ({mode})"))
            steps.append(evaluation(f"eval-zst{sfx}", "user", cfg.target, "test", f"zst{sfx}", [f"zst{sfx}"],
                                    f"Φt with the ZST prompt ({mode})"))
        if cfg.undistilled:
            und = lambda r: r["undistilled"].model_dir  # noqa: E731
            steps.append(tune_step(f"tune-undistilled{sfx}", "user", und, ["undistilled"],
                                   f"prompt on the undistilled layers ({mode})", {}))
            steps.append(evaluation(f"eval-undistilled{sfx}", "user", und, "test", f"tune-undistilled{sfx}",
                                    ["undistilled", f"tune-undistilled{sfx}"],
                                    f"the undistilled layers with their prompt ({mode})"))
            steps.append(transfer_step(f"transfer-undistilled{sfx}", und, f"tune-undistilled{sfx}",
                                       ["undistilled", f"tune-undistilled{sfx}"],
                                       f"POST from the undistilled layers ({mode})"))
            steps.append(evaluation(f"eval-post-undistilled{sfx}", "user", cfg.target, "test",
                                    f"transfer-undistilled{sfx}", [f"transfer-undistilled{sfx}"],
                                    f"Φt with pt from the undistilled layers ({mode})"))
        if cfg.attack is not None:
            def attack_build(r: Results, dp_opts: dict[str, Any] = dp_opts,
                             sfx: str = sfx) -> Any:
                values = _no_early_stop_if_dp(f"attack{sfx}", {
                    **common, **task, "seed": cfg.seed, **tune_opts, **dp_opts, "model": student_dir(r), "test": False,
                    **_section(cfg, "attack")})
                # The shadows copy the released prompt's mechanism (q, steps, σ, δ): it was tuned on train_limit.
                if (limit := values.pop("train_limit", None)) is not None:
                    values["target_n_train"] = limit
                if cfg.attack_transfer:
                    values.update(transfer_target=cfg.target, public=cfg.public)
                return _make(attack.AttackConfig, "attack", values)

            steps.append(Step(f"attack{sfx}", "user", "attack-lira", attack_build, attack.attack, src_deps,
                              f"LiRA on prompts tuned like ps ({mode})"))
    if cfg.reconstruct is not None:
        steps += _reconstruct_steps(cfg, student_dir, src_deps)
    return steps


def _reconstruct_steps(cfg: PipelineConfig, student_dir: Callable[[Results], str],
                       src_deps: list[str]) -> list[Step]:
    """A control prompt tuned like ps on public labelled data, then the nearest-token check of every prompt."""
    from post import reconstruct, tune

    common = _common(cfg)
    opts = _section(cfg, "reconstruct")
    reference_task = opts.pop("reference_task", cfg.public)
    # The control is asked like ps by default; a reference set with other classes names its own words.
    reference_words = opts.pop("reference_label_words", cfg.label_words)
    tune_opts = _section(cfg, "tune")

    first_ps = "tune-source" + mode_suffix(cfg.modes[0])

    def tune_public_build(r: Results) -> Any:
        # As many examples as ps was tuned on, so the control takes as many steps.
        limit = r[first_ps].n_train
        return _make(tune.TuneConfig, "tune", {
            **common, "task": reference_task, "label_words": reference_words, "max_length": cfg.max_length,
            "split_seed": cfg.split_seed, "seed": cfg.seed, **tune_opts, "train_limit": limit, "dp": False,
            "model": student_dir(r), "test": False})

    tune_public = Step("tune-public", "user", "tune", tune_public_build, tune.tune, [*src_deps, first_ps],
                       "control prompt tuned like ps on public labelled data")
    prompts = [f"{stage}{mode_suffix(mode)}" for mode in cfg.modes for stage in ("tune-source", "transfer")]

    def build(r: Results) -> Any:
        return _make(reconstruct.ReconstructConfig, "reconstruct", {
            **common, **_task_opts(cfg), "prompt": [_prompt_of(r, p) for p in prompts],
            "reference": [_prompt_of(r, "tune-public")], "public": cfg.public, "local_model": student_dir(r),
            **opts})

    return [tune_public, Step("reconstruct", "user", "attack-reconstruct", build, reconstruct.reconstruct,
                              ["tune-public", *prompts], "nearest-token reading of every prompt vs the control")]


@dataclass(frozen=True)
class _Placeholder:
    """Any earlier step's result in a dry run: a placeholder for each attribute the steps' builders read."""

    name: str
    n_train: int = 2
    seconds: float | None = None

    @property
    def student_dir(self) -> str:
        return f"<{self.name}>"

    @property
    def model_dir(self) -> str:
        return f"<{self.name}>"

    @property
    def prompt(self) -> str:
        return f"<{self.name}>.safetensors"


class _Placeholders(dict):
    """Stand-in results for a dry run: every step's outputs exist, as placeholder values."""

    def __missing__(self, name: str) -> _Placeholder:
        return _Placeholder(name)


def check_steps(cfg: PipelineConfig) -> list[Step]:
    """Build every step's config with placeholder inputs: bad options fail now, not an hour in."""
    steps = build_steps(cfg)
    fake = _Placeholders()
    for step in steps:
        step.build(fake)
    return steps


def _key(config: Any, deps: list[str], keys: dict[str, str]) -> str:
    blob = json.dumps({"config": to_plain(config), "deps": [keys[d] for d in deps]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_pipeline(cfg: PipelineConfig, *, only: list[str] | None = None, echo: Callable[[str], None] | None = None
                 ) -> dict[str, Any]:
    """Run (or resume) every step; write the table and the report; return the pipeline's result."""
    from post.report import PIPELINE_RESULT, write_report
    from post.table import TableConfig, table

    say = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PostError(f"cannot create the output directory {out} ({e.strerror}); choose another --out.") from None
    state_path = out / STATE_FILE
    state: dict[str, Any] = read_json(state_path) if state_path.exists() else {}
    keys: dict[str, str] = dict(state.get("keys", {}))
    steps = check_steps(cfg)
    write_json(out / "pipeline-config.json", to_plain(cfg))
    if only:
        names = {s.name for s in steps}
        bad = sorted(set(only) - names)
        if bad:
            raise ConfigError(f"--only: no step {', '.join(bad)}; steps: {', '.join(s.name for s in steps)}.")
    results: dict[str, StageResult] = {}
    new_keys: dict[str, str] = {}
    timings: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    n = len(steps)
    for i, step in enumerate(steps, 1):
        config = step.build(results)
        key = _key(config, step.deps, new_keys)
        new_keys[step.name] = key
        d = out / step.name
        head = f"[{i:2d}/{n}] {step.name:<24} {step.party:<8}"
        finished = (d / RESULT_FILE).exists()
        if finished and keys.get(step.name) == key:
            results[step.name] = load_result(d)
            say(f"{head} done earlier ({step.what})")
            timings[step.name] = {"party": step.party, "seconds": results[step.name].seconds, "skipped": True}
            continue
        if only and step.name not in only:
            if not finished:
                raise PostError(f"step {step.name} has not run yet and --only leaves it out; run without --only first.")
            results[step.name] = load_result(d)
            continue
        if d.exists() and keys.get(step.name) not in (None, key):
            changed = [dep for dep in step.deps if state.get("keys", {}).get(dep) not in (None, new_keys[dep])]
            why = f"its input {', '.join(changed)} changed" if changed else "its options changed"
            say(f"{head} re-running: {why}")
            shutil.rmtree(d)
        elif d.exists() and not finished:
            say(f"{head} resuming ({step.what})")
        else:
            say(f"{head} running ({step.what})")
        keys[step.name] = key  # before running: an interrupted step resumes under the same key
        write_json(state_path, {"keys": keys})
        t0 = time.perf_counter()
        results[step.name] = result_from_dict(step.run(config, d), source=f"step {step.name}'s result")
        took = time.perf_counter() - t0
        timings[step.name] = {"party": step.party, "seconds": round(took, 3), "skipped": False}
        say(f"{'':7} {step.name:<24} finished in {duration(took)} (pipeline {duration(time.perf_counter() - t_start)})")
    stale = sorted(set(keys) - set(new_keys))
    for name in stale:  # a step this config no longer asks for: its results would mislead the table
        if (out / name).exists():
            shutil.rmtree(out / name)
        keys.pop(name)
    write_json(state_path, {"keys": keys})
    say(f"[table] collecting {len(results)} run directories")
    if (out / "table").exists():  # always rebuilt from the run directories
        shutil.rmtree(out / "table")
    tab = table(TableConfig(runs=[out / s.name for s in steps if s.stage == "evaluate"],
                            target=cfg.target), out / "table")
    summary = {"out": str(out), "target": cfg.target, "task": cfg.task, "public": cfg.public,
               "steps": {s.name: {"party": s.party, "stage": s.stage, "key": new_keys[s.name],
                                  "what": s.what, **timings.get(s.name, {})} for s in steps},
               "seconds": round(time.perf_counter() - t_start, 3), "table": tab["table"]}
    summary["report"] = str(write_report(out, summary))
    write_json(out / PIPELINE_RESULT, summary)  # once, with the report: a pipeline-result.json marks a finished run
    return summary
