"""`shapectl demo`: a coordinator and N simulated nodeagents on localhost, with the live status.

Writes a topology (2 rows x 2 racks, row limits tight for the simulated peak load) in a temp dir,
starts the coordinator and N `nodeagent --backend sim --sim-load demo` processes on free ports,
each in its own process group, and shows the status view until --for SECONDS have passed after
every node reported (or Ctrl-C). Then it stops everything it started and, with --json, prints the
final `status --json` object on stdout (the live view goes to stderr then).

The scripted UPS failure (--ups-failure-at S, default 20 s after every node reported): row r1's
feed drops to 75 % (`shapectl emergency declare --row r1 --capacity 0.75`); the live view shows
the emergency's timeline; --ups-restore-after S later it is cleared and the caps relax in steps.
With --json the output gains "emergency": the final `emergency show --json` object.

Automatic detection (the coordinator's default, `--emergency-detect-after-s 3`): the demo's load
takes the tight rows over their limits at its peaks, and the coordinator declares an emergency
itself (source "auto"), whose caps bring the row back under. The live view shows each one's
timeline like the UPS one's; with --json the output gains "auto_emergencies" (their `emergency
show --json` objects). The UPS failure on a row that detection already caps takes that
emergency over in place (its caps are never lifted in between).
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
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from shapectl.commands.cluster import cluster_status, status_json, status_view
from shapectl.commands.emergency import status_json as emergency_json
from shapectl.commands.emergency import summary_text, timeline_table
from shapeshifter.api.v1 import emergency_pb2 as epb
from shapeshifter.api.v1 import emergency_pb2_grpc as epb_grpc
from shapeshifter.hw.models import gpu_model
from shapeshifter.hw.server_model import server_model_for

RACKS = (("r1", "k1", "a1"), ("r1", "k2", "a1"), ("r2", "k3", "a2"), ("r2", "k4", "a2"))
ROW_LIMIT_FRAC = 0.6  # of the rows' simulated peak: tight, the demo load crosses it at peaks
AISLE_LIMIT_FRAC = 0.8
REPORT_INTERVAL_S = 0.5
# coordinator.emergency.controller.AUTO_SOURCE: emergencies its detection declares
AUTO_SOURCE = "auto"
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
    p.add_argument("--ups-failure-at", type=float, default=20.0, metavar="S",
                   help="row r1's UPS fails S seconds after every node reported (<0: never)")
    p.add_argument("--ups-restore-after", type=float, default=30.0, metavar="S",
                   help="clear the UPS emergency S seconds after it was declared")
    p.set_defaults(func=cmd_demo)


def peak_node_power_w(gpu_type: str, gpus: int) -> float:
    sm = server_model_for(gpu_type)
    return sm.node_power_w(gpus * gpu_model(gpu_type).power.max_w, 1.0, gpus)


def demo_topology(nodes: int, gpu_type: str, gpus: int, row_limit_frac: float = ROW_LIMIT_FRAC,
                  aisle_limit_frac: float = AISLE_LIMIT_FRAC) -> dict[str, Any]:
    """2 rows x 2 racks in 2 aisles (node i in rack i mod 4); each row's power limit and each
    aisle's airflow limit a fraction of what its nodes draw at full simulated load."""
    peak_w = peak_node_power_w(gpu_type, gpus)
    peak_cfm = server_model_for(gpu_type).airflow_cfm(1.0, gpus)
    placed = [RACKS[i % len(RACKS)] for i in range(nodes)]
    in_row = Counter(row for row, _, _ in placed)
    in_aisle = Counter(aisle for _, _, aisle in placed)
    rows = [{"name": row,
             "row_power_limit_w": round(row_limit_frac * peak_w * max(1, in_row[row])),
             "inlet_offset_c": 1.0 * i,  # TAPAS: rows differ by ~1 C, racks by up to 2 C
             "racks": [{"name": k, "aisle": a, "inlet_offset_c": 0.5 * j}
                       for j, (r, k, a) in enumerate(RACKS) if r == row]}
            for i, row in enumerate(("r1", "r2"))]
    aisles = [{"name": a,
               "aisle_airflow_cfm": round(aisle_limit_frac * peak_cfm * max(1, in_aisle[a]))}
              for a in ("a1", "a2")]
    return {"version": 1, "liveness": {"suspect_after_s": 3.0, "lost_after_s": 10.0},
            "sites": [{"name": "s1", "aisles": aisles, "rows": rows}]}


def free_port() -> int:
    """A loopback port the OS says is free now (bind port 0). Tiny race; fine on one host."""
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


def start_cluster(workdir: Path, nodes: int, gpu_type: str, gpus: int, *,
                  sim_load: str = "demo", report_interval_s: float = REPORT_INTERVAL_S,
                  topology: dict[str, Any] | None = None,
                  coordinator_args: Sequence[str] = ()) -> Cluster:
    """The coordinator and `nodes` sim agents (node i in RACKS[i mod 4]). `topology` replaces
    demo_topology(); `coordinator_args` are extra daemon flags (e.g. --emergency-*)."""
    topo_path = workdir / "topology.yaml"
    topo = topology if topology is not None else demo_topology(nodes, gpu_type, gpus)
    topo_path.write_text(yaml.safe_dump(topo, sort_keys=False))
    cluster = Cluster(workdir, f"127.0.0.1:{free_port()}")
    cluster.spawn("coordinator", [
        sys.executable, "-m", "coordinator.daemon", "--listen", cluster.coordinator_addr,
        "--topology", str(topo_path), "--db", str(workdir / "coordinator.db"),
        "--lease-ttl-s", "5", *coordinator_args])
    for i in range(nodes):
        row, rack, aisle = RACKS[i % len(RACKS)]
        node_id = f"node-{i + 1:02d}"
        cfg = workdir / f"{node_id}.yaml"
        cfg.write_text(yaml.safe_dump({
            "version": 1, "sim": {"seed": i + 1}, "sampling": {"interval_s": report_interval_s},
            "coordinator": {"report_interval_s": report_interval_s, "reconnect_max_s": 2.0}}))
        cluster.spawn(node_id, [
            sys.executable, "-m", "nodeagent.daemon", "--config", str(cfg), "--backend", "sim",
            "--sim-load", sim_load, "--sim-gpus", str(gpus), "--sim-gpu-type", gpu_type,
            "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", "",
            "--state-dir", str(workdir / node_id), "--node-id", node_id,
            "--coordinator", cluster.coordinator_addr,
            "--labels", f"site=s1,row={row},rack={rack},aisle={aisle}"])
    return cluster


def cmd_demo(args: argparse.Namespace) -> int:
    for name, value, high in (("nodes", args.nodes, 64), ("gpus", args.gpus, 16)):
        if not 1 <= value <= high:
            print(f"error: --{name}={value} is outside the allowed range [1, {high}]",
                  file=sys.stderr)
            return 2
    console = Console(stderr=args.json)
    workdir = Path(tempfile.mkdtemp(prefix="shapeshifter-demo-"))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, _interrupter(stop))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    cluster = start_cluster(workdir, args.nodes, args.gpu_type, args.gpus)
    console.print(f"demo: coordinator on {cluster.coordinator_addr}, {args.nodes} sim nodes; "
                  f"logs in {workdir}; Ctrl-C stops", soft_wrap=True)
    final = None
    ups = UpsScript(cluster.coordinator_addr, args.ups_failure_at, args.ups_restore_after)
    auto = AutoWatch(cluster.coordinator_addr)
    try:
        try:
            final = show_live(console, cluster, args.nodes, args.for_s, ups, stop, auto)
        except KeyboardInterrupt:
            console.print("demo: stopping")
        final = _try_status(cluster_status, cluster.coordinator_addr) or final
        ups.refresh()
        auto.refresh()
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        out = status_json(final) if final is not None else {}
        if ups.status is not None:
            out["emergency"] = emergency_json(ups.status)
        out["auto_emergencies"] = [emergency_json(e) for e in auto.emergencies]
        if auto.error:
            out["auto_emergencies_error"] = auto.error
        print(json.dumps(out))
    return 0 if final is not None else 1


class UpsScript:
    """Declares row r1's UPS failure at a time after every node reported, clears it later."""

    def __init__(self, address: str, fail_at_s: float, restore_after_s: float) -> None:
        self._address = address
        self._fail_at_s = fail_at_s
        self._restore_after_s = restore_after_s
        self.emergency_id = ""
        self.status: Any = None
        self._declared_mono_s: float | None = None
        self._cleared = False
        self.error = ""

    def step(self, since_all_up_s: float) -> None:
        """Call each refresh; since_all_up_s counts from the moment every node reported."""
        if self._fail_at_s < 0 or self.error:
            return
        if not self.emergency_id and since_all_up_s >= self._fail_at_s:
            self._call(lambda stub: self._declare(stub))
        elif (self.emergency_id and not self._cleared and self._declared_mono_s is not None
              and time.monotonic() - self._declared_mono_s >= self._restore_after_s):
            self._call(lambda stub: stub.ClearEmergency(epb.ClearEmergencyRequest(
                emergency_id=self.emergency_id, note="demo: UPS restored"), timeout=5))
            self._cleared = True
        self.refresh()

    def refresh(self) -> None:
        if self.emergency_id and not self.error:
            self._call(lambda stub: setattr(self, "status", stub.GetEmergency(
                epb.GetEmergencyRequest(emergency_id=self.emergency_id), timeout=5)))

    def _declare(self, stub: Any) -> None:
        status = stub.DeclareEmergency(epb.DeclareEmergencyRequest(
            scope="row", name="r1", kind="power", capacity_frac=0.75, source="demo: UPS failure",
            note="scripted by shapectl demo"), timeout=5)
        self.emergency_id, self.status = status.emergency_id, status
        self._declared_mono_s = time.monotonic()

    def _call(self, fn: Any) -> None:
        try:
            with grpc.insecure_channel(self._address) as channel:
                fn(epb_grpc.EmergencyStub(channel))
        except grpc.RpcError as err:  # shown in the view; the demo goes on without it
            self.error = f"{err.code().name}: {err.details()}"

    def view(self) -> Any:
        if self.error:
            return Text(f"UPS script: {self.error}", style="bold red")
        if self.status is None:
            when = ("never" if self._fail_at_s < 0
                    else f"{self._fail_at_s:g} s after all nodes report")
            return Text(f"scripted UPS failure on row r1: {when}")
        return Group(Text(summary_text(self.status), style="bold yellow"),
                     timeline_table(self.status, last=12))


class AutoWatch:
    """The emergencies the coordinator declared by itself (source "auto"), with timelines."""

    SHOWN = 3  # the most recent ones in the live view

    def __init__(self, address: str) -> None:
        self._address = address
        self.emergencies: list[Any] = []  # EmergencyStatus, oldest first
        self.error = ""

    def refresh(self) -> None:
        try:
            with grpc.insecure_channel(self._address) as channel:
                stub = epb_grpc.EmergencyStub(channel)
                listed = stub.ListEmergencies(epb.ListEmergenciesRequest(), timeout=5)
                self.emergencies = [
                    stub.GetEmergency(epb.GetEmergencyRequest(emergency_id=e.emergency_id),
                                      timeout=5)
                    for e in listed.emergencies if e.source == AUTO_SOURCE]
            self.error = ""
        except grpc.RpcError as err:  # shown in the view; the last list seen is kept
            self.error = f"{err.code().name}: {err.details()}"

    def view(self) -> Any:
        parts: list[Any] = []
        for e in self.emergencies[-self.SHOWN:]:
            parts.append(Text(f"automatic {summary_text(e)} ({e.note})", style="bold magenta"))
            if e.state != "cleared":
                parts.append(timeline_table(e, last=6))
        if self.error:
            parts.append(Text(f"automatic emergencies: {self.error}", style="red"))
        return Group(*parts) if parts else Text(
            "automatic detection: no row or aisle over its limit for long enough yet")


def show_live(console: Console, cluster: Cluster, nodes: int, for_s: float | None,
              ups: UpsScript, stop: threading.Event, auto: AutoWatch | None = None) -> Any:
    """The status view, refreshed until for_s after every node reported (for_s None: forever)
    or until stop is set (KeyboardInterrupt). Returns the last status seen (None if the
    coordinator never answered)."""
    last = None
    started = time.monotonic()
    all_up_at = None
    with Live(Text("starting..."), console=console, auto_refresh=False) as live:
        while for_s is None or all_up_at is None or time.monotonic() - all_up_at < for_s:
            if stop.is_set():  # also when the interrupt itself was swallowed inside a gRPC call
                raise KeyboardInterrupt
            status = _try_status(cluster_status, cluster.coordinator_addr)
            if status is not None:
                last = status
                if all_up_at is None and _all_reported(status, nodes):
                    all_up_at = time.monotonic()
                if all_up_at is not None:
                    ups.step(time.monotonic() - all_up_at)
                if auto is not None:
                    auto.refresh()
                views = (status_view(status), *([auto.view()] if auto else []), ups.view())
                live.update(Group(*views), refresh=True)
            if all_up_at is None and time.monotonic() - started > STARTUP_TIMEOUT_S:
                console.print(f"demo: not every node reported within {STARTUP_TIMEOUT_S:g} s; "
                              f"see the logs in {cluster.workdir}")
                all_up_at = time.monotonic()
            stop.wait(0.5)
    return last


def _interrupter(stop: threading.Event) -> Callable[[int, object], None]:
    """SIGINT/SIGTERM: remember it (show_live checks) and interrupt whatever runs now."""
    def handler(_signum: int, _frame: object) -> None:
        stop.set()
        raise KeyboardInterrupt

    return handler


def _try_status(get: Any, address: str) -> Any:
    try:
        return get(address, 2.0)
    except grpc.RpcError:
        return None  # the coordinator is still starting


def _all_reported(status: Any, nodes: int) -> bool:
    up = [n for n in status.nodes if n.state == "up" and n.gpus > 0]
    return len(up) >= nodes
