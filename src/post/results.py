"""Typed stage results: what a finished run directory's ``result.json`` says, as frozen dataclasses.

Each stage writes its figures with :meth:`post.rundir.RunDir.finish`; the pipeline, the table and the
report read them back through these types, by attribute, instead of by the keys of the JSON layout:

=============================  ===================  ============================================================
type                           ``stage``            read by
=============================  ===================  ============================================================
:class:`DistillResult`         ``distill``          pipeline (the student), table (its cost), report (quality)
:class:`StudentResult`         ``student``          pipeline (the undistilled layers), table (which source)
:class:`TuneResult`            ``tune``             pipeline (prompt, n_train), table (PT cells and costs)
:class:`TransferResult`        ``transfer``         pipeline (the prompt), table (costs), report (α, loss)
:class:`ZstResult`             ``zst``              pipeline (the prompt), table (costs)
:class:`EvaluateResult`        ``evaluate``         table (every test-split cell)
:class:`AttackResult`          ``attack-lira``      report (the LiRA audit)
:class:`ReconstructResult`     ``reconstruct``      report (the nearest-token reading of every prompt)
:class:`CanaryResult`          ``attack-canary``    the CLI's summary (the one-run ε lower bound)
:class:`TableResult`           ``table``            pipeline (the Markdown table in its summary), the CLI
:class:`ExportPeftResult`      ``export-peft``      the CLI's summary (where the adapter is)
:class:`ChooseTemplateResult`  ``choose-template``  the CLI's summary (the winner and its override)
=============================  ===================  ============================================================

Reading a result:

- ``TuneResult.from_dir(path)`` reads ``<path>/result.json``; ``TuneResult.from_dict(d)`` takes the
  mapping itself. Either raises :class:`~post.errors.PostError` (one line) when the file is missing or
  unreadable, when it holds another stage's result, or when a required field is absent.
- :func:`load_result` and :func:`result_from_dict` pick the type from the ``stage`` field (any other
  stage gives a plain :class:`StageResult`).

Required fields are those every run of the stage writes and some reader needs; a field that older or
hand-made results may lack has a default (None). A required field may still hold None where the stage
writes None (e.g. an evaluation without a prompt). Values are kept as JSON gave them (no casting, lists
stay lists), so what a reader computes from them is unchanged; only ``prompt`` of an evaluation becomes a
:class:`PromptInfo`. Every key a type does not name is kept, read-only, in ``extra``: nothing in the
file is lost, and figures no reader uses yet need no field.

Frozen means the attributes cannot be reassigned; nested figures (dicts, lists) are the parsed JSON and
are to be treated as read-only.

Each stage function returns its type too (``tune`` a :class:`TuneResult`, ``evaluate`` an
:class:`EvaluateResult`, ...): the object :meth:`StageResult.from_dict` makes of the mapping it has just
written to ``result.json`` (or found there, for a finished run), so a caller reads the same attributes
whether it ran the stage or reads its directory later. Optional fields that only the CLI's summaries and
the tests read (``val_accuracy``, ``macro_f1``, ...) are None in results that lack them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

from post.errors import PostError
from post.rundir import RESULT_FILE, read_result

R = TypeVar("R", bound="StageResult")


def _missing(cls: type, d: Mapping[str, Any]) -> list[str]:
    """The fields of ``cls`` without a default that ``d`` lacks."""
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in d]


def _read(path: str | os.PathLike[str], what: str) -> tuple[dict[str, Any], str]:
    """A run directory's parsed ``result.json`` and the file's name, or a PostError naming the directory."""
    file = Path(path) / RESULT_FILE
    if not file.is_file():
        raise PostError(f"{path} is not a finished {what} directory (no {RESULT_FILE}); run the stage first or "
                        "pass another directory.")
    return read_result(path), str(file)


@dataclass(frozen=True, kw_only=True)
class PromptInfo:
    """What an evaluation's result says of the prompt it scored (:meth:`post.prompt.PromptFile.summary`).

    Attributes:
        model: The model the prompt belongs to (``local:<name>`` for a local directory).
        method: ``tuned``, ``post`` or ``zst``: how the prompt was made.
        path: The prompt file.
        source_model: The model a transferred prompt came from.
        epsilon, delta, target_epsilon: The prompt's privacy ledger (None for a non-private prompt).
        n_tokens: Its length.

    Other keys of the summary are dropped (it is not a stage result and has no ``extra``).
    """

    model: str
    method: str | None = None
    path: str | None = None
    source_model: str | None = None
    epsilon: float | None = None
    delta: float | None = None
    target_epsilon: float | None = None
    n_tokens: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "a prompt summary") -> PromptInfo:
        if not isinstance(d, Mapping):
            raise PostError(f"{source}: the prompt is not a mapping ({type(d).__name__}); re-run the evaluation.")
        if missing := _missing(cls, d):
            raise PostError(f"{source}: the prompt lacks {', '.join(missing)}; re-run the evaluation.")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True, kw_only=True)
class StageResult:
    """A finished run's result: its stage, its seconds, and (here) every other key in ``extra``.

    Subclasses name the fields their readers use; ``STAGE`` is the stage they accept.
    """

    STAGE: ClassVar[str | None] = None
    _NESTED: ClassVar[Mapping[str, Any]] = {}  # field -> a from_dict for a nested mapping (None stays None)

    stage: str
    seconds: float | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_dict(cls: type[R], d: Mapping[str, Any], *, source: str | None = None) -> R:
        """The result in ``d`` (a parsed ``result.json``); ``source`` names it in errors (default: the type)."""
        where = source or f"a {cls.STAGE or 'stage'} result"
        if not isinstance(d, Mapping):
            raise PostError(f"{where} is not a result (a JSON object, got {type(d).__name__}).")
        if cls.STAGE is not None and d.get("stage") != cls.STAGE:
            raise PostError(f"{where} is a {d.get('stage')!r} result, not a {cls.STAGE} result; "
                            f"pass the {cls.STAGE} run's directory.")
        if missing := _missing(cls, d):
            raise PostError(f"{where} lacks {', '.join(missing)} (written by another version of post "
                            f"{d.get('stage', '?')}?); re-run that stage.")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: d[k] for k in names if k in d}
        for name, parse in cls._NESTED.items():
            if values.get(name) is not None:
                values[name] = parse(values[name], source=f"{where}, field {name}")
        return cls(**values, extra=MappingProxyType({k: v for k, v in d.items() if k not in names}))

    @classmethod
    def from_dir(cls: type[R], path: str | os.PathLike[str]) -> R:
        """The result in ``<path>/result.json``."""
        d, file = _read(path, f"{cls.STAGE} run" if cls.STAGE else "run")
        return cls.from_dict(d, source=file)


@dataclass(frozen=True, kw_only=True)
class DistillResult(StageResult):
    """``post distill``: the student directory and the distillation's figures."""

    STAGE: ClassVar[str | None] = "distill"

    student_dir: str
    teacher: str
    keep_layers: list[int]
    teacher_params: int
    student_params: int
    steps: int
    tokens_seen: int
    train_seconds: float
    teacher_quality: Mapping[str, float]
    undistilled_quality: Mapping[str, float]
    distilled_quality: Mapping[str, float]
    trainable_params: int | None = None
    processes: int | None = None
    planned_steps: int | None = None  # more than ``steps`` when --max-minutes stopped the run
    mixed_precision: str | None = None
    held_out_curve: list[dict[str, float]] | None = None  # with --eval-every: {step, perplexity, kl_to_teacher}
    prompted_texts: int | None = None  # texts seen behind random prompts (--alpha-prompted)


@dataclass(frozen=True, kw_only=True)
class StudentResult(StageResult):
    """``post student``: kept layers of the teacher, not distilled."""

    STAGE: ClassVar[str | None] = "student"

    model_dir: str
    teacher: str
    keep_layers: list[int]
    teacher_layers: int | None = None
    teacher_params: int | None = None
    student_params: int | None = None


@dataclass(frozen=True, kw_only=True)
class TuneResult(StageResult):
    """``post tune``: the prompt file and the tuning's figures.

    ``train_seconds`` is required but may be None in old results; ``test`` holds the test-split
    metrics (n, accuracy, class_names, ...) of a run asked to score the test split. ``steps`` is the
    steps taken (fewer than ``planned_steps`` when ``stopped_early``); ``validation_curve`` the
    validations, each with its step and ``val_accuracy``. With ``--patience`` the prompt kept is the best
    validated one, from step ``kept_step``, and ``val_accuracy`` is its; otherwise the last.
    """

    STAGE: ClassVar[str | None] = "tune"

    model: str
    task: str
    dp: bool
    prompt: str
    n_train: int
    train_seconds: float | None
    test_accuracy: float | None = None
    test: Mapping[str, Any] | None = None
    epsilon: float | None = None
    delta: float | None = None
    privacy: Mapping[str, Any] | None = None
    n_tokens: int | None = None
    steps: int | None = None
    planned_steps: int | None = None
    stopped_early: bool | None = None
    val_accuracy: float | None = None
    validation_curve: list[dict[str, Any]] | None = None
    kept_step: int | None = None


@dataclass(frozen=True, kw_only=True)
class _PromptTransfer(StageResult):
    """What both transfers (POST and ZST) write: the prompt made for the target and the ledger it carries."""

    prompt: str
    source_model: str
    target_model: str
    epsilon: float | None = None
    delta: float | None = None


@dataclass(frozen=True, kw_only=True)
class TransferResult(_PromptTransfer):
    """``post transfer``: the transferred prompt, α and the transfer's costs.

    ``target_zero_shot`` and ``source_accuracy`` are what a heuristic α was computed from (None for a
    given α); ``watch_curve`` the watched accuracies (each with its step), empty when nothing was watched.
    ``loss`` is ``post`` (the paper's) or ``proxy-labels``; for the latter ``alpha`` is None and
    ``proxy_label_shares`` / ``proxy_labels_as_target`` say how the public texts were labelled (the share of each
    class, and of texts labelled as the target answers them alone) and ``calibrate_labels`` whether the labels
    were calibrated on the public texts.
    """

    STAGE: ClassVar[str | None] = "transfer"

    alpha: float | None
    mode: str
    steps: int
    public: str
    public_texts: int
    train_seconds: float
    cache_seconds: float
    alpha_source: str | None = None
    alpha_seconds: float | None = None
    target_zero_shot: float | None = None
    source_accuracy: float | None = None
    processes: int | None = None
    watch_curve: list[dict[str, Any]] | None = None
    loss: str = "post"
    proxy_label_shares: dict[str, float] | None = None
    proxy_labels_as_target: float | None = None
    calibrate_labels: bool = False


@dataclass(frozen=True, kw_only=True)
class ZstResult(_PromptTransfer):
    """``post zst``: the zero-shot transferred prompt (its run has only its total ``seconds``)."""

    STAGE: ClassVar[str | None] = "zst"

    anchors: int | None = None
    final_loss: float | None = None


@dataclass(frozen=True, kw_only=True)
class EvaluateResult(StageResult):
    """``post evaluate``: one model (with or without a prompt) scored on one split.

    ``prompt`` is None for a zero-shot run; ``method`` is ``proxy`` for proxy tuning (else None);
    ``predictions`` is the file of per-example predictions.
    """

    STAGE: ClassVar[str | None] = "evaluate"
    _NESTED: ClassVar[Mapping[str, Any]] = {"prompt": PromptInfo.from_dict}

    model: str
    task: str
    split: str
    prompt: PromptInfo | None
    accuracy: float
    n: int | None = None
    class_names: list[str] | None = None
    method: str | None = None
    proxy_source_model: str | None = None
    macro_f1: float | None = None
    confusion_matrix: list[list[int]] | None = None
    predictions: str | None = None


@dataclass(frozen=True, kw_only=True)
class AttackResult(StageResult):
    """``post attack lira``: the audit's figures on ps (and on the transferred prompts when asked).

    ``source_prompt`` and ``transferred_prompt`` hold LiRA's figures by variant (``online``, ...),
    ``source_prompt_rmia`` and ``transferred_prompt_rmia`` RMIA's. A DP audit (``dp``) also has the
    released prompt's mechanism (``target_mechanism``), the shadows' (``shadow_mechanism``,
    ``shadow_epsilon_max``) and a ``mechanism_note`` on how they differ.
    """

    STAGE: ClassVar[str | None] = "attack-lira"

    shadows: int
    pool: int
    source_prompt: Mapping[str, Any]
    roc_png: str
    epsilon: float | None = None
    transferred_prompt: Mapping[str, Any] | None = None
    roc_transferred_png: str | None = None
    model: str | None = None
    task: str | None = None
    dp: bool | None = None
    delta: float | None = None
    source_prompt_rmia: Mapping[str, Any] | None = None
    transferred_prompt_rmia: Mapping[str, Any] | None = None
    transfer_target: str | None = None
    auc: float | None = None
    rmia_auc: float | None = None
    wall_seconds: float | None = None
    target_mechanism: Mapping[str, Any] | None = None
    shadow_mechanism: Mapping[str, Any] | None = None
    shadow_epsilon_max: float | None = None
    mechanism_note: str | None = None


@dataclass(frozen=True, kw_only=True)
class ReconstructResult(StageResult):
    """``post attack reconstruct``: every prompt's nearest-token reading and the verdict on them.

    ``prompts`` holds one row per prompt file (the private prompts, then the references): its summary,
    ``reference``, ``projection``, ``mean_top1_cosine``, ``nearest``, ``ngrams`` (by n) and
    ``longest_run``; :func:`post.reconstruct.markdown` renders them.
    """

    STAGE: ClassVar[str | None] = "reconstruct"

    task: str
    split: str
    private_texts: int
    public: str | None
    public_texts: int
    max_n: int
    prompts: list[dict[str, Any]]
    verdict: str


@dataclass(frozen=True, kw_only=True)
class CanaryResult(StageResult):
    """``post attack canary``: the one-run audit's guesses and the ε lower bounds they give.

    ``guesses`` of the ``canaries`` were made (``guesses_in`` + ``guesses_out``), ``correct`` of them right;
    ``epsilon_lower_bound`` is the bound at ``audit_delta`` and ``confidence``, ``epsilon_lower_bound_pure``
    at δ = 0. ``epsilon`` and ``delta`` are the audited tuning run's ledger (None without DP), ``steps`` and
    ``val_accuracy`` its figures, ``tune_dir`` its directory; ``canary_auc`` is None when every coin fell
    the same way.
    """

    STAGE: ClassVar[str | None] = "attack-canary"

    model: str
    task: str
    dp: bool
    canaries: int
    canaries_in: int
    guesses_in: int
    guesses_out: int
    guesses: int
    correct: int
    precision: float
    confidence: float
    audit_delta: float
    epsilon_lower_bound: float
    epsilon_lower_bound_pure: float
    canary_auc: float | None
    epsilon: float | None
    delta: float | None
    n_train: int
    steps: int | None
    val_accuracy: float | None
    tune_dir: str
    wall_seconds: float
    exceeds_accounted_epsilon: bool


@dataclass(frozen=True, kw_only=True)
class TableResult(StageResult):
    """``post table``: how many cells, the Markdown and CSV files, and the Markdown ``table`` itself."""

    STAGE: ClassVar[str | None] = "table"

    cells: int
    markdown: str
    csv: str
    table: str


@dataclass(frozen=True, kw_only=True)
class ExportPeftResult(StageResult):
    """``post export-peft``: the adapter directory, the prompt and model it was made from, its PEFT task type."""

    STAGE: ClassVar[str | None] = "export-peft"

    adapter_dir: str
    prompt: str
    model: str
    n_tokens: int
    task_type: str


@dataclass(frozen=True, kw_only=True)
class ChooseTemplateResult(StageResult):
    """``post user choose-template``: the ranking of templates × label words and its winner.

    ``data`` names what was ranked on (``public:<name>`` or ``private:<task>``); ``ranking`` holds one row
    per candidate, best first (template, words, label_words, n, accuracy, ci_low, ci_high,
    balanced_accuracy, macro_f1, rank, p_value_vs_winner, ...); ``winner`` is its first row, ``override``
    the ``template`` and ``label_words`` options that select it; ``table`` is the ranking as Markdown.
    """

    STAGE: ClassVar[str | None] = "choose-template"

    model: str
    task: str
    data: str
    split: str
    classes: list[str]
    class_counts: list[int]
    n: int
    primary_key: str
    winner: Mapping[str, Any]
    override: Mapping[str, Any]
    ranking: list[dict[str, Any]]
    markdown: str
    csv: str
    table: str
    scoring_seconds: float


RESULT_TYPES: dict[str, type[StageResult]] = {
    t.STAGE: t for t in (DistillResult, StudentResult, TuneResult, TransferResult, ZstResult, EvaluateResult,
                         AttackResult, ReconstructResult, CanaryResult, TableResult, ExportPeftResult,
                         ChooseTemplateResult) if t.STAGE is not None}


def result_from_dict(d: Mapping[str, Any], *, source: str | None = None) -> StageResult:
    """The typed result of ``d``, by its ``stage`` (a plain :class:`StageResult` for other stages)."""
    if not isinstance(d, Mapping):
        raise PostError(f"{source or 'a result'} is not a result (a JSON object, got {type(d).__name__}).")
    stage = d.get("stage")
    return RESULT_TYPES.get(stage if isinstance(stage, str) else "", StageResult).from_dict(d, source=source)


def load_result(path: str | os.PathLike[str]) -> StageResult:
    """The typed result in ``<path>/result.json``, by its stage."""
    d, file = _read(path, "run")
    return result_from_dict(d, source=file)
