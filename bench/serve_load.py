"""Benchmark: the provider's service under load from many tenants, against unbatched and raw batched scoring.

    python bench/serve_load.py [--model smollm2-135m] [--tenants 8] [--clients 32] [--requests 256]
                               [--duration 120] [--threads 2] [--prompt-tokens N]

Loopback only (127.0.0.1, a free port), bounded by --requests and --duration. Sets up a fresh
data directory with --tenants tenants, each owning one transferred prompt for --model (random
text-initialised prompts of 4..11 tokens, or --prompt-tokens each: serving cost does not depend on how a
prompt was trained), starts ``post provider serve`` and lets --clients concurrent clients (tenant = client
mod tenants) each send one-text classify requests, so every forward mixes prompts. Reported:

- service throughput (texts/s) and latency p50/p99 over HTTP;
- ÷ one-at-a-time: the same model scoring one row per forward in this process, as the service
  scores (each prompt's start run once, when it is loaded), and with every text run whole;
- ÷ raw batched forward: this process scoring full mixed batches of --max-batch rows with no HTTP,
  queue or waiting (the ceiling), as the service runs them;
- the layouts side by side, timed interleaved batch by batch on the same full batches, with the tokens
  each runs: the service's (each prompt's start run once, the rest of each text packed end to end),
  every text packed whole (prompt included), and every row padded to the batch's longest.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from post.data import load_texts
from post.models import load_model
from post.prompt import init_prompt, save_prompt
from post.scoring import tight_rows
from post.service.auth import add_tenant
from post.service.db import open_db
from post.service.engine import MixedScorer
from post.service.store import register_output
from post.tasks import Task

TASK = Task(label_words={"negative": (" bad", " terrible"), "positive": (" good", " great")},
            init_text="Predict if sentiment of this review is positive or negative")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_tokens(i: int, args) -> int:
    return args.prompt_tokens or 4 + i % 8


def setup(data_dir: Path, loaded, tenants: int, args) -> list[tuple[str, str]]:
    """(key, target prompt id) per tenant, stored as the service stores a finished job's output."""
    sessions = open_db(f"sqlite:///{data_dir / 'service.db'}")
    out = []
    for i in range(tenants):
        tenant_id, key = add_tenant(sessions, f"tenant{i}")
        src = data_dir / "src" / f"{i}.safetensors"
        src.parent.mkdir(parents=True, exist_ok=True)
        save_prompt(src, init_prompt(loaded, prompt_tokens(i, args), init="text", init_text=TASK.init_text),
                    loaded=loaded, task=TASK)
        with sessions.begin() as s:
            row = register_output(s, data_dir, src, id=f"p-bench{i:02d}", tenant_id=tenant_id, job_id="bench")
        out.append((key, row.id))
    return out


def start_server(model: str, data_dir: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "post", "provider", "serve", "--model", model, "--student", model, "--data-dir",
           str(data_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "4096",
           "--rate-limit", "0", "--max-length", str(args.max_length)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {(data_dir / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def load(url: str, tenants: list[tuple[str, str]], texts: list[str], args) -> dict:
    """--clients threads send one-text classify requests until --requests are done or --duration passes."""
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.monotonic() + args.duration

    def client(k: int) -> None:
        key, prompt_id = tenants[k % len(tenants)]
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=300) as c:
            while time.monotonic() < stop_at:
                with lock:
                    if issued[0] >= args.requests:
                        return
                    j = issued[0]
                    issued[0] += 1
                t0 = time.perf_counter()
                r = c.post(url + "/v1/classify", json={"prompt_id": prompt_id, "texts": [texts[j % len(texts)]]})
                dt = time.perf_counter() - t0
                with lock:
                    (latencies.append(dt) if r.status_code == 200 else errors.append(r.text[:200]))

    # Warm-up: one request per tenant (loads each prompt into the server's cache).
    for key, prompt_id in tenants:
        httpx.post(url + "/v1/classify", json={"prompt_id": prompt_id, "texts": ["warm up"]},
                   headers={"Authorization": f"Bearer {key}"}, timeout=300).raise_for_status()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"requests": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": wall, "texts_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50) * 1000), "p99_ms": float(np.percentile(lat, 99) * 1000)}


def in_process(loaded, tenants_prompts: list, texts: list[str], args) -> dict:
    """One-at-a-time and full-batch throughput of the same mixed rows in this process, in three layouts (the
    service's shared starts, whole texts packed, padded rows), the full batches interleaved batch by batch."""
    layouts = {"shared": MixedScorer(loaded, args.max_length),
               "packed": MixedScorer(loaded, args.max_length, share=False),
               "padded": MixedScorer(loaded, args.max_length, pack=False)}
    rows = {}
    for name, scorer in layouts.items():
        prompts = [scorer.prepare(f"p{i}", p, TASK) for i, p in enumerate(tenants_prompts)]
        rows[name] = [scorer.rows(prompts[j % len(prompts)], [texts[j % len(texts)]])[0] for j in range(args.requests)]
        scorer.scores(rows[name][:2])  # warm-up
    n_loop = min(args.loop_n, args.requests)
    one = {}
    for name in ("shared", "packed"):
        t0 = time.perf_counter()
        for r in rows[name][:n_loop]:
            layouts[name].scores([r])
        one[name] = n_loop / (time.perf_counter() - t0)
    seconds = dict.fromkeys(layouts, 0.0)
    tokens = dict.fromkeys(layouts, 0)
    for at in range(0, args.requests, args.max_batch):
        for name, scorer in layouts.items():
            batch = rows[name][at : at + args.max_batch]
            t0 = time.perf_counter()
            scorer.scores(batch)
            seconds[name] += time.perf_counter() - t0
        with torch.no_grad():
            shared = rows["shared"][at : at + args.max_batch]
            rest = [len(r.ids) - r.prompt.start.covers(r.answer) for r in shared] if layouts["shared"].sharing else []
            layout = tight_rows(rest) if rest else []
            tokens["shared"] += len(layout) * max((sum(rest[j] for j in row) for row in layout), default=0)
            packed = rows["packed"][at : at + args.max_batch]
            tokens["packed"] += (layouts["packed"].packed_inputs(packed)[0]["position_ids"].numel()
                                 if layouts["packed"].packing() else 0)
            tokens["padded"] += layouts["padded"].inputs(rows["padded"][at : at + args.max_batch])[0][
                "attention_mask"].numel()
    return {"one_at_a_time_texts_per_s": one["shared"], "one_at_a_time_whole_texts_per_s": one["packed"],
            "raw_batched_texts_per_s": args.requests / seconds["shared"],
            "packed_batched_texts_per_s": args.requests / seconds["packed"],
            "padded_batched_texts_per_s": args.requests / seconds["padded"], "loop_n": n_loop,
            "sharing": layouts["shared"].sharing, "packing": layouts["packed"].packing(),
            "shared_tokens": tokens["shared"], "packed_tokens": tokens["packed"], "padded_tokens": tokens["padded"],
            "start_tokens": sum(p.shape[0] for p in tenants_prompts),
            "real_tokens": sum(r.prompt.tensor.shape[0] + len(r.ids) for r in rows["packed"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256, help="classify requests (one text each) in all")
    ap.add_argument("--duration", type=float, default=120.0, help="stop sending after this many seconds")
    ap.add_argument("--loop-n", type=int, default=32, help="rows for the one-at-a-time reference")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (server and this process)")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="every prompt this long (default: 4..11 tokens)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    texts = [t for t in load_texts("airline") if t.strip()][: max(args.requests, 64)]
    data_dir = Path(tempfile.mkdtemp(prefix="post-serve-load-"))
    tenants = setup(data_dir, loaded, args.tenants, args)
    prompts = [init_prompt(loaded, prompt_tokens(i, args), init="text", init_text=TASK.init_text)
               for i in range(args.tenants)]
    port = free_port()
    proc = start_server(args.model, data_dir, port, args)
    try:
        served = load(f"http://127.0.0.1:{port}", tenants, texts, args)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    ref = in_process(loaded, prompts, texts, args)
    result = {"model": args.model, "tenants": args.tenants, "clients": args.clients, "max_batch": args.max_batch,
              "max_wait_ms": args.max_wait_ms, "threads": args.threads, **served, **ref,
              "vs_one_at_a_time": served["texts_per_s"] / ref["one_at_a_time_texts_per_s"],
              "vs_raw_batched": served["texts_per_s"] / ref["raw_batched_texts_per_s"]}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.model}, {args.tenants} tenants, {args.clients} clients, {served['requests']} requests "
          f"({served['errors']} errors) in {served['seconds']:.1f} s, max batch {args.max_batch}, "
          f"{args.threads} threads")
    print(f"service (mixed-prompt batches): {served['texts_per_s']:.2f} texts/s, latency p50 "
          f"{served['p50_ms']:.0f} ms, p99 {served['p99_ms']:.0f} ms")
    print(f"one-at-a-time (in process):     {ref['one_at_a_time_texts_per_s']:.2f} texts/s -> service is "
          f"{result['vs_one_at_a_time']:.2f}x; one at a time, each text whole: "
          f"{ref['one_at_a_time_whole_texts_per_s']:.2f} texts/s")
    print(f"raw batched forward (in process): {ref['raw_batched_texts_per_s']:.2f} texts/s -> service is "
          f"{result['vs_raw_batched']:.2f}x")
    print(f"full batches, interleaved: shared starts {ref['raw_batched_texts_per_s']:.2f} texts/s (sharing: "
          f"{ref['sharing']}), whole texts packed {ref['packed_batched_texts_per_s']:.2f} (packing: {ref['packing']}), "
          f"padded {ref['padded_batched_texts_per_s']:.2f}; shared ÷ packed "
          f"{ref['raw_batched_texts_per_s'] / ref['packed_batched_texts_per_s']:.2f}x, packed ÷ padded "
          f"{ref['packed_batched_texts_per_s'] / ref['padded_batched_texts_per_s']:.2f}x")
    print(f"tokens run: shared {ref['shared_tokens']} (+ {ref['start_tokens']} prompt positions once, at load), "
          f"packed {ref['packed_tokens']}, padded {ref['padded_tokens']} ({ref['real_tokens']} real, prompts included)")


if __name__ == "__main__":
    main()
