"""What the long-lived gRPC streams that dial out share (agent -> coordinator in nodeagent.link,
leaf -> parent in coordinator.hierarchy_leaf): one writer per stream, and a session that lasts
until the first of its tasks ends."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, NoReturn


async def run_session(*coros: Coroutine[Any, Any, Any], stopped: Exception) -> NoReturn:
    """Run the session's coroutines until one ends: re-raise its failure, or raise `stopped`
    when it ended without one. The others are cancelled and awaited."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()  # re-raise the failure that ended the session
        raise stopped
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def write_forever(call: Any, outbox: asyncio.Queue[Any]) -> NoReturn:
    while True:  # the one writer: gRPC allows a single outstanding write per stream
        await call.write(await outbox.get())
