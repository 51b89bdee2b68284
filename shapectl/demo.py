"""`shapectl demo`: a coordinator and N simulated nodeagents on localhost, with the live status.

Writes a topology (2 rows x 2 racks, row limits tight for the simulated peak load) in a temp dir,
starts the coordinator and N `nodeagent --backend sim --sim-load demo` processes on free ports,
each in its own process group, and shows the status view until --for SECONDS have passed after
every node reported (or Ctrl-C). Then it stops everything it started and, with --json, prints the
final `status --json` object on stdout (the live view goes to stderr then).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from rich.console import Console
from rich.live import Live
from rich.text import Text

from nodeagent.gpu.models import gpu_model
from nodeagent.gpu.server_model import server_model_for

RACKS = (("r1", "k1", "a1"), ("r1", "k2", "a1"), ("r2", "k3", "a2"), ("r2", "k4", "a2"))
ROW_LIMIT_FRAC = 0.6  # of the rows' simulated peak: tight, the demo load crosses it at peaks
AISLE_LIMIT_FRAC = 0.8
REPORT_INTERVAL_S = 0.5
STARTUP_TIMEOUT_S = 60.0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="run a local coordinator + simulated nodes, live view")
    p.add_argument("--nodes", type=int, default=8, metavar="N", help="agents to start (1-64)")
    p.add_argument("--gpus", type=int, default=8, metavar="G", help="simulated GPUs per node")
    p.add_argument("--gpu-type", default="h100-80gb",
                   choices=("a100-40gb", "a100-80gb", "h100-80gb"))
    p.add_argument("--for", dest="for_s", type=float, default=None, metavar="SECONDS",
                   help="stop after this long once all nodes report (default: until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="print the final status JSON on stdout")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, state, db)")
    p.set_defaults(func=cmd_demo)


def peak_node_power_w(gpu_type: str, gpus: int) -> float:
    sm = server_model_for(gpu_type)
    return sm.node_power_w(gpus * gpu_model(gpu_type).power.max_w, 1.0, gpus)


def demo_topology(nodes: int, gpu_type: str, gpus: int) -> dict[str, Any]:
    """2 rows x 2 racks in 2 aisles (node i in rack i mod 4); each row's power limit and each
    aisle's airflow limit a fraction of what its nodes draw at full simulated load."""
    peak_w = peak_node_power_w(gpu_type, gpus)
    peak_cfm = server_model_for(gpu_type).airflow_cfm(1.0, gpus)
    placed = [RACKS[i % len(RACKS)] for i in range(nodes)]
    in_row = Counter(row for row, _, _ in placed)
    in_aisle = Counter(aisle for _, _, aisle in placed)
    rows = [{"name": row,
             "row_power_limit_w": round(ROW_LIMIT_FRAC * peak_w * max(1, in_row[row])),
             "inlet_offset_c": 1.0 * i,  # TAPAS: rows differ by ~1 C, racks by up to 2 C
             "racks": [{"name": k, "aisle": a, "inlet_offset_c": 0.5 * j}
                       for j, (r, k, a) in enumerate(RACKS) if r == row]}
            for i, row in enumerate(("r1", "r2"))]
    aisles = [{"name": a,
               "aisle_airflow_cfm": round(AISLE_LIMIT_FRAC * peak_cfm * max(1, in_aisle[a]))}
              for a in ("a1", "a2")]
    return {"version": 1, "liveness": {"suspect_after_s": 3.0, "lost_after_s": 10.0},
            "sites": [{"name": "s1", "aisles": aisles, "rows": rows}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """The processes the demo started, each the leader of its own process group."""

    workdir: Path
    coordinator_addr: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM agents (they restore their GPUs) and the coordinator; SIGKILL stragglers."""
        for p in reversed(self.procs):
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()
            _signal_group(p, signal.SIGKILL)  # anything the leader left in its group


def _signal_group(p: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


def start_cluster(workdir: Path, nodes: int, gpu_type: str, gpus: int) -> Cluster:
    topo_path = workdir / "topology.yaml"
    topo_path.write_text(yaml.safe_dump(demo_topology(nodes, gpu_type, gpus), sort_keys=False))
    cluster = Cluster(workdir, f"127.0.0.1:{free_port()}")
    cluster.spawn("coordinator", [
        sys.executable, "-m", "coordinator.daemon", "--listen", cluster.coordinator_addr,
        "--topology", str(topo_path), "--db", str(workdir / "coordinator.db"),
        "--lease-ttl-s", "5"])
    for i in range(nodes):
        row, rack, aisle = RACKS[i % len(RACKS)]
        node_id = f"node-{i + 1:02d}"
        cfg = workdir / f"{node_id}.yaml"
        cfg.write_text(yaml.safe_dump({
            "version": 1, "sim": {"seed": i + 1}, "sampling": {"interval_s": REPORT_INTERVAL_S},
            "coordinator": {"report_interval_s": REPORT_INTERVAL_S, "reconnect_max_s": 2.0}}))
        cluster.spawn(node_id, [
            sys.executable, "-m", "nodeagent.daemon", "--config", str(cfg), "--backend", "sim",
            "--sim-load", "demo", "--sim-gpus", str(gpus), "--sim-gpu-type", gpu_type,
            "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", "",
            "--state-dir", str(workdir / node_id), "--node-id", node_id,
            "--coordinator", cluster.coordinator_addr,
            "--labels", f"site=s1,row={row},rack={rack},aisle={aisle}"])
    return cluster


def cmd_demo(args: argparse.Namespace) -> int:
    from shapectl.cluster_cmds import cluster_status, status_json

    for name, value, high in (("nodes", args.nodes, 64), ("gpus", args.gpus, 16)):
        if not 1 <= value <= high:
            print(f"error: --{name}={value} is outside the allowed range [1, {high}]",
                  file=sys.stderr)
            return 2
    console = Console(stderr=args.json)
    workdir = Path(tempfile.mkdtemp(prefix="shapeshifter-demo-"))
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    cluster = start_cluster(workdir, args.nodes, args.gpu_type, args.gpus)
    console.print(f"demo: coordinator on {cluster.coordinator_addr}, {args.nodes} sim nodes; "
                  f"logs in {workdir}; Ctrl-C stops", soft_wrap=True)
    final = None
    try:
        try:
            final = show_live(console, cluster, args.nodes, args.for_s)
        except KeyboardInterrupt:
            console.print("demo: stopping")
        final = _try_status(cluster_status, cluster.coordinator_addr) or final
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous_term)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(status_json(final) if final is not None else {}))
    return 0 if final is not None else 1


def show_live(console: Console, cluster: Cluster, nodes: int, for_s: float | None) -> Any:
    """The status view, refreshed until for_s after every node reported (for_s None: forever).
    Returns the last status seen (None if the coordinator never answered)."""
    from shapectl.cluster_cmds import cluster_status, status_view

    last = None
    started = time.monotonic()
    all_up_at = None
    with Live(Text("starting..."), console=console, auto_refresh=False) as live:
        while for_s is None or all_up_at is None or time.monotonic() - all_up_at < for_s:
            status = _try_status(cluster_status, cluster.coordinator_addr)
            if status is not None:
                last = status
                live.update(status_view(status), refresh=True)
                if all_up_at is None and _all_reported(status, nodes):
                    all_up_at = time.monotonic()
            if all_up_at is None and time.monotonic() - started > STARTUP_TIMEOUT_S:
                console.print(f"demo: not every node reported within {STARTUP_TIMEOUT_S:g} s; "
                              f"see the logs in {cluster.workdir}")
                all_up_at = time.monotonic()
            time.sleep(0.5)
    return last


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _try_status(get: Any, address: str) -> Any:
    try:
        return get(address, 2.0)
    except grpc.RpcError:
        return None  # the coordinator is still starting


def _all_reported(status: Any, nodes: int) -> bool:
    up = [n for n in status.nodes if n.state == "up" and n.gpus > 0]
    return len(up) >= nodes
