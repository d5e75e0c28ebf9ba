"""The ``post`` command: a thin layer over the stage functions.

Each stage command takes its options as flags (``--max-length 64``) or from a YAML file
(``--config run.yaml``, flags override it), builds the stage's config dataclass (whose checks
name the bad flag), runs the stage function into ``--out`` and prints a one-line summary.
Every user-fixable problem ends as one line on stderr and exit status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionYesNo, ArgumentParser

from post import __version__
from post.cliparse import Parser, config_parser
from post.config import flag
from post.errors import ConfigError, PostError
from post.rundir import default_out

log = logging.getLogger("post")

# Commands whose options take several values, each given by repeating the flag (``--prompt a --prompt b``).
_REPEATED_FLAGS = {"reconstruct": ("prompt", "reference"), "table": ("runs",)}


def _normalize_flags(argv: Sequence[str]) -> list[str]:
    """``--max-grad-norm=1`` -> ``--max_grad_norm=1``: jsonargparse names options after fields.

    A repeatable flag becomes jsonargparse's append form, ``--prompt+ a --prompt+ b``.
    """
    words = []  # the command words (``attack reconstruct``, ``user attack reconstruct``) before any flag
    for arg in argv:
        if arg.startswith("-"):
            break
        words.append(arg)
    repeated = {f for cmd, flags in _REPEATED_FLAGS.items() if cmd in words for f in flags}
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            arg = "--" + name + ("+" if name in repeated else "") + eq + value
        out.append(arg)
    return out


@dataclass(frozen=True)
class StageCommand:
    """A CLI command backed by a stage function ``run(config, run_dir) -> result``.

    ``result`` is the stage's typed result (:mod:`post.results`), or the mapping it wrote for a stage
    without one; ``summarize`` takes what ``run`` returns.
    """

    name: str
    help: str
    config: type
    run: Callable[[Any, Path], Any]
    summarize: Callable[[Any], str]


def _stage_commands() -> list[StageCommand]:
    from post import distill, evaluate, export, student, table, templates, transfer, tune, zst

    return [
        StageCommand("evaluate", "Score a model (optionally with a soft prompt) on a task split.",
                     evaluate.EvaluateConfig, evaluate.evaluate, evaluate.summarize),
        StageCommand("tune", "Tune a soft prompt on private data, optionally with DP-SGD (the user's side).",
                     tune.TuneConfig, tune.tune, tune.summarize),
        StageCommand("distill", "Distil a teacher into a layer-dropped student (the provider's side).",
                     distill.DistillConfig, distill.distill, distill.summarize),
        StageCommand("transfer", "Transfer a prompt to a target model with public data (the provider's side).",
                     transfer.TransferConfig, transfer.transfer, transfer.summarize),
        StageCommand("zst", "Baseline: zero-shot continuous prompt transfer via anchor tokens (no data).",
                     zst.ZstConfig, zst.zst, zst.summarize),
        StageCommand("student", "Cut an undistilled student from a teacher by keeping some of its layers.",
                     student.StudentConfig, student.make_student, student.summarize),
        StageCommand("table", "Collect run directories into the paper's results table (Markdown and CSV).",
                     table.TableConfig, table.table, table.summarize),
        StageCommand("export-peft", "Export a prompt file as a PEFT prompt-tuning adapter.",
                     export.ExportPeftConfig, export.export_peft, export.summarize),
        StageCommand("choose-template", "Rank templates x label words zero-shot on public data (or on your own data "
                     "with a student model only).", templates.ChooseTemplateConfig, templates.choose_template,
                     templates.summarize),
    ]


def _attack_commands() -> list[StageCommand]:
    from post import attack, canary, reconstruct

    return [StageCommand("lira", "LiRA and RMIA membership inference on soft prompts (shadow prompts, ROC, "
                         "empirical ε).", attack.AttackConfig, attack.attack, attack.summarize),
            StageCommand("canary", "One-run audit: tune once with secret canaries, guess them, bound ε (Steinke "
                         "et al. 2023).", canary.CanaryConfig, canary.canary_audit, canary.summarize),
            StageCommand("reconstruct", "Project prompts onto their nearest tokens and count the private n-grams "
                         "they reproduce.", reconstruct.ReconstructConfig, reconstruct.reconstruct,
                         reconstruct.summarize)]


def _stage_parser(cmd: StageCommand) -> ArgumentParser:
    p = config_parser(cmd.config, cmd.help)
    p.add_argument("--out", type=Path | None, default=None,
                   help=f"Run directory to write (default: runs/{cmd.name}-<time>).")
    return p


def _add_attack(sub: Any, help: str) -> None:
    """``attack lira``; jsonargparse wants a parser added to its parent before its own subcommands."""
    attack = Parser(description="Privacy audits of prompts.", exit_on_error=False)
    sub.add_subcommand("attack", attack, help=help)
    attack_sub = attack.add_subcommands(dest="attack_command", required=True)
    for cmd in _attack_commands():
        attack_sub.add_subcommand(cmd.name, _stage_parser(cmd), help=cmd.help)


# The two parties: the user's commands touch private data and never need the target's weights; the
# provider's never take private data. Both only exchange files (the student one way, prompts the other).
USER_COMMANDS = ("tune", "evaluate", "attack", "choose-template", "upload", "transfer-status", "classify")
PROVIDER_COMMANDS = ("distill", "student", "transfer", "zst", "serve", "tenants")
# Commands of the provider's service (post.service.cli): serve and tenants, and the user's client side.
SERVICE_COMMANDS = ("serve", "tenants", "upload", "transfer-status", "classify")


def _pipeline_parsers(sub: Any) -> None:
    run = Parser(description="Run the whole pipeline from a YAML config (or a built-in one: post run demo).",
                  exit_on_error=False)
    run.add_argument("config", type=str, help="YAML file, or a built-in config name (demo, demo-quick, cpu-full, "
                     "cross-vocab, privacy-curve, paper-*).")
    run.add_argument("overrides", nargs="*", type=str, default=[],
                     help="key=value or section.key=value, e.g. tune.n_tokens=16 transfer.steps=300.")
    run.add_argument("--out", type=Path | None, default=None, help="Output directory (overrides the config's out).")
    run.add_argument("--only", type=str | None, default=None, help="Comma-separated steps to (re-)run; others must "
                     "have finished.")
    run.add_argument("--dry_run", action=ActionYesNo, default=False, help="Check the config and list each step with "
                     "what it would do (run, re-run, or done earlier) and the models' dtype and device; run nothing.")
    sub.add_subcommand("run", run, help="Run the whole pipeline (distil, tune, transfer, baselines, attack, report).")
    demo = Parser(description="The built-in demo: smollm2-135m, its distilled student, private mr, public "
                   "airline, ε=8, end to end with a report.", exit_on_error=False)
    demo.add_argument("--out", type=Path | None, default=None, help="Output directory (default: runs/demo).")
    demo.add_argument("--quick", action=ActionYesNo, default=False, help="A few-minute smoke run of the same pipeline.")
    sub.add_subcommand("demo", demo, help="Run the built-in demo end to end and print its table.")
    report = Parser(description="Write report.html and report.md for a pipeline directory.", exit_on_error=False)
    report.add_argument("dir", type=Path, help="A pipeline output directory (post run's --out).")
    sub.add_subcommand("report", report, help="Rewrite the HTML/Markdown report of a pipeline directory.")


def _add_party(sub: Any, party: str, names: tuple[str, ...], help: str) -> None:
    """``post user ...`` / ``post provider ...``; jsonargparse wants each level added before the next."""
    stages = {c.name: c for c in _stage_commands()}
    what = ("touch private data, never the target's weights" if party == "user"
            else "never take private data: public text and files from the user only")
    p = Parser(description=f"The {party}'s commands ({what}).", exit_on_error=False)
    sub.add_subcommand(party, p, help=help)
    psub = p.add_subcommands(dest=f"{party}_command", required=True)
    for name in names:
        if name == "attack":
            _add_attack(psub, "Privacy audits: attack lira, attack reconstruct.")
        elif name in SERVICE_COMMANDS:
            from post.service.cli import add_command

            add_command(psub, name)
        else:
            psub.add_subcommand(name, _stage_parser(stages[name]), help=stages[name].help)


def build_parser() -> ArgumentParser:
    parser = Parser(prog="post", description="POST: private soft-prompt transfer for LLMs.", exit_on_error=False)
    parser.add_argument("--version", action="version", version=f"post {__version__}")
    sub = parser.add_subcommands(dest="command", required=True)
    for cmd in _stage_commands():
        sub.add_subcommand(cmd.name, _stage_parser(cmd), help=cmd.help)
    _pipeline_parsers(sub)
    _add_party(sub, "user", USER_COMMANDS, "The user's side: tune, evaluate, attack (private data stays here); "
               "upload, transfer-status, classify against a provider's service.")
    _add_party(sub, "provider", PROVIDER_COMMANDS,
               "The provider's side: distill, student, transfer, zst, serve, tenants (no private data).")
    fetch = Parser(description="Download, verify and cache built-in models and datasets.", exit_on_error=False)
    fetch.add_argument("names", nargs="+", help="Built-in model or dataset names (see post models / post datasets).")
    fetch.add_argument("--cache_dir", type=Path | None, default=None, help="Cache directory.")
    fetch.add_argument("--verify", type=bool, default=False,
                       help="Re-hash cached files and repair any that changed.")
    sub.add_subcommand("fetch", fetch, help="Download, verify and cache built-in models and datasets.")
    from post.cost import CostConfig

    sub.add_subcommand("cost", config_parser(CostConfig, "Estimate FLOPs and time of each POST stage."),
                       help="Estimate FLOPs and time of each stage: the user's and provider's cost vs tuning on Φt.")
    _add_attack(sub, "Privacy audits: post attack lira (membership inference on prompts), post attack "
                "reconstruct (nearest-token reading of prompts).")
    sub.add_subcommand("models", Parser(description="List built-in models.", exit_on_error=False),
                       help="List built-in models.")
    sub.add_subcommand("datasets", Parser(description="List built-in datasets.", exit_on_error=False),
                       help="List built-in datasets.")
    return parser


def _build_config(config: type, ns: Any) -> Any:
    values = {f.name: ns.get(f.name) for f in dataclasses.fields(config) if f.init}
    try:
        hints = typing.get_type_hints(config)
    except (NameError, TypeError):  # an annotation that can't be resolved here: no null check
        hints = {}
    for name, value in values.items():  # e.g. `lr: null` in a config file
        hint = hints.get(name)
        if value is None and hint is not None and hint is not Any and type(None) not in typing.get_args(hint):
            raise ConfigError(f"{flag(name)}: needs a value; null (None) is not one.")
    for key in ("cache_dir", "prompt", "train_indices", "reference"):  # jsonargparse leaves paths as str
        if isinstance(values.get(key), str):
            values[key] = Path(values[key])
        elif isinstance(values.get(key), list):
            values[key] = [Path(v) for v in values[key]]
    return config(**values)


def _run_stage(cmd: StageCommand, ns: Any) -> None:
    cfg = _build_config(cmd.config, ns)
    out = Path(ns.get("out") or default_out(cmd.name))
    result = cmd.run(cfg, out)
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch, one process reports
        return
    print(cmd.summarize(result))
    print(f"result: {out / 'result.json'}")


def _run_pipeline(command: str, ns: Any) -> None:
    from post.pipeline import load_pipeline_config, run_pipeline
    from post.progress import duration

    if command == "demo":
        cfg = load_pipeline_config("demo-quick" if ns.quick else "demo", [], ns.out)
    else:
        cfg = load_pipeline_config(ns.config, list(ns.overrides or []), ns.out)
    only = [s.strip() for s in ns.get("only").split(",") if s.strip()] if ns.get("only") else None
    if ns.get("dry_run"):
        _print_plan(cfg)
        return
    t0 = time.perf_counter()
    result = run_pipeline(cfg, only=only)
    print(result["table"])
    print(f"report: {result['report']}")
    print(f"pipeline finished in {duration(time.perf_counter() - t0)}; all run directories under {result['out']}")


def _print_plan(cfg: Any) -> None:
    from post.config import dtype_name
    from post.pipeline import plan_pipeline

    plan = plan_pipeline(cfg)
    n = len(plan)
    for i, p in enumerate(plan, 1):
        print(f"[{i:2d}/{n}] {p['step']:<24} {p['party']:<8} {p['status']:<13} {p['what']}")
    runs = sum(p["status"] != "done earlier" for p in plan)
    dtype = dtype_name(cfg.torch_dtype)
    print(f"{runs} of {n} steps would run, under {cfg.out}; models on {cfg.torch_device} in {dtype}"
          + (" (dtype auto; distillation keeps float32)" if cfg.dtype == "auto" else ""))


def _fetch(ns: Any) -> None:
    from post import data, models

    known_data = {d.name for d in data.list_datasets() if d.source.startswith("offline")}
    for name in ns.names:
        t0 = time.perf_counter()
        if name in models.BUILTIN_MODELS:
            path = models.fetch_model(name, cache_dir=ns.cache_dir, verify=ns.verify)
        elif name in known_data:
            path = data.fetch_dataset(name, cache_dir=ns.cache_dir, verify=ns.verify)
        else:
            raise PostError(f"nothing built in is called {name!r}; models: {', '.join(models.BUILTIN_MODELS)}; "
                            f"datasets: {', '.join(sorted(known_data))}.")
        print(f"{name}: {path} ({time.perf_counter() - t0:.1f} s)")


def _list_models() -> None:
    from post import models

    rows = [["name", "source", "description"]]
    for m in models.list_models():
        src = m.parts[0].requirement + (f" (+{len(m.parts) - 1} parts)" if len(m.parts) > 1 else "")
        rows.append([m.alias, src, m.description])
    rows += [[name, "built from a config", "tiny random model for tests and smoke runs"] for name in models.TINY_MODELS]
    print(_table(rows))
    print("Any Hugging Face hub id (org/name) or local model directory also works.")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def _list_datasets() -> None:
    from post import data

    rows = [["name", "kind", "where", "size", "classes", "description"]]
    for d in data.list_datasets():
        where = "offline" if d.source.startswith("offline") else "hub"
        rows.append([d.name, d.kind, where, d.size, ",".join(d.classes) or "-", d.description])
    print(_table(rows))
    print("Your own CSV/JSONL/Parquet file also works: --task FILE --label-words 'neg=bad;pos=good'.")


def _error_line(message: str) -> None:
    # On a terminal a progress bar may be open on the current line: clear it first.
    prefix = "\r\033[K" if sys.stderr.isatty() else ""
    print(f"{prefix}post: error: {' '.join(message.split())}", file=sys.stderr)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="post: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on every local load


_RUN_OPTIONS = ("--out", "--only")
_RUN_FLAGS = ("-h", "--help", "--dry_run", "--no_dry_run")


def _run_options_first(argv: list[str]) -> list[str]:
    """``post run CONFIG k=v --out DIR k=v`` -> ``post run --out DIR CONFIG k=v k=v``.

    argparse stops reading a ``nargs="*"`` positional at the first option, so overrides given after
    ``--out`` would be refused; the README writes options after the overrides.
    """
    if not argv or argv[0] != "run":
        return argv
    options, rest, i = [], [], 1
    while i < len(argv):
        arg = argv[i]
        if arg in _RUN_OPTIONS and i + 1 < len(argv):
            options += argv[i:i + 2]
            i += 2
            continue
        (options if arg.startswith(tuple(o + "=" for o in _RUN_OPTIONS)) or arg in _RUN_FLAGS else rest
         ).append(arg)
        i += 1
    return [argv[0], *options, *rest]


# Stages whose run directories record another name than their command's (the rest record the command's name).
_STAGE_COMMANDS = {"attack-lira": "attack lira", "attack-canary": "attack canary", "reconstruct": "attack reconstruct"}


def _command_stage(args: Sequence[str]) -> str:
    """The stage name a run directory of this command records (``post user tune`` -> tune, ``attack lira`` ->
    attack-lira)."""
    words = list(args[:2])
    if words and words[0] in ("user", "provider"):
        words = words[1:]
    command = " ".join(words[:2] if words[:1] == ["attack"] else words[:1])
    return {c: s for s, c in _STAGE_COMMANDS.items()}.get(command, command)


def _config_files(args: Sequence[str]) -> list[str]:
    """Check every --config file; a run directory's ``config.yaml`` is taken as it is.

    A file that names another config file is refused (the parser would crash on it). A stage's saved
    ``config.yaml`` starts with ``stage: NAME``: for the command that wrote it that line is dropped, so
    ``post transfer --config RUN/config.yaml --seed 1 --out OTHER`` re-runs a run with one change; for
    another command it is refused with the command to use.
    """
    out = list(args)
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            at, path = i + 1, args[i + 1]
        elif arg.startswith("--config="):
            at, path = i, arg.partition("=")[2]
        else:
            continue
        if not path or not Path(path).is_file():
            continue  # the parser reports a missing file itself
        try:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8", errors="replace"))
        except yaml.YAMLError:
            continue  # and a malformed one
        if not isinstance(doc, dict):
            continue
        if any(str(k).replace("-", "_") in ("config", "print_config") for k in doc):
            raise ConfigError(f"--config {path}: a config file can't hold 'config' or 'print_config'; "
                              "give every file with its own --config.")
        if "stage" not in doc:
            continue
        stage, command = str(doc.pop("stage")), _command_stage(args)
        if stage != command:
            wrote, used = _STAGE_COMMANDS.get(stage, stage), _STAGE_COMMANDS.get(command, command)
            raise ConfigError(f"--config {path} holds the settings of a 'post {wrote}' run, not 'post {used}': "
                              f"give it to post {wrote}, or delete its 'stage: {stage}' line.")
        text = yaml.safe_dump(doc, sort_keys=False) if doc else "{}"
        out[at] = text if arg == "--config" else f"--config={text}"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``post`` command; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = _run_options_first(_normalize_flags([a for a in args if a != "--debug"]))
    try:
        args = _config_files(args)
        parser = build_parser()
        try:
            ns = parser.parse_args(args)
        except argparse.ArgumentError as e:
            sub = args[0] if args and not args[0].startswith("-") else ""
            raise PostError(f"{e} (see: post {sub} --help)".replace("  ", " ")) from None
        _setup_logging()
        command, sub_ns = ns.command, ns[ns.command]
        if command in ("user", "provider"):  # post user tune ... == post tune ...
            command, sub_ns = sub_ns[f"{command}_command"], sub_ns[sub_ns[f"{command}_command"]]
            if ns.command == "provider" and command == "transfer" and sub_ns.get("watch_task"):
                raise PostError("post provider transfer takes no labelled data: --watch-task is the user's private "
                                "data. Leave it out (the provider reports the fixed-step prompt).")
        stages = {c.name: c for c in _stage_commands()}
        if command in stages:
            _run_stage(stages[command], sub_ns)
        elif command == "attack":
            attacks = {c.name: c for c in _attack_commands()}
            name = sub_ns.attack_command
            _run_stage(attacks[name], sub_ns[name])
        elif command in SERVICE_COMMANDS:
            from post.service.cli import run as run_service

            run_service(command, sub_ns)
        elif command in ("run", "demo"):
            _run_pipeline(command, sub_ns)
        elif command == "report":
            from post.report import write_report

            print(f"report: {write_report(sub_ns.dir)}")
        elif command == "fetch":
            _fetch(ns.fetch)
        elif command == "cost":
            from post.cost import CostConfig, print_cost

            print_cost(_build_config(CostConfig, ns.cost))
        elif command == "models":
            _list_models()
        elif command == "datasets":
            _list_datasets()
        return 0
    except PostError as e:
        if debug:
            raise
        _error_line(str(e))
        return e.exit_code
    except OSError as e:  # a write no stage wrapped: still one line, never a traceback
        if debug:
            raise
        _error_line(f"{e.strerror or e} ({e.filename or 'a file'}); check the disk and the output directory.")
        return 2
    except KeyboardInterrupt:
        print("post: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
