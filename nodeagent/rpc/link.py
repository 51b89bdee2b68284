"""The agent's end of the coordinator link: one long-lived AgentLink.Connect stream.

The agent dials out, sends Register, then a NodeReport every report interval. It receives
Registered, Leases (handed to the LeaseKeeper) and Plans (run in order on the actuator; each
answered with a plan_result on the same stream). The lease ticker runs whether or not the stream
is up, so an unreachable coordinator leads to the fail-safe caps when the lease runs out.

Several coordinator replicas (HA): only the elected leader serves; the others refuse with
UNAVAILABLE and name the leader in the trailing metadata key ``shapeshifter-leader``. The link
dials the leader hint when it has one (at once, no backoff), else the next address round-robin.
One "cycle" tries every address once (hints in between); only a cycle in which no address
registered the agent is retried with exponential backoff and jitter (tenacity), and the backoff
restarts after a session that got registered, so a failover does not leave the agent sleeping.

A coordinator that stops without closing its connections (SIGSTOP, a hung host) is detected by
silence: a coordinator renews the lease every third of its TTL, so nothing read for longer than
the last lease's TTL (before any lease: max(3 report intervals, 5 s)) ends the session and the
link redials another address.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from nodeagent.actuation.plan import NodePlan, NodePlanOutcome, failed_outcome
from nodeagent.rpc import codec
from nodeagent.safety.emergency import EmergencyGuard
from nodeagent.safety.lease import LeaseKeeper
from shapeshifter.api.v1 import agent_pb2, link_pb2_grpc
from shapeshifter.api.v1 import link_pb2 as lpb
from shapeshifter.common.clock import Clock
from shapeshifter.common.errors import DomainError
from shapeshifter.net.streams import (
    RETRIED,
    LinkError,
    Redial,
    SessionEnded,
    describe,
    open_channel,
    redial_forever,
    run_session,
    write_forever,
)
from shapeshifter.net.transport import leader_hint


class PlanActuator(Protocol):
    def apply_plan(self, plan: NodePlan) -> NodePlanOutcome: ...


SILENCE_BEFORE_LEASE_MIN_S = 5.0


class StatusLost(LinkError):
    """The coordinator ended the call before Register was written, and grpc.aio replaced its
    status (a follower's refusal, with the leader hint) by INTERNAL "Internal error from Core"
    (grpc/grpc#36066). Not an answer: the address is redialled at once."""


_LOST_STATUS_DETAILS = "Internal error from Core"  # grpc.aio's stand-in for a lost status
_LOST_STATUS_REDIALS = 2  # per dial


@dataclass(frozen=True)
class LinkSettings:
    """addresses: every coordinator replica, in the order they are tried. address: a single
    coordinator (callers from before HA); after construction it is addresses[0] when not given,
    and addresses is (address,) when not given."""

    address: str = ""
    report_interval_s: float = 1.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 10.0
    lease_tick_s: float = 0.1
    credentials: grpc.ChannelCredentials | None = None  # mTLS; None: plaintext
    addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        addresses = tuple(self.addresses) or ((self.address,) if self.address else ())
        if not addresses:
            raise ValueError("LinkSettings needs at least one coordinator address")
        if self.address and self.address not in addresses:
            raise ValueError(f"address {self.address!r} is not one of addresses {addresses!r}")
        object.__setattr__(self, "addresses", addresses)  # frozen: normalise once, here
        object.__setattr__(self, "address", self.address or addresses[0])

    @property
    def silence_before_lease_s(self) -> float:
        """How long a coordinator may send nothing before its first lease of a session."""
        return max(3 * self.report_interval_s, SILENCE_BEFORE_LEASE_MIN_S)


def plan_outcome(actuator: PlanActuator, plan: agent_pb2.Plan) -> NodePlanOutcome:
    """Apply a plan from the stream; a refused plan (stale epoch, bad action) becomes an outcome."""
    try:
        return actuator.apply_plan(codec.plan_from_pb(plan))
    except DomainError as err:
        first_id = plan.actions[0].action_id if plan.actions else ""
        return NodePlanOutcome(plan.plan_id, (failed_outcome(first_id, err),), completed=False)


def run_plan(actuator: PlanActuator, plan: agent_pb2.Plan) -> agent_pb2.ApplyPlanResponse:
    """plan_outcome as the ApplyPlanResponse the coordinator reads."""
    return codec.plan_outcome_to_pb(plan_outcome(actuator, plan))


class CoordinatorLink:
    def __init__(
        self,
        settings: LinkSettings,
        snapshot: Callable[[], agent_pb2.Node],
        actuator: PlanActuator,
        lease: LeaseKeeper,
        clock: Clock,
        log: Any,
        on_change: Callable[[], None] = lambda: None,
        emergency: EmergencyGuard | None = None,
        on_epoch: Callable[[int], None] = lambda _epoch: None,
    ) -> None:
        """on_change: called after each plan ran (e.g. the sampler's mark_changed, so that the
        next snapshot and report show the effect). emergency: emergency caps and the pre-armed
        fallback (applied at once when the stream is lost during an emergency). on_epoch: called
        with each registration's epoch (the agent's fences: plans, leases, emergency messages)."""
        self._emergency = emergency
        self._s = settings
        self._snapshot = snapshot
        self._on_change = on_change
        self._on_epoch = on_epoch
        self._actuator = actuator
        self._lease = lease
        self._clock = clock
        self._log = log
        self._seq = 0
        self.address = settings.addresses[0]  # the coordinator dialled last (or being dialled)
        self._next_index = 0  # round-robin position in settings.addresses
        self._leader_hint: str | None = None  # from a follower's refusal; dialled next, once
        self._silence_limit_s = settings.silence_before_lease_s
        self.connected = False
        self.epoch = 0
        self.topology_known: bool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- thread wrapper

    def start(self) -> None:
        """Run the link on its own thread with its own event loop."""
        ready = threading.Event()

        def main() -> None:
            async def body() -> None:
                self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
                ready.set()
                await self.run(self._stop)

            asyncio.run(body())

        self._thread = threading.Thread(target=main, name="coordinator-link", daemon=True)
        self._thread.start()
        ready.wait(5.0)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ---------------------------------------------------------------- the link

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [
            asyncio.create_task(self._lease_ticker()),
            asyncio.create_task(self._connect_forever()),
        ]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _lease_ticker(self) -> None:
        while True:
            await asyncio.to_thread(self._lease.tick)
            if self._emergency is not None:
                await asyncio.to_thread(self._emergency.tick)
            await asyncio.sleep(self._s.lease_tick_s)

    async def _connect_forever(self) -> None:
        redial = Redial(self._s.reconnect_initial_s, self._s.reconnect_max_s,
                        "coordinator unreachable; retrying", "coordinator link lost; reconnecting")
        await redial_forever(self._cycle, redial, self._log, lambda: {"address": self.address})

    async def _cycle(self) -> None:
        """Dial each address once (a leader hint first, when there is one) until one registers
        the agent. Returns only by SessionEnded (a registered session ended); raises LinkError
        when none did, which the caller retries with backoff. Once per address and cycle, so two
        replicas naming each other the leader cannot keep the agent from the others."""
        failures: list[str] = []
        tried: set[str] = set()
        while (address := self._pick_address(tried)) is not None:
            tried.add(address)
            try:
                await self._dial(address)
            except RETRIED as err:
                failures.append(f"{address}: {describe(err)}")
                self._follow_leader(err, address)
        raise LinkError("; ".join(failures))

    def _pick_address(self, tried: set[str]) -> str | None:
        """The leader hint (used once), else the next address round-robin; None when every
        address has been tried in this cycle."""
        hint, self._leader_hint = self._leader_hint, None
        if hint is not None and hint not in tried:
            self.address = hint
            return hint
        for _ in self._s.addresses:
            candidate = self._s.addresses[self._next_index]
            self._next_index = (self._next_index + 1) % len(self._s.addresses)
            if candidate not in tried:
                self.address = candidate
                return candidate
        return None

    async def _dial(self, address: str) -> None:
        """One session with address; redialled at once when grpc.aio lost its answer."""
        for _ in range(_LOST_STATUS_REDIALS):
            try:
                return await self._session(address)
            except StatusLost:
                continue
        return await self._session(address)

    def _follow_leader(self, err: BaseException, address: str) -> None:
        """Remember the leader a follower named. Only configured addresses are followed: the
        configuration (and its plaintext check) decides where this agent may connect."""
        hint = leader_hint(err)
        if hint is None or hint == address:
            return
        if hint not in self._s.addresses:
            self._log.warning("leader hint is not a configured coordinator address; ignored",
                              address=address, leader=hint, addresses=list(self._s.addresses))
            return
        self._log.info("coordinator is not the leader; following", address=address, leader=hint)
        self._leader_hint = hint

    async def _session(self, address: str) -> None:
        self._silence_limit_s = self._s.silence_before_lease_s  # until this session's first lease
        async with open_channel(address, self._s.credentials) as channel:
            call = link_pb2_grpc.AgentLinkStub(channel).Connect()
            first = await self._register_on(call)
            self._on_registered(first.registered, address)
            try:
                await self._exchange(call)
            except RETRIED as err:
                self._follow_leader(err, address)  # a leader that stepped down may name the next
                raise SessionEnded(describe(err)) from err
            finally:
                self.connected = False
                if self._emergency is not None:
                    self._emergency.link_up(False)

    async def _register_on(self, call: Any) -> lpb.CoordinatorMessage:
        """Send Register and read Registered. Bounded: a stopped coordinator still accepts TCP
        connections, and the call would otherwise wait for it forever."""
        try:
            async with asyncio.timeout(self._silence_limit_s):
                await self._send_register(call)
                first = await call.read()
        except TimeoutError:
            raise LinkError(
                f"coordinator silent for {self._silence_limit_s:g} s during registration"
            ) from None
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "registered":
            raise LinkError("the coordinator did not answer the registration")
        return first

    async def _send_register(self, call: Any) -> None:
        """Write Register. A refusing coordinator (a follower) may end the call before that;
        then read() raises its status, unless grpc.aio lost it (StatusLost)."""
        try:
            await call.write(codec.register_message(self._snapshot(), self._s.report_interval_s))
        except asyncio.InvalidStateError:
            return  # the call had ended: read() raises its status
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.INTERNAL and err.details() == _LOST_STATUS_DETAILS:
                raise StatusLost(
                    "the coordinator ended the call before Register was sent; status lost"
                ) from err
            raise

    def _on_registered(self, reg: lpb.Registered, address: str) -> None:
        self.connected, self.epoch, self.topology_known = True, reg.epoch, reg.topology_known
        self._on_epoch(reg.epoch)  # fences older leaders' plans, leases and emergency messages
        # Redial after this session starts with the next replica, not this one again (it may be
        # the one that went silent).
        if address in self._s.addresses:
            self._next_index = (self._s.addresses.index(address) + 1) % len(self._s.addresses)
        if self._emergency is not None:
            self._emergency.link_up(True)
        self._log.info(
            "registered with coordinator",
            address=address,
            epoch=reg.epoch,
            topology_known=reg.topology_known,
        )
        if not reg.topology_known:
            self._log.warning("coordinator does not know this node's labels", note=reg.message)

    async def _exchange(self, call: Any) -> None:
        """Run writer, reporter, reader and plan worker until one of them ends the session."""
        outbox: asyncio.Queue[lpb.AgentMessage] = asyncio.Queue()
        plans: asyncio.Queue[agent_pb2.Plan] = asyncio.Queue()
        await run_session(call, write_forever(call, outbox), self._report(outbox),
                          self._read(call, plans, outbox), self._run_plans(plans, outbox),
                          stopped=LinkError("the link stopped"))

    async def _report(self, outbox: asyncio.Queue[lpb.AgentMessage]) -> None:
        while True:
            self._seq += 1
            outbox.put_nowait(codec.report_message(self._snapshot(), self._seq, self._clock.time()))
            await asyncio.sleep(self._s.report_interval_s)

    async def _read(self, call: Any, plans: asyncio.Queue[agent_pb2.Plan],
                    outbox: asyncio.Queue[lpb.AgentMessage]) -> None:
        while (msg := await self._read_within_limit(call)) is not grpc.aio.EOF:
            kind = msg.WhichOneof("kind")
            if kind == "lease":
                self._silence_limit_s = self._silence_after_lease_s(msg.lease)
                await asyncio.to_thread(self._lease.grant, msg.lease)
            elif kind == "plan":
                plans.put_nowait(msg.plan)
            elif kind in ("emergency", "prearm") and self._emergency is not None:
                # At once, not queued behind plans (an instance start can take a minute).
                handle = (self._emergency.directive if kind == "emergency"
                          else self._emergency.prearm)
                answer = await asyncio.to_thread(handle, getattr(msg, kind))
                self._on_change()
                outbox.put_nowait(codec.plan_result_message(answer))
            else:
                self._log.warning("unexpected message from coordinator", kind=kind)
        raise LinkError("the coordinator closed the stream")

    async def _read_within_limit(self, call: Any) -> Any:
        """The next message, or LinkError when the coordinator has been silent for too long: a
        stopped coordinator keeps its TCP connection open, so the read alone would never end."""
        try:
            async with asyncio.timeout(self._silence_limit_s):
                return await call.read()
        except TimeoutError:
            raise LinkError(f"coordinator silent for {self._silence_limit_s:g} s") from None

    def _silence_after_lease_s(self, lease: agent_pb2.Lease) -> float:
        """The lease's TTL: three renewals (every TTL/3) missed. Leases are renewed in answer to
        reports, so they come no more often than reports; hence the 3-report floor."""
        if lease.ttl_s <= 0:
            return self._s.silence_before_lease_s
        return max(lease.ttl_s, 3 * self._s.report_interval_s)

    async def _run_plans(
        self, plans: asyncio.Queue[agent_pb2.Plan], outbox: asyncio.Queue[lpb.AgentMessage]
    ) -> None:
        """Plans run one at a time, in arrival order, off the event loop."""
        while True:
            plan = await plans.get()
            result = await asyncio.to_thread(plan_outcome, self._actuator, plan)
            self._on_change()
            self._log.info(
                "plan from coordinator",
                plan_id=plan.plan_id,
                epoch=plan.epoch,
                completed=result.completed,
            )
            outbox.put_nowait(codec.plan_result_message(result))

