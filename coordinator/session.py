"""One connected agent's stream, seen from the coordinator: an outbox and pending plan answers."""

from __future__ import annotations

import asyncio

from coordinator.rpc import agent_codec
from shapeshifter.api.v1 import agent_pb2, link_pb2
from shapeshifter.common.errors import Unavailable


class AgentSession:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.outbox: asyncio.Queue[link_pb2.CoordinatorMessage | None] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[agent_pb2.ApplyPlanResponse]] = {}
        self.closed = False

    def send(self, msg: link_pb2.CoordinatorMessage) -> None:
        if self.closed:
            raise Unavailable(f"node {self.node_id} is not connected", field="node_id")
        self.outbox.put_nowait(msg)

    async def written(self, timeout_s: float) -> bool:
        """Wait until everything queued so far was handed to the transport (False on timeout)."""
        try:
            await asyncio.wait_for(self.outbox.join(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def apply_plan(self, plan: agent_pb2.Plan,
                         timeout_s: float) -> agent_pb2.ApplyPlanResponse:
        """Send a plan over the stream and wait for the agent's plan_result."""
        fut = asyncio.get_running_loop().create_future()
        self._pending[plan.plan_id] = fut
        try:
            self.send(agent_codec.plan_message(plan))
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError as e:
            raise Unavailable(
                f"node {self.node_id} did not answer plan {plan.plan_id} within {timeout_s:g} s",
                field="node_id",
            ) from e
        finally:
            self._pending.pop(plan.plan_id, None)

    async def request(self, msg: link_pb2.CoordinatorMessage, request_id: str,
                      timeout_s: float) -> agent_pb2.ApplyPlanResponse:
        """Send any message answered by a plan_result with plan_id=request_id (emergency caps,
        pre-armed caps) and wait for it. The message is queued before the first await."""
        fut = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        try:
            self.send(msg)
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError as e:
            raise Unavailable(
                f"node {self.node_id} did not answer {request_id} within {timeout_s:g} s",
                field="node_id",
            ) from e
        finally:
            self._pending.pop(request_id, None)

    def resolve(self, result: agent_pb2.ApplyPlanResponse) -> bool:
        """Hand a plan_result to its waiter; False when nobody waits for it (late or unknown)."""
        fut = self._pending.get(result.plan_id)
        if fut is None or fut.done():
            return False
        fut.set_result(result)
        return True

    def close(self) -> None:
        """The stream ended: fail every waiter and stop the writer."""
        self.closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(
                    Unavailable(f"node {self.node_id} disconnected", field="node_id")
                )
        self.outbox.put_nowait(None)
