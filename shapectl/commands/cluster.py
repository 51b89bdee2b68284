"""Cluster commands through the coordinator: status, nodes, watch, audit.

`shapectl --coordinator ADDR status --json` prints {"rows": [...], "aisles": [...], "nodes": [...]}
(plus racks, sites, epoch): every read command has --json for scripts.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import grpc
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from shapectl.channels import ClientSecurity, client_channel, open_channel
from shapectl.targets import to_json_dict
from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.api.v1 import coordinator_pb2_grpc as cpb_grpc


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("status", help="rows and aisles: power and airflow vs limits, nodes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_status)
    p = subparsers.add_parser("nodes", help="every node the coordinator knows, with liveness")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_nodes)
    p = subparsers.add_parser("watch", help="the status view, refreshed until Ctrl-C")
    p.add_argument("--interval-s", type=float, default=1.0, metavar="S")
    p.set_defaults(func=cmd_watch)
    p = subparsers.add_parser("audit", help="the coordinator's audit log, newest first")
    p.add_argument("--node", default="", help="only this node's entries")
    p.add_argument("--limit", type=int, default=50, metavar="N")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_audit)


def cluster_status(address: str, timeout_s: float,
                   security: ClientSecurity | None = None) -> cpb.ClusterStatus:
    with open_channel(address, security) as channel:
        return cpb_grpc.CoordinatorStub(channel).GetCluster(cpb.GetClusterRequest(),
                                                            timeout=timeout_s)


def status_json(status: cpb.ClusterStatus) -> dict[str, Any]:
    return to_json_dict(status)


def cmd_status(args: argparse.Namespace) -> int:
    status = cluster_status(args.coordinator, args.timeout, args.security)
    if args.json:
        print(json.dumps(status_json(status)))
    else:
        Console().print(status_view(status))
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        resp = cpb_grpc.CoordinatorStub(channel).ListNodes(cpb.ListNodesRequest(),
                                                           timeout=args.timeout)
    if args.json:
        print(json.dumps(to_json_dict(resp)))
    else:
        Console().print(nodes_table(list(resp.nodes)))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        resp = cpb_grpc.CoordinatorStub(channel).ListAudit(
            cpb.ListAuditRequest(limit=args.limit, node_id=args.node), timeout=args.timeout)
    if args.json:
        print(json.dumps(to_json_dict(resp)))
        return 0
    table = Table(title="audit log")
    for column in ("id", "time", "epoch", "node", "action", "ok", "code", "actor", "message"):
        table.add_column(column)
    for e in resp.entries:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at_unix_s))
        table.add_row(str(e.id), at, str(e.epoch), e.node_id, e.action, "yes" if e.ok else "NO",
                      e.code, e.actor, e.message)
    Console().print(table)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Refresh until Ctrl-C; an unreachable coordinator is shown, and watching goes on."""
    with Live(Text("connecting..."), auto_refresh=False) as live:
        try:
            while True:
                try:
                    view: Any = status_view(
                        cluster_status(args.coordinator, args.timeout, args.security))
                except grpc.RpcError as err:
                    view = Text(f"{args.coordinator}: {err.code().name}: {err.details()}",
                                style="bold red")
                live.update(view, refresh=True)
                time.sleep(args.interval_s)
        except KeyboardInterrupt:
            return 0


# ---------------------------------------------------------------- rendering


def status_view(status: cpb.ClusterStatus) -> Group:
    return Group(rows_table(list(status.rows)), aisles_table(list(status.aisles)),
                 nodes_table(list(status.nodes)),
                 Text(f"epoch {status.epoch}", style="dim"))


def _pct(used: float, limit: float) -> Text:
    if limit <= 0:
        return Text("-")
    pct = 100.0 * used / limit
    style = "bold red" if pct >= 100 else "yellow" if pct >= 90 else "green"
    return Text(f"{pct:5.1f}%", style=style)


def _nodes(r: cpb.Rollup) -> str:
    return f"{r.nodes_up}/{r.nodes_suspect}/{r.nodes_lost}"


def rows_table(rows: list[cpb.Rollup]) -> Table:
    t = Table(title="rows (power feed)")
    for c in ("row", "draw / limit W", "%", "max GPU °C", "inlet °C", "nodes up/suspect/lost",
              "GPUs in use"):
        t.add_column(c)
    for r in rows:
        t.add_row(r.name, f"{r.power_draw_w:,.0f} / {r.power_limit_w:,.0f}",
                  _pct(r.power_draw_w, r.power_limit_w), f"{r.max_gpu_temp_c:.1f}",
                  f"{r.inlet_temp_c:.1f}", _nodes(r), f"{r.gpus_in_use}/{r.gpus}")
    return t


def aisles_table(aisles: list[cpb.Rollup]) -> Table:
    t = Table(title="aisles (cooling airflow)")
    for c in ("aisle", "airflow / limit CFM", "%", "power W", "max GPU °C", "inlet °C",
              "nodes up/suspect/lost"):
        t.add_column(c)
    for a in aisles:
        t.add_row(a.name, f"{a.airflow_cfm:,.0f} / {a.airflow_limit_cfm:,.0f}",
                  _pct(a.airflow_cfm, a.airflow_limit_cfm), f"{a.power_draw_w:,.0f}",
                  f"{a.max_gpu_temp_c:.1f}", f"{a.inlet_temp_c:.1f}", _nodes(a))
    return t


_STATE_STYLE = {"up": "green", "suspect": "yellow", "lost": "bold red"}


def nodes_table(nodes: list[cpb.NodeSummary]) -> Table:
    t = Table(title="nodes")
    for c in ("node", "state", "row/rack/aisle", "power W", "GPU limits W", "max GPU °C",
              "GPUs", "safety", "seen s ago"):
        t.add_column(c)
    for n in nodes:
        where = f"{n.row}/{n.rack}/{n.aisle}" + ("" if n.topology_known else " (unknown)")
        t.add_row(n.name, Text(n.state, style=_STATE_STYLE.get(n.state, "")), where,
                  f"{n.power_draw_w:,.0f}", f"{n.gpu_power_limit_w:,.0f}",
                  f"{n.max_gpu_temp_c:.1f}", str(n.gpus), n.safety_state,
                  f"{n.last_seen_age_s:.1f}")
    return t
