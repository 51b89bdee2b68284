"""Overhead of the nodeagent: CPU and RSS while sampling 8 simulated GPUs at 10 Hz, and the
latency of GetNode and SetPowerLimit over localhost gRPC.

    python bench/agent_overhead.py --seconds 60

Targets (issue 2): under 2% of one core and under 80 MB RSS; issue 19: 1% of a core, and a
scrape round of 8 engines no longer than the slowest single scrape (8 local HTTP servers that
answer /metrics after 50, 100, ... 400 ms, scraped the way the engine monitor scrapes them).
The last line is machine-readable:
    cpu_pct=X rss_mb=Y getnode_p99_ms=Z scrape_round_ms=R slowest_scrape_ms=S
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodeagent.engines.runner import ProcessRunner
from shapectl.commands.demo import free_port
from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import agent_pb2_grpc as pb_grpc


def slow_metrics_server(delay_s: float) -> ThreadingHTTPServer:
    """A loopback server whose /metrics answers after delay_s (an engine under load)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(delay_s)
            body = b"vllm:num_requests_running 1\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def scrape_round_ms(engines: int = 8) -> tuple[float, float]:
    """(one concurrent round over the engines, the slowest engine scraped alone), in ms."""
    servers = [slow_metrics_server(0.05 * (i + 1)) for i in range(engines)]
    runner = ProcessRunner(http_timeout_s=5.0)
    targets = [("127.0.0.1", s.server_address[1]) for s in servers]
    try:
        t0 = time.perf_counter()
        runner.fetch_metrics(*targets[-1])
        slowest_ms = 1e3 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        results = runner.fetch_metrics_many(targets)
        round_ms = 1e3 * (time.perf_counter() - t0)
    finally:
        for s in servers:
            s.shutdown()
    failed = [t for t, r in results.items() if isinstance(r, Exception)]
    if failed:
        raise SystemExit(f"bench: scrapes failed: {failed}")
    return round_ms, slowest_ms


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
    round_ms, slowest_ms = scrape_round_ms()
    print(f"agent: {args.gpus} simulated H100s, sampled every {args.interval_s} s")
    print(f"cpu: {cpu_pct:.2f}% of one core over {elapsed_s:.0f} s (target < 2%)")
    print(f"rss: {rss_mb:.1f} MB sampling, {rss_after_mb:.1f} MB after RPCs (target < 80 MB)")
    for name, ms in (("GetNode", get_ms), ("SetPowerLimit", set_ms)):
        print(f"{name}: p50 {pct(ms, 50):.2f} ms, p99 {pct(ms, 99):.2f} ms ({len(ms)} calls)")
    print(f"scrape round of 8 engines: {round_ms:.0f} ms; the slowest alone: {slowest_ms:.0f} ms")
    print(
        f"cpu_pct={cpu_pct:.2f} rss_mb={max(rss_mb, rss_after_mb):.1f} "
        f"getnode_p99_ms={get_p99:.2f} scrape_round_ms={round_ms:.0f} "
        f"slowest_scrape_ms={slowest_ms:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
