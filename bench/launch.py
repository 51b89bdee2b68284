"""What the coordinator benches share: a loopback address, waiting for a condition, and the real
coordinator daemon as a subprocess (its database and log in the bench's work dir)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from shapectl.commands.demo import free_port
from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.api.v1 import coordinator_pb2_grpc as cpb_grpc


def local_address() -> str:
    """127.0.0.1 with a port that is free now."""
    return f"127.0.0.1:{free_port()}"


def start_coordinator(workdir: Path, name: str, *flags: str) -> subprocess.Popen[bytes]:
    """`python -m coordinator.daemon --db WORKDIR/NAME.db FLAGS...`, its output appended to
    WORKDIR/NAME.log: a restart under the same name keeps the database and the log."""
    with (workdir / f"{name}.log").open("ab") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "coordinator.daemon", "--db", str(workdir / f"{name}.db"),
             *flags],
            stdout=log, stderr=subprocess.STDOUT)


def stop_coordinators(procs: Iterable[subprocess.Popen[bytes]], timeout_s: float = 30) -> None:
    """SIGTERM each one still running, then wait up to timeout_s for each to exit."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout_s)


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} not reached within {timeout_s:g} s")
        time.sleep(0.2)


def serving(stub: cpb_grpc.CoordinatorStub) -> bool:
    """The coordinator answers GetIngestStats."""
    try:
        stub.GetIngestStats(cpb.GetIngestStatsRequest(), timeout=10)
    except grpc.RpcError:
        return False
    return True
