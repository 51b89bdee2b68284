"""Highly available coordinator: kill the leader under load and during an emergency.

A real 3-member etcd (Debian's etcd-server, loopback ports) and two coordinator replicas
(`coordinator --state etcd`, the real daemon). N virtual nodes (bench/fault_soak.py's: sim
backend, the agent's real EmergencyGuard, their own AgentLink streams) are given both replica
addresses and follow the leader the way agents do: a follower's refusal names the leader
(trailing metadata `shapeshifter-leader`), any other failure moves on to the next address.

Sequence: every node registered and pre-armed -> a 75 % emergency on row r0, acknowledged ->
operator SetPowerLimit actions through the leader at 5/s -> SIGKILL the leader -> the other
replica takes over -> 10 s more -> stop.

Figures:
  failover_s     leader SIGKILL -> the other replica answers GetCluster as leader
  all_back_s     leader SIGKILL -> the new leader has every node up (registered and reporting)
  emergency_kept 1 when the new leader lists the emergency as active
  unsafe         episodes (> 3 s) in which a node knew of an emergency with neither its caps nor
                 its pre-armed fallback in effect (bench/fault_soak.py's count)
  reports_lost   reports the nodes wrote on streams the new leader had registered, minus the
                 reports it ingested (it starts counting at its own start: both sides count the
                 same stream)
  plans_doubled  action ids some node applied more than once (across both leaders)
  actions_lost   actions a leader answered OK that no node applied

Before that (unless --scale-nodes 0), bench/leaves_fanin.py's figures for --scale-nodes light
nodes across --leaves leaf coordinators under a parent, on a line starting `leaves:`.

    python bench/ha_failover.py --nodes 200 --scale-nodes 10000 --leaves 4

The last line is: failover_s=A reports_lost=B plans_doubled=C
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import structlog
import yaml

from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.api.v1 import coordinator_pb2_grpc as cpb_grpc
from shapeshifter.api.v1 import emergency_pb2 as epb
from shapeshifter.api.v1 import emergency_pb2_grpc as epb_grpc
from shapeshifter.api.v1 import link_pb2 as lpb
from shapeshifter.net.transport import leader_hint

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
import leaves_fanin
from emergency import GPUS, HOST_OTHER_W, topology
from fault_soak import TICK_S, SoakNode
from launch import local_address, start_coordinator, stop_coordinators, wait_for

from tests.etcd_cluster import EtcdCluster, etcd_binary

LEADER_TTL_S = 3


class HaNode(SoakNode):
    """A soak node given every replica address; it follows the leader until stop is set."""

    def __init__(self, index: int, nodes: int, addresses: list[str], stop: Any) -> None:
        super().__init__(index, nodes)
        self.addresses = addresses
        self.target = addresses[index % len(addresses)]  # the replica of the current session
        self.sent: Counter[str] = Counter()  # reports written per replica address
        self._stop = stop

    async def follow(self, rng: random.Random) -> None:
        await asyncio.sleep(rng.uniform(0, 2))
        while not self._stop.is_set():
            try:
                await self._session(self.target, float("inf"))
            except grpc.aio.AioRpcError as err:
                self.target = leader_hint(err) or self._next()
            except asyncio.InvalidStateError:
                self.target = self._next()
            self.guard.link_up(False)
            await asyncio.sleep(rng.uniform(0.05, 0.3))

    def _next(self) -> str:
        return self.addresses[(self.addresses.index(self.target) + 1) % len(self.addresses)]

    async def _session(self, address: str, stop_at: float) -> None:
        await super()._session(address, stop_at)
        if not self._stop.is_set():
            raise asyncio.InvalidStateError("the stream ended")

    async def _report(self, outbox: asyncio.Queue[lpb.AgentMessage], stop_at: float) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            outbox.put_nowait(lpb.AgentMessage(report=lpb.NodeReport(
                node=self.report(), seq=seq, sent_at_unix_s=time.time())))
            self.sent[self.target] += 1
            await asyncio.sleep(1.0)


def host_process(addresses: list[str], indices: list[int], nodes: int, stop: Any,
                 results: Any) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))

    async def ticker(vnodes: list[HaNode]) -> None:
        while not stop.is_set():
            await asyncio.sleep(TICK_S)
            for v in vnodes:
                v.check(time.monotonic(), stalled=False)

    async def main() -> list[HaNode]:
        vnodes = [HaNode(i, nodes, addresses, stop) for i in indices]
        await asyncio.gather(ticker(vnodes), *(v.follow(random.Random(i))
                                               for i, v in zip(indices, vnodes, strict=True)))
        return vnodes

    vnodes = asyncio.run(main())
    results.put({"applied": sum((v.applied for v in vnodes), Counter()),
                 "sent": sum((v.sent for v in vnodes), Counter()),
                 "unsafe": sum(v.unsafe for v in vnodes)})


class Replicas:
    def __init__(self, workdir: Path, etcd: EtcdCluster) -> None:
        self.workdir, self.etcd = workdir, etcd
        self.addresses = [local_address() for _ in range(2)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, address: str) -> None:
        name = f"c{self.addresses.index(address)}"
        self.procs[address] = start_coordinator(
            self.workdir, name, "--listen", address,
            "--topology", str(self.workdir / "topology.yaml"), "--state", "etcd",
            "--etcd-endpoints", ",".join(self.etcd.endpoints), "--replica-id", name,
            "--leader-ttl-s", str(LEADER_TTL_S), "--lease-ttl-s", "30", "--log-level", "error",
            "--emergency-prearm-interval-s", "5", "--emergency-reissue-after-s", "3")

    def leader(self) -> str:
        """The address that answers GetCluster ('' while none does)."""
        for address in self.addresses:
            with grpc.insecure_channel(address) as ch:
                try:
                    cpb_grpc.CoordinatorStub(ch).GetIngestStats(cpb.GetIngestStatsRequest(),
                                                                timeout=2)
                    return address
                except grpc.RpcError:
                    continue
        return ""

    def stop(self) -> None:
        stop_coordinators(self.procs.values(), timeout_s=20)


class Operator:
    """SetPowerLimit through whichever replica leads, at 5/s; records the acknowledged ids."""

    def __init__(self, replicas: Replicas, node_ids: list[str]) -> None:
        self.replicas, self.node_ids = replicas, node_ids
        self.acked: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        rng = random.Random(7)
        address = self.replicas.addresses[0]
        while not self.stop.wait(0.2):
            req = cpb.NodeSetPowerLimitRequest(
                node_id=rng.choice(self.node_ids), request=pb.SetPowerLimitRequest(
                    gpu_index=rng.randrange(GPUS), power_limit_w=rng.uniform(500, 700)))
            with grpc.insecure_channel(address) as ch:
                try:
                    result = cpb_grpc.CoordinatorStub(ch).SetPowerLimit(req, timeout=5)
                    self.acked.add(result.action_id)
                except grpc.RpcError:  # a follower, or the dead leader: try the other one
                    address = self.replicas.leader() or address


def run(nodes: int, processes: int) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="shapeshifter-ha-"))
    (workdir / "topology.yaml").write_text(yaml.safe_dump(
        topology(nodes, HOST_OTHER_W + GPUS * 700.0)))
    etcd = EtcdCluster(workdir / "etcd").start(3)
    replicas = Replicas(workdir, etcd)
    ctx = mp.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    hosts = [ctx.Process(target=host_process, args=(replicas.addresses, list(
        range(p, nodes, processes)), nodes, stop, results), daemon=True) for p in range(processes)]
    try:
        for address in replicas.addresses:
            replicas.start(address)
        wait_for(lambda: bool(replicas.leader()), 30, "a leader")
        for h in hosts:
            h.start()
        return _scenario(replicas, nodes, stop, results, hosts)
    finally:
        stop.set()
        for h in hosts:
            h.join(10)
            if h.is_alive():
                h.terminate()
        replicas.stop()
        etcd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _scenario(replicas: Replicas, nodes: int, stop: Any, results: Any,
              hosts: list[Any]) -> dict[str, float]:
    old = replicas.leader()
    channel = grpc.insecure_channel(old)
    em = epb_grpc.EmergencyStub(channel)
    wait_for(lambda: em.ListEmergencies(epb.ListEmergenciesRequest(), timeout=10)
             .prearmed_nodes == nodes, 60 + nodes / 20, "every node pre-armed")
    declared = em.DeclareEmergency(epb.DeclareEmergencyRequest(
        scope="row", name="r0", capacity_frac=0.75, source="bench"), timeout=30)
    wait_for(lambda: em.GetEmergency(epb.GetEmergencyRequest(
        emergency_id=declared.emergency_id), timeout=10).acked_s >= 0, 30, "caps acknowledged")
    operator = Operator(replicas, [f"v{i:05d}" for i in range(nodes)])
    operator.thread.start()
    time.sleep(3.0)
    replicas.procs[old].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    new = ""
    while not new or new == old:
        new = replicas.leader()
        time.sleep(0.05)
    failover_s = time.monotonic() - killed_at
    stub = cpb_grpc.CoordinatorStub(grpc.insecure_channel(new))
    wait_for(lambda: sum(n.state == "up" for n in stub.ListNodes(
        cpb.ListNodesRequest(), timeout=10).nodes) == nodes, 60, "every node back")
    all_back_s = time.monotonic() - killed_at
    kept = epb_grpc.EmergencyStub(grpc.insecure_channel(new)).GetEmergency(
        epb.GetEmergencyRequest(emergency_id=declared.emergency_id), timeout=10).state == "active"
    time.sleep(10.0)
    operator.stop.set()
    operator.thread.join(10)
    stop.set()
    hosted = [results.get(timeout=60) for _ in hosts]
    time.sleep(1.0)  # the last reports are read
    ingested = stub.GetIngestStats(cpb.GetIngestStatsRequest(), timeout=10).reports_total
    applied = sum((r["applied"] for r in hosted), Counter())
    sent = sum((r["sent"] for r in hosted), Counter())
    return {"nodes": nodes, "failover_s": round(failover_s, 2), "all_back_s": round(all_back_s, 2),
            "emergency_kept": int(kept), "unsafe": sum(r["unsafe"] for r in hosted),
            "actions_acked": len(operator.acked),
            "actions_lost": len(operator.acked - set(applied)),
            "reports_lost": max(0, sent[new] - ingested), "reports_to_new": sent[new],
            "plans_doubled": sum(1 for n in applied.values() if n > 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=200, help="virtual nodes for the failover")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--scale-nodes", type=int, default=10_000,
                   help="light reporters across leaves, first (bench/leaves_fanin.py); 0 skips")
    p.add_argument("--leaves", type=int, default=4)
    args = p.parse_args()
    if etcd_binary() is None:
        print("etcd is not installed (Debian: apt-get install etcd-server)", file=sys.stderr)
        return 1
    if args.scale_nodes > 0:
        scale = leaves_fanin.run(args.scale_nodes, args.leaves, 100, args.processes)
        print("leaves: " + " ".join(f"{k}={v}" for k, v in scale.items()), flush=True)
    r = run(args.nodes, args.processes)
    print(" ".join(f"{k}={v}" for k, v in r.items()))
    print(f"failover_s={r['failover_s']} reports_lost={r['reports_lost']} "
          f"plans_doubled={r['plans_doubled']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
