"""10,000 virtual nodes across leaf coordinators under one parent: fan-in, a row emergency and a
site limit (part of bench/ha_failover.py; runs alone too).

Processes: a parent (`coordinator --role parent`, the site's full topology) and L leaves
(`coordinator --parent ... --leaf-id leafN`, each with every L-th row). Nodes:
  - N light reporters (bench/coordinator_fanin.py's: a full 8-GPU report at 1 Hz on its own
    stream; they do not act on caps), 100 per row, rows r0.. spread over the leaves;
  - E emergency nodes in row e0 of leaf0 (bench/emergency.py's virtual node: sim GPUs at full
    load, the agent's real EmergencyGuard; they act on caps).

Figures:
  reports_per_s, ingest_p99_ms  all leaves together over 10 s (p99: the worst leaf's)
  leaves_cpu_pct, reporters_cpu_pct, leaf_cpu_ms_per_report
                                where the CPU went meanwhile (100 = one core; the reporters
                                share the machine), and the leaves' CPU per report ingested:
                                cores a site needs for its leaves = reports/s x that / 1000
  row_acked_p99_s, row_under_limit_s
                                a 75 % emergency on e0 declared at leaf0 while everything
                                reports (bench/emergency.py's definitions; targets 2 s / 5 s)
  site_rows_acked_s             SetSiteLimit at the parent -> every row's leaf acknowledged its
                                new limit (declared or adjusted its row emergency)
  site_e0_agents_acked_s        ... -> e0's agents acknowledged their caps

    python bench/leaves_fanin.py --nodes 10000 --leaves 4
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import structlog
import yaml

from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.api.v1 import coordinator_pb2_grpc as cpb_grpc
from shapeshifter.api.v1 import emergency_pb2 as epb
from shapeshifter.api.v1 import emergency_pb2_grpc as epb_grpc
from shapeshifter.api.v1 import hierarchy_pb2 as hpb
from shapeshifter.api.v1 import hierarchy_pb2_grpc as hpb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from coordinator_fanin import cpu_seconds, placement, report_forever, topology
from emergency import GPUS, HOST_OTHER_W, VirtualNode, figures
from launch import local_address, serving, start_coordinator, stop_coordinators, wait_for

E_ROW = "e0"


def row_of(i: int) -> int:
    return int(placement(i)["row"][1:])


class RowNode(VirtualNode):
    """An emergency bench node placed in row e0."""

    def __init__(self, index: int) -> None:
        super().__init__(index, 1)
        self.node_id = f"e{index:05d}"
        self.labels = {"site": "s1", "row": E_ROW, "rack": f"ek{index // 10}", "aisle": "a0"}


def site_topology(nodes: int, e_nodes: int) -> dict[str, Any]:
    t = topology(nodes)
    peak_w = HOST_OTHER_W + GPUS * 700.0
    t["sites"][0]["rows"].append({
        "name": E_ROW, "row_power_limit_w": round(1.02 * e_nodes * peak_w),
        "racks": [{"name": f"ek{k}", "aisle": "a0"} for k in range((e_nodes + 9) // 10)]})
    return t


def leaf_topology(site: dict[str, Any], leaf: int, leaves: int) -> dict[str, Any]:
    rows = [r for r in site["sites"][0]["rows"]
            if (r["name"] == E_ROW and leaf == 0)
            or (r["name"] != E_ROW and int(r["name"][1:]) % leaves == leaf)]
    return {"version": 1, "sites": [{**site["sites"][0], "rows": rows}]}


def light_process(addresses: list[str], indices: list[int], total: int, stop_at: float) -> None:
    async def main() -> None:
        await asyncio.gather(*(report_forever(addresses[row_of(i) % len(addresses)], i, total,
                                              stop_at) for i in indices))

    asyncio.run(main())


def row_process(address: str, indices: list[int], stop_at: float) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    async def main() -> None:
        await asyncio.gather(*(RowNode(i).run(address, stop_at, i / 200) for i in indices))

    asyncio.run(main())


def run(nodes: int, leaves: int, e_nodes: int, processes: int) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="shapeshifter-leaves-"))
    site = site_topology(nodes, e_nodes)
    (workdir / "site.yaml").write_text(yaml.safe_dump(site))
    parent = local_address()
    addresses = [local_address() for _ in range(leaves)]
    procs = [start_coordinator(workdir, "parent", "--log-level", "error", "--role", "parent",
                               "--listen", parent, "--topology", str(workdir / "site.yaml"))]
    for n, address in enumerate(addresses):
        (workdir / f"leaf{n}.yaml").write_text(yaml.safe_dump(leaf_topology(site, n, leaves)))
        procs.append(start_coordinator(
            workdir, f"leaf{n}", "--log-level", "error", "--listen", address,
            "--topology", str(workdir / f"leaf{n}.yaml"),
            "--parent", parent, "--leaf-id", f"leaf{n}", "--lease-ttl-s", "60",
            "--emergency-prearm-interval-s", "3600", "--emergency-phase2-after-s", "0",
            "--emergency-reissue-after-s", "3", "--emergency-clear-step-s", "0.3"))
    ctx = mp.get_context("spawn")
    stop_at = time.time() + 300 + nodes / 100
    hosts = [ctx.Process(target=light_process, args=(addresses, list(range(p, nodes, processes)),
                                                     nodes, stop_at), daemon=True)
             for p in range(processes)]
    hosts.append(ctx.Process(target=row_process, args=(addresses[0], list(range(e_nodes)),
                                                       stop_at), daemon=True))
    try:
        stubs = [cpb_grpc.CoordinatorStub(grpc.insecure_channel(a)) for a in addresses]
        for stub in stubs:
            wait_for(lambda s=stub: serving(s), 60, "leaves serving")
        for h in hosts:
            h.start()
        leaf_pids = [p.pid for p in procs[1:]]
        host_pids = [h.pid for h in hosts if h.pid is not None]
        return _measure(stubs, addresses[0], parent, nodes + e_nodes, e_nodes,
                        (leaf_pids, host_pids))
    finally:
        for h in hosts:
            h.terminate()
        stop_coordinators(procs)
        shutil.rmtree(workdir, ignore_errors=True)


def _measure(stubs: list[cpb_grpc.CoordinatorStub], leaf0: str, parent: str, total: int,
             e_nodes: int, pids: tuple[list[int], list[int]]) -> dict[str, float]:
    def connected() -> int:
        return sum(s.GetIngestStats(cpb.GetIngestStatsRequest(), timeout=30).connected_agents
                   for s in stubs)

    wait_for(lambda: connected() >= total, 120 + total / 100, "every node connected")
    em = epb_grpc.EmergencyStub(grpc.insecure_channel(leaf0))
    wait_for(lambda: em.ListEmergencies(epb.ListEmergenciesRequest(), timeout=30)
             .prearmed_nodes >= e_nodes, 120, "row e0 pre-armed")
    time.sleep(3.0)
    out: dict[str, float] = {"nodes": total, "leaves": len(stubs)}
    out.update(_fan_in(stubs, 10.0, pids))
    out.update(_row_emergency(em))
    out.update(_site_limit(hpb_grpc.SiteStub(grpc.insecure_channel(parent))))
    return out


def _fan_in(stubs: list[cpb_grpc.CoordinatorStub], seconds: float,
            pids: tuple[list[int], list[int]]) -> dict[str, float]:
    """Reports ingested per second, the worst leaf's p99 delay, and where the CPU went (this
    machine also runs the reporters: when it saturates, reports queue on both sides)."""
    def snap(reset: bool) -> list[cpb.IngestStats]:
        return [s.GetIngestStats(cpb.GetIngestStatsRequest(reset_window=reset), timeout=30)
                for s in stubs]

    leaves, hosts = ([psutil.Process(p) for p in group] for group in pids)
    cpu0 = [sum(cpu_seconds(p) for p in group) for group in (leaves, hosts)]
    before, t0 = snap(True), time.monotonic()
    time.sleep(seconds)
    after, elapsed = snap(True), time.monotonic() - t0
    cpu1 = [sum(cpu_seconds(p) for p in group) for group in (leaves, hosts)]
    reports = sum(a.reports_total - b.reports_total for a, b in zip(after, before, strict=True))
    leaves_cpu_s = cpu1[0] - cpu0[0]
    return {"reports_per_s": round(reports / elapsed),
            "ingest_p99_ms": round(max(a.delay_p99_ms for a in after), 1),
            "leaves_cpu_pct": round(100 * leaves_cpu_s / elapsed),
            "reporters_cpu_pct": round(100 * (cpu1[1] - cpu0[1]) / elapsed),
            "leaf_cpu_ms_per_report": round(1e3 * leaves_cpu_s / max(reports, 1), 3),
            "cores": os.cpu_count() or 0}


def _row_emergency(em: epb_grpc.EmergencyStub) -> dict[str, float]:
    eid = em.DeclareEmergency(epb.DeclareEmergencyRequest(
        scope="row", name=E_ROW, capacity_frac=0.75, source="bench"), timeout=30).emergency_id
    deadline = time.monotonic() + 30
    while True:
        s = em.GetEmergency(epb.GetEmergencyRequest(emergency_id=eid), timeout=30)
        if (s.acked_s >= 0 and s.under_limit_s >= 0) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    f = figures(s, 0)
    em.ClearEmergency(epb.ClearEmergencyRequest(emergency_id=eid), timeout=30)
    wait_for(lambda: em.GetEmergency(epb.GetEmergencyRequest(emergency_id=eid), timeout=30)
             .state == "cleared", 60, "row emergency cleared")
    return {"row_acked_p99_s": round(f["acked_p99_s"], 3),
            "row_under_limit_s": round(f["under_limit_s"], 3)}


def _site_limit(site: hpb_grpc.SiteStub) -> dict[str, float]:
    start = time.monotonic()
    site.SetSiteLimit(hpb.SetSiteLimitRequest(site="s1", capacity_frac=0.6, source="bench"),
                      timeout=30)
    rows_acked_s = e0_acked_s = -1.0
    while time.monotonic() - start < 60 and (rows_acked_s < 0 or e0_acked_s < 0):
        s = site.GetSite(hpb.GetSiteRequest(site="s1"), timeout=30)
        now_s = time.monotonic() - start
        if rows_acked_s < 0 and all(r.acked for r in s.rows):
            rows_acked_s = now_s
        if e0_acked_s < 0 and any(r.row == E_ROW and r.acked and r.agents_acked for r in s.rows):
            e0_acked_s = now_s
        time.sleep(0.1)
    return {"site_rows_acked_s": round(rows_acked_s, 2),
            "site_e0_agents_acked_s": round(e0_acked_s, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=10_000, help="light reporters")
    p.add_argument("--leaves", type=int, default=4)
    p.add_argument("--row-nodes", type=int, default=100, help="emergency nodes in row e0")
    p.add_argument("--processes", type=int, default=2, help="processes hosting light reporters")
    args = p.parse_args()
    r = run(args.nodes, args.leaves, args.row_nodes, args.processes)
    print(" ".join(f"{k}={v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
