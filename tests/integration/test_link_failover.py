"""The agent link against several coordinator replicas: fake AgentLink servicers on real grpc.aio
servers on 127.0.0.1 (own event loop, own thread) and a real CoordinatorLink.

The reconnect backoff is set long (RECONNECT_INITIAL_S) so that any backoff sleep on the way to
the leader would make a test miss its FAST_S deadline."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import structlog

from nodeagent.actuation import plan as act
from nodeagent.rpc.link import CoordinatorLink, LinkSettings
from nodeagent.safety.lease import LeaseKeeper
from shapectl.commands.demo import free_port
from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import link_pb2 as lpb
from shapeshifter.api.v1 import link_pb2_grpc as lpb_grpc
from shapeshifter.common.clock import SystemClock
from shapeshifter.net.transport import LEADER_METADATA_KEY, leader_hint
from tests.conftest import poll

RECONNECT_INITIAL_S = 5.0
FAST_S = 2.5  # well under one backoff step
SILENT_TTL_S = 1.0
# Dials of one address in one cycle: 1, plus redials when grpc.aio loses a refusal's status
# (grpc/grpc#36066; nodeagent.rpc.link.StatusLost).
MAX_DIALS = 3
Msg = lpb.CoordinatorMessage


def lease(epoch: int, ttl_s: float) -> Msg:
    return Msg(lease=pb.Lease(lease_id=f"n1/e{epoch}", epoch=epoch, ttl_s=ttl_s,
                              gpu_power_limit_w={0: 700.0}))


class Replica(lpb_grpc.AgentLinkServicer):
    def __init__(self) -> None:
        self.connects = 0
        self.registered_at: list[float] = []  # monotonic time of each Registered sent

    async def _registered(self, requests: AsyncIterator[lpb.AgentMessage], epoch: int) -> Msg:
        first = await anext(aiter(requests))
        assert first.WhichOneof("kind") == "register"
        self.registered_at.append(time.monotonic())
        return Msg(registered=lpb.Registered(node_id=first.register.node_id, epoch=epoch,
                                             topology_known=True))


class Leader(Replica):
    """Registers the agent and answers every report with a lease (like the real one, renewed)."""

    async def Connect(self, requests: AsyncIterator[lpb.AgentMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[Msg]:
        self.connects += 1
        yield await self._registered(requests, epoch=2)
        async for msg in requests:
            if msg.WhichOneof("kind") == "report":
                yield lease(2, 10.0)


class Follower(Replica):
    """Refuses like a replica that is not the leader; names the leader when it knows it."""

    def __init__(self, leader: str | None) -> None:
        super().__init__()
        self.leader = leader

    async def Connect(self, requests: AsyncIterator[lpb.AgentMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[Msg]:
        self.connects += 1
        if self.leader is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "not the leader: no leader elected yet")
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"not the leader: the leader is at {self.leader}",
                            trailing_metadata=((LEADER_METADATA_KEY, self.leader),))
        yield Msg()  # not reached; an async generator like the real servicer


class Silent(Replica):
    """Registers the agent, grants one short lease, then stops answering (a SIGSTOPped process:
    the connection stays open, nothing comes); later calls get no answer at all."""

    def __init__(self) -> None:
        super().__init__()
        self.silent_since = 0.0

    async def Connect(self, requests: AsyncIterator[lpb.AgentMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[Msg]:
        self.connects += 1
        if self.connects == 1:
            yield await self._registered(requests, epoch=1)
            yield lease(1, SILENT_TTL_S)
            self.silent_since = time.monotonic()
        await asyncio.Event().wait()  # until the agent gives up on the call


class Replicas:
    """grpc.aio servers on one background event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[grpc.aio.Server] = []

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def add(self, servicer: Replica) -> str:
        async def start() -> int:
            server = grpc.aio.server()
            lpb_grpc.add_AgentLinkServicer_to_server(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self.servers.append(server)
            return port

        return f"127.0.0.1:{self._run(start())}"

    def stop(self) -> None:
        async def stop() -> None:
            await asyncio.gather(*(s.stop(grace=None) for s in self.servers))

        self._run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def replicas() -> Iterator[Replicas]:
    r = Replicas()
    yield r
    r.stop()


class FakeActuator:
    def apply_plan(self, plan: act.NodePlan) -> act.NodePlanOutcome:
        raise AssertionError("no plans in these tests")

    def set_power_ceilings_w(self, ceilings: dict[int, float | None],
                             source: str) -> dict[int, bool]:
        return dict.fromkeys(ceilings, True)


def snapshot() -> pb.Node:
    gpus = [pb.Gpu(index=0, power_limit_min_w=200, power_limit_max_w=700, power_limit_w=700)]
    return pb.Node(node_id="n1", hostname="h1", backend="sim", software_version="test", gpus=gpus)


@pytest.fixture
def start_link() -> Iterator[Any]:
    links: list[CoordinatorLink] = []

    def start(*addresses: str) -> tuple[CoordinatorLink, LeaseKeeper]:
        log = structlog.get_logger()
        keeper = LeaseKeeper(FakeActuator(), {0: 300.0}, SystemClock(), log)
        settings = LinkSettings(addresses=addresses, report_interval_s=0.1,
                                reconnect_initial_s=RECONNECT_INITIAL_S, reconnect_max_s=10.0,
                                lease_tick_s=0.05)
        link = CoordinatorLink(settings, snapshot, FakeActuator(), keeper, SystemClock(), log)
        links.append(link)
        link.start()
        return link, keeper

    yield start
    for link in links:
        link.stop()


def test_follows_the_leader_hint_at_once(replicas: Replicas, start_link: Any) -> None:
    leader = Leader()
    leader_at = replicas.add(leader)
    follower, unsure = Follower(leader_at), Follower(None)
    # Round-robin would dial `unsure` second; following the hint skips it.
    link, keeper = start_link(replicas.add(follower), replicas.add(unsure), leader_at)
    poll(lambda: leader.registered_at, timeout_s=FAST_S)
    assert link.connected and link.address == leader_at
    assert 1 <= follower.connects <= MAX_DIALS and unsure.connects == 0
    poll(lambda: keeper.state == "leased", timeout_s=FAST_S)


def test_dead_address_is_skipped_without_backoff(replicas: Replicas, start_link: Any) -> None:
    leader = Leader()
    leader_at = replicas.add(leader)
    link, keeper = start_link(f"127.0.0.1:{free_port()}", leader_at)  # nothing listens there
    poll(lambda: leader.registered_at, timeout_s=FAST_S)
    assert link.connected and link.address == leader_at
    poll(lambda: keeper.state == "leased", timeout_s=FAST_S)


def test_replicas_naming_each_other_do_not_hide_the_leader(
    replicas: Replicas, start_link: Any
) -> None:
    """Two confused followers naming each other the leader: each is dialled once per cycle, and
    the real leader after them, at once."""
    leader = Leader()
    first, second = Follower(None), Follower(None)
    first_at, second_at = replicas.add(first), replicas.add(second)
    first.leader, second.leader = second_at, first_at
    link, _ = start_link(first_at, second_at, leader_at := replicas.add(leader))
    poll(lambda: leader.registered_at, timeout_s=FAST_S)
    assert link.address == leader_at
    assert 1 <= first.connects <= MAX_DIALS and 1 <= second.connects <= MAX_DIALS


def test_a_cycle_without_leader_backs_off(replicas: Replicas, start_link: Any) -> None:
    """No replica registers the agent: one cycle of dials, then the backoff, not a busy loop."""
    first, second = Follower(None), Follower(None)
    first_at, second_at = replicas.add(first), replicas.add(second)
    first.leader, second.leader = second_at, first_at
    link, _ = start_link(first_at, second_at)
    poll(lambda: first.connects and second.connects, timeout_s=FAST_S)
    time.sleep(1.0)  # well inside the first backoff step (RECONNECT_INITIAL_S)
    assert 1 <= first.connects <= MAX_DIALS and 1 <= second.connects <= MAX_DIALS
    dialled = first.connects + second.connects
    time.sleep(1.0)
    assert first.connects + second.connects == dialled
    assert not link.connected


def test_silent_coordinator_is_left_for_another(replicas: Replicas, start_link: Any) -> None:
    silent, leader = Silent(), Leader()
    silent_at, leader_at = replicas.add(silent), replicas.add(leader)
    link, keeper = start_link(silent_at, leader_at)
    poll(lambda: silent.silent_since, timeout_s=FAST_S)
    poll(lambda: leader.registered_at, timeout_s=SILENT_TTL_S + FAST_S)
    waited_s = leader.registered_at[0] - silent.silent_since
    # Not before the lease's TTL of silence, and no backoff after it.
    assert SILENT_TTL_S - 0.1 <= waited_s < SILENT_TTL_S + FAST_S
    assert link.connected and link.address == leader_at
    assert silent.connects == 1  # the redial went to the next replica, not the silent one
    poll(lambda: keeper.state == "leased" and _lease_epoch(keeper) == 2, timeout_s=FAST_S)


def _lease_epoch(keeper: LeaseKeeper) -> int | None:
    lease_view = keeper.view().lease
    return lease_view.epoch if lease_view else None


def test_link_settings_keep_the_single_address_form() -> None:
    assert LinkSettings("127.0.0.1:1", report_interval_s=2.0).addresses == ("127.0.0.1:1",)
    both = LinkSettings(addresses=["a:1", "b:2"])  # type: ignore[arg-type]  # a list is accepted
    assert (both.address, both.addresses) == ("a:1", ("a:1", "b:2"))
    with pytest.raises(ValueError, match="at least one"):
        LinkSettings()
    with pytest.raises(ValueError, match="not one of"):
        LinkSettings("c:3", addresses=("a:1",))


def test_leader_hint_only_from_unavailable() -> None:
    trailer = grpc.aio.Metadata((LEADER_METADATA_KEY, "b:2"))
    refused = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), trailer)
    assert leader_hint(refused) == "b:2"
    other = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), trailer)
    assert leader_hint(other) is None
    bare = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                grpc.aio.Metadata())
    assert leader_hint(bare) is None
