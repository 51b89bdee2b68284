"""Report fan-in: M simulated agents streaming 8-GPU NodeReports at 1 Hz into one coordinator.

The coordinator runs as a subprocess (the real daemon). Reporters are lightweight: asyncio +
grpc.aio in 1-4 processes, one real AgentLink.Connect stream (and TCP connection) per node,
staggered over the second. After every node registered and a warm-up, the bench reads the
coordinator's own figures (GetIngestStats: reports ingested, delay from each report's send time
to it being in the state the rollups are computed from) and its CPU time (psutil).

    python bench/coordinator_fanin.py --nodes 1000 --seconds 20

The last line is: nodes=M reports_per_s=X p50_ms=Y p99_ms=Z coordinator_cpu_pct=W
cpu_us_per_report=C (coordinator process CPU time over the window / reports ingested in it).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
import yaml

from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.api.v1 import coordinator_pb2_grpc as cpb_grpc
from shapeshifter.api.v1 import link_pb2 as lpb
from shapeshifter.api.v1 import link_pb2_grpc as lpb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from launch import local_address, serving, start_coordinator, stop_coordinators, wait_for

NODES_PER_RACK = 10
RACKS_PER_ROW = 10
WARMUP_S = 3.0
COLUMNS = (("nodes", "nodes"), ("connected", "streams"), ("reports_per_s", "reports/s"),
           ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("max_ms", "max ms"),
           ("coordinator_cpu_pct", "coordinator CPU %"), ("cpu_us_per_report", "CPU us/report"),
           ("getcluster_ms", "GetCluster ms"),
           ("reporters_cpu_pct", "reporters CPU %"))
CONNECT_TIMEOUT_S = 60.0


def placement(i: int) -> dict[str, str]:
    rack = i // NODES_PER_RACK
    row = rack // RACKS_PER_ROW
    return {"site": "s1", "row": f"r{row}", "rack": f"k{rack}", "aisle": f"a{row // 2}"}


def topology(nodes: int) -> dict:
    racks = (nodes + NODES_PER_RACK - 1) // NODES_PER_RACK
    rows = (racks + RACKS_PER_ROW - 1) // RACKS_PER_ROW
    return {
        "version": 1,
        "sites": [{
            "name": "s1",
            "aisles": [{"name": f"a{a}", "aisle_airflow_cfm": 200_000}
                       for a in range((rows + 1) // 2)],
            "rows": [{"name": f"r{r}", "row_power_limit_w": 1_000_000,
                      "racks": [{"name": f"k{k}", "aisle": f"a{r // 2}"}
                                for k in range(r * RACKS_PER_ROW,
                                               min(racks, (r + 1) * RACKS_PER_ROW))]}
                     for r in range(rows)],
        }],
    }


def node_template(node_id: str, labels: dict[str, str]) -> pb.Node:
    """An 8 x H100 node report as an agent sends it (all fields a real report fills)."""
    gpus = []
    for i in range(8):
        budget = pb.Budget(memory_used_mib=40_000, memory_total_mib=81_559, kv_cache_usage_frac=0.5,
                           requests_in_flight=40, requests_capacity=100, utilization_pct=70,
                           power_draw_w=520, power_limit_w=700, temperature_c=65,
                           slowdown_temp_c=89, memory_headroom_mib=41_559,
                           compute_headroom_requests=60, power_headroom_w=180,
                           thermal_headroom_c=24)
        gpus.append(pb.Gpu(
            index=i, uuid=f"GPU-{node_id}-{i}", name="NVIDIA H100 80GB HBM3", serial=f"{i:012d}",
            gpu_type="h100-80gb", power_draw_w=520, power_draw_avg_w=515, power_limit_w=700,
            power_limit_min_w=200, power_limit_max_w=700, power_limit_default_w=700,
            energy_j=1e9, temperature_c=65 + i, memory_temperature_c=70, slowdown_temp_c=89,
            shutdown_temp_c=92, sm_clock_mhz=1755, memory_clock_mhz=2619, sm_clock_max_mhz=1980,
            supported_sm_clocks_mhz=list(range(1980, 344, -15)), utilization_gpu_pct=70,
            utilization_memory_pct=40, memory_used_mib=40_000, memory_total_mib=81_559,
            throttle_reasons=["sw_power_cap"], healthy=True, budget=budget))
    nb = pb.NodeBudget(node_power_w=6500, gpu_power_w=4160, idle_power_w=1500, fan_power_w=840,
                       gpu_power_limit_w=5600, airflow_cfm=1000,
                       totals=pb.Budget(memory_used_mib=320_000, memory_total_mib=652_472))
    return pb.Node(node_id=node_id, hostname=node_id, labels=labels, backend="sim",
                   software_version="bench", gpus=gpus, budget=nb, safety_state="leased",
                   host=pb.HostStats(cpu_pct=10, memory_used_mib=100_000,
                                     memory_total_mib=2_000_000))


# ---------------------------------------------------------------- reporters (child processes)


async def report_forever(address: str, index: int, total: int, stop_at: float) -> int:
    """One simulated agent: connect (spread over total/1000 s), report at 1 Hz, and on a failed
    stream redial after a random pause, as agents do. Returns the reports sent."""
    node_id = f"bench-{index:05d}"
    node = node_template(node_id, placement(index))
    register = lpb.Register(node_id=node_id, hostname=node_id, labels=node.labels,
                            software_version="bench", backend="sim", gpus=node.gpus,
                            report_interval_s=1.0)
    await asyncio.sleep(index / 1000)  # connect ~1000 nodes per second, not all at once
    sent = 0
    while time.time() < stop_at:
        try:
            sent += await _session(address, register, node, index / total, stop_at, sent)
        except grpc.aio.AioRpcError:
            await asyncio.sleep(random.uniform(0.5, 2.0))
    return sent


async def _session(address: str, register: lpb.Register, node: pb.Node, offset_s: float,
                   stop_at: float, seq: int) -> int:
    # A local subchannel pool: one TCP connection per node, as separate agents would have.
    async with grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        call = lpb_grpc.AgentLinkStub(channel).Connect()
        await call.write(lpb.AgentMessage(register=register))
        await call.read()  # Registered
        drain = asyncio.create_task(_drain(call))
        await asyncio.sleep(offset_s)  # stagger the nodes over the second
        sent = 0
        next_at = time.monotonic()
        try:
            while time.time() < stop_at:
                sent += 1
                node.sampled_at_unix_s = time.time()
                report = lpb.NodeReport(node=node, seq=seq + sent, sent_at_unix_s=time.time())
                await call.write(lpb.AgentMessage(report=report))
                next_at += 1.0
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await call.done_writing()
        finally:
            drain.cancel()
        return sent


async def _drain(call: grpc.aio.StreamStreamCall) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass  # leases: read so that flow control never stalls the coordinator's writes


def reporter_process(address: str, indices: list[int], total: int, stop_at: float,
                     results: mp.Queue) -> None:
    async def main() -> int:
        counts = await asyncio.gather(*(report_forever(address, i, total, stop_at)
                                        for i in indices))
        return sum(counts)

    results.put(asyncio.run(main()))


# ---------------------------------------------------------------- the bench


def start_fanin_coordinator(workdir: Path, nodes: int) -> tuple[subprocess.Popen[bytes], str]:
    (workdir / "topology.yaml").write_text(yaml.safe_dump(topology(nodes)))
    address = local_address()
    proc = start_coordinator(workdir, "coordinator", "--listen", address,
                             "--topology", str(workdir / "topology.yaml"),
                             "--lease-ttl-s", "30", "--log-level", "warning")
    return proc, address


def stats(stub: cpb_grpc.CoordinatorStub, reset: bool = False) -> cpb.IngestStats:
    return stub.GetIngestStats(cpb.GetIngestStatsRequest(reset_window=reset), timeout=10)


def run(nodes: int, seconds: float, processes: int, status_every_s: float) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="shapeshifter-fanin-"))
    proc, address = start_fanin_coordinator(workdir, nodes)
    channel = grpc.insecure_channel(address)
    stub = cpb_grpc.CoordinatorStub(channel)
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    children = []
    try:
        wait_for(lambda: serving(stub), 30, "coordinator serving")
        stop_at = time.time() + CONNECT_TIMEOUT_S + WARMUP_S + seconds + 10
        for p in range(processes):
            indices = list(range(p, nodes, processes))
            child = ctx.Process(target=reporter_process,
                                args=(address, indices, nodes, stop_at, results))
            child.start()
            children.append(child)
        connected = _wait_connected(stub, nodes, CONNECT_TIMEOUT_S)
        time.sleep(WARMUP_S)
        coordinator = psutil.Process(proc.pid)
        reporters_cpu0 = sum(cpu_seconds(psutil.Process(c.pid)) for c in children)
        cpu0, t0, s0 = cpu_seconds(coordinator), time.monotonic(), stats(stub, reset=True)
        rollup_ms = []
        while time.monotonic() - t0 < seconds:
            if status_every_s > 0:  # an operator's `shapectl watch`, a dashboard
                start = time.perf_counter()
                stub.GetCluster(cpb.GetClusterRequest(), timeout=10)
                rollup_ms.append((time.perf_counter() - start) * 1e3)
            time.sleep(status_every_s or 0.5)
        s1, t1, cpu1 = stats(stub, reset=True), time.monotonic(), cpu_seconds(coordinator)
        reporters_cpu = sum(cpu_seconds(psutil.Process(c.pid)) for c in children) - reporters_cpu0
    finally:
        for c in children:
            c.terminate()
        channel.close()
        stop_coordinators([proc])
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = t1 - t0
    reports = s1.reports_total - s0.reports_total
    return {
        "nodes": nodes,
        "reports_per_s": reports / elapsed,
        "cpu_us_per_report": 1e6 * (cpu1 - cpu0) / reports if reports else float("inf"),
        "p50_ms": s1.delay_p50_ms,
        "p99_ms": s1.delay_p99_ms,
        "max_ms": s1.delay_max_ms,
        "coordinator_cpu_pct": 100.0 * (cpu1 - cpu0) / elapsed,
        "getcluster_ms": statistics.median(rollup_ms) if rollup_ms else 0.0,
        # The reporters share this machine: when they saturate it, delays grow on their side.
        "reporters_cpu_pct": 100.0 * reporters_cpu / elapsed,
        "connected": connected,
    }


def _wait_connected(stub: cpb_grpc.CoordinatorStub, nodes: int, timeout_s: float) -> int:
    """Wait for every stream; past the timeout, measure with those that made it (and say so)."""
    deadline = time.monotonic() + timeout_s
    while (connected := stats(stub).connected_agents) < nodes and time.monotonic() < deadline:
        time.sleep(0.5)
    if connected < nodes:
        print(f"bench: only {connected} of {nodes} streams connected within {timeout_s:g} s",
              file=sys.stderr)
    return connected


def cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, required=True, metavar="M")
    parser.add_argument("--seconds", type=float, default=20.0, metavar="S")
    parser.add_argument("--processes", type=int, default=0, metavar="P",
                        help="reporter processes (default: 1 per 250 nodes, 1-4)")
    parser.add_argument("--status-every-s", type=float, default=1.0, metavar="S",
                        help="GetCluster (full rollup) this often during the run; 0 = never")
    args = parser.parse_args()
    processes = args.processes or min(4, max(1, (args.nodes + 249) // 250))
    r = run(args.nodes, args.seconds, processes, args.status_every_s)
    header = "  ".join(f"{title:>{len(title)}}" for _, title in COLUMNS)
    print(header)
    print("  ".join(f"{r[key]:>{len(title)}.1f}" for key, title in COLUMNS))
    print(f"nodes={args.nodes} reports_per_s={r['reports_per_s']:.1f} p50_ms={r['p50_ms']:.2f} "
          f"p99_ms={r['p99_ms']:.2f} coordinator_cpu_pct={r['coordinator_cpu_pct']:.1f} "
          f"cpu_us_per_report={r['cpu_us_per_report']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
