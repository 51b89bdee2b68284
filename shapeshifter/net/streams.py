"""What the long-lived gRPC streams that dial out share (agent -> coordinator in nodeagent.rpc.link,
leaf -> parent in coordinator.hierarchy.leaf): the channel, redialling with backoff, one writer
per stream, and a session that lasts until the first of its tasks ends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random


class LinkError(Exception):
    """The stream failed before or during registration (retried with backoff)."""


class SessionEnded(Exception):
    """A registered session ended; reconnect with a fresh backoff."""


RETRIED = (grpc.aio.AioRpcError, LinkError, OSError)


@dataclass(frozen=True)
class Redial:
    """Exponential backoff up to max_s, plus up to one initial step of jitter so that clients
    cut off together do not redial in lockstep. The log events name what is dialled."""

    initial_s: float
    max_s: float
    unreachable_event: str  # logged before each backoff sleep
    lost_event: str  # logged when a registered session ended


async def redial_forever(attempt: Callable[[], Awaitable[None]], redial: Redial, log: Any,
                         lost_fields: Callable[[], dict[str, Any]] = dict) -> NoReturn:
    """attempt() again and again: a failure in RETRIED is retried with backoff; SessionEnded
    (a registered session ended) restarts the backoff. lost_fields: extra fields of the
    lost_event line."""
    def log_retry(state: Any) -> None:
        err = state.outcome.exception() if state.outcome else None
        log.warning(redial.unreachable_event, attempt=state.attempt_number,
                    wait_s=round(state.next_action.sleep, 2) if state.next_action else None,
                    error=describe(err))

    while True:
        try:
            retrying = AsyncRetrying(
                wait=wait_exponential(multiplier=redial.initial_s, max=redial.max_s)
                + wait_random(0, redial.initial_s),
                retry=retry_if_exception_type(RETRIED), before_sleep=log_retry)
            async for try_ in retrying:
                with try_:
                    await attempt()
        except SessionEnded as ended:
            log.warning(redial.lost_event, reason=str(ended), **lost_fields())


def open_channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    """mTLS with credentials; None: plaintext."""
    if credentials is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, credentials)


def describe(err: BaseException | None) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err) if err else ""


async def run_session(call: Any, *coros: Coroutine[Any, Any, Any],
                      stopped: Exception) -> NoReturn:
    """Run the session's coroutines on call until one ends: re-raise its failure, or raise
    `stopped` when it ended without one. Then the call is cancelled first, so that no read or
    write the others wait in can outlive it (grpc.aio does not always end those when the peer is
    gone, grpc/grpc#32005), and the others are cancelled and awaited."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()  # re-raise the failure that ended the session
        raise stopped
    finally:
        call.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def write_forever(call: Any, outbox: asyncio.Queue[Any]) -> NoReturn:
    while True:  # the one writer: gRPC allows a single outstanding write per stream
        await call.write(await outbox.get())
