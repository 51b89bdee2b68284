"""sd_notify(3) over the AF_UNIX datagram socket systemd passes in $NOTIFY_SOCKET.

A no-op when the variable is unset (run outside systemd). Abstract socket names start with '@'.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from shapeshifter.common.clock import Clock, SystemClock


class Notifier:
    def __init__(
        self, environ: Mapping[str, str] | None = None, clock: Clock | None = None
    ) -> None:
        env = os.environ if environ is None else environ
        self._clock = clock or SystemClock()
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = _watchdog_interval_s(env)
        self._last_ping_s: float | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, message: str) -> None:
        """Send one datagram; raises OSError when the socket is configured but unusable."""
        if self._address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), self._address)

    def ready(self, status: str = "") -> None:
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def watchdog_ping(self) -> None:
        """Called from the sampling loop on every pass; sends at most every quarter interval."""
        if self.watchdog_interval_s is None:
            return
        now_s = self._clock.monotonic()
        if (
            self._last_ping_s is not None
            and now_s - self._last_ping_s < self.watchdog_interval_s / 4
        ):
            return
        self._last_ping_s = now_s
        self.notify("WATCHDOG=1")


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # Linux abstract namespace
    return value


def _watchdog_interval_s(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process
    return int(usec) / 1e6
