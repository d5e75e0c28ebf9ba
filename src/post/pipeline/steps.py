"""The pipeline's steps, declared as a table: each row a step with its name, party, stage and options.

A row (:class:`StepDecl`) names its stage (:class:`Stage`: the stage function, its config and
result types), the party that runs it, the config section whose options it takes, when the config
asks for it, and its inputs: references to other rows' typed results (:mod:`post.results`), such as
``prompt_of(TUNE_SOURCE)`` (the tune-source step's ``TuneResult.prompt``) or ``STUDENT`` (the
distill step's ``student_dir``, or the config's ``student``). A reference names the row and an
attribute of its result type, checked when the row is declared. Rows marked ``per_mode`` run once
per privacy mode, the mode's suffix added to their name (``tune-source-dp``); a reference reads the
same mode's step unless it asks for the first mode's (``FIRST``).

A step's options are merged, later layers winning, in one order:

1. **common**: cache_dir, dtype, device, trust_remote_code;
2. **task**: the task options (rows with ``task``), then the row's own pipeline values (``options``:
   seed, the target, the split, ...; some are references, e.g. an evaluation's model);
3. **section**: the row's config section, then the sections in ``also`` (tune-target: ``tune``, then
   ``tune_target``);
4. **mode**: the privacy mode's options (rows with ``private``): ``dp``, the ``dp`` section, the
   ε of a ``dp-eps<E>`` mode;
5. **inputs**: the row's ``inputs``, earlier steps' results (and values no section may change).

Rows with ``section_last`` (transfer, zst, attack, reconstruct) merge their own section after the
inputs instead, so that section may change any option, inputs included; their ``also`` sections
keep the section place (attack: ``tune`` at 3, ``attack`` last). Then, for rows with ``private``,
``patience`` is dropped when ``dp`` is on (early stopping reads private validation data), and a
row's ``finish`` adjusts the merged options (attack: ``train_limit`` becomes ``target_n_train``, and
``attack_transfer`` adds the transfer's target and public text, and the transfer section's mode, loss,
steps, lr, batch size, public limit and α where the attack section gives none; reconstruct: the two options that
only its control tuning reads are dropped). This is the precedence every step had when the steps
were hand-written closures; the same configs and keys come out.

A step's *deps*, whose keys enter its own key, are the steps its options and inputs reference, in
that order (an input declared ``keyed=False`` is named by path only). The dry run
(:func:`check_steps`, :func:`dry_run`) builds every step's config from the same rows, each earlier
step's result stood in for by a placeholder of its declared result type: a reference to a step the
config does not run, or that runs later, fails there.

Adding a step is one :func:`declare` call (and its stage function): it appears in the run, the dry
run, the state file, the table (evaluations) and the report's cost section.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from post.config import TaskOptions
from post.errors import ConfigError, PostError
from post.pipeline.config import PipelineConfig, mode_epsilon, mode_suffix, section
from post.results import (
    AttackResult,
    DistillResult,
    EvaluateResult,
    ReconstructResult,
    StageResult,
    StudentResult,
    TransferResult,
    TuneResult,
    ZstResult,
    result_from_dict,
)

log = logging.getLogger(__name__)

Results = Mapping[str, StageResult]  # earlier steps' typed results by step name


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """A stage function as the pipeline runs it: ``function(config, run_dir)`` in ``module``, returning a ``result``.

    The module is imported when a step is built (so reading the table imports no model code).
    """

    name: str  # the ``stage`` its result.json names
    module: str
    config: str  # the config class's name in ``module``
    function: str
    result: type[StageResult]  # what its result.json is read back as
    command: str  # ``post <command> --help`` lists its options

    def load(self) -> tuple[type, Callable[[Any, Path], StageResult | dict[str, Any]]]:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config), getattr(mod, self.function)


DISTILL_STAGE = Stage("distill", "post.distill", "DistillConfig", "distill", DistillResult, "distill")
STUDENT_STAGE = Stage("student", "post.student", "StudentConfig", "make_student", StudentResult, "student")
TUNE = Stage("tune", "post.tune", "TuneConfig", "tune", TuneResult, "tune")
TRANSFER_STAGE = Stage("transfer", "post.transfer", "TransferConfig", "transfer", TransferResult, "transfer")
ZST_STAGE = Stage("zst", "post.zst", "ZstConfig", "zst", ZstResult, "zst")
EVALUATE = Stage("evaluate", "post.evaluate", "EvaluateConfig", "evaluate", EvaluateResult, "evaluate")
ATTACK_STAGE = Stage("attack-lira", "post.attack", "AttackConfig", "attack", AttackResult, "attack lira")
RECONSTRUCT_STAGE = Stage("attack-reconstruct", "post.reconstruct", "ReconstructConfig", "reconstruct",
                          ReconstructResult, "attack reconstruct")


# --------------------------------------------------------------------------- inputs

SAME, FIRST = "same", "first"  # which mode's step a reference reads: the step's own, or the config's first


@dataclass(frozen=True)
class Context:
    """What an input resolves against: the config, the step's privacy mode, earlier steps' results."""

    cfg: PipelineConfig
    mode: str
    results: Results


class Input:
    """An option's value taken from the config or from earlier steps' results when the step is built."""

    def steps(self, cfg: PipelineConfig, mode: str) -> list[str]:
        """The steps it reads whose keys enter the reading step's key (its deps)."""
        return []

    def resolve(self, ctx: Context) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Of(Input):
    """A value of the pipeline config, e.g. ``Of(lambda c: c.target)``."""

    get: Callable[[PipelineConfig], Any]

    def resolve(self, ctx: Context) -> Any:
        return self.get(ctx.cfg)


@dataclass(frozen=True, eq=False)
class Ref(Input):
    """The attribute ``attr`` of the typed result of row ``row``'s step (``mode``: SAME or FIRST)."""

    row: StepDecl
    attr: str
    mode: str = SAME
    cast: Callable[[Any], Any] | None = None
    keyed: bool = True

    def __post_init__(self) -> None:
        names = {f.name for f in dataclasses.fields(self.row.stage.result)}
        if self.attr not in names:
            raise TypeError(f"{self.row.name}: a {self.row.stage.result.__name__} has no {self.attr!r}")

    def step(self, cfg: PipelineConfig, mode: str) -> str:
        return self.row.step_name(cfg.modes[0] if self.mode == FIRST else mode)

    def steps(self, cfg: PipelineConfig, mode: str) -> list[str]:
        return [self.step(cfg, mode)] if self.keyed else []

    def resolve(self, ctx: Context) -> Any:
        name = self.step(ctx.cfg, ctx.mode)
        if name not in ctx.results:
            raise PostError(f"step {name}'s result is needed but that step has not run (is it declared before "
                            "the steps that read it, and asked for by this config?).")
        value = getattr(ctx.results[name], self.attr)
        return self.cast(value) if self.cast else value


@dataclass(frozen=True, eq=False)
class Each(Input):
    """``attr`` of the results of ``rows``' steps, every mode in turn (a row without modes once)."""

    rows: tuple[StepDecl, ...]
    attr: str
    cast: Callable[[Any], Any] | None = None

    def _steps(self, cfg: PipelineConfig) -> dict[str, tuple[StepDecl, str]]:
        out: dict[str, tuple[StepDecl, str]] = {}
        for mode in cfg.modes:
            for row in self.rows:
                out.setdefault(row.step_name(mode), (row, mode))
        return out

    def steps(self, cfg: PipelineConfig, mode: str) -> list[str]:
        return list(self._steps(cfg))

    def resolve(self, ctx: Context) -> Any:
        return [Ref(row, self.attr, cast=self.cast).resolve(Context(ctx.cfg, mode, ctx.results))
                for row, mode in self._steps(ctx.cfg).values()]


@dataclass(frozen=True)
class Student(Input):
    """The student Φs: the config's ``student`` when it names one, else the distill step's ``student_dir``."""

    keyed: bool = True

    def _ref(self) -> Ref:
        return Ref(DISTILL, "student_dir", keyed=self.keyed)

    def steps(self, cfg: PipelineConfig, mode: str) -> list[str]:
        return [] if cfg.student else self._ref().steps(cfg, mode)

    def resolve(self, ctx: Context) -> Any:
        return ctx.cfg.student if ctx.cfg.student else self._ref().resolve(ctx)


STUDENT = Student()
TARGET = Of(lambda c: c.target)


def prompt_of(row: StepDecl, mode: str = SAME) -> Ref:
    """The prompt file a tune, transfer or zst step wrote."""
    return Ref(row, "prompt", mode, cast=Path)


# --------------------------------------------------------------------------- rows


def _always(cfg: PipelineConfig) -> bool:
    return True


def _nothing(cfg: PipelineConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True, eq=False)
class StepDecl:
    """One row of the pipeline's table (see the module's docstring for how its options are merged).

    Attributes:
        name: The step's run directory (per-mode rows: plus the mode's suffix).
        party: Who runs it: provider, user or baseline.
        stage: Its stage function.
        what: One line for the log and the report; ``{mode}`` is the privacy mode.
        section: Its config section (named in errors), None for none.
        also: More sections merged at the section place, after ``section``.
        section_last: Merge ``section`` after the inputs.
        when: Whether a config runs it.
        per_mode: Run once per privacy mode.
        task: Take the task options.
        private: Take the privacy mode's options (a row without modes takes non-private's).
        options: The pipeline's own values for it (values may be :class:`Input`).
        inputs: Values from earlier steps' results (and values no section may change), in deps order.
        finish: Adjusts the merged options.
    """

    name: str
    party: str
    stage: Stage
    what: str
    section: str | None = None
    also: tuple[str, ...] = ()
    section_last: bool = False
    when: Callable[[PipelineConfig], bool] = _always
    per_mode: bool = False
    task: bool = False
    private: bool = False
    options: Callable[[PipelineConfig], Mapping[str, Any]] = _nothing
    inputs: Mapping[str, Any] = field(default_factory=dict)
    finish: Callable[[PipelineConfig, dict[str, Any]], None] | None = None

    def step_name(self, mode: str) -> str:
        return self.name + mode_suffix(mode) if self.per_mode else self.name

    def owns(self, step: str) -> bool:
        """Whether ``step`` is a step of this row (``tune-source-dp-eps1`` is one of tune-source's)."""
        if not self.per_mode:
            return step == self.name
        return re.fullmatch(re.escape(self.name) + r"(-dp(-eps\d+(\.\d+)?)?)?", step) is not None


STEPS: list[StepDecl] = []  # the table, in an order where every row follows the rows it reads


def declare(name: str, party: str, stage: Stage, what: str, **kw: Any) -> StepDecl:
    """Add a row to the table (after the rows declared so far) and return it."""
    row = StepDecl(name, party, stage, what, **kw)
    if any(r.name == name for r in STEPS):
        raise ValueError(f"step {name} is declared twice")
    STEPS.append(row)
    return row


def _seed(c: PipelineConfig) -> dict[str, Any]:
    return {"seed": c.seed}


def _baseline(name: str) -> Callable[[PipelineConfig], bool]:
    return lambda c: name in c.baselines


def _undistilled(c: PipelineConfig) -> bool:
    return c.undistilled


def _keep_layers(c: PipelineConfig) -> Any:
    from post.distill import DistillConfig

    return section(c, "distill").get("keep_layers", DistillConfig.keep_layers)


def _transfer_options(c: PipelineConfig) -> dict[str, Any]:
    # α comes from public labelled data (the public set itself when it is labelled): the provider sends
    # no private text to Φt and receives no statistic of private data.
    from post.data import is_dataset_name

    alpha_public = {"alpha_public": c.public} if is_dataset_name(c.public.lower()) else {}
    return {"target_model": c.target, "public": c.public, "max_length": c.max_length, "seed": c.seed,
            **alpha_public}


def _evaluation(name: str, party: str, model: Any, prompt: Ref | None, what: str, *,
                when: Callable[[PipelineConfig], bool] = _always, **inputs: Any) -> StepDecl:
    """A test-split evaluation; its model comes before the evaluate section (which may change it)."""
    return declare(name, party, EVALUATE, what, section="evaluate", when=when, per_mode=prompt is not None,
                   task=True, options=lambda c: {"model": model, "split": "test", "seed": c.seed},
                   inputs={**inputs, **({"prompt": prompt} if prompt is not None else {})})


def _tuning(name: str, party: str, model: Any, what: str, *, when: Callable[[PipelineConfig], bool] = _always,
            also: tuple[str, ...] = ()) -> StepDecl:
    # Test accuracy comes from an evaluate step, on the same test examples as every other cell.
    return declare(name, party, TUNE, what, section="tune", also=also, when=when, per_mode=True, task=True,
                   private=True, options=_seed, inputs={"model": model, "test": False})


def _transferring(name: str, source: Any, tuned: StepDecl, what: str, *,
                  when: Callable[[PipelineConfig], bool] = _always) -> StepDecl:
    return declare(name, "provider", TRANSFER_STAGE, what, section="transfer", section_last=True, when=when,
                   per_mode=True, options=_transfer_options,
                   inputs={"source_model": source, "prompt": prompt_of(tuned)})


def _attack_finish(c: PipelineConfig, values: dict[str, Any]) -> None:
    # The shadows copy the released prompt's mechanism (q, steps, σ, δ): it was tuned on train_limit.
    if (limit := values.pop("train_limit", None)) is not None:
        values["target_n_train"] = limit
    if c.attack_transfer:
        values.update(transfer_target=c.target, public=c.public)
        # The shadows' transfers copy the pipeline's (mode, loss, steps, ...) unless the attack section says
        # otherwise: the audit is of the transfer the provider runs.
        deployed = section(c, "transfer")
        for ours, theirs in _ATTACK_TRANSFER.items():
            if deployed.get(theirs) is not None:
                values.setdefault(ours, deployed[theirs])


# The attack's transfer options and the transfer section's names for them.
_ATTACK_TRANSFER = {"transfer_mode": "mode", "transfer_loss": "loss", "transfer_steps": "steps",
                    "transfer_lr": "lr", "transfer_batch_size": "batch_size", "public_limit": "public_limit",
                    "transfer_alpha": "alpha", "transfer_calibrate_labels": "calibrate_labels"}


def _reconstruct_opts(c: PipelineConfig) -> tuple[Any, Any]:
    """The control's task and label words (reconstruct's reference_task, reference_label_words)."""
    opts = section(c, "reconstruct")
    # The control is asked like ps by default; a reference set with other classes names its own words.
    return opts.get("reference_task", c.public), opts.get("reference_label_words", c.label_words)


def _reconstruct_finish(c: PipelineConfig, values: dict[str, Any]) -> None:
    values.pop("reference_task", None)
    values.pop("reference_label_words", None)


# --------------------------------------------------------------------------- the table

DISTILL = declare("distill", "provider", DISTILL_STAGE, "distil the target into the student Φs",
                  section="distill", when=lambda c: not c.student,
                  options=lambda c: {"teacher": c.target, "seed": c.seed})
UNDISTILLED = declare("undistilled", "provider", STUDENT_STAGE, "the same layers, not distilled", when=_undistilled,
                      options=lambda c: {"teacher": c.target, "keep_layers": _keep_layers(c)})
ZERO_SHOT = _evaluation("zero-shot", "user", TARGET, None, "Φt zero-shot on test", when=_baseline("zero-shot"))
# Φt zero-shot divided by its mean answer on the public texts: what an even label prior alone is worth.
EVAL_CALIBRATED = _evaluation("eval-calibrated", "user", TARGET, None, "Φt zero-shot, calibrated on public texts",
                              when=_baseline("calibrated"), calibrate_public=Of(lambda c: c.public))
TUNE_SOURCE = _tuning("tune-source", "user", STUDENT, "ps on Φs ({mode})")
EVAL_SOURCE = _evaluation("eval-source", "user", STUDENT, prompt_of(TUNE_SOURCE), "Φs with ps ({mode})",
                          when=_baseline("source-tuning"))
TUNE_TARGET = _tuning("tune-target", "baseline", TARGET, "prompt tuned on Φt ({mode}; the data goes to the provider)",
                      when=_baseline("target-tuning"), also=("tune_target",))
EVAL_TARGET = _evaluation("eval-target", "baseline", TARGET, prompt_of(TUNE_TARGET), "Φt with its own prompt ({mode})",
                          when=_baseline("target-tuning"))
TRANSFER = _transferring("transfer", STUDENT, TUNE_SOURCE, "POST ps → pt ({mode})")
EVAL_POST = _evaluation("eval-post", "user", TARGET, prompt_of(TRANSFER), "Φt with pt ({mode})")
EVAL_DIRECT = _evaluation("eval-direct", "user", TARGET, prompt_of(TUNE_SOURCE), "Φt with ps as it is ({mode})",
                          when=_baseline("direct"), allow_other_model=True)
# Proxy tuning: Φt's logits plus the change ps causes on Φs, at query time (no transfer training).
EVAL_PROXY = _evaluation("eval-proxy", "user", TARGET, prompt_of(TUNE_SOURCE),
                         "Φt + (Φs(ps) − Φs), proxy tuning ({mode})", when=_baseline("proxy"),
                         proxy_source_model=STUDENT)
ZST = declare("zst", "provider", ZST_STAGE, "zero-shot continuous prompt transfer ({mode})", section="zst",
              section_last=True, when=_baseline("zst"), per_mode=True,
              options=lambda c: {"target_model": c.target, "seed": c.seed},
              inputs={"source_model": STUDENT, "prompt": prompt_of(TUNE_SOURCE)})
EVAL_ZST = _evaluation("eval-zst", "user", TARGET, prompt_of(ZST), "Φt with the ZST prompt ({mode})",
                       when=_baseline("zst"))
UNDISTILLED_DIR = Ref(UNDISTILLED, "model_dir")
TUNE_UNDISTILLED = _tuning("tune-undistilled", "user", UNDISTILLED_DIR, "prompt on the undistilled layers ({mode})",
                           when=_undistilled)
EVAL_UNDISTILLED = _evaluation("eval-undistilled", "user", UNDISTILLED_DIR, prompt_of(TUNE_UNDISTILLED),
                               "the undistilled layers with their prompt ({mode})", when=_undistilled)
TRANSFER_UNDISTILLED = _transferring("transfer-undistilled", UNDISTILLED_DIR, TUNE_UNDISTILLED,
                                     "POST from the undistilled layers ({mode})", when=_undistilled)
EVAL_POST_UNDISTILLED = _evaluation("eval-post-undistilled", "user", TARGET, prompt_of(TRANSFER_UNDISTILLED),
                                    "Φt with pt from the undistilled layers ({mode})", when=_undistilled)
ATTACK = declare("attack", "user", ATTACK_STAGE, "LiRA on prompts tuned like ps ({mode})", section="attack",
                 also=("tune",), section_last=True, when=lambda c: c.attack is not None, per_mode=True, task=True,
                 private=True, options=_seed, inputs={"model": STUDENT, "test": False}, finish=_attack_finish)
# A control prompt tuned like ps on public labelled data, then the nearest-token check of every prompt.
TUNE_PUBLIC = declare(
    "tune-public", "user", TUNE, "control prompt tuned like ps on public labelled data", section="tune",
    when=lambda c: c.reconstruct is not None, private=True,
    options=lambda c: {"task": _reconstruct_opts(c)[0], "label_words": _reconstruct_opts(c)[1],
                       "max_length": c.max_length, "split_seed": c.split_seed, "seed": c.seed},
    # As many examples as ps was tuned on, so the control takes as many steps.
    inputs={"model": STUDENT, "train_limit": Ref(TUNE_SOURCE, "n_train", FIRST), "test": False})
RECONSTRUCT = declare(
    "reconstruct", "user", RECONSTRUCT_STAGE, "nearest-token reading of every prompt vs the control",
    section="reconstruct", section_last=True, when=lambda c: c.reconstruct is not None, task=True,
    options=lambda c: {"public": c.public},
    inputs={"reference": Each((TUNE_PUBLIC,), "prompt", Path), "prompt": Each((TUNE_SOURCE, TRANSFER), "prompt", Path),
            "local_model": Student(keyed=False)},
    finish=_reconstruct_finish)


# --------------------------------------------------------------------------- building steps


def mode_options(cfg: PipelineConfig, mode: str) -> dict[str, Any]:
    """A privacy mode's options: ``dp``, the dp section's (for DP modes) and a dp-eps<E> mode's ε."""
    opts = {"dp": False} if mode == "non-private" else {"dp": True, **section(cfg, "dp")}
    if (eps := mode_epsilon(mode)) is not None:
        opts["epsilon"] = eps
    return opts


def _common(cfg: PipelineConfig) -> dict[str, Any]:
    return {"cache_dir": cfg.cache_dir, "dtype": cfg.dtype, "device": cfg.device,
            "trust_remote_code": cfg.trust_remote_code}


def _task_opts(cfg: PipelineConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TaskOptions)}


def _no_early_stop_if_dp(step: str, values: dict[str, Any]) -> dict[str, Any]:
    """A DP tuning's options without ``patience``: early stopping reads private validation data, so a DP run
    (and a DP shadow copying it) takes its planned steps."""
    if values.get("dp") and values.pop("patience", None) is not None:
        log.info("%s: patience applies to non-private runs only; the DP run takes its planned steps", step)
    return values


def _make(config_cls: type, label: str, stage: Stage, values: Mapping[str, Any]) -> Any:
    """Build a stage config, naming the YAML section when an option is unknown."""
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{label}: unknown option(s) {', '.join(unknown)} (see post {stage.command} --help).")
    try:
        return config_cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}") from None


@dataclass
class Step:
    """One step of a config: a row of the table in one privacy mode."""

    decl: StepDecl
    mode: str
    cfg: PipelineConfig
    deps: list[str]

    @property
    def name(self) -> str:
        return self.decl.step_name(self.mode)

    @property
    def party(self) -> str:
        return self.decl.party

    @property
    def stage(self) -> str:
        return self.decl.stage.name

    @property
    def what(self) -> str:
        return self.decl.what.format(mode=self.mode)

    def options(self, results: Results) -> dict[str, Any]:
        """The stage's options, merged in the documented order from the config and earlier steps' results."""
        d, cfg = self.decl, self.cfg
        ctx = Context(cfg, self.mode, results)

        def resolved(values: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v.resolve(ctx) if isinstance(v, Input) else v for k, v in values.items()}

        own = [] if d.section is None else [section(cfg, d.section)]
        sections = [*([] if d.section_last else own), *(section(cfg, s) for s in d.also)]
        values = {**_common(cfg), **(_task_opts(cfg) if d.task else {}), **resolved(d.options(cfg))}
        for s in sections:
            values.update(s)
        if d.private:
            values.update(mode_options(cfg, self.mode))
        values.update(resolved(d.inputs))
        if d.section_last:
            for s in own:
                values.update(s)
        if d.private:
            values = _no_early_stop_if_dp(self.name, values)
        if d.finish is not None:
            d.finish(cfg, values)
        return values

    def build(self, results: Results) -> Any:
        """The stage's config."""
        config_cls, _ = self.decl.stage.load()
        return _make(config_cls, self.decl.section or self.decl.stage.name, self.decl.stage, self.options(results))

    def run(self, config: Any, run_dir: Path) -> StageResult:
        """Run the stage; its typed result (one that returns its ``result.json`` as a mapping is read as one)."""
        _, function = self.decl.stage.load()
        result = function(config, run_dir)
        if isinstance(result, StageResult):
            return result
        return result_from_dict(result, source=f"step {self.name}'s result")


def _deps(decl: StepDecl, cfg: PipelineConfig, mode: str) -> list[str]:
    values = [*decl.options(cfg).values(), *decl.inputs.values()]
    names = [n for v in values if isinstance(v, Input) for n in v.steps(cfg, mode)]
    return list(dict.fromkeys(names))


def build_steps(cfg: PipelineConfig, table: Sequence[StepDecl] | None = None) -> list[Step]:
    """The steps this config asks for, in table order; runs of per-mode rows repeat for every mode."""
    rows = list(STEPS if table is None else table)
    steps: list[Step] = []
    i = 0
    while i < len(rows):
        j = i + 1
        while rows[i].per_mode and j < len(rows) and rows[j].per_mode:
            j += 1
        block = rows[i:j]
        for mode in cfg.modes if rows[i].per_mode else ["non-private"]:
            steps += [Step(d, mode, cfg, _deps(d, cfg, mode)) for d in block if d.when(cfg)]
        i = j
    return steps


# --------------------------------------------------------------------------- the dry run


def placeholder(result: type[StageResult], stage: str, name: str) -> StageResult:
    """A stand-in result of type ``result`` for step ``name``: every required field a placeholder of its type
    (strings ``<name>``, a prompt ``<name>.safetensors``, numbers 2, optional fields None)."""
    hints = typing.get_type_hints(result)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(result):
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING or f.name == "stage":
            continue
        hint = hints[f.name]
        base = typing.get_origin(hint) or hint
        if type(None) in typing.get_args(hint):
            values[f.name] = None
        elif f.name == "prompt":
            values[f.name] = f"<{name}>.safetensors"
        else:
            values[f.name] = {str: f"<{name}>", int: 2, float: 2.0, bool: False, list: []}.get(base, {})
    return result(stage=stage, **values)


def dry_run(cfg: PipelineConfig, table: Sequence[StepDecl] | None = None) -> dict[str, Any]:
    """Every step's stage config, built with placeholder results in place of earlier steps' results."""
    results: dict[str, StageResult] = {}
    configs: dict[str, Any] = {}
    for step in build_steps(cfg, table):
        configs[step.name] = step.build(results)
        results[step.name] = placeholder(step.decl.stage.result, step.stage, step.name)
    return configs


def check_steps(cfg: PipelineConfig, table: Sequence[StepDecl] | None = None) -> list[Step]:
    """Build every step's config with placeholder inputs: bad options fail now, not an hour in."""
    dry_run(cfg, table)
    return build_steps(cfg, table)


def steps_of(names: Iterable[str], *rows: StepDecl) -> list[str]:
    """The names among ``names`` that are steps of ``rows`` (in the order of ``names``)."""
    return [n for n in names if any(r.owns(n) for r in rows)]


def rows_of(stage: Stage, table: Sequence[StepDecl] | None = None) -> tuple[StepDecl, ...]:
    """The rows that run ``stage``."""
    return tuple(r for r in (STEPS if table is None else table) if r.stage == stage)
