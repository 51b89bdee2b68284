"""What every coordinator servicer shares: who the caller is (for the audit log), the one
DomainError -> gRPC status translation, and health + reflection for a server's services."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shapeshifter.common import errors
from shapeshifter.net.authz import Principal

ACTOR_METADATA_KEY = "x-shapeshifter-actor"
Identify = Callable[[Any], Principal | None]
T = TypeVar("T")


def actor_of(context: Any, identify: Identify) -> str:
    """The audit log's actor: the authenticated identity when auth is on (the client's claimed
    actor kept only as a note), else the claim or the peer address."""
    metadata = dict(context.invocation_metadata() or ())
    actor = str(metadata.get(ACTOR_METADATA_KEY) or context.peer())
    who = identify(context)
    return actor if who is None else f"{who.describe()}; claims {actor}"


async def answer(context: Any, fn: Callable[[], T]) -> T:
    """fn() (a synchronous domain call); a DomainError aborts the RPC with its status code."""
    try:
        return fn()
    except errors.DomainError as err:
        await context.abort(errors.grpc_code(err), str(err))
        raise  # unreachable: abort raises


async def answer_async(context: Any, fn: Callable[[], Awaitable[T]]) -> T:
    """await fn(); a DomainError aborts the RPC with its status code."""
    try:
        return await fn()
    except errors.DomainError as err:
        await context.abort(errors.grpc_code(err), str(err))
        raise  # unreachable: abort raises


async def add_health_and_reflection(server: grpc.aio.Server,
                                    names: Sequence[str]) -> health.aio.HealthServicer:
    """Health (every service in names, and "", SERVING) and reflection (names, reflection,
    health) on server; returns the health servicer (for the graceful shutdown)."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in [*names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME, health.SERVICE_NAME],
                                        server)
    return health_servicer
