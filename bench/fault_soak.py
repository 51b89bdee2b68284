"""Fault soak: N virtual nodes report at 1 Hz to the real coordinator while faults are injected.

The coordinator runs as a subprocess (the real daemon, SQLite on disk). Virtual nodes are hosted
in a few processes (asyncio + grpc.aio), each with its own AgentLink stream, a sim backend
(8 x H100 at full load) and the agent's real EmergencyGuard; they redial a lost stream after a
short random pause, as agents do.

Faults, one every --fault-every-s on average, chosen at random:
  coordinator_kill  SIGKILL the coordinator; a new one starts on the same database 1 s later
  node_stop         SIGSTOP one process of virtual nodes for 3 s, then SIGCONT
  partition         one virtual node drops its stream and redials 2 s later
Throughout: bad requests at --bad-rps against the admin and emergency APIs; good operator
actions (SetPowerLimit through the coordinator) at 2/s; and a cycle of emergencies on a random
row (declared at 75 %, held 8 s, cleared).

Counted:
  faults      faults injected (the three kinds above)
  refused_ok  bad requests answered with the error code expected for them
  unsafe      bad requests answered OK, plus episodes in which a running node knew of an
              emergency for more than 3 s with neither its caps nor its pre-armed fallback in
              effect, plus emergencies in force at the end that the soak did not declare
  lost        SetPowerLimit actions answered OK whose action id no node applied
  doubled     action ids applied more than once
Requests that meet a dead coordinator (UNAVAILABLE, DEADLINE_EXCEEDED) count as neither: their
outcome is unknown to the client, which is what a real client would retry. A stopped node's
exposure clock restarts when it runs again (a stopped process can act on nothing).

    python bench/fault_soak.py --nodes 200 --seconds 600

The last line is: faults=A refused_ok=B unsafe=C lost=D doubled=E missing_hosts=F
stuck_sessions=G. Shutdown is bounded: a host cancels sessions still running 10 s past the end
and reports; one that sends nothing within 30 s is killed. The figures are printed either way
(actions of a missing host's nodes are not judged), and the exit status is 1 when a host was
missing or had to cancel, with the host named on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
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

sys.path.insert(0, str(Path(__file__).parent))
from emergency import (
    GPUS,
    HOST_OTHER_W,
    VirtualNode,
    placement,
    topology,
    write_outbox,
)
from launch import local_address, start_coordinator, stop_coordinators, wait_for

GRACE_S = 3.0  # fallback_after_s (1 s) + a report interval + scheduling slack
STALL_S = 1.0  # a tick gap this long means the process was stopped
TICK_S = 0.2
CONNECT_TIMEOUT_S = 10.0  # a Register unanswered this long is redialled
HOST_GRACE_S = 10.0  # past stop_at, a host cancels what is still running and reports
COLLECT_GRACE_S = 30.0  # past stop_at, the soak stops waiting for a host's report
EXPECTED = {  # bad request -> the codes that refuse it correctly
    "unknown_node": {"NOT_FOUND"},
    "nan_watts": {"INVALID_ARGUMENT", "OUT_OF_RANGE"},
    "huge_watts": {"INVALID_ARGUMENT", "OUT_OF_RANGE"},
    "bad_gpu": {"INVALID_ARGUMENT", "OUT_OF_RANGE", "NOT_FOUND"},
    "bad_scope": {"INVALID_ARGUMENT"},
    "bad_capacity": {"INVALID_ARGUMENT", "OUT_OF_RANGE"},
    "unknown_row": {"NOT_FOUND", "INVALID_ARGUMENT"},
    "unknown_emergency": {"NOT_FOUND"},
}
UNKNOWN_OUTCOME = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                   grpc.StatusCode.CANCELLED}


# ---------------------------------------------------------------- virtual nodes (child processes)


class SoakNode(VirtualNode):
    """bench/emergency.py's virtual node, which also redials, answers plans (SetPowerLimit,
    recording each action id it applies) and counts its long exposures."""

    def __init__(self, index: int, nodes: int) -> None:
        super().__init__(index, nodes)
        self.applied: Counter[str] = Counter()
        self.partition = asyncio.Event()
        self.partitions = self.unsafe = 0
        self._exposed_since: float | None = None
        self._counted = False

    async def run(self, address: str, stop_at: float, rng: random.Random) -> None:
        await asyncio.sleep(rng.uniform(0, 2))
        while time.time() < stop_at:
            # A lost stream (an RPC error, or a write after it ended): fall back, redial.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError,
                                     TimeoutError):
                await self._session(address, stop_at)
            self.guard.link_up(False)
            await asyncio.sleep(2.0 if self.partition.is_set() else rng.uniform(0.2, 1.0))
            self.partition.clear()

    async def _session(self, address: str, stop_at: float) -> None:
        async with grpc.aio.insecure_channel(
                address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            # Bounded: a Register sent as the coordinator dies or stops may never be answered,
            # and a session must not outlive the soak's deadline waiting for it.
            call = await asyncio.wait_for(self.connect(channel),
                                          max(1.0, min(CONNECT_TIMEOUT_S, stop_at - time.time())))
            self.guard.link_up(True)
            outbox: asyncio.Queue[lpb.AgentMessage] = asyncio.Queue()
            tasks = [asyncio.create_task(self._read(call, outbox)),
                     asyncio.create_task(write_outbox(call, outbox)),
                     asyncio.create_task(self._report(outbox, stop_at)),
                     asyncio.create_task(self.partition.wait())]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()  # a failed stream raises here
            finally:
                for t in tasks:
                    t.cancel()
                call.cancel()

    def answer(self, msg: lpb.CoordinatorMessage) -> pb.ApplyPlanResponse | None:
        if msg.WhichOneof("kind") == "plan":
            return self._apply(msg.plan)
        return super().answer(msg)

    def _apply(self, plan: pb.Plan) -> pb.ApplyPlanResponse:
        results = []
        for action in plan.actions:
            if action.WhichOneof("kind") == "set_power_limit":
                req = action.set_power_limit
                self.ceilings.set_power_ceilings_w({req.gpu_index: req.power_limit_w}, "operator")
                self.applied[action.action_id] += 1
            results.append(pb.ActionResult(action_id=action.action_id, ok=True, code="OK"))
        return pb.ApplyPlanResponse(plan_id=plan.plan_id, results=results, completed=True)

    def check(self, now_s: float, stalled: bool) -> None:
        """Drive the guard's deadline and count an exposure longer than GRACE_S once."""
        self.guard.tick()
        if stalled or not self.guard.exposed:
            self._exposed_since, self._counted = None, False
        elif self._exposed_since is None:
            self._exposed_since = now_s
        elif now_s - self._exposed_since > GRACE_S and not self._counted:
            self.unsafe, self._counted = self.unsafe + 1, True


def host_process(host: int, address: str, indices: list[int], nodes: int, stop_at: float,
                 seed: int, partition_every_s: float, results: Any) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))
    rng = random.Random(seed)

    async def ticker(vnodes: list[SoakNode]) -> None:
        last = time.monotonic()
        while time.time() < stop_at:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            stalled, last = now - last > STALL_S, now
            for v in vnodes:
                v.check(now, stalled)

    async def partitioner(vnodes: list[SoakNode]) -> None:
        while time.time() < stop_at:
            # Never asleep past the deadline: the host's shutdown waits for this task too.
            await asyncio.sleep(min(rng.expovariate(1 / partition_every_s),
                                    max(0.0, stop_at - time.time())))
            if time.time() >= stop_at:
                break
            victim = rng.choice(vnodes)
            if not victim.partition.is_set():
                victim.partition.set()
                victim.partitions += 1

    async def main() -> None:
        vnodes = [SoakNode(i, nodes) for i in indices]
        tasks = [asyncio.create_task(c) for c in (
            ticker(vnodes), partitioner(vnodes),
            *(v.run(address, stop_at, random.Random(seed + i))
              for i, v in zip(indices, vnodes, strict=True)))]
        # Bounded: a session stuck in a call past the deadline is cancelled, not waited for.
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, stop_at - time.time())
                                           + HOST_GRACE_S)
        for t in pending:
            t.cancel()
        errors = [repr(t.exception()) for t in done if not t.cancelled() and t.exception()]
        # The result goes out before the loop's teardown, which a wedged channel could hold up.
        results.put({"host": host, "applied": sum((v.applied for v in vnodes), Counter()),
                     "partitions": sum(v.partitions for v in vnodes),
                     "unsafe": sum(v.unsafe for v in vnodes), "stuck": len(pending),
                     "errors": errors})
        await asyncio.wait(pending, timeout=5.0)

    asyncio.run(main())


# ---------------------------------------------------------------- the soak (main process)


class Coordinator:
    """The coordinator subprocess, killed and restarted on the same database and port."""

    def __init__(self, workdir: Path, nodes: int) -> None:
        self.workdir = workdir
        (workdir / "topology.yaml").write_text(yaml.safe_dump(
            topology(nodes, HOST_OTHER_W + GPUS * 700.0)))
        self.address = local_address()
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        self.proc = start_coordinator(
            self.workdir, "coordinator", "--listen", self.address,
            "--topology", str(self.workdir / "topology.yaml"), "--lease-ttl-s", "30",
            "--log-level", "error", "--emergency-prearm-interval-s", "5",
            "--emergency-reissue-after-s", "3", "--emergency-clear-step-s", "0.5")

    def kill_and_restart(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.kills += 1
        time.sleep(1.0)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            stop_coordinators([self.proc], timeout_s=20)


class Clients:
    """Admin and emergency stubs on one channel, with the request counters."""

    def __init__(self, address: str, rows: list[str], node_ids: list[str],
                 rng: random.Random) -> None:
        self.channel = grpc.insecure_channel(address)
        self.admin = cpb_grpc.CoordinatorStub(self.channel)
        self.em = epb_grpc.EmergencyStub(self.channel)
        self.rows, self.node_ids, self.rng = rows, node_ids, rng
        self.counts: Counter[str] = Counter()
        self.acked: dict[str, str] = {}  # action id -> node id
        self.lock = threading.Lock()

    def bump(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def bad_request(self, kind: str) -> Callable[[], object]:
        node = self.rng.choice(self.node_ids)

        def power(node_id: str, gpu: int, watts: float) -> Callable[[], object]:
            return lambda: self.admin.SetPowerLimit(cpb.NodeSetPowerLimitRequest(
                node_id=node_id, request=pb.SetPowerLimitRequest(gpu_index=gpu,
                                                                 power_limit_w=watts)), timeout=5)

        def declare(**kw: Any) -> Callable[[], object]:
            return lambda: self.em.DeclareEmergency(epb.DeclareEmergencyRequest(
                source="soak-bad", **kw), timeout=5)

        return {
            "unknown_node": power("no-such-node", 0, 400.0),
            "nan_watts": power(node, 0, math.nan),
            "huge_watts": power(node, 1, 1e9),
            "bad_gpu": power(node, 99, 400.0),
            "bad_scope": declare(scope="galaxy", name="r0", capacity_frac=0.5),
            "bad_capacity": declare(scope="row", name="r0", capacity_frac=1.5),
            "unknown_row": declare(scope="row", name="no-such-row", capacity_frac=0.5),
            "unknown_emergency": lambda: self.em.ClearEmergency(
                epb.ClearEmergencyRequest(emergency_id="no-such-emergency"), timeout=5),
        }[kind]

    def send_bad(self) -> None:
        kind = self.rng.choice(sorted(EXPECTED))
        try:
            self.bad_request(kind)()
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
            if code in UNKNOWN_OUTCOME:
                self.bump("bad_unanswered")
            elif code.name in EXPECTED[kind]:
                self.bump("refused_ok")
            else:
                self.bump("wrong_code")
                self.bump(f"wrong_code:{kind}:{code.name}")
            return
        self.bump("bad_accepted")
        self.bump(f"bad_accepted:{kind}")

    def send_good(self) -> None:
        node = self.rng.choice(self.node_ids)
        try:
            result = self.admin.SetPowerLimit(cpb.NodeSetPowerLimitRequest(
                node_id=node, request=pb.SetPowerLimitRequest(
                    gpu_index=self.rng.randrange(GPUS),
                    power_limit_w=float(self.rng.randrange(400, 701)))), timeout=10)
        except grpc.RpcError:
            self.bump("good_unanswered")  # dead coordinator, or node not (yet) connected
            return
        if result.ok:
            with self.lock:
                self.acked[result.action_id] = node
        self.bump("good_ok" if result.ok else "good_failed")


def every(stop: threading.Event, period_s: float, fn: Callable[[], None]) -> threading.Thread:
    def loop() -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            fn()
            next_at += period_s
            stop.wait(max(0.0, next_at - time.monotonic()))

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def emergency_cycle(c: Clients, stop: threading.Event) -> None:
    """Declare on a random row, hold, clear; retried across coordinator restarts."""
    while not stop.is_set():
        try:
            for e in c.em.ListEmergencies(epb.ListEmergenciesRequest(), timeout=5).emergencies:
                if e.state == "active" and e.source == "soak":
                    c.em.ClearEmergency(epb.ClearEmergencyRequest(emergency_id=e.emergency_id),
                                        timeout=10)
            c.em.DeclareEmergency(epb.DeclareEmergencyRequest(
                scope="row", name=c.rng.choice(c.rows), capacity_frac=0.75, source="soak"),
                timeout=30)
            c.bump("emergencies")
        except grpc.RpcError:
            stop.wait(1.0)
            continue
        stop.wait(8.0)
        stop.wait(4.0)  # the next cycle clears it first


def inject(kind: str, coord: Coordinator, hosts: list[Any], stopped: set[int],
           rng: random.Random) -> bool:
    if kind == "coordinator_kill":
        coord.kill_and_restart()
        return True
    running = [h for h in hosts if h.pid not in stopped and h.is_alive()]
    if not running:
        return False
    victim = rng.choice(running)
    os.kill(victim.pid, signal.SIGSTOP)
    stopped.add(victim.pid)

    def resume() -> None:
        os.kill(victim.pid, signal.SIGCONT)
        stopped.discard(victim.pid)

    threading.Timer(3.0, resume).start()
    return True


def run(nodes: int, seconds: float, processes: int, fault_every_s: float, bad_rps: float,
        seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="shapeshifter-soak-"))
    coord = Coordinator(workdir, nodes)
    coord.start()
    rows = sorted({placement(i, nodes)["row"] for i in range(nodes)})
    node_ids = [f"v{i:05d}" for i in range(nodes)]
    clients = Clients(coord.address, rows, node_ids, random.Random(seed + 1))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    stop_at = time.time() + 20 + nodes / 50 + seconds
    # Partitions share the fault rate with the main process's two kinds (one third each).
    partition_every_s = 3 * fault_every_s * processes
    hosts = [ctx.Process(target=host_process, daemon=True, args=(
        p, coord.address, list(range(p, nodes, processes)), nodes, stop_at, seed + 1000 * p,
        partition_every_s, results)) for p in range(processes)]
    stop = threading.Event()
    stopped: set[int] = set()
    faults = Counter[str]()
    try:
        for h in hosts:
            h.start()
        wait_for(lambda: _connected(clients) >= nodes, 60 + nodes / 20, "every node connected")
        threads = [every(stop, 1 / bad_rps, clients.send_bad),
                   every(stop, 0.5, clients.send_good),
                   threading.Thread(target=emergency_cycle, args=(clients, stop), daemon=True)]
        threads[-1].start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(rng.expovariate(1 / (1.5 * fault_every_s)), end - time.monotonic()))
            if time.monotonic() >= end:
                break
            if not all(h.is_alive() for h in hosts):
                raise SystemExit("bench: a process of virtual nodes died (its error is above)")
            kind = rng.choice(["coordinator_kill", "node_stop"])
            if inject(kind, coord, hosts, stopped, rng):
                faults[kind] += 1
        stop.set()
        time.sleep(3.5)  # stopped hosts resume; answers in flight land
        # The last fault may have been a kill: wait for the restarted coordinator to answer.
        for e in clients.em.ListEmergencies(epb.ListEmergenciesRequest(), timeout=60,
                                            wait_for_ready=True).emergencies:
            if e.state == "active" and e.source != "soak":
                clients.bump("foreign_emergency")  # a refused request that declared one
        hosted = collect(results, len(hosts), stop_at + COLLECT_GRACE_S)
    finally:
        stop.set()
        end_hosts(hosts)
        coord.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return tally(clients, faults, hosted, processes)


def collect(results: Any, count: int, deadline: float) -> dict[int, dict[str, Any]]:
    """The hosts' reports that arrive by the deadline, by host index (a missing one is absent)."""
    hosted: dict[int, dict[str, Any]] = {}
    while len(hosted) < count and (left := deadline - time.time()) > 0:
        with contextlib.suppress(queue.Empty):
            r = results.get(timeout=left)
            hosted[r["host"]] = r
    return hosted


def end_hosts(hosts: list[Any]) -> None:
    """Resume, terminate and reap every host, killing one that ignores SIGTERM."""
    for h in hosts:
        if h.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(h.pid, signal.SIGCONT)
        h.terminate()
    for h in hosts:
        h.join(5.0)
        if h.is_alive():
            h.kill()
            h.join(5.0)


def tally(clients: Clients, faults: Counter[str], hosted: dict[int, dict[str, Any]],
          processes: int) -> dict[str, int]:
    """The figures; actions acked for nodes of a host that did not report are not judged."""
    reports = list(hosted.values())
    applied: Counter[str] = sum((h["applied"] for h in reports), Counter())
    faults["partition"] = sum(h["partitions"] for h in reports)
    judged = {a for a, node in clients.acked.items() if int(node[1:]) % processes in hosted}
    c = clients.counts
    out = {"faults": sum(faults.values()), "refused_ok": c["refused_ok"],
           "unsafe": c["bad_accepted"] + c["foreign_emergency"] + sum(h["unsafe"] for h in reports),
           "lost": len(judged - set(applied)),
           "doubled": sum(1 for n in applied.values() if n > 1),
           "missing_hosts": processes - len(hosted),
           "stuck_sessions": sum(h["stuck"] for h in reports)}
    detail = {**{f"fault_{k}": v for k, v in sorted(faults.items())}, **dict(sorted(c.items())),
              "exposed_episodes": sum(h["unsafe"] for h in reports), "acked_actions":
              len(clients.acked), "applied_actions": len(applied)}
    print(" ".join(f"{k}={v}" for k, v in detail.items()), file=sys.stderr)
    for p in range(processes):
        if p not in hosted:
            print(f"bench: host process {p} sent no report by the deadline", file=sys.stderr)
        elif hosted[p]["stuck"] or hosted[p]["errors"]:
            print(f"bench: host process {p}: {hosted[p]['stuck']} task(s) cancelled at the "
                  f"deadline, errors {hosted[p]['errors']}", file=sys.stderr)
    return out


def _connected(c: Clients) -> int:
    try:
        return c.admin.GetIngestStats(cpb.GetIngestStatsRequest(), timeout=5).connected_agents
    except grpc.RpcError:
        return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=200)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--processes", type=int, default=4, help="processes hosting virtual nodes")
    p.add_argument("--fault-every-s", type=float, default=5.0, help="mean time between faults")
    p.add_argument("--bad-rps", type=float, default=50.0, help="bad requests per second")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    for name in ("nodes", "processes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seconds <= 0 or args.fault_every_s <= 0 or args.bad_rps <= 0:
        p.error("--seconds, --fault-every-s and --bad-rps must be positive")
    r = run(args.nodes, args.seconds, min(args.processes, args.nodes), args.fault_every_s,
            args.bad_rps, args.seed)
    print(" ".join(f"{k}={v}" for k, v in r.items()))
    return 1 if r["missing_hosts"] or r["stuck_sessions"] else 0


if __name__ == "__main__":
    sys.exit(main())
