"""Emergency load shedding: N virtual 8-GPU nodes in 4 rows, one row drops to 75%.

The coordinator runs as a subprocess (the real daemon). Virtual nodes are hosted in a few
processes (asyncio + grpc.aio); each has its own sim backend (nodeagent.device.sim, 8 x H100 at full
load), the agent's real EmergencyGuard, and its own AgentLink.Connect stream and TCP connection.
It reports every second (GPU draw and limits from the sim) and applies the coordinator's caps
to its sim GPUs. After every node registered and acknowledged its pre-armed caps, the bench
declares a 75% emergency on row r0 and reads the timeline:
  issued: declaration -> the node's caps queued on its stream (per node),
  acked:  declaration -> the node's acknowledgement received (per node),
  under:  declaration -> the row's power, summed from the nodes' reports, under the new limit
          (so it includes up to one report interval).

    python bench/emergency.py --nodes 100

The last line is: nodes=N issued_p99_s=A acked_p99_s=B under_limit_s=C
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc
import structlog
import yaml

from nodeagent.device.sim import SimulatedBackend
from nodeagent.rpc.codec import plan_outcome_to_pb
from nodeagent.safety.emergency import EmergencyGuard
from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import coordinator_pb2_grpc as cpb_grpc
from shapeshifter.api.v1 import emergency_pb2 as epb
from shapeshifter.api.v1 import emergency_pb2_grpc as epb_grpc
from shapeshifter.api.v1 import link_pb2 as lpb
from shapeshifter.api.v1 import link_pb2_grpc as lpb_grpc
from shapeshifter.common.clock import SystemClock
from shapeshifter.net.streams import write_forever as write_outbox

sys.path.insert(0, str(Path(__file__).parent))
from launch import local_address, serving, start_coordinator, stop_coordinators, wait_for

GPUS, ROWS, NODES_PER_RACK = 8, 4, 10
HOST_OTHER_W = 1500.0  # idle + fans of an 8-GPU host, not cappable
CAPACITY = 0.75
REPORT_INTERVAL_S = 1.0


def placement(i: int, nodes: int) -> dict[str, str]:
    per_row = (nodes + ROWS - 1) // ROWS
    row = i // per_row
    rack = i // NODES_PER_RACK
    return {"site": "s1", "row": f"r{row}", "rack": f"k{row}-{rack}", "aisle": f"a{row // 2}"}


def topology(nodes: int, node_peak_w: float) -> dict:
    racks: dict[str, set[str]] = {}
    for i in range(nodes):
        p = placement(i, nodes)
        racks.setdefault(p["row"], set()).add(p["rack"])
    per_row = (nodes + ROWS - 1) // ROWS
    return {"version": 1, "sites": [{
        "name": "s1",
        "aisles": [{"name": f"a{a}", "aisle_airflow_cfm": 1e8} for a in range(2)],
        "rows": [{"name": row, "row_power_limit_w": round(1.02 * per_row * node_peak_w),
                  "racks": [{"name": k, "aisle": f"a{int(row[1:]) // 2}"} for k in sorted(ks)]}
                 for row, ks in sorted(racks.items())]}]}


class SimCeilings:
    """The actuator's two power layers, reduced: applied limit = min(max, every ceiling)."""

    def __init__(self, backend: SimulatedBackend) -> None:
        self._b = backend
        self._ceilings: dict[int, dict[str, float]] = {i: {} for i in range(GPUS)}

    def set_power_ceilings_w(self, ceilings: dict[int, float | None],
                             source: str) -> dict[int, bool]:
        for i, w in ceilings.items():
            if w is None:
                self._ceilings[i].pop(source, None)
            else:
                self._ceilings[i][source] = w
            max_w = self._b.power_constraints(i).max_w
            self._b.set_power_limit_w(i, min([max_w, *self._ceilings[i].values()]))
        return dict.fromkeys(ceilings, True)


class VirtualNode:
    def __init__(self, index: int, nodes: int) -> None:
        self.node_id = f"v{index:05d}"
        self.labels = placement(index, nodes)
        self.backend = SimulatedBackend("h100-80gb", GPUS, SystemClock(), seed=index)
        for i in range(GPUS):
            self.backend.set_load(i, 1.0)
        self.ceilings = SimCeilings(self.backend)
        self.guard = EmergencyGuard(self.ceilings, list(range(GPUS)), SystemClock(),
                                    structlog.get_logger())

    def report(self) -> pb.Node:
        gpus = []
        for i in range(GPUS):
            t = self.backend.telemetry(i)
            c = self.backend.power_constraints(i)
            gpus.append(pb.Gpu(index=i, gpu_type="h100-80gb", power_draw_w=t.power_draw_w,
                               power_limit_w=t.power_limit_w, power_limit_min_w=c.min_w,
                               power_limit_max_w=c.max_w, utilization_gpu_pct=100.0))
        gpu_w = sum(g.power_draw_w for g in gpus)
        budget = pb.NodeBudget(node_power_w=HOST_OTHER_W + gpu_w, gpu_power_w=gpu_w)
        return pb.Node(node_id=self.node_id, hostname=self.node_id, labels=self.labels,
                       backend="sim", gpus=gpus, budget=budget, sampled_at_unix_s=time.time())

    async def connect(self, channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
        """Open the AgentLink stream and register (answered by Registered)."""
        call = lpb_grpc.AgentLinkStub(channel).Connect()
        await call.write(lpb.AgentMessage(register=lpb.Register(
            node_id=self.node_id, hostname=self.node_id, labels=self.labels,
            backend="sim", gpus=self.report().gpus, report_interval_s=REPORT_INTERVAL_S)))
        await call.read()
        return call

    async def run(self, address: str, stop_at: float, offset_s: float) -> None:
        await asyncio.sleep(offset_s)
        async with grpc.aio.insecure_channel(
                address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            call = await self.connect(channel)
            outbox: asyncio.Queue[lpb.AgentMessage] = asyncio.Queue()
            tasks = [asyncio.create_task(self._read(call, outbox)),
                     asyncio.create_task(self._report(outbox, stop_at)),
                     asyncio.create_task(write_outbox(call, outbox))]
            await tasks[1]
            reader = tasks[0]
            for t in tasks:
                t.cancel()
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()  # a failed answer must not pass as a silent node

    async def _read(self, call: grpc.aio.StreamStreamCall,
                    outbox: asyncio.Queue[lpb.AgentMessage]) -> None:
        while (msg := await call.read()) is not grpc.aio.EOF:
            answer = self.answer(msg)
            if answer is not None:
                outbox.put_nowait(lpb.AgentMessage(plan_result=answer))

    def answer(self, msg: lpb.CoordinatorMessage) -> pb.ApplyPlanResponse | None:
        """The node's answer to a coordinator message (None: nothing to answer)."""
        kind = msg.WhichOneof("kind")
        if kind == "emergency":
            return plan_outcome_to_pb(self.guard.directive(msg.emergency))
        if kind == "prearm":
            return plan_outcome_to_pb(self.guard.prearm(msg.prearm))
        return None

    async def _report(self, outbox: asyncio.Queue[lpb.AgentMessage], stop_at: float) -> None:
        seq = 0
        while time.time() < stop_at:
            seq += 1
            outbox.put_nowait(lpb.AgentMessage(report=lpb.NodeReport(
                node=self.report(), seq=seq, sent_at_unix_s=time.time())))
            await asyncio.sleep(REPORT_INTERVAL_S)


def host_process(address: str, indices: list[int], nodes: int, stop_at: float) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    async def main() -> None:
        vnodes = [VirtualNode(i, nodes) for i in indices]
        await asyncio.gather(*(v.run(address, stop_at, i / 500)
                               for i, v in zip(indices, vnodes, strict=True)))

    asyncio.run(main())


def percentile(values: list[float], frac: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(frac * len(v)))] if v else float("nan")


def run(nodes: int, processes: int, timeout_s: float) -> dict[str, float]:
    node_peak_w = HOST_OTHER_W + GPUS * 700.0
    workdir = Path(tempfile.mkdtemp(prefix="shapeshifter-emergency-"))
    (workdir / "topology.yaml").write_text(yaml.safe_dump(topology(nodes, node_peak_w)))
    address = local_address()
    coord = start_coordinator(
        workdir, "coordinator", "--listen", address, "--topology", str(workdir / "topology.yaml"),
        "--lease-ttl-s", "60", "--log-level", "error", "--emergency-prearm-interval-s", "3600",
        "--emergency-phase2-after-s", "0", "--emergency-reissue-after-s", "3")
    stop_at = time.time() + timeout_s + nodes / 50 + 60
    ctx = mp.get_context("spawn")
    hosts = [ctx.Process(target=host_process,
                         args=(address, list(range(p, nodes, processes)), nodes, stop_at),
                         daemon=True) for p in range(processes)]
    try:
        channel = grpc.insecure_channel(address)
        wait_for(lambda: serving(cpb_grpc.CoordinatorStub(channel)), 30, "coordinator serving")
        for h in hosts:
            h.start()
        em = epb_grpc.EmergencyStub(channel)
        wait_for(lambda: em.ListEmergencies(epb.ListEmergenciesRequest(), timeout=10)
                 .prearmed_nodes == nodes, 60 + nodes / 20, "every node pre-armed")
        time.sleep(2 * REPORT_INTERVAL_S)  # every node reported at full load
        status = em.DeclareEmergency(epb.DeclareEmergencyRequest(
            scope="row", name="r0", capacity_frac=CAPACITY, source="bench"), timeout=30)
        eid = status.emergency_id
        deadline = time.monotonic() + timeout_s
        while True:
            s = em.GetEmergency(epb.GetEmergencyRequest(emergency_id=eid), timeout=30)
            if (s.acked_s >= 0 and s.under_limit_s >= 0) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        return figures(s, nodes)
    finally:
        for h in hosts:
            h.terminate()
        stop_coordinators([coord], timeout_s=20)
        shutil.rmtree(workdir, ignore_errors=True)


def figures(s: epb.EmergencyStatus, nodes: int) -> dict[str, float]:
    first: dict[str, dict[str, float]] = {"caps_issued": {}, "caps_acked": {}}
    for e in s.timeline:
        if e.kind in first and e.node_id not in first[e.kind]:
            first[e.kind][e.node_id] = e.t_s
    issued, acked = list(first["caps_issued"].values()), list(first["caps_acked"].values())
    plan = next((json.loads(e.detail_json) for e in s.timeline if e.kind == "plan"), {})
    return {"nodes": nodes, "row_nodes": s.nodes, "acked_nodes": len(acked),
            "issued_p50_s": percentile(issued, 0.5), "issued_p99_s": percentile(issued, 0.99),
            "acked_p50_s": percentile(acked, 0.5), "acked_p99_s": percentile(acked, 0.99),
            "under_limit_s": s.under_limit_s, "reissued": sum(
                e.kind == "caps_reissued" for e in s.timeline),
            "row_draw_w": plan.get("power_draw_w", 0), "limit_w": s.power_limit_w,
            "shortfall_w": s.shortfall_w}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--processes", type=int, default=4, help="processes hosting virtual nodes")
    p.add_argument("--timeout-s", type=float, default=60.0, help="wait for acks and the limit")
    args = p.parse_args()
    r = run(args.nodes, args.processes, args.timeout_s)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in r.items()), file=sys.stderr)
    print(f"nodes={args.nodes} issued_p99_s={r['issued_p99_s']:.3f} "
          f"acked_p99_s={r['acked_p99_s']:.3f} under_limit_s={r['under_limit_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
