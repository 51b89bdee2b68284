"""The process runner: concurrent scrapes that ignore proxies, engine URLs, ports on any
family, and engines run as an unprivileged user with no capabilities."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nodeagent.engines.runner import (
    EngineUser,
    ProcessRunner,
    drop_privileges,
    engine_url,
    pick_free_port,
    port_is_free,
    run_concurrently,
)
from shapeshifter.common.errors import InvalidArgument

BARRIER_TIMEOUT_S = 10.0  # only reached when the scrapes run one after another (a failure)


@contextmanager
def _metrics_servers(n: int, barrier: threading.Barrier | None) -> Iterator[list[int]]:
    """n HTTP servers on 127.0.0.1 whose /metrics answers only once all n requests arrived."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if barrier is not None:
                barrier.wait(BARRIER_TIMEOUT_S)
            body = f"vllm:num_requests_running {self.server.server_port}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(n)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield [s.server_port for s in servers]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def test_a_scrape_round_runs_concurrently() -> None:
    """Each engine answers only when all 8 requests are in flight at once: a sequential round
    would break the barrier."""
    n = 8
    with _metrics_servers(n, threading.Barrier(n)) as ports:
        got = ProcessRunner(http_timeout_s=BARRIER_TIMEOUT_S + 5).fetch_metrics_many(
            ("127.0.0.1", p) for p in ports)
    assert got == {("127.0.0.1", p): f"vllm:num_requests_running {p}\n" for p in ports}


def test_unreachable_engine_is_reported_not_raised() -> None:
    with _metrics_servers(1, None) as ports:
        dead = pick_free_port("127.0.0.1")
        got = ProcessRunner().fetch_metrics_many([("127.0.0.1", ports[0]), ("127.0.0.1", dead)])
    assert got[("127.0.0.1", ports[0])] == f"vllm:num_requests_running {ports[0]}\n"
    assert isinstance(got[("127.0.0.1", dead)], OSError)


def test_proxy_settings_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    dead_proxy = f"http://127.0.0.1:{pick_free_port('127.0.0.1')}"
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with _metrics_servers(1, None) as ports:
        runner = ProcessRunner()
        assert runner.health_ok("127.0.0.1", ports[0])
        assert runner.fetch_metrics("127.0.0.1", ports[0]).startswith("vllm:")


def test_run_concurrently_returns_listed_errors_and_raises_others() -> None:
    def fn(x: int) -> int:
        if x == 2:
            raise OSError("down")
        if x == 3:
            raise KeyError(x)
        return x * 10

    got = run_concurrently(fn, [1, 2], errors=(OSError,))
    assert got[1] == 10 and isinstance(got[2], OSError)
    with pytest.raises(KeyError):
        run_concurrently(fn, [1, 3], errors=(OSError,))


def test_engine_url_reaches_wildcard_listeners_over_loopback() -> None:
    assert engine_url("127.0.0.1", 8000, "/health") == "http://127.0.0.1:8000/health"
    assert engine_url("0.0.0.0", 8000, "/metrics") == "http://127.0.0.1:8000/metrics"
    assert engine_url("::", 8000, "/metrics") == "http://[::1]:8000/metrics"
    assert engine_url("10.1.2.3", 8000, "/health") == "http://10.1.2.3:8000/health"
    assert engine_url("fd00::5", 9, "/x") == "http://[fd00::5]:9/x"


def test_ports_on_a_wildcard_host() -> None:
    port = pick_free_port("0.0.0.0")
    assert port_is_free("0.0.0.0", port)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", port))
        taken.listen()
        assert not port_is_free("0.0.0.0", port)


@pytest.mark.parametrize(("name", "text"), [
    ("root", "is root"),
    ("no-such-user-zz", "no such user"),
    ("Bad Name", "not a valid user name"),
])  # fmt: skip
def test_engine_user_must_be_an_existing_unprivileged_user(name: str, text: str) -> None:
    with pytest.raises(InvalidArgument, match=text) as err:
        EngineUser.resolve(name)
    assert err.value.field == "engines.engine_user"


def test_engine_user_resolves() -> None:
    user = EngineUser.resolve("nobody")
    assert user.uid != 0 and user.name == "nobody"


USER = EngineUser("svc", 990, 991, (44, 109), "/var/lib/svc")


def test_setpriv_drops_ids_and_every_capability() -> None:
    argv, env, extra = drop_privileges(USER, ["python", "-m", "x"], {"HOME": "/root", "A": "1"},
                                       setpriv="/usr/bin/setpriv")
    assert argv == ["/usr/bin/setpriv", "--reuid=990", "--regid=991", "--groups=44,109",
                    "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
                    "python", "-m", "x"]
    assert extra == {}
    assert env == {"HOME": "/var/lib/svc", "USER": "svc", "LOGNAME": "svc", "A": "1"}


def test_without_setpriv_popen_switches_ids_and_sets_no_new_privs() -> None:
    argv, _, extra = drop_privileges(USER, ["python"], {}, setpriv="")
    assert argv == ["python"]
    assert (extra["user"], extra["group"], extra["extra_groups"]) == (990, 991, [44, 109])
    assert callable(extra["preexec_fn"])


def _status(log: Path) -> dict[str, str]:
    fields = (line.split(":", 1) for line in log.read_text().splitlines() if ":" in line)
    return {k: v.strip() for k, v in fields}


@pytest.mark.skipif(os.geteuid() != 0, reason="switching a child's user needs root")
@pytest.mark.parametrize("use_setpriv", [True, False])
def test_engine_runs_unprivileged(tmp_path: Path, use_setpriv: bool,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A real child as `nobody`: its uid, no capabilities at all, no_new_privs."""
    if use_setpriv and shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed")
    if not use_setpriv:
        monkeypatch.setattr(shutil, "which", lambda name: None)
    user = EngineUser.resolve("nobody")
    log = tmp_path / "engine.log"
    proc = ProcessRunner(engine_user=user).launch(["cat", "/proc/self/status"],
                                                  {"PATH": os.environ["PATH"]}, log)
    assert proc.wait(30) == 0
    status = _status(log)
    assert status["Uid"].split()[:2] == [str(user.uid)] * 2
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert int(status["CapInh"], 16) == 0 and int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    if use_setpriv:
        assert int(status["CapBnd"], 16) == 0
