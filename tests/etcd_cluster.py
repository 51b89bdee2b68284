"""A real etcd cluster on loopback ports (Debian's etcd-server), for the HA tests and bench.

Each member is its own `etcd` process with its own data directory; members can be killed and
restarted. `ETCD_BIN` overrides the binary (default: `etcd` on PATH).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.ha.etcd import EtcdClient, EtcdError


def etcd_binary() -> str | None:
    return os.environ.get("ETCD_BIN") or shutil.which("etcd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    scheme: str = "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    """tls_dir: scripts/dev-ca.sh output; the members then serve https with coordinator.pem and
    require client certificates signed by ca.pem (etcd's --client-cert-auth)."""

    workdir: Path
    tls_dir: Path | None = None
    members: list[Member] = field(default_factory=list)

    def client_tls(self, cert: str = "coordinator") -> ssl.SSLContext | None:
        if self.tls_dir is None:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls_dir / "ca.pem"))
        ctx.load_cert_chain(self.tls_dir / f"{cert}.pem", self.tls_dir / f"{cert}.key")
        return ctx

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, size: int, timeout_s: float = 30.0) -> EtcdCluster:
        binary = etcd_binary()
        if binary is None:
            raise FileNotFoundError("etcd is not installed (Debian: apt-get install etcd-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i in range(size):
            name = f"m{i}"
            self.members.append(Member(name, _free_port(), _free_port(), self.workdir / name,
                                       self.workdir / f"{name}.log",
                                       scheme="https" if self.tls_dir else "http"))
        for m in self.members:
            self._launch(binary, m, "new")
        self.wait_healthy(timeout_s)
        return self

    def _launch(self, binary: str, m: Member, state: str) -> None:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        with m.log_path.open("ab") as log:
            m.proc = subprocess.Popen(
                [binary, "--name", m.name, "--data-dir", str(m.data_dir),
                 "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                 "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                 "--initial-cluster", initial, "--initial-cluster-state", state,
                 "--initial-cluster-token", f"shapeshifter-test-{self.workdir.name}",
                 # Loopback: short heartbeats make elections (and these tests) quick.
                 "--heartbeat-interval", "50", "--election-timeout", "500", *self._tls_flags()],
                stdout=log, stderr=subprocess.STDOUT)

    def _tls_flags(self) -> list[str]:
        if self.tls_dir is None:
            return []
        return ["--cert-file", str(self.tls_dir / "coordinator.pem"),
                "--key-file", str(self.tls_dir / "coordinator.key"),
                "--trusted-ca-file", str(self.tls_dir / "ca.pem"), "--client-cert-auth"]

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        client = EtcdClient(self.endpoints, timeout_s=1.0, tls=self.client_tls())
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.put("/health-probe", "ok")
                return
            except EtcdError as err:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd not healthy after {timeout_s} s: {err}\n"
                                       + self.logs()) from None
                time.sleep(0.1)
            finally:
                client.close()

    def kill(self, index: int) -> None:
        m = self.members[index]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(10)

    def restart(self, index: int) -> None:
        binary = etcd_binary()
        assert binary is not None
        self._launch(binary, self.members[index], "existing")

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.terminate()
        for m in self.members:
            if m.proc is not None:
                try:
                    m.proc.wait(10)
                except subprocess.TimeoutExpired:
                    m.proc.kill()

    def logs(self) -> str:
        return "\n".join(f"== {m.name}\n" + m.log_path.read_text(errors="replace")[-3000:]
                         for m in self.members if m.log_path.exists())
