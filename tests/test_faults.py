"""Faults: SIGKILL at random moments in every long stage, then the same command again.

Every stage runs in its own process on tiny models. A seeded random schedule kills it several
times with SIGKILL, each time once it has made some progress plus a random fraction of a step (so
kills land in computations, in checkpoint writes and between them). After every kill the run
directory must hold nothing corrupt that a later run would trust; the final attempt, a plain
``python -m post`` process, must then give bitwise the result of a run that was never killed. For
DP, the ledger on disk must at every kill count at least every step taken so far.

The attempts that get killed are forked from a process that has already imported torch and the
stages (a fork server), so that each costs milliseconds to start instead of seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import interrupted_on_call, write_sentiment_csv
from post.accounting import PrivacyLedger
from post.cli import main

LW = "negative=bad;positive=good"
TIMEOUT = 180  # seconds any one process may take before the test gives up on it
TIMING_KEYS = {"seconds", "train_seconds", "cache_seconds", "tune_seconds", "transfer_seconds", "wall_seconds",
               "elapsed", "time"}

#: Faults injected and resumes verified, per stage, over this module (reported by test_fault_counts).
COUNTS: dict[str, dict[str, int]] = {}


def _env() -> dict[str, str]:
    """The test's environment (its private cache included), with one thread everywhere: the runs compared
    bitwise then compute alike, and tiny models run much faster than with threads that wait on each other
    on a busy machine."""
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class KillLog:
    kills: int = 0
    steps_at_kill: list[int] = field(default_factory=list)


def _metrics_lines(out: Path) -> int:
    return sum(len(p.read_text(encoding="utf-8", errors="replace").splitlines()) for p in out.rglob("metrics.jsonl"))


def _logged_steps(run: Path) -> int:
    """The highest step the run logged as done (steps actually taken, checkpointed or not)."""
    best = 0
    p = run / "metrics.jsonl"
    if p.exists():
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                best = max(best, int(json.loads(line).get("step", 0)))
            except (json.JSONDecodeError, TypeError, ValueError):
                continue  # a line torn by the kill
    return best


def _check_after_kill(out: Path, *, dp: bool) -> None:
    """What a kill may leave: an old or new checkpoint (never a torn one), and no result unless it is whole."""
    for ckpt in out.rglob("checkpoint.safetensors"):
        with safe_open(str(ckpt), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
            # a DP run checkpoints (its secret seed) before step 1
            assert isinstance(meta["step"], int) and meta["step"] >= (0 if dp else 1)
        assert load_file(str(ckpt))  # every tensor readable
        # checkpoint.json may lag one save behind, and is absent when the kill lands between the first save's
        # two files (resuming reads the tensors' header; test_kill_between_checkpoint_files_... covers it);
        # when present it is never torn.
        if (ckpt.parent / "checkpoint.json").exists():
            json.loads((ckpt.parent / "checkpoint.json").read_text())
    for p in out.rglob("*"):  # every file a later run reads whole is whole (temporary *.part files aside)
        if p.suffix == ".json" and not p.name.startswith("."):
            json.loads(p.read_text(encoding="utf-8"))
        elif p.name == "config.yaml":
            assert yaml.safe_load(p.read_text(encoding="utf-8"))
    if dp:  # the ledger never under-counts: it covers every step logged and the checkpoint's
        for run in {p.parent for p in out.rglob("metrics.jsonl")}:
            taken = _logged_steps(run)
            ledger_path = run / "privacy.json"
            if taken == 0 and not ledger_path.exists():
                continue
            ledger = PrivacyLedger.from_dict(json.loads(ledger_path.read_text()))
            ckpt_step = 0
            if (run / "checkpoint.safetensors").exists():
                with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
                    ckpt_step = json.loads(f.metadata()["meta"])["step"]
            assert ledger.steps >= max(taken, ckpt_step), (run, ledger.steps, taken, ckpt_step)


FORK_SERVER = r"""
import json, os, sys
import post.cli
post.cli._stage_commands(), post.cli._attack_commands()  # torch, transformers and every stage, imported once
import accelerate, dp_accounting, matplotlib.pyplot, tqdm.auto  # noqa: E401 - what the stages import late
for line in sys.stdin:
    argv, stderr_path = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        code = post.cli.main(argv)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class ForkServer:
    """Starts ``post`` commands as forks of one warm process; each fork is a process of its own."""

    def __init__(self, cache: Path) -> None:
        env = {**_env(), "POST_CACHE_DIR": str(cache)}
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def start(self, argv: list[str], stderr: Path) -> int:
        self.proc.stdin.write(json.dumps([argv, str(stderr)]) + "\n")
        self.proc.stdin.flush()
        self.pid: int | None = int(self.proc.stdout.readline())
        return self.pid

    def exited(self, timeout: float = 0.0) -> int | None:
        """The exit code of the running command if it has ended (-9: killed), else None."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        self.pid = None
        return int(self.proc.stdout.readline())

    def kill(self) -> int:
        """SIGKILL the running command (unless it has just ended) and return its exit code."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):  # it ended a moment ago
                os.kill(self.pid, signal.SIGKILL)
        code = self.exited(timeout=TIMEOUT)
        assert code is not None
        return code

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def forks(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("fork-server-cache"))
    yield server
    server.close()


def run_with_kills(forks: ForkServer, argv: list[str], out: Path, *, kills: int, seed: int,
                   dp: bool = False) -> KillLog:
    """Run ``post argv --out out``, SIGKILL it ``kills`` times at random moments, then let it finish."""
    rng = random.Random(seed)
    log = KillLog()
    args = [*argv, "--out", str(out)]
    stderr = out.parent / f"{out.name}.stderr"
    for _ in range(kills):
        forks.start(args, stderr)
        try:
            target = _metrics_lines(out) + rng.randint(1, 3)
            deadline = time.monotonic() + TIMEOUT
            code = None
            while (code := forks.exited()) is None and _metrics_lines(out) < target:
                assert time.monotonic() < deadline, f"no progress: {stderr.read_text()[-2000:]}"
                time.sleep(0.005)
            if code is None:
                time.sleep(rng.uniform(0.0, 0.1))  # a random moment of the steps under way (or of a checkpoint write)
                code = forks.kill()
        finally:
            if forks.pid is not None:  # never leave a command running for the next test
                forks.kill()
        if code != -signal.SIGKILL:  # it finished before the kill came
            assert code == 0, stderr.read_text()[-2000:]
            break
        log.kills += 1
        log.steps_at_kill.append(_metrics_lines(out))
        _check_after_kill(out, dp=dp)
    with open(stderr, "wb") as err:  # the resume: a plain `python -m post` process
        proc = subprocess.run([sys.executable, "-m", "post", *args], env=_env(), stdout=subprocess.DEVNULL, stderr=err,
                              timeout=TIMEOUT)
    assert proc.returncode == 0, stderr.read_text()[-3000:]
    return log


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _same_result(clean: Path, killed: Path) -> None:
    a = json.loads((clean / "result.json").read_text())
    b = json.loads((killed / "result.json").read_text())
    paths = {k for k, v in a.items() if isinstance(v, str) and str(clean) in v}
    assert _without_timing({k: v for k, v in a.items() if k not in paths}) == \
        _without_timing({k: v for k, v in b.items() if k not in paths})


def _record(stage: str, log: KillLog) -> None:
    c = COUNTS.setdefault(stage, {"faults": 0, "resumes": 0})
    c["faults"] += log.kills
    c["resumes"] += 1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = write_sentiment_csv(root / "data.csv", n=60)
    rng = random.Random(0)
    words = "the film was a good movie and the plot was bad but it is great to see this amazing story".split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(120)))
    return root, data, corpus


def _tune_args(data: Path, *extra: str) -> list[str]:
    return ["tune", "--model", "tiny-llama", "--task", str(data), "--label-words", LW, "--n-tokens", "2",
            "--epochs", "15", "--batch-size", "8", "--lr", "0.1", "--test", "false", "--eval-limit", "4",
            "--eval-every", "10", "--checkpoint-every", "3", "--device", "cpu", *extra]


@pytest.mark.parametrize("dp", [False, True], ids=["non-private", "dp"])
def test_tune_survives_sigkill(files, forks, tmp_path, dp):
    root, data, _ = files
    args = _tune_args(data, *(["--dp", "true", "--epsilon", "4", "--accountant", "rdp", "--epochs", "8"] if dp else []))
    log = run_with_kills(forks, args, tmp_path / "killed", kills=3, seed=11 if dp else 10, dp=dp)
    _record("tune (DP)" if dp else "tune", log)
    assert log.kills >= 2
    # A default DP run's noise is secret: its uninterrupted twin replays it with the seed from its checkpoint.
    twin = ["--dp-seed", str(_secret_seed(tmp_path / "killed"))] if dp else []
    assert main([*args, *twin, "--out", str(tmp_path / "clean")]) == 0
    a = load_file(str(tmp_path / "clean" / "prompt.safetensors"))["prompt"]
    b = load_file(str(tmp_path / "killed" / "prompt.safetensors"))["prompt"]
    assert torch.equal(a, b)
    if dp:
        la = PrivacyLedger.from_dict(json.loads((tmp_path / "clean" / "privacy.json").read_text()))
        lb = PrivacyLedger.from_dict(json.loads((tmp_path / "killed" / "privacy.json").read_text()))
        assert lb.steps == lb.planned_steps == la.steps  # every step accounted, none twice
        assert (la.randomness, lb.randomness) == ("seeded", "secret")
        assert dataclasses.replace(lb, randomness="seeded") == la and lb.epsilon == la.epsilon
    else:
        _same_result(tmp_path / "clean", tmp_path / "killed")


def _secret_seed(run_dir: Path) -> int:
    from post.tune import _secret_from

    return _secret_from(load_file(str(run_dir / "checkpoint.safetensors"))["t.dp_secret"])


def test_distill_survives_sigkill(files, forks, tmp_path):
    root, _, corpus = files
    args = ["distill", "--teacher", "tiny-llama", "--keep-layers", "0", "--corpus", str(corpus), "--block-size",
            "16", "--batch-size", "4", "--max-steps", "120", "--held-out", "2", "--checkpoint-every", "3",
            "--log-every", "1", "--lr", "1e-3", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    log = run_with_kills(forks, args, tmp_path / "killed", kills=3, seed=20)
    _record("distill", log)
    assert log.kills >= 2
    a = load_file(str(tmp_path / "clean" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _same_result(tmp_path / "clean", tmp_path / "killed")


def test_transfer_survives_sigkill(files, forks, tmp_path):
    root, data, corpus = files
    assert main([*_tune_args(data, "--max-steps", "2"), "--out", str(tmp_path / "ps")]) == 0
    args = ["transfer", "--source-model", "tiny-llama", "--prompt", str(tmp_path / "ps" / "prompt.safetensors"),
            "--target-model", "tiny-gemma3", "--mode", "label-words", "--public", str(corpus), "--public-limit", "40",
            "--steps", "120", "--batch-size", "4", "--alpha", "0.5", "--lr", "0.05", "--checkpoint-every", "3",
            "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    log = run_with_kills(forks, args, tmp_path / "killed", kills=3, seed=30)
    _record("transfer", log)
    assert log.kills >= 2
    a = load_file(str(tmp_path / "clean" / "prompt.safetensors"))["prompt"]
    b = load_file(str(tmp_path / "killed" / "prompt.safetensors"))["prompt"]
    assert torch.equal(a, b)
    _same_result(tmp_path / "clean", tmp_path / "killed")


@pytest.mark.parametrize("dp", [False, True], ids=["non-private", "dp"])
def test_attack_shadows_survive_sigkill(files, forks, tmp_path, dp):
    root, data, _ = files
    args = ["attack", "lira", "--model", "tiny-llama", "--task", str(data), "--label-words", LW, "--shadows", "4",
            "--pool-size", "16", "--n-tokens", "2", "--epochs", "3", "--batch-size", "2", "--lr", "0.1",
            "--eval-limit", "2", "--eval-every", "100", "--checkpoint-every", "1", "--device", "cpu",
            *(["--dp", "true", "--noise-multiplier", "1.0", "--accountant", "rdp", "--dp-seed", "7"] if dp else [])]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    log = run_with_kills(forks, args, tmp_path / "killed", kills=3, seed=41 if dp else 40, dp=dp)
    _record("attack shadows (DP)" if dp else "attack shadows", log)
    assert log.kills >= 2
    for s in range(4):
        shadow = Path("shadows") / f"shadow-{s:03d}"
        a = json.loads((tmp_path / "clean" / shadow / "confidence.json").read_text())
        b = json.loads((tmp_path / "killed" / shadow / "confidence.json").read_text())
        assert _without_timing(a) == _without_timing(b)
        pa = load_file(str(tmp_path / "clean" / shadow / "tune" / "prompt.safetensors"))["prompt"]
        pb = load_file(str(tmp_path / "killed" / shadow / "tune" / "prompt.safetensors"))["prompt"]
        assert torch.equal(pa, pb)
    _same_result(tmp_path / "clean", tmp_path / "killed")


def test_kill_between_checkpoint_files_leaves_a_consistent_checkpoint(files, tmp_path, monkeypatch):
    """The narrowest window: new tensors renamed into place, checkpoint.json not yet rewritten."""
    import post.checkpoint as ckpt
    from post.tune import TuneConfig, tune

    root, data, _ = files
    cfg = TuneConfig(model="tiny-llama", task=str(data), label_words=LW, n_tokens=2, epochs=2, batch_size=8, lr=0.1,
                     test=False, eval_limit=4, checkpoint_every=2, device="cpu")
    full = tune(cfg, tmp_path / "full")
    real = ckpt.write_json
    saves = {"n": 0}

    def dies_before_the_json(path, obj):
        saves["n"] += 1
        if saves["n"] == 3:  # the third checkpoint's tensors are in place, its JSON is not
            raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(ckpt, "write_json", dies_before_the_json)
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "checkpoint.json").read_text())["step"] == 4  # one save behind
    monkeypatch.setattr(ckpt, "write_json", real)
    resumed = tune(cfg, tmp_path / "killed")
    assert torch.equal(load_file(full.prompt)["prompt"], load_file(resumed.prompt)["prompt"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other-parameters"])
def test_a_damaged_checkpoint_is_never_trusted(files, tmp_path, monkeypatch, caplog, damage):
    """A checkpoint damaged by other means (a disk, a hand) is ignored: the run starts over, same result."""
    from safetensors.torch import save_file

    from post.tune import PromptTrainer, TuneConfig, tune

    root, data, _ = files
    cfg = TuneConfig(model="tiny-llama", task=str(data), label_words=LW, n_tokens=2, epochs=2, batch_size=8, lr=0.1,
                     test=False, eval_limit=4, checkpoint_every=2, device="cpu")
    full = tune(cfg, tmp_path / "full")
    with interrupted_on_call(monkeypatch, PromptTrainer, "mean_gradient", 7), pytest.raises(KeyboardInterrupt):
        tune(cfg, tmp_path / "damaged")
    ckpt = tmp_path / "damaged" / "checkpoint.safetensors"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:-7])
    elif damage == "garbage":
        ckpt.write_bytes(random.Random(0).randbytes(ckpt.stat().st_size))
    else:
        save_file({"t.prompt": torch.zeros(2, 64), "opt.not-a-parameter.exp_avg": torch.zeros(1)}, str(ckpt),
                  metadata={"meta": json.dumps({"step": 6, "history": [], "elapsed": 0.0})})
    with caplog.at_level("WARNING"):
        resumed = tune(cfg, tmp_path / "damaged")
    assert "ignoring unreadable checkpoint" in caplog.text
    assert torch.equal(load_file(full.prompt)["prompt"], load_file(resumed.prompt)["prompt"])


def test_fault_counts():
    """Runs last in this module: what was injected and verified (shown with pytest -s or -rA)."""
    if not COUNTS:
        pytest.skip("run with the fault tests above")
    print("\nfaults injected / resumes verified:",
          ", ".join(f"{k}: {v['faults']} / {v['resumes']}" for k, v in COUNTS.items()))
    assert all(v["faults"] >= 2 and v["resumes"] >= 1 for v in COUNTS.values())
