"""AgentLink servicer: one bidirectional stream per agent. Translation only; logic is in core."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from coordinator.core import CoordinatorCore
from coordinator.registry import NodeRecord
from coordinator.security import check_agent_node
from coordinator.session import AgentSession
from shapeshifter.api.v1 import link_pb2, link_pb2_grpc
from shapeshifter.common import errors
from shapeshifter.net.authz import Principal

Msg = link_pb2.CoordinatorMessage


class AgentLinkServicer(link_pb2_grpc.AgentLinkServicer):
    def __init__(self, core: CoordinatorCore,
                 identify: Callable[[Any], Principal | None] = lambda _context: None) -> None:
        """identify: the authenticated caller (coordinator.security.caller); None: auth off."""
        self._core = core
        self._identify = identify
        self._log = structlog.get_logger().bind(component="link")
        self.connected = 0

    async def Connect(self, request_iterator: AsyncIterator[link_pb2.AgentMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[Msg]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "register":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first message on AgentLink.Connect must be a Register")
        session = AgentSession(first.register.node_id)
        try:
            check_agent_node(self._identify(context), first.register.node_id)
            rec, registered = self._core.register(first.register, session)
        except errors.DomainError as err:
            await context.abort(errors.grpc_code(err), str(err))
        self.connected += 1
        reader = asyncio.create_task(self._read(rec, session, request_iterator))
        try:
            yield Msg(registered=registered)
            while (msg := await session.outbox.get()) is not None:
                yield msg
                session.outbox.task_done()  # resumed after the write: AgentSession.written()
        finally:
            self.connected -= 1
            reader.cancel()
            self._core.disconnect(rec, session)

    async def _read(self, rec: NodeRecord, session: AgentSession,
                    requests: AsyncIterator[link_pb2.AgentMessage]) -> None:
        """Feed the agent's messages to the core; closing the session ends the writer too."""
        try:
            async for msg in requests:
                kind = msg.WhichOneof("kind")
                if kind == "report":
                    lease = self._core.report(rec, msg.report)
                    if lease is not None:
                        session.send(Msg(lease=lease))
                elif kind == "plan_result":
                    self._core.plan_result(rec, session, msg.plan_result)
                else:
                    self._log.warning("link_unexpected_message", node_id=rec.node_id, kind=kind)
        except grpc.aio.AioRpcError as err:
            self._log.info("link_stream_ended", node_id=rec.node_id, code=err.code().name)
        except errors.DomainError as err:  # a closed session refusing a lease: stream is ending
            self._log.info("link_read_stopped", node_id=rec.node_id, reason=str(err))
        except Exception:
            self._log.exception("link_read_failed", node_id=rec.node_id)
        finally:
            session.close()
