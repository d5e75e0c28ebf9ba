"""The pipeline end to end on tiny models: every step, skip/resume/re-run, the two parties, the report."""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers import interrupted_on_call
from post.cli import main
from post.errors import ConfigError, PostError
from post.pipeline import builtin_configs, check_steps, dry_run, load_pipeline_config, run_pipeline
from post.pipeline.steps import STEPS, TRANSFER, Ref, Stage, StepDecl, prompt_of
from post.results import EvaluateResult

LABEL_WORDS = "negative=bad;positive=good"
# Private sentences carry a marker that must never reach a provider's run directory.
MARK = "zqxprivate"


def write_private(path, n=120, seed=0):
    rng = random.Random(seed)
    rows = ["text,label"]
    for i in range(n):
        pos = i % 2
        word = rng.choice(["good", "great"] if pos else ["bad", "awful"])
        rows.append(f"{MARK}{i} {word},{'positive' if pos else 'negative'}")
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_config(root, **kw):
    corpus = root / "corpus.txt"
    rng = random.Random(1)
    words = "the film was a good movie and the plot was bad but great story awful acting".split()
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(80)))
    public = root / "public.txt"
    public.write_text("\n".join(["a good day", "bad service", "great flight", "awful delay", "ok trip"] * 8))
    public_labelled = root / "public-labelled.csv"
    public_labelled.write_text("text,label\n" + "".join(f"{w} trip {i},{'positive' if i % 2 else 'negative'}\n"
                                                       for i, w in enumerate(["good", "bad"] * 20)))
    cfg = {
        "out": str(root / "out"), "target": "tiny-llama", "task": str(write_private(root / "private.csv")),
        "label_words": LABEL_WORDS, "public": str(public), "device": "cpu", "max_length": 32,
        "undistilled": True,
        "distill": {"keep_layers": "0", "corpus": str(corpus), "block_size": 32, "batch_size": 4, "max_steps": 6,
                    "held_out": 4, "checkpoint_every": 3},
        "tune": {"n_tokens": 4, "epochs": 1, "batch_size": 16, "lr": 0.1},
        "tune_target": {"max_steps": 3},
        "dp": {"epsilon": 8.0, "accountant": "rdp"},  # RDP calibrates in milliseconds
        "transfer": {"steps": 4, "batch_size": 4, "public_limit": 20, "checkpoint_every": 2,
                     "alpha_public": str(public_labelled)},
        "zst": {"steps": 20, "anchors": 32},
        "attack": {"shadows": 4, "pool_size": 16, "max_steps": 2, "batch_size": 2},
        "reconstruct": {"reference_task": str(public_labelled), "max_n": 3},
    }
    for k, v in kw.items():
        cfg[k] = v
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    path = tiny_config(root)
    lines = []
    result = run_pipeline(load_pipeline_config(path), echo=lines.append)
    return root, path, result, lines


def test_every_step_runs_and_the_table_is_full(finished):
    root, path, result, lines = finished
    out = root / "out"
    steps = result["steps"]
    assert {"distill", "undistilled", "zero-shot", "tune-source", "tune-source-dp", "tune-target", "tune-target-dp",
            "eval-source", "eval-source-dp", "eval-target", "eval-target-dp", "eval-undistilled-dp",
            "transfer", "transfer-dp", "eval-post", "eval-post-dp", "eval-direct-dp", "zst-dp", "eval-zst-dp",
            "eval-proxy", "eval-proxy-dp",
            "tune-undistilled", "transfer-undistilled-dp", "attack", "attack-dp", "tune-public",
            "reconstruct"} <= set(steps)
    for name in steps:
        assert (out / name / "result.json").is_file(), name
    cells = list(__import__("csv").DictReader((out / "table" / "table.csv").open()))
    placed = {(c["method"], c["dp"]) for c in cells}
    for method in ("PT on Φt", "PT on Φs", "direct transfer", "ZST", "POST", "PT on Φs, undistilled",
                   "POST, undistilled Φs"):
        assert (method, "False") in placed and (method, "True") in placed, method
    md = (out / "table" / "table.md").read_text()
    assert "**Non-private**" in md and "**DP (ε = " in md
    # The heuristic α was measured by the provider on public labelled data, not by the user on private data.
    tr = json.loads((out / "transfer" / "result.json").read_text())
    assert tr["alpha_source"].startswith("heuristic (Eq. 6) on public") and not (out / "zero-shot-val").exists()
    assert any("running" in line for line in lines)


def test_report_is_self_contained(finished):
    root, path, result, lines = finished
    html = (root / "out" / "report.html").read_text()
    assert result["report"].endswith("report.html")
    for needle in ("Results", "Privacy", "LiRA", "Cost of each stage", "Loss curves", "data:image/png;base64,",
                   "POST", "ε ="):
        assert needle in html, needle
    assert "src='http" not in html and 'src="http' not in html  # nothing fetched when it is opened
    md = (root / "out" / "report.md").read_text()
    assert "| tune-source-dp | user |" in md
    assert "; frozen models in float32 on cpu;" in md and result["dtype"] == "float32"
    goals = json.loads((root / "out" / "report.json").read_text())["goals"]
    assert {g["dp"] for g in goals} == {False, True}
    assert "Prompt reconstruction check" in md and "reference (public)" in md
    assert "- `transfer-dp`: matched full-vocabulary distributions (the paper's loss), α = " in md


def test_summary_is_written_once_and_post_report_rebuilds_the_report_from_it(finished, monkeypatch):
    import post.pipeline.run as pipeline

    root, path, result, _ = finished
    out = root / "out"
    assert json.loads((out / "pipeline-result.json").read_text()) == result  # the report's path included
    md = (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == md
    written, write_json = [], pipeline.write_json
    monkeypatch.setattr(pipeline, "write_json", lambda p, obj: (written.append(Path(p).name), write_json(p, obj)))
    run_pipeline(load_pipeline_config(path), echo=lambda s: None)  # every step done earlier
    assert written.count("pipeline-result.json") == 1


def test_reconstruct_reads_every_prompt_against_the_public_control(finished):
    root, path, result, lines = finished
    rec = json.loads((root / "out" / "reconstruct" / "result.json").read_text())
    kinds = [(Path(p["path"]).parent.name, p["reference"]) for p in rec["prompts"]]
    assert kinds == [("tune-source", False), ("transfer", False), ("tune-source-dp", False), ("transfer-dp", False),
                     ("tune-public", True)]
    assert {p["model"] for p in rec["prompts"]} == {"tiny-llama", "local:student"}  # prompt files carry no paths
    assert rec["private_texts"] > 0 and rec["public_texts"] == 40
    # the control is tuned on as many (public) examples as ps was on private ones, so as many steps
    # (capped by what the public set holds)
    ps = json.loads((root / "out" / "tune-source" / "result.json").read_text())
    asked = yaml.safe_load((root / "out" / "tune-public" / "config.yaml").read_text())
    assert asked["train_limit"] == ps["n_train"] == 96


def test_provider_directories_hold_no_private_text(finished):
    root, path, result, lines = finished
    out = root / "out"
    provider = [name for name, s in result["steps"].items() if s["party"] == "provider"]
    assert set(provider) >= {"distill", "undistilled", "transfer", "transfer-dp", "zst", "zst-dp"}
    for name in provider:
        for f in (out / name).rglob("*"):
            if f.is_file():
                assert MARK.encode() not in f.read_bytes(), f
    # The check can fail: the user's own run directories do hold the private text's indices/metrics only,
    # but the private file itself carries the marker.
    assert MARK.encode() in (root / "private.csv").read_bytes()


def test_rerun_skips_everything_and_a_change_reruns_only_what_it_affects(finished, tmp_path):
    root, path, result, _ = finished
    out = root / "out"
    before = {n: (out / n / "result.json").stat().st_mtime_ns for n in result["steps"]}
    lines = []
    run_pipeline(load_pipeline_config(path), echo=lines.append)
    after = {n: (out / n / "result.json").stat().st_mtime_ns for n in result["steps"]}
    assert before == after
    assert all("done earlier" in line for line in lines if line.startswith("[ "))
    lines.clear()
    run_pipeline(load_pipeline_config(path, ["transfer.steps=5"]), echo=lines.append)
    changed = {n for n in result["steps"] if (out / n / "result.json").stat().st_mtime_ns != before[n]}
    assert changed == {"transfer", "transfer-dp", "eval-post", "eval-post-dp", "transfer-undistilled",
                       "transfer-undistilled-dp", "eval-post-undistilled", "eval-post-undistilled-dp",
                       "reconstruct"}  # it reads the transferred prompts
    assert not (out / "table" / "table.md").read_text() == ""
    assert any("transfer " in line and "its options changed" in line for line in lines)
    assert any("eval-post " in line and "its input transfer changed" in line for line in lines)
    # Put it back for the other tests of this module.
    run_pipeline(load_pipeline_config(path), echo=lines.append)


def test_dry_run_says_what_a_run_would_do_and_runs_nothing(finished, capsys):
    from post.pipeline import plan_pipeline

    root, path, result, _ = finished
    out = root / "out"
    before = {n: (out / n / "result.json").stat().st_mtime_ns for n in result["steps"]}
    assert {p["status"] for p in plan_pipeline(load_pipeline_config(path))} == {"done earlier"}
    plan = plan_pipeline(load_pipeline_config(path, ["transfer.steps=5"]))
    moved = {p["step"] for p in plan if p["status"] != "done earlier"}
    assert moved == {"transfer", "transfer-dp", "eval-post", "eval-post-dp", "transfer-undistilled",
                     "transfer-undistilled-dp", "eval-post-undistilled", "eval-post-undistilled-dp", "reconstruct"}
    assert {p["status"] for p in plan if p["step"] in moved} == {"would re-run"}
    assert main(["run", str(path), "transfer.steps=5", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "9 of " in printed and "would re-run" in printed and "in float32" in printed
    assert before == {n: (out / n / "result.json").stat().st_mtime_ns for n in result["steps"]}
    with pytest.raises(ConfigError, match="n-tokens"):
        plan_pipeline(load_pipeline_config(path, ["tune.n_tokens=0"]))


def test_interrupted_step_resumes(tmp_path, monkeypatch):
    import post.transfer as t

    path = tiny_config(tmp_path, modes=["non-private"], undistilled=False, attack=None,
                       baselines=["zero-shot"])
    with interrupted_on_call(monkeypatch, t, "post_loss", 3), pytest.raises(KeyboardInterrupt):
        run_pipeline(load_pipeline_config(path), echo=lambda s: None)
    out = tmp_path / "out"
    assert not (out / "transfer" / "result.json").exists() and (out / "tune-source" / "result.json").exists()
    mtime = (out / "tune-source" / "result.json").stat().st_mtime_ns
    lines = []
    run_pipeline(load_pipeline_config(path), echo=lines.append)
    assert any("transfer" in line and "resuming" in line for line in lines)
    assert (out / "tune-source" / "result.json").stat().st_mtime_ns == mtime


def test_config_errors_name_the_option(tmp_path):
    path = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="tune: unknown option"):
        check_steps(load_pipeline_config(path, ["tune.n_tokenz=3"]))
    with pytest.raises(ConfigError, match="unknown option.*colour"):
        load_pipeline_config(path, ["colour=blue"])
    with pytest.raises(ConfigError, match="--modes"):
        load_pipeline_config(path, ["modes=[private]"])
    with pytest.raises(PostError, match="no config file"):
        load_pipeline_config(tmp_path / "missing.yaml")
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


def test_run_takes_its_options_before_or_after_the_overrides():
    from post.cli import _run_options_first

    expected = ["run", "--out", "d", "--only=x", "demo", "a=1", "b.c=2"]
    assert _run_options_first(["run", "demo", "a=1", "--out", "d", "b.c=2", "--only=x"]) == expected
    assert _run_options_first(["run", "--out", "d", "--only=x", "demo", "a=1", "b.c=2"]) == expected
    assert _run_options_first(["tune", "--out", "d"]) == ["tune", "--out", "d"]


def test_shipped_configs_parse_and_resolve(tmp_path):
    from post.data import list_datasets
    from post.models import BUILTIN_MODELS

    shipped = builtin_configs()
    assert {"demo", "demo-quick", "cross-vocab", "paper-roberta-sst2", "paper-gpt2xl-sst2",
            "paper-llama2-7b-sst2"} <= set(shipped)
    datasets = {d.name for d in list_datasets()}
    stand_in = {"roberta-base": "tiny-roberta", "gpt2-xl": "tiny-gpt2", "meta-llama/Llama-2-7b-hf": "tiny-llama"}
    for name, path in shipped.items():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# post "), f"{name} must open with the command that runs it"
        cfg = load_pipeline_config(name)
        assert cfg.task in datasets and (cfg.public in datasets), name
        assert cfg.target in BUILTIN_MODELS or cfg.target in stand_in, name
        steps = check_steps(cfg)  # every section's options are valid options of its stage
        assert {"tune-source", "transfer", "eval-post"} <= {s.name for s in steps}, name
        if cfg.target in stand_in:  # the hub-only settings, resolved against a tiny model of the same family
            tiny = load_pipeline_config(name, [f"target={stand_in[cfg.target]}", "device=cpu", "dtype=float32"],
                                        out=tmp_path / name)
            for step_name, c in dry_run(tiny).items():
                model = getattr(c, "target_model", None) or getattr(c, "teacher", None) or getattr(c, "model", "")
                assert not str(model).startswith(("roberta-base", "gpt2-xl", "meta-llama")), (name, step_name)
            from post.models import load_model

            assert load_model(stand_in[cfg.target]).kind == ("masked" if "roberta" in name else "causal")


def test_accelerate_configs_load():
    from importlib import resources

    from accelerate.commands.config.config_args import ClusterConfig

    root = resources.files("post") / "configs" / "accelerate"
    found = {}
    for f in root.iterdir():
        if str(f).endswith(".yaml"):
            assert Path(str(f)).read_text().startswith("# accelerate launch --config_file")
            found[Path(str(f)).stem] = ClusterConfig.from_yaml_file(str(f))
    assert {"ddp-cpu-2", "ddp-gpus", "fsdp", "deepspeed-zero3"} <= set(found)
    assert found["ddp-cpu-2"].num_processes == 2 and not found["ddp-cpu-2"].use_cpu


def test_party_commands(tmp_path, capsys):
    assert main(["provider", "transfer", "--source-model", "tiny-llama", "--prompt", "x.safetensors",
                 "--target-model", "tiny-llama", "--watch-task", "mr"]) == 2
    assert "takes no labelled data" in capsys.readouterr().err
    assert main(["provider", "tune", "--model", "tiny-llama"]) == 2  # tuning touches private data: user only
    assert main(["user", "distill"]) == 2


def test_sigkill_anywhere_then_rerun_gives_the_same_results(tmp_path):
    """Kill `post run` at random moments (several times), re-run until it finishes: same numbers, and no
    step that had finished is run again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from post.prompt import read_prompt

    def config(root):
        # An explicit DP seed makes the two pipelines comparable (by default the DP noise is secret, so two
        # separate runs differ; a killed run still resumes with its own secret from its checkpoint).
        return tiny_config(root, modes=["non-private", "dp"], undistilled=False, attack=None,
                           baselines=["zero-shot", "direct"], dp={"epsilon": 8.0, "accountant": "rdp", "dp_seed": 3})

    clean = tmp_path / "clean"
    clean.mkdir()
    reference = run_pipeline(load_pipeline_config(config(clean)), echo=lambda s: None)
    killed = tmp_path / "killed"
    killed.mkdir()
    path = config(killed)
    out = killed / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)

    def progress():  # bytes of metrics logged and results written so far
        return sum(f.stat().st_size for f in out.glob("*/*.json*") if f.is_file())

    kills, finished_at = 0, {}
    for _attempt in range(12):
        before = progress() if out.exists() else 0
        proc = subprocess.Popen([sys.executable, "-m", "post", "run", str(path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kills < 4:  # kill a moment after this attempt got somewhere: inside some step or between two
            while proc.poll() is None and (not out.exists() or progress() == before):
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.wait()
        for name in reference["steps"]:
            f = out / name / "result.json"
            if f.exists():  # once finished, a step's result is never rewritten
                finished_at.setdefault(name, f.stat().st_mtime_ns)
                assert f.stat().st_mtime_ns == finished_at[name], name
        if proc.returncode == 0:
            break
    assert proc.returncode == 0 and kills >= 2
    for name in reference["steps"]:
        a = json.loads((clean / "out" / name / "result.json").read_text())
        b = json.loads((out / name / "result.json").read_text())
        if "accuracy" in a:
            assert a["accuracy"] == b["accuracy"], name
        if a.get("stage") in ("tune", "transfer"):
            assert (read_prompt(a["prompt"]).tensor == read_prompt(b["prompt"]).tensor).all(), name


def test_no_private_text_reaches_the_target_outside_test_queries_and_the_target_tuning_baseline(tmp_path, monkeypatch):
    """Every input the target model sees is recorded: POST's path (distil, transfer, ZST, α) sends it no private
    text; private test sentences reach it only as the user's queries (eval steps), and training or validation
    sentences only in the baseline that tunes on the target (its data goes to the provider by definition)."""
    import post.resolve
    from post.data import load_labelled

    seen: dict[str, list[str]] = {}
    current = {"step": None}
    real_load = post.resolve.load_model

    def recording_load(name, **kw):
        loaded = real_load(name, **kw)
        if name == "tiny-llama":  # the target Φt
            tok = loaded.tokenizer

            def hook(module, args, output):
                for row in args[0].tolist():
                    seen.setdefault(current["step"], []).append(tok.decode(row))

            loaded.model.get_input_embeddings().register_forward_hook(hook)
        return loaded

    monkeypatch.setattr(post.resolve, "load_model", recording_load)

    def echo(line):
        if "running" in line:
            current["step"] = line.split("]")[1].split()[0]

    path = tiny_config(tmp_path, baselines=["zero-shot", "target-tuning", "direct", "zst"], undistilled=False,
                       attack=None, reconstruct=None)
    run_pipeline(load_pipeline_config(path), echo=echo)
    private = load_labelled(str(tmp_path / "private.csv"), label_words=LABEL_WORDS)
    import re

    def ids(texts):
        return {int(m) for t in texts for m in re.findall(MARK + r"(\d+)", t)}

    test_ids = ids(private.split("test").texts)
    assert test_ids and not test_ids & ids(private.split("train").texts + private.split("validation").texts)
    assert {"distill", "transfer", "transfer-dp", "zst", "eval-post"} <= set(seen)  # the target was watched
    for step, inputs in seen.items():
        private_inputs = [t for t in inputs if MARK in t]
        if step.startswith("tune-target"):
            continue  # the baseline that sends its data to the provider
        if step.startswith(("eval-", "zero-shot")):
            assert ids(private_inputs) <= test_ids, step  # only test sentences, as the user's queries
        else:
            assert not private_inputs, (step, private_inputs[:2])


def test_privacy_curve_modes_run_dp_at_each_epsilon(tmp_path):
    path = tiny_config(tmp_path, modes=["non-private", "dp", "dp-eps1", "dp-eps0.5"], attack=None,
                       undistilled=False, reconstruct=None)
    steps = dry_run(load_pipeline_config(path, ["dp.epsilon=8"]))
    eps = {name: steps[name].epsilon
           for name in ("tune-source-dp", "tune-source-dp-eps1", "tune-source-dp-eps0.5", "tune-target-dp-eps1")}
    assert eps == {"tune-source-dp": 8, "tune-source-dp-eps1": 1, "tune-source-dp-eps0.5": 0.5,
                   "tune-target-dp-eps1": 1}
    assert steps["tune-source"].dp is False
    assert {"transfer-dp-eps1", "eval-post-dp-eps0.5", "eval-source-dp-eps1"} <= set(steps)
    for bad in (["dp-eps0"], ["dp-epsx"], ["dp", "dp"], ["dp-eps-1"]):
        with pytest.raises(ConfigError, match="modes"):
            load_pipeline_config(path, [f"modes={bad}"])


def test_privacy_levels_are_unique_and_dp_runs_never_stop_early(tmp_path):
    path = tiny_config(tmp_path, attack=None, undistilled=False, reconstruct=None)
    for bad in (["dp-eps1", "dp-eps1.0"], ["dp", "dp-eps8"]):
        with pytest.raises(ConfigError, match="privacy level twice"):
            load_pipeline_config(path, [f"modes={bad}", "dp.epsilon=8"])
    with pytest.raises(ConfigError, match="noise_multiplier"):
        load_pipeline_config(path, ["modes=[dp-eps1]", "dp.noise_multiplier=1.0"])
    cfg = load_pipeline_config(path, ["modes=[non-private, dp]", "tune_target.patience=2"])
    steps = dry_run(cfg)
    assert steps["tune-target"].patience == 2 and steps["tune-target-dp"].patience is None


# --- adding a step: one declaration and its stage function --------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    """A toy evaluation's options: what a stage config is, a frozen dataclass (with the options every step gets)."""

    model: str
    task: str
    prompt: Path | None = None
    seed: int = 0
    label_words: str | None = None
    cache_dir: Path | None = None
    dtype: str | None = None
    device: str | None = None
    trust_remote_code: bool = False


def toy_evaluate(cfg: ToyConfig, run_dir: Path) -> EvaluateResult:
    """A stage function that scores nothing: it writes and returns an evaluation's result as post evaluate would."""
    from post.rundir import RunDir

    return EvaluateResult.from_dict(RunDir(run_dir, stage="evaluate", config=cfg).finish({
        "model": cfg.model, "task": cfg.task, "split": "test", "prompt": None, "accuracy": 0.75, "n": 4,
        "class_names": ["negative", "positive"]}))


TOY = Stage("evaluate", __name__, "ToyConfig", "toy_evaluate", EvaluateResult, "evaluate")


def toy_row(name: str, **inputs) -> StepDecl:
    """A new step, declared as the table's own rows are (not added to the shipped table: tests share it)."""
    return StepDecl(name, "user", TOY, "a toy score of Φt ({mode})", per_mode=bool(inputs),
                    options=lambda c: {"model": c.target, "task": c.task, "label_words": c.label_words},
                    inputs=inputs)


def test_a_declared_step_is_in_the_dry_run_with_its_inputs(tmp_path):
    path = tiny_config(tmp_path, attack=None, undistilled=False, reconstruct=None, modes=["non-private", "dp"])
    cfg = load_pipeline_config(path)
    toy = toy_row("toy-post", prompt=prompt_of(TRANSFER))
    table = (*STEPS, toy)
    steps = {s.name: s for s in check_steps(cfg, table)}
    assert [n for n in steps if n.startswith("toy")] == ["toy-post", "toy-post-dp"]
    assert steps["toy-post-dp"].deps == ["transfer-dp"] and steps["toy-post-dp"].party == "user"
    assert dry_run(cfg, table)["toy-post-dp"].prompt == Path("<transfer-dp>.safetensors")
    assert {s.name for s in check_steps(cfg)} == set(steps) - {"toy-post", "toy-post-dp"}  # the shipped table
    with pytest.raises(TypeError, match="no 'promt'"):  # a reference names an attribute of the result type
        Ref(TRANSFER, "promt")
    early = StepDecl("toy-early", "user", TOY, "reads a step that runs later", options=lambda c: {},
                     inputs={"prompt": prompt_of(TRANSFER)})
    with pytest.raises(PostError, match="transfer's result is needed"):
        dry_run(cfg, (early, *STEPS))


def test_a_declared_step_runs_and_fills_the_table_and_the_report(tmp_path):
    path = tiny_config(tmp_path)
    result = run_pipeline(load_pipeline_config(path), rows=(toy_row("toy-zero-shot"),), echo=lambda s: None)
    out = tmp_path / "out"
    assert list(result["steps"]) == ["toy-zero-shot"] and result["steps"]["toy-zero-shot"]["stage"] == "evaluate"
    cells = list(__import__("csv").DictReader((out / "table" / "table.csv").open()))
    assert [(c["method"], c["accuracy"], Path(c["run"]).name) for c in cells] == [
        ("zero-shot Φt", "0.7500", "toy-zero-shot")]
    assert "| toy-zero-shot | user | a toy score of Φt (non-private) |" in (out / "report.md").read_text()


def test_the_calibrated_baseline_is_one_declared_step_on_the_public_texts(tmp_path):
    path = tiny_config(tmp_path, attack=None, undistilled=False, reconstruct=None,
                       baselines=["zero-shot", "calibrated"])
    cfg = load_pipeline_config(path)
    configs = dry_run(cfg)
    cal = configs["eval-calibrated"]
    assert cal.calibrate_public == cfg.public and cal.model == cfg.target and cal.split == "test"
    assert cal.prompt is None and "eval-calibrated-dp" not in configs  # nothing private: once for every mode
    (tmp_path / "b").mkdir()
    plain = dry_run(load_pipeline_config(tiny_config(tmp_path / "b", attack=None, undistilled=False,
                                                     reconstruct=None, baselines=["zero-shot"])))
    assert "eval-calibrated" not in plain  # only when asked for


def test_unlabelled_public_text_needs_a_labelled_reference_for_the_reconstruction_control(tmp_path):
    path = tiny_config(tmp_path, attack=None, undistilled=False, reconstruct={})
    with pytest.raises(ConfigError, match="reference_task"):
        load_pipeline_config(path, ["public=reviews"])
    assert load_pipeline_config(path, ["public=reviews", "reconstruct.reference_task=airline"]).public == "reviews"
    assert load_pipeline_config(path, ["public=reviews", "reconstruct=null"]).reconstruct is None
    assert load_pipeline_config(path, ["public=reviews", "reconstruct.reference-task=airline"]).public == "reviews"
    with pytest.raises(ConfigError, match="reference_task"):
        load_pipeline_config(path, ["public=offline+airline", "reconstruct.reference_task=null"])
    labelled = tmp_path / "public.csv"  # a labelled file is not refused: the control can tune on it
    labelled.write_text("text,label\ngreat,positive\nbad,negative\n")
    assert load_pipeline_config(path, [f"public={labelled}"]).public == str(labelled)


def test_the_public_data_never_holds_the_private_task(tmp_path):
    path = tiny_config(tmp_path, attack=None, undistilled=False, reconstruct=None)
    for public in ("mr", " MR ", "reviews+mr", "airline + mr"):
        with pytest.raises(ConfigError, match="private task"):
            load_pipeline_config(path, ["task=mr", f"public={public}"])
    for public in ("sst2", "glue/sst2", "reviews+sst2"):  # an alias of the private set is the private set
        with pytest.raises(ConfigError, match="private task"):
            load_pipeline_config(path, ["task=glue/sst2", f"public={public}"])
    assert load_pipeline_config(path, ["task=mr", "public=reviews+airline"]).public == "reviews+airline"


def test_the_audited_transfers_are_the_pipelines_own(tmp_path):
    """With attack_transfer the shadows' transfers copy the transfer section (mode, loss, steps, ...); the attack
    section may still set its own."""
    path = tiny_config(tmp_path, undistilled=False, reconstruct=None, baselines=["zero-shot"], attack_transfer=True,
                       modes=["non-private"])
    cfg = load_pipeline_config(path, ["transfer.mode=label-words", "transfer.loss=proxy-labels"])
    attack = dry_run(cfg)["attack"]
    assert attack.transfer_target == cfg.target and attack.public == cfg.public
    assert (attack.transfer_mode, attack.transfer_loss, attack.transfer_steps, attack.transfer_batch_size,
            attack.public_limit) == ("label-words", "proxy-labels", 4, 4, 20)
    assert attack.transfer_calibrate_labels is False
    calibrated = load_pipeline_config(path, ["transfer.mode=label-words", "transfer.loss=proxy-labels",
                                             "transfer.calibrate_labels=true"])
    assert dry_run(calibrated)["attack"].transfer_calibrate_labels is True
    own = dry_run(load_pipeline_config(path, ["transfer.alpha=0.25", "attack.transfer_steps=7"]))["attack"]
    assert (own.transfer_loss, own.transfer_alpha, own.transfer_steps) == ("post", 0.25, 7)
    plain = dry_run(load_pipeline_config(path, ["attack_transfer=false"]))["attack"]
    assert plain.transfer_target is None and plain.transfer_steps == 300  # no transfer audited: nothing copied
