"""Engine processes behind a small Protocol: launch, adopt, signal, probe over HTTP.

Each engine runs in its own session (process group = its pid), so a stop reaches vLLM's worker
processes too, and the agent's own signals never reach the engines (they survive an agent
restart and are re-adopted). Output goes straight to a per-instance log file opened for
append; rotation is copy-truncate, so a re-adopted engine keeps writing with no pipe to the
agent that could break when the agent exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import psutil

from shapeshifter.common.errors import Internal

CREATE_TIME_TOLERANCE_S = 0.05
UNKNOWN_EXIT_CODE = -1  # an adopted process is not our child: its exit code is not ours to read


class EngineProcess(Protocol):
    pid: int
    create_time: float  # psutil's process create time (Unix s): with pid, the identity

    def exit_code(self) -> int | None: ...  # None while running
    def send_signal(self, sig: int) -> None: ...  # to the engine's main process; no-op if gone
    def signal_group(self, sig: int) -> None: ...  # to its whole process group; no-op if gone
    def wait(self, timeout_s: float) -> int | None: ...  # exit code, None on timeout


class EngineRunner(Protocol):
    def launch(
        self, argv: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> EngineProcess: ...

    def adopt(self, pid: int, create_time: float, argv: Sequence[str]) -> EngineProcess | None: ...

    def health_ok(self, host: str, port: int) -> bool: ...
    def fetch_metrics(self, host: str, port: int) -> str: ...  # raises OSError when unreachable


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)  # started with start_new_session: the group id is the pid


class ChildProcess:
    """An engine this agent started."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        try:
            self.create_time = psutil.Process(popen.pid).create_time()
        except psutil.NoSuchProcess:
            self.create_time = 0.0  # exited at once; exit_code() tells why

    def exit_code(self) -> int | None:
        return self._popen.poll()

    def send_signal(self, sig: int) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        _signal_group(self.pid, sig)

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self._popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None


class AdoptedProcess:
    """An engine a previous agent process started, found again from the journal."""

    def __init__(self, proc: psutil.Process) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.create_time = proc.create_time()

    def exit_code(self) -> int | None:
        try:
            alive = self._proc.is_running() and self._proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        return None if alive else UNKNOWN_EXIT_CODE

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            self._proc.send_signal(sig)  # psutil checks the create time: never a reused pid

    def signal_group(self, sig: int) -> None:
        _signal_group(self.pid, sig)

    def wait(self, timeout_s: float) -> int | None:
        try:
            self._proc.wait(timeout=timeout_s)
        except psutil.TimeoutExpired:
            return None
        return UNKNOWN_EXIT_CODE


class ProcessRunner:
    """The real runner: subprocesses, psutil checks, HTTP over localhost."""

    def __init__(self, *, http_timeout_s: float = 2.0) -> None:
        self._http_timeout_s = http_timeout_s

    def launch(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> EngineProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_path, "ab") as log:  # append mode: copy-truncate rotation stays safe
                popen = subprocess.Popen(
                    list(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                )  # fmt: skip
        except OSError as exc:
            raise Internal(f"cannot start engine {argv[0]!r}: {exc}") from exc
        return ChildProcess(popen)

    def adopt(self, pid: int, create_time: float, argv: Sequence[str]) -> EngineProcess | None:
        """The process when pid, create time and command line all match, else None."""
        try:
            proc = psutil.Process(pid)
            same = (
                abs(proc.create_time() - create_time) < CREATE_TIME_TOLERANCE_S
                and proc.cmdline() == list(argv)
                and proc.status() != psutil.STATUS_ZOMBIE
            )
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return AdoptedProcess(proc) if same else None

    def health_ok(self, host: str, port: int) -> bool:
        try:
            return self._get(host, port, "/health")[0] == 200
        except OSError:
            return False

    def fetch_metrics(self, host: str, port: int) -> str:
        status, body = self._get(host, port, "/metrics")
        if status != 200:
            raise OSError(f"/metrics answered HTTP {status}")
        return body

    def _get(self, host: str, port: int, path: str) -> tuple[int, str]:
        url = f"http://{host}:{port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=self._http_timeout_s) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, ""


def rotate_log(path: Path, *, max_bytes: int, backups: int) -> bool:
    """Copy-truncate rotation (path -> path.1 -> ... -> path.N); True when it rotated.

    The engine holds the file open in append mode, so after the truncate it writes at the new
    end; a few lines written between copy and truncate may be lost, as with logrotate's
    copytruncate.
    """
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i + 1}"))
    if backups > 0:
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with open(path, "r+b") as f:
        f.truncate(0)
    return True


def tail_lines(path: Path, n: int = 20, *, max_bytes: int = 16384) -> str:
    """The last n lines of a log file ('' when missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - max_bytes, 0))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-n:])


def port_is_free(host: str, port: int) -> bool:
    """Whether nothing listens on the port. SO_REUSEADDR as servers (vLLM's uvicorn) use it,
    so connections of a just-stopped engine in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
