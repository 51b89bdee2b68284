from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from shapeshifter.common.clock import ManualClock
from shapeshifter.common.sdnotify import Notifier


@pytest.fixture
def abstract_socket() -> tuple[socket.socket, str]:
    name = f"@ss-unit-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name[1:].encode())
    sock.settimeout(5)
    yield sock, name
    sock.close()


def test_noop_without_socket() -> None:
    n = Notifier(environ={})
    assert not n.enabled and n.watchdog_interval_s is None
    n.ready("x")
    n.watchdog_ping()


def test_messages_on_abstract_socket(abstract_socket: tuple[socket.socket, str]) -> None:
    sock, name = abstract_socket
    n = Notifier(environ={"NOTIFY_SOCKET": name})
    n.ready("serving")
    assert sock.recv(100) == b"READY=1\nSTATUS=serving"
    n.status("busy")
    assert sock.recv(100) == b"STATUS=busy"
    n.stopping()
    assert sock.recv(100) == b"STOPPING=1"


def test_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "n.sock")
    if len(path) > 100:
        pytest.skip("tmp path too long for AF_UNIX")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        Notifier(environ={"NOTIFY_SOCKET": path}).ready()
        assert sock.recv(100) == b"READY=1"


def test_watchdog_rate_limited_to_quarter_interval(
    abstract_socket: tuple[socket.socket, str],
) -> None:
    sock, name = abstract_socket
    clock = ManualClock()
    n = Notifier(environ={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "2000000"}, clock=clock)
    assert n.watchdog_interval_s == 2.0
    n.watchdog_ping()
    n.watchdog_ping()  # too soon: dropped
    clock.advance(0.5)
    n.watchdog_ping()
    sock.settimeout(0.5)
    assert [sock.recv(100), sock.recv(100)] == [b"WATCHDOG=1", b"WATCHDOG=1"]
    with pytest.raises(TimeoutError):
        sock.recv(100)


def test_watchdog_for_another_pid_is_ignored() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(environ=env).watchdog_interval_s is None
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier(environ=env).watchdog_interval_s == 1.0
