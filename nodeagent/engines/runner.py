"""Engine processes behind a small Protocol: launch, adopt, signal, probe over HTTP.

Each engine runs in its own session (process group = its pid), so a stop reaches vLLM's worker
processes too, and the agent's own signals never reach the engines (they survive an agent
restart and are re-adopted). Output goes straight to a per-instance log file opened for
append; rotation is copy-truncate, so a re-adopted engine keeps writing with no pipe to the
agent that could break when the agent exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import ipaddress
import os
import pwd
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import psutil

from shapeshifter.common.errors import Internal, InvalidArgument

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")
MAX_SCRAPE_THREADS = 16
# No proxy for engine HTTP: urllib would otherwise send even 127.0.0.1 through $http_proxy.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

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


_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class EngineUser:
    """The unprivileged account engines run as (config engines.engine_user)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups (e.g. video, for /dev/nvidia*)
    home: str

    @classmethod
    def resolve(cls, name: str) -> EngineUser:
        """Look the user up; InvalidArgument naming engines.engine_user when it cannot run
        engines (unknown, malformed, or root)."""
        field = "engines.engine_user"
        if not _USER_RE.match(name):
            raise InvalidArgument(
                f"{field}={name!r} is not a valid user name ({_USER_RE.pattern})", field=field
            )
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise InvalidArgument(f"{field}={name!r}: no such user", field=field) from None
        if pw.pw_uid == 0:
            raise InvalidArgument(f"{field}={name!r} is root; name an unprivileged user",
                                  field=field)
        groups = tuple(sorted({g.gr_gid for g in grp.getgrall() if name in g.gr_mem}))
        return cls(name, pw.pw_uid, pw.pw_gid, groups, pw.pw_dir)


def drop_privileges(
    user: EngineUser, argv: Sequence[str], env: Mapping[str, str], *, setpriv: str | None = None
) -> tuple[list[str], dict[str, str], dict[str, object]]:
    """(argv, env, extra Popen kwargs) that start argv as user with no capabilities.

    The agent runs as root with CAP_SYS_ADMIN in its bounding set. With util-linux setpriv
    (found on PATH unless given), the engine is exec'd through it: uid/gid/groups switched,
    inheritable and bounding sets emptied, no_new_privs (setpriv execs, so the engine keeps the
    pid and its own command line, which adoption compares). Without setpriv, Popen switches
    uid/gid/groups (the kernel clears the permitted/effective/ambient sets on the switch from
    root) and a preexec sets no_new_privs, so no setuid binary can take capabilities back.
    HOME/USER/LOGNAME become the user's, so caches land where it may write.
    """
    child_env = {**env, "HOME": user.home, "USER": user.name, "LOGNAME": user.name}
    setpriv = setpriv if setpriv is not None else shutil.which("setpriv")
    if setpriv:
        groups = ",".join(map(str, user.groups)) if user.groups else None
        prefix = [
            setpriv, f"--reuid={user.uid}", f"--regid={user.gid}",
            f"--groups={groups}" if groups else "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
        ]  # fmt: skip
        return [*prefix, *argv], child_env, {}
    extra: dict[str, object] = {
        "user": user.uid, "group": user.gid, "extra_groups": list(user.groups),
        "preexec_fn": _set_no_new_privs,
    }  # fmt: skip
    return list(argv), child_env, extra


def _set_no_new_privs() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


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
    """The real runner: subprocesses, psutil checks, HTTP to the engines (never via a proxy).

    engine_user: run engines as this unprivileged user, with no capabilities (privileges.py);
    None keeps the agent's own user.
    """

    def __init__(
        self, *, http_timeout_s: float = 2.0, engine_user: EngineUser | None = None
    ) -> None:
        self._http_timeout_s = http_timeout_s
        self._engine_user = engine_user

    def launch(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> EngineProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        exec_argv, child_env, extra = list(argv), dict(env), {}
        if self._engine_user is not None:
            exec_argv, child_env, extra = drop_privileges(self._engine_user, argv, env)
        try:
            with open(log_path, "ab") as log:  # append mode: copy-truncate rotation stays safe
                popen = subprocess.Popen(
                    exec_argv, env=child_env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True, **extra,
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

    def fetch_metrics_many(
        self, targets: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], str | Exception]:
        """/metrics of many engines at once: {(host, port): text or the OSError}. A round
        takes about as long as the slowest single scrape, not their sum."""
        return run_concurrently(lambda t: self.fetch_metrics(*t), targets, errors=(OSError,))

    def _get(self, host: str, port: int, path: str) -> tuple[int, str]:
        url = engine_url(host, port, path)
        try:
            with _NO_PROXY_OPENER.open(url, timeout=self._http_timeout_s) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, ""


def run_concurrently(
    fn: Callable[[K], R],
    items: Iterable[K],
    *,
    errors: tuple[type[Exception], ...] = (),
    max_workers: int = MAX_SCRAPE_THREADS,
) -> dict[K, R | Exception]:
    """fn(item) for every item on a thread pool: {item: result, or the exception when it is one
    of errors}. Any other exception propagates once every call has finished."""
    keys = list(dict.fromkeys(items))

    def call(item: K) -> R | Exception:
        try:
            return fn(item)
        except errors as exc:
            return exc

    if len(keys) <= 1:
        return {k: call(k) for k in keys}
    with ThreadPoolExecutor(max_workers=min(max_workers, len(keys))) as pool:
        return dict(zip(keys, pool.map(call, keys), strict=True))


def engine_url(host: str, port: int, path: str) -> str:
    """URL of an engine endpoint. An engine listening on a wildcard address is reached over
    loopback; IPv6 literals are bracketed."""
    connect = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in connect:
        connect = f"[{connect}]"
    return f"http://{connect}:{port}{path}"


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
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _family(host: str) -> socket.AddressFamily:
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:  # a host name
        is_v6 = False
    return socket.AF_INET6 if is_v6 else socket.AF_INET


def pick_free_port(host: str) -> int:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
