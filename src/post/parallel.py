"""Starting a stage under Accelerate: one process group, one run directory written by rank 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from post.config import ModelOptions
from post.rundir import RESULT_FILE, RunDir, read_result


def open_distributed_run(cfg: ModelOptions, run_dir: str | Path, stage: str
                         ) -> tuple[Any, RunDir | None, dict[str, Any] | None]:
    """(accelerator, run directory on the main process else None, the finished result if there is one)."""
    from accelerate import Accelerator

    # On a machine without CUDA, accelerate forms a (gloo) process group only when told to use the CPU.
    acc = Accelerator(cpu=cfg.torch_device.type == "cpu")
    run = RunDir(run_dir, stage=stage, config=cfg) if acc.is_main_process else None
    acc.wait_for_everyone()
    done = read_result(run_dir) if (Path(run_dir) / RESULT_FILE).exists() else None
    return acc, run, done
