"""The agent link in-process: a real coordinator gRPC server (own event loop, own thread) and a
CoordinatorLink against a fake actuator, over a real localhost stream."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

from coordinator.core import CoordinatorCore
from coordinator.daemon import build_server
from coordinator.leases import LeasePolicy
from coordinator.store.sqlite import Store
from nodeagent.actuation import plan as act
from nodeagent.rpc.link import CoordinatorLink, LinkSettings
from nodeagent.safety.lease import LeaseKeeper
from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.api.v1 import coordinator_pb2_grpc as cpb_grpc
from shapeshifter.common.clock import SystemClock
from shapeshifter.common.errors import FailedPrecondition
from shapeshifter.topology import parse_topology
from tests.conftest import poll

TOPOLOGY = """\
version: 1
sites:
  - name: s1
    aisles: [{name: a1, aisle_airflow_cfm: 1000}]
    rows: [{name: r1, row_power_limit_w: 5000, racks: [{name: k1, aisle: a1}]}]
"""
TTL_S = 0.6


class FakeActuator:
    """Records plans and ceilings; answers plans as told."""

    def __init__(self) -> None:
        self.plans: list[act.NodePlan] = []
        self.ceilings: dict[str, dict[int, float | None]] = {}
        self.answer: Any = None  # an ActionOutcome, an exception, or None for ok
        self.delay_s = 0.0

    def apply_plan(self, plan: act.NodePlan) -> act.NodePlanOutcome:
        self.plans.append(plan)
        time.sleep(self.delay_s)
        if isinstance(self.answer, Exception):
            raise self.answer
        outcome = self.answer or act.ActionOutcome(plan.actions[0].action_id, True, True, "OK",
                                                   "", 0.001)
        return act.NodePlanOutcome(plan.plan_id, (outcome,), outcome.ok)

    def set_power_ceilings_w(self, ceilings: dict[int, float | None],
                             source: str) -> dict[int, bool]:
        self.ceilings.setdefault(source, {}).update(ceilings)
        return dict.fromkeys(ceilings, True)


class InProcessCoordinator:
    def __init__(self, workdir: Path, port: int = 0) -> None:
        """port: 0 for a free one; a previous coordinator's to restart it (same database)."""
        self.workdir = workdir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = port
        self.core, self.server = self._run(self._start())
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = cpb_grpc.CoordinatorStub(self.channel)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _start(self) -> tuple[CoordinatorCore, grpc.aio.Server]:
        store = Store(self.workdir / "c.db")
        core = CoordinatorCore(parse_topology(TOPOLOGY), store, SystemClock(),
                               epoch=store.bump_epoch(), lease_policy=LeasePolicy(ttl_s=TTL_S),
                               action_timeout_s=1.0)
        server, _ = await build_server(core)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        return core, server

    def stop(self) -> None:
        self.channel.close()

        async def stop() -> None:
            self.core.close_sessions()
            await self.server.stop(grace=0.5)
            self.core.store.close()

        self._run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def snapshot(labels: dict[str, str]) -> pb.Node:
    gpus = [pb.Gpu(index=i, power_limit_min_w=200, power_limit_max_w=700, power_limit_w=700,
                   supported_sm_clocks_mhz=[1980, 1000, 345]) for i in range(2)]
    return pb.Node(node_id="n1", hostname="h1", labels=labels, backend="sim",
                   software_version="test", gpus=gpus,
                   budget=pb.NodeBudget(node_power_w=1800.0, airflow_cfm=300.0))


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[InProcessCoordinator]:
    c = InProcessCoordinator(tmp_path)
    yield c
    c.stop()


def start_link(address: str, labels: dict[str, str]) -> tuple[CoordinatorLink, FakeActuator,
                                                              LeaseKeeper]:
    fake = FakeActuator()
    log = structlog.get_logger()
    keeper = LeaseKeeper(fake, {0: 300.0, 1: 300.0}, SystemClock(), log)
    settings = LinkSettings(address, report_interval_s=0.1, reconnect_initial_s=0.05,
                            reconnect_max_s=0.2, lease_tick_s=0.05)
    link = CoordinatorLink(settings, lambda: snapshot(labels), fake, keeper, SystemClock(), log)
    link.start()
    return link, fake, keeper


KNOWN = {"site": "s1", "row": "r1", "rack": "k1", "aisle": "a1"}


def set_power(stub: cpb_grpc.CoordinatorStub, watts: float) -> pb.ActionResult:
    req = cpb.NodeSetPowerLimitRequest(
        node_id="n1", request=pb.SetPowerLimitRequest(gpu_index=1, power_limit_w=watts))
    return stub.SetPowerLimit(req, timeout=5)


def test_register_report_lease_and_plan_round_trip(coordinator: InProcessCoordinator) -> None:
    link, fake, keeper = start_link(coordinator.address, KNOWN)
    try:
        poll(lambda: keeper.state == "leased")
        assert link.topology_known is True and link.epoch == coordinator.core.epoch
        assert fake.ceilings["lease"] == {0: 700.0, 1: 700.0}
        rows = coordinator.stub.GetCluster(cpb.GetClusterRequest(), timeout=5).rows
        assert rows[0].power_draw_w == 1800.0
        assert set_power(coordinator.stub, 250).ok
        plan = fake.plans[-1]
        assert plan.epoch == coordinator.core.epoch
        assert plan.actions[0].action == act.SetPowerLimit(1, 250.0)
    finally:
        link.stop()


def test_agent_refusals_come_back_as_status_codes(coordinator: InProcessCoordinator) -> None:
    link, fake, _ = start_link(coordinator.address, KNOWN)
    try:
        poll(lambda: link.connected)
        poll(lambda: coordinator.core.registry.get("n1").report is not None)
        fake.answer = act.ActionOutcome("a", False, False, "FAILED_PRECONDITION",
                                        "gpu_index=1 is in use", 0.0)
        with pytest.raises(grpc.RpcError) as e:
            set_power(coordinator.stub, 250)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "gpu_index=1 is in use" in e.value.details()
        fake.answer = FailedPrecondition("plan epoch 1 is older than the newest seen epoch 9")
        with pytest.raises(grpc.RpcError) as e:
            set_power(coordinator.stub, 260)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "older than the newest seen epoch" in e.value.details()
        fake.answer, fake.delay_s = None, 1.5  # longer than the coordinator's 1 s action timeout
        with pytest.raises(grpc.RpcError) as e:
            set_power(coordinator.stub, 270)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "did not answer" in e.value.details()
    finally:
        link.stop()


def test_unknown_labels_are_accepted_but_flagged(coordinator: InProcessCoordinator) -> None:
    link, _, keeper = start_link(coordinator.address, {**KNOWN, "rack": "k9"})
    try:
        poll(lambda: keeper.state == "leased")
        assert link.topology_known is False
        nodes = coordinator.stub.ListNodes(cpb.ListNodesRequest(), timeout=5).nodes
        assert [(n.name, n.topology_known, n.rack) for n in nodes] == [("n1", False, "k9")]
        rows = coordinator.stub.GetCluster(cpb.GetClusterRequest(), timeout=5).rows
        assert rows[0].nodes == 0 and rows[0].power_draw_w == 0.0
    finally:
        link.stop()


def test_coordinator_gone_means_failsafe_and_back_means_leased(tmp_path: Path) -> None:
    first = InProcessCoordinator(tmp_path)
    link, fake, keeper = start_link(first.address, KNOWN)
    try:
        poll(lambda: keeper.state == "leased")
        epoch = first.core.epoch
        port = first.port
        first.stop()
        poll(lambda: keeper.state == "failsafe", timeout_s=TTL_S + 5)
        assert fake.ceilings["failsafe"] == {0: 300.0, 1: 300.0}
        assert fake.ceilings["lease"] == {0: None, 1: None}
        second = InProcessCoordinator(tmp_path, port)
        try:
            poll(lambda: keeper.state == "leased", timeout_s=10)
            assert second.core.epoch == epoch + 1 and link.epoch == epoch + 1
            assert fake.ceilings["failsafe"] == {0: None, 1: None}
        finally:
            second.stop()
    finally:
        link.stop()

