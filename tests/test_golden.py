"""Golden numbers: the exact losses, prompts and table that fixed-seed tiny-llama runs produce today.

What this guards: a refactor of the stages (tune, DP tune with its reproducible ``dp_seed``, distill,
transfer in both modes) or of the pipeline must not change what they compute. Each test runs one
stage (or the whole pipeline) with fixed seeds, then compares, bit for bit, the first logged metrics
lines (``metrics.jsonl`` without its wall-clock ``time``), the exact result figures and a sha256 of the
output tensors with the JSON files in ``tests/golden/``. Floats are compared by exact equality of
their stored repr (``json`` round-trips a float exactly), never with a tolerance.

A change that alters any of these numbers must say why in its commit message (a new default, a fixed
bug, a reordered random draw...). To regenerate the files after such a change, run

    POST_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_golden.py

which rewrites this machine's files and reports each test as skipped with "updated ..." (never as
passed); review ``git diff tests/golden`` before committing. Without the variable a missing or
different file fails, with a diff of the JSON.

The files were recorded on CPU (one torch thread, as tests/conftest.py sets). The same code gives other last
bits under other CPU kernels (torch's AVX-512 and AVX2 kernels sum in other orders, and so do AVX-512 machines of
other generations), so each vector ISA that torch dispatches to (``torch.backends.cpu.get_cpu_capability()``,
with ``-amx`` where the CPU has AMX) keeps its own copy, ``tests/golden/<isa>/<name>.json``, and a run must equal
one of the recorded copies bit for bit. A change of the numbers fails on every machine; a machine whose ISA has
no copy yet fails until one is recorded there (another torch version may move the last bits as well: regenerate
and say so in the commit). A change that is meant to alter the numbers must regenerate every ISA's copy, each on
its own kind of machine.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import write_sentiment_csv
from post.distill import DistillConfig, distill
from post.pipeline import load_pipeline_config, run_pipeline
from post.prompt import read_prompt
from post.transfer import TransferConfig, transfer
from post.tune import TuneConfig, tune

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("POST_UPDATE_GOLDEN") == "1"
LABEL_WORDS = "negative=bad;positive=good"
FIRST = 6  # metrics lines kept per run


def isa() -> str:
    """The vector ISA torch's CPU kernels dispatch to here ("avx2", "avx512", ...), with "-amx" on a CPU that has AMX
    tiles: the key of the golden copies. Two AVX-512 machines of other generations (one with AMX, one without)
    differ in the last bits of fp32 matmuls although torch reports the same capability."""
    cap = torch.backends.cpu.get_cpu_capability().lower()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return f"{cap}-amx" if amx else cap


def check_golden(name: str, actual: dict[str, Any]) -> None:
    """Compare ``actual`` exactly with the recorded copies ``tests/golden/*/<name>.json`` (it must equal one), or
    rewrite this machine's copy, ``tests/golden/<isa>/<name>.json``, under POST_UPDATE_GOLDEN=1."""
    path = GOLDEN / isa() / f"{name}.json"
    text = json.dumps(actual, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_text(encoding="utf-8") if path.exists() else None
        path.write_text(text, encoding="utf-8")
        pytest.skip(f"updated {path} ({'unchanged' if old == text else 'changed' if old else 'new'}); "
                    "review `git diff tests/golden` and say why in the commit")
    copies = sorted(GOLDEN.glob(f"*/{name}.json"))
    assert path.exists() or copies, (f"{path} is missing; write it with POST_UPDATE_GOLDEN=1 .venv/bin/pytest "
                                     "tests/test_golden.py")
    if any(json.loads(text) == json.loads(p.read_text(encoding="utf-8")) for p in copies):
        return
    ref = path if path.exists() else copies[0]
    stored = ref.read_text(encoding="utf-8")
    diff = "\n".join(difflib.unified_diff(stored.splitlines(), text.splitlines(), f"{ref} (stored)", "this run",
                                          lineterm="", n=2))
    recorded = ", ".join(p.parent.name for p in copies)
    what = "the numbers changed" if path.exists() else (
        f"no copy was recorded on this machine's ISA, {isa()}, and none of the recorded ones ({recorded}) matches: "
        "if the code is unchanged, record one with POST_UPDATE_GOLDEN=1")
    pytest.fail(f"{name}: {what} (see the module docstring; torch {torch.__version__}, {isa()}).\n{diff[:6000]}",
                pytrace=False)


def tensor_digest(t: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype, sha256 of the raw bytes and the first four values (for a readable diff)."""
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.uint8) if t.dtype != torch.uint8 else t
    return {"shape": list(t.shape), "dtype": str(t.dtype), "sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(),
            "first": [float(x) for x in t.flatten()[:4].float()]}


def weights_digest(path: Path) -> str:
    """One sha256 over every tensor of a safetensors file, by sorted name."""
    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(name.encode())
        h.update(json.dumps(tensor_digest(t)).encode())
    return h.hexdigest()


def metrics_lines(run_dir: Path, n: int | None = FIRST) -> list[dict[str, Any]]:
    """The first ``n`` lines of a run's metrics.jsonl without the wall-clock ``time``."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k != "time"} for x in lines[:n]]


def prompt_digest(path: str | Path) -> dict[str, Any]:
    return tensor_digest(read_prompt(path).tensor)


def test_check_golden_is_exact_and_updates_only_when_asked(tmp_path, monkeypatch):
    """The comparison itself: one ulp off fails, a missing file fails, POST_UPDATE_GOLDEN writes and says so."""
    import math
    import sys

    module = sys.modules[__name__]
    monkeypatch.setattr(module, "GOLDEN", tmp_path)
    monkeypatch.setattr(module, "UPDATE", False)
    with pytest.raises(AssertionError, match="POST_UPDATE_GOLDEN=1"):
        check_golden("g", {"loss": 0.1})
    monkeypatch.setattr(module, "UPDATE", True)
    with pytest.raises(pytest.skip.Exception, match=f"updated .*{isa()}.g.json .new."):
        check_golden("g", {"loss": 0.1})
    monkeypatch.setattr(module, "UPDATE", False)
    check_golden("g", {"loss": 0.1})
    with pytest.raises(pytest.fail.Exception, match="the numbers changed"):
        check_golden("g", {"loss": math.nextafter(0.1, 1.0)})
    assert json.loads((tmp_path / isa() / "g.json").read_text()) == {"loss": 0.1}


def test_a_run_must_equal_one_recorded_copy_bit_for_bit(tmp_path, monkeypatch):
    """Another ISA's copy counts when it is equal; a machine whose ISA has no copy and matches none fails and says
    so; this ISA's own copy is the one the diff is shown against."""
    import math
    import sys

    module = sys.modules[__name__]
    monkeypatch.setattr(module, "GOLDEN", tmp_path)
    monkeypatch.setattr(module, "UPDATE", False)
    (tmp_path / "other-isa").mkdir()
    (tmp_path / "other-isa" / "g.json").write_text(json.dumps({"loss": 0.1}))
    check_golden("g", {"loss": 0.1})  # equal to another machine's copy: the same numbers
    with pytest.raises(pytest.fail.Exception, match=f"no copy was recorded on this machine's ISA, {isa()}, and none "
                       r"of the recorded ones \(other-isa\) matches"):
        check_golden("g", {"loss": math.nextafter(0.1, 1.0)})
    (tmp_path / isa()).mkdir()
    (tmp_path / isa() / "g.json").write_text(json.dumps({"loss": 0.2}))
    check_golden("g", {"loss": 0.1})
    check_golden("g", {"loss": 0.2})
    with pytest.raises(pytest.fail.Exception, match=f"{isa()}.g.json .stored.") as err:
        check_golden("g", {"loss": 0.3})
    assert "no copy" not in str(err.value) and "the numbers changed" in str(err.value)


# --- the stages ---------------------------------------------------------------------------------------------------

def tune_config(data_csv: Path, **kw: Any) -> TuneConfig:
    base = dict(model="tiny-llama", task=str(data_csv), label_words=LABEL_WORDS, n_tokens=4, epochs=1,
                batch_size=8, lr=0.1, eval_every=10, seed=0)
    return TuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("golden-data") / "sentiment.csv", n=120, seed=0)


@pytest.fixture(scope="module")
def tuned(data_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("golden-tune")
    return out, tune(tune_config(data_csv), out)


def test_tune_golden(tuned):
    out, r = tuned
    assert r.privacy is None
    check_golden("tune", {
        "metrics": metrics_lines(out), "steps": r.steps, "test_accuracy": r.test_accuracy,
        "prompt": prompt_digest(r.prompt),
    })


def test_dp_tune_with_dp_seed_golden(data_csv, tmp_path):
    """A DP run logs only validation points; its prompt, ε and curve are fixed by the explicit dp_seed."""
    r = tune(tune_config(data_csv, dp=True, noise_multiplier=1.0, max_grad_norm=1.0, dp_seed=5), tmp_path)
    check_golden("tune-dp", {
        "metrics": metrics_lines(tmp_path, None), "steps": r.steps, "epsilon": r.epsilon,
        "test_accuracy": r.test_accuracy, "prompt": prompt_digest(r.prompt),
    })


def test_distill_golden(tmp_path):
    rng = random.Random(0)
    words = "the film was a good movie and the plot was bad but it is great to see this amazing story".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(80)))
    cfg = DistillConfig(teacher="tiny-llama", keep_layers="0", corpus=str(corpus), block_size=32, batch_size=4,
                        max_steps=8, lr=1e-3, held_out=4, log_every=2, seed=0, device="cpu")
    r = distill(cfg, tmp_path / "run")
    check_golden("distill", {
        "metrics": metrics_lines(tmp_path / "run"), "distilled_quality": r.distilled_quality,
        "undistilled_quality": r.undistilled_quality,
        "student": weights_digest(Path(r.student_dir) / "model.safetensors"),
    })


@pytest.mark.parametrize("mode", ["vocab", "label-words"])
def test_transfer_golden(tuned, tmp_path, mode):
    _, ps = tuned
    public = tmp_path / "public.txt"
    public.write_text("\n".join(["a good day", "bad service", "great flight", "awful delay", "ok trip"] * 8))
    cfg = TransferConfig(source_model="tiny-llama", prompt=ps.prompt, target_model="tiny-llama",
                         public=str(public), mode=mode, steps=8, batch_size=4, lr=0.05, alpha=0.5, seed=0,
                         device="cpu")
    r = transfer(cfg, tmp_path / "run")
    check_golden(f"transfer-{mode}", {
        "metrics": metrics_lines(tmp_path / "run"), "steps": r.steps, "alpha": r.alpha,
        "prompt": prompt_digest(r.prompt),
    })


# --- the pipeline -------------------------------------------------------------------------------------------------
# A frozen copy of tests/test_pipeline.py's tiny config (so edits there do not move these numbers), with an
# explicit dp_seed so the DP half of the table replays.

def pipeline_config(root: Path) -> Path:
    rng = random.Random(0)
    private = root / "private.csv"
    rows = ["text,label"]
    for i in range(120):
        pos = i % 2
        rows.append(f"zq{i} {rng.choice(['good', 'great'] if pos else ['bad', 'awful'])},"
                    f"{'positive' if pos else 'negative'}")
    private.write_text("\n".join(rows) + "\n")
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
        "out": str(root / "out"), "target": "tiny-llama", "task": str(private), "seed": 0,
        "label_words": LABEL_WORDS, "public": str(public), "device": "cpu", "max_length": 32,
        "undistilled": True,
        "distill": {"keep_layers": "0", "corpus": str(corpus), "block_size": 32, "batch_size": 4, "max_steps": 6,
                    "held_out": 4, "checkpoint_every": 3},
        "tune": {"n_tokens": 4, "epochs": 1, "batch_size": 16, "lr": 0.1},
        "tune_target": {"max_steps": 3},
        "dp": {"epsilon": 8.0, "accountant": "rdp", "dp_seed": 7},
        "transfer": {"steps": 4, "batch_size": 4, "public_limit": 20, "checkpoint_every": 2,
                     "alpha_public": str(public_labelled)},
        "zst": {"steps": 20, "anchors": 32},
        "attack": {"shadows": 4, "pool_size": 16, "max_steps": 2, "batch_size": 2},
        "reconstruct": {"reference_task": str(public_labelled), "max_n": 3},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def wall_clock(column: str) -> bool:
    """Table columns that time the runs (``seconds``, ``user_seconds``, ...) and so differ run to run."""
    return column == "seconds" or column.endswith("_seconds")


def test_pipeline_table_golden(tmp_path):
    """The table's cells (without wall-clock seconds; paths cut to their last part) and every prompt the pipeline
    wrote."""
    run_pipeline(load_pipeline_config(pipeline_config(tmp_path)), echo=lambda _: None)
    out = tmp_path / "out"
    with (out / "table" / "table.csv").open(newline="") as f:
        cells = [{k: (Path(v).name if k in ("task", "run") else v) for k, v in row.items() if not wall_clock(k)}
                 for row in csv.DictReader(f)]
    prompts = {p.parent.name: prompt_digest(p) for p in sorted(out.glob("*/prompt.safetensors"))}
    assert cells and "tune-source-dp" in prompts
    check_golden("pipeline", {"table": cells, "prompts": prompts})
