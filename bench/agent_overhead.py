"""Overhead of the nodeagent: CPU and RSS while sampling 8 simulated GPUs at 10 Hz, and the
latency of GetNode and SetPowerLimit over localhost gRPC.

    python bench/agent_overhead.py --seconds 60

Targets (issue 2): under 2% of one core and under 80 MB RSS. The last line is machine-readable:
    cpu_pct=X rss_mb=Y getnode_p99_ms=Z
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shapectl.commands.demo import free_port
from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import agent_pb2_grpc as pb_grpc


def start_agent(
    state_dir: Path, gpus: int, interval_s: float
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    script = Path(sys.executable).parent / "nodeagent"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "nodeagent.daemon"]
    cmd += [
        "--backend", "sim", "--sim-gpus", str(gpus), "--sim-gpu-type", "h100-80gb",
        "--sim-load", "demo", "--interval-s", str(interval_s), "--listen", f"127.0.0.1:{port}",
        "--metrics-listen", "", "--state-dir", str(state_dir), "--log-level", "warning",
    ]  # fmt: skip
    return subprocess.Popen(cmd), f"127.0.0.1:{port}"


def wait_serving(
    channel: grpc.Channel, proc: subprocess.Popen[bytes], timeout_s: float = 30
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"agent exited with {proc.returncode}")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                return
        except grpc.RpcError:
            time.sleep(0.1)
    raise SystemExit("agent did not become healthy")


def latencies_ms(call: Callable[[int], object], n: int) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        call(i)
        out.append((time.perf_counter() - start) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="CPU measurement window")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--interval-s", type=float, default=0.1, help="sampling interval (10 Hz)")
    parser.add_argument("--calls", type=int, default=300, help="RPCs per latency measurement")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_agent(Path(tmp), args.gpus, args.interval_s)
        channel = grpc.insecure_channel(address)
        try:
            wait_serving(channel, proc)
            agent = psutil.Process(proc.pid)
            time.sleep(2.0)  # let start-up work settle
            before = agent.cpu_times()
            start = time.monotonic()
            time.sleep(args.seconds)
            after = agent.cpu_times()
            elapsed_s = time.monotonic() - start
            cpu_pct = (
                100 * ((after.user - before.user) + (after.system - before.system)) / elapsed_s
            )
            rss_mb = agent.memory_info().rss / 2**20

            stub = pb_grpc.NodeAgentStub(channel)
            get_ms = latencies_ms(
                lambda _i: stub.GetNode(pb.GetNodeRequest(), timeout=5), args.calls
            )
            set_ms = latencies_ms(
                lambda i: stub.SetPowerLimit(
                    pb.SetPowerLimitRequest(
                        gpu_index=i % args.gpus, power_limit_w=400 + 100 * (i % 2)
                    ),
                    timeout=5,
                ),
                args.calls,
            )
            rss_after_mb = agent.memory_info().rss / 2**20
        finally:
            channel.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    get_p99 = pct(get_ms, 99)
    print(f"agent: {args.gpus} simulated H100s, sampled every {args.interval_s} s")
    print(f"cpu: {cpu_pct:.2f}% of one core over {elapsed_s:.0f} s (target < 2%)")
    print(f"rss: {rss_mb:.1f} MB sampling, {rss_after_mb:.1f} MB after RPCs (target < 80 MB)")
    for name, ms in (("GetNode", get_ms), ("SetPowerLimit", set_ms)):
        print(f"{name}: p50 {pct(ms, 50):.2f} ms, p99 {pct(ms, 99):.2f} ms ({len(ms)} calls)")
    print(
        f"cpu_pct={cpu_pct:.2f} rss_mb={max(rss_mb, rss_after_mb):.1f} getnode_p99_ms={get_p99:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
