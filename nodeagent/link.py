"""The agent's end of the coordinator link: one long-lived AgentLink.Connect stream.

The agent dials out, sends Register, then a NodeReport every report interval. It receives
Registered, Leases (handed to the LeaseKeeper) and Plans (run in order on the actuator; each
answered with a plan_result on the same stream). A lost stream is redialled with exponential
backoff and jitter (tenacity); the backoff restarts after a session that got registered. The
lease ticker runs whether or not the stream is up, so an unreachable coordinator leads to the
fail-safe caps when the lease runs out.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from coordinator.v1 import coordinator_pb2 as cpb
from coordinator.v1 import coordinator_pb2_grpc
from nodeagent import actuation as act
from nodeagent.clock import Clock
from nodeagent.emergency import EmergencyGuard
from nodeagent.errors import DomainError, grpc_code
from nodeagent.lease import LeaseKeeper
from nodeagent.server import plan_from_pb, plan_outcome_to_pb
from nodeagent.v1 import agent_pb2


class PlanActuator(Protocol):
    def apply_plan(self, plan: act.Plan) -> act.PlanOutcome: ...


class LinkError(Exception):
    """The stream failed before or during registration (retried with backoff)."""


class SessionEnded(Exception):
    """A registered session ended; reconnect with a fresh backoff."""


_RETRIED = (grpc.aio.AioRpcError, LinkError, OSError)


@dataclass(frozen=True)
class LinkSettings:
    address: str
    report_interval_s: float = 1.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 10.0
    lease_tick_s: float = 0.1
    credentials: grpc.ChannelCredentials | None = None  # mTLS; None: plaintext


def run_plan(actuator: PlanActuator, plan: agent_pb2.Plan) -> agent_pb2.ApplyPlanResponse:
    """Apply a plan from the stream; a refused plan (stale epoch, bad action) becomes a result."""
    try:
        return plan_outcome_to_pb(actuator.apply_plan(plan_from_pb(plan)))
    except DomainError as err:
        failed = agent_pb2.ActionResult(
            ok=False,
            code=grpc_code(err).name,
            message=str(err),
            action_id=plan.actions[0].action_id if plan.actions else "",
        )
        return agent_pb2.ApplyPlanResponse(plan_id=plan.plan_id, results=[failed], completed=False)


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
    ) -> None:
        """on_change: called after each plan ran (e.g. the sampler's mark_changed, so that the
        next snapshot and report show the effect). emergency: emergency caps and the pre-armed
        fallback (applied at once when the stream is lost during an emergency)."""
        self._emergency = emergency
        self._s = settings
        self._snapshot = snapshot
        self._on_change = on_change
        self._actuator = actuator
        self._lease = lease
        self._clock = clock
        self._log = log.bind(coordinator=settings.address)
        self._seq = 0
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
        while True:
            try:
                # Exponential up to reconnect_max_s, plus up to one initial step of jitter so
                # that agents cut off together do not redial in lockstep.
                initial_s = self._s.reconnect_initial_s
                retrying = AsyncRetrying(
                    wait=wait_exponential(multiplier=initial_s, max=self._s.reconnect_max_s)
                    + wait_random(0, initial_s),
                    retry=retry_if_exception_type(_RETRIED),
                    before_sleep=self._log_retry,
                )
                async for attempt in retrying:
                    with attempt:
                        await self._session()
            except SessionEnded as ended:
                self._log.warning("coordinator link lost; reconnecting", reason=str(ended))

    def _log_retry(self, state: Any) -> None:
        err = state.outcome.exception() if state.outcome else None
        self._log.warning(
            "coordinator unreachable; retrying",
            attempt=state.attempt_number,
            wait_s=round(state.next_action.sleep, 2) if state.next_action else None,
            error=_describe(err),
        )

    async def _session(self) -> None:
        async with self._channel() as channel:
            call = coordinator_pb2_grpc.AgentLinkStub(channel).Connect()
            await call.write(cpb.AgentMessage(register=self._register()))
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("kind") != "registered":
                raise LinkError("the coordinator did not answer the registration")
            self._on_registered(first.registered)
            try:
                await self._exchange(call)
            except _RETRIED as err:
                raise SessionEnded(_describe(err)) from err
            finally:
                self.connected = False
                if self._emergency is not None:
                    self._emergency.link_up(False)

    def _channel(self) -> grpc.aio.Channel:
        if self._s.credentials is None:
            return grpc.aio.insecure_channel(self._s.address)
        return grpc.aio.secure_channel(self._s.address, self._s.credentials)

    def _register(self) -> cpb.Register:
        node = self._snapshot()
        return cpb.Register(
            node_id=node.node_id,
            hostname=node.hostname,
            labels=node.labels,
            software_version=node.software_version,
            backend=node.backend,
            gpus=node.gpus,
            report_interval_s=self._s.report_interval_s,
        )

    def _on_registered(self, reg: cpb.Registered) -> None:
        self.connected, self.epoch, self.topology_known = True, reg.epoch, reg.topology_known
        if self._emergency is not None:
            self._emergency.link_up(True)
        self._log.info(
            "registered with coordinator", epoch=reg.epoch, topology_known=reg.topology_known
        )
        if not reg.topology_known:
            self._log.warning("coordinator does not know this node's labels", note=reg.message)

    async def _exchange(self, call: Any) -> None:
        """Run writer, reporter, reader and plan worker until one of them ends the session."""
        outbox: asyncio.Queue[cpb.AgentMessage] = asyncio.Queue()
        plans: asyncio.Queue[agent_pb2.Plan] = asyncio.Queue()
        tasks = [
            asyncio.create_task(c)
            for c in (
                self._write(call, outbox),
                self._report(outbox),
                self._read(call, plans, outbox),
                self._run_plans(plans, outbox),
            )
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # re-raise the failure that ended the session
            raise LinkError("the link stopped")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _write(self, call: Any, outbox: asyncio.Queue[cpb.AgentMessage]) -> None:
        while True:  # the one writer: gRPC allows a single outstanding write per stream
            await call.write(await outbox.get())

    async def _report(self, outbox: asyncio.Queue[cpb.AgentMessage]) -> None:
        while True:
            self._seq += 1
            report = cpb.NodeReport(
                node=self._snapshot(), seq=self._seq, sent_at_unix_s=self._clock.time()
            )
            outbox.put_nowait(cpb.AgentMessage(report=report))
            await asyncio.sleep(self._s.report_interval_s)

    async def _read(self, call: Any, plans: asyncio.Queue[agent_pb2.Plan],
                    outbox: asyncio.Queue[cpb.AgentMessage]) -> None:
        while (msg := await call.read()) is not grpc.aio.EOF:
            kind = msg.WhichOneof("kind")
            if kind == "lease":
                await asyncio.to_thread(self._lease.grant, msg.lease)
            elif kind == "plan":
                plans.put_nowait(msg.plan)
            elif kind in ("emergency", "prearm") and self._emergency is not None:
                # At once, not queued behind plans (an instance start can take a minute).
                handle = (self._emergency.directive if kind == "emergency"
                          else self._emergency.prearm)
                answer = await asyncio.to_thread(handle, getattr(msg, kind))
                self._on_change()
                outbox.put_nowait(cpb.AgentMessage(plan_result=answer))
            else:
                self._log.warning("unexpected message from coordinator", kind=kind)
        raise LinkError("the coordinator closed the stream")

    async def _run_plans(
        self, plans: asyncio.Queue[agent_pb2.Plan], outbox: asyncio.Queue[cpb.AgentMessage]
    ) -> None:
        """Plans run one at a time, in arrival order, off the event loop."""
        while True:
            plan = await plans.get()
            result = await asyncio.to_thread(run_plan, self._actuator, plan)
            self._on_change()
            self._log.info(
                "plan from coordinator",
                plan_id=plan.plan_id,
                epoch=plan.epoch,
                completed=result.completed,
            )
            outbox.put_nowait(cpb.AgentMessage(plan_result=result))


def _describe(err: BaseException | None) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err) if err else ""
