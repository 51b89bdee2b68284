"""`shapectl emergency declare|clear|show|list` against the coordinator's Emergency service.

    shapectl emergency declare --row r1 --capacity 0.75 [--source ups] [--note ...]
    shapectl emergency declare --aisle a1 --capacity 0.9           (cooling)
    shapectl emergency clear ID
    shapectl emergency show ID [--json]     (the timeline)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from shapectl.channels import client_channel
from shapectl.targets import actor_metadata, to_json_dict
from shapeshifter.api.v1 import emergency_pb2 as epb
from shapeshifter.api.v1 import emergency_pb2_grpc as epb_grpc


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("emergency", help="declare, clear and show emergencies")
    sub = p.add_subparsers(dest="emergency_command", metavar="ACTION", required=True)
    d = sub.add_parser("declare", help="capacity of a row (power) or aisle (cooling) dropped")
    scope = d.add_mutually_exclusive_group(required=True)
    scope.add_argument("--row", metavar="NAME")
    scope.add_argument("--aisle", metavar="NAME")
    scope.add_argument("--site", metavar="NAME")
    d.add_argument("--kind", choices=("power", "cooling"), default="",
                   help="default: power for rows and sites, cooling for aisles")
    cap = d.add_mutually_exclusive_group(required=True)
    cap.add_argument("--capacity", type=float, metavar="FRAC",
                     help="new capacity as a fraction of normal, in (0, 1]")
    cap.add_argument("--capacity-w", type=float, metavar="W", help="new power capacity in W")
    cap.add_argument("--capacity-cfm", type=float, metavar="CFM", help="new airflow in CFM")
    d.add_argument("--source", default="operator", help="e.g. ups, bms, operator")
    d.add_argument("--note", default="")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_declare)
    c = sub.add_parser("clear", help="relax the caps in steps and lift them")
    c.add_argument("emergency_id", metavar="ID")
    c.add_argument("--note", default="")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_clear)
    s = sub.add_parser("show", help="one emergency and its timeline")
    s.add_argument("emergency_id", metavar="ID")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_show)
    ls = sub.add_parser("list", help="emergencies, newest last")
    ls.add_argument("--active", action="store_true", help="only those not cleared")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)


def _stub(args: argparse.Namespace, channel: Any) -> epb_grpc.EmergencyStub:
    return epb_grpc.EmergencyStub(channel)


def cmd_declare(args: argparse.Namespace) -> int:
    scope, name = next((s, getattr(args, s)) for s in ("row", "aisle", "site")
                       if getattr(args, s) is not None)
    req = epb.DeclareEmergencyRequest(
        scope=scope, name=name, kind=args.kind, capacity_frac=args.capacity or 0.0,
        capacity_w=args.capacity_w or 0.0, capacity_cfm=args.capacity_cfm or 0.0,
        source=args.source, note=args.note)
    with client_channel(args, args.coordinator) as channel:
        status = _stub(args, channel).DeclareEmergency(req, timeout=args.timeout,
                                                       metadata=actor_metadata())
    _print_status(status, args.json)
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        status = _stub(args, channel).ClearEmergency(
            epb.ClearEmergencyRequest(emergency_id=args.emergency_id, note=args.note),
            timeout=args.timeout, metadata=actor_metadata())
    _print_status(status, args.json)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        status = _stub(args, channel).GetEmergency(
            epb.GetEmergencyRequest(emergency_id=args.emergency_id), timeout=args.timeout)
    if args.json:
        print(json.dumps(status_json(status)))
    else:
        Console().print(summary_text(status))
        Console().print(timeline_table(status))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        resp = _stub(args, channel).ListEmergencies(
            epb.ListEmergenciesRequest(active_only=args.active), timeout=args.timeout)
    if args.json:
        print(json.dumps(to_json_dict(resp)))
        return 0
    table = Table("id", "scope", "kind", "state", "capacity", "limit W", "nodes", "acked")
    for e in resp.emergencies:
        table.add_row(e.emergency_id, f"{e.scope} {e.name}", e.kind, e.state,
                      f"{e.capacity_frac:.2f}", f"{e.power_limit_w:.0f}", str(e.nodes),
                      str(e.nodes_acked))
    Console().print(table)
    return 0


def status_json(status: epb.EmergencyStatus) -> dict[str, Any]:
    """The status with each timeline event's detail decoded into an object."""
    out = to_json_dict(status)
    for event in out.get("timeline", []):
        event["detail"] = json.loads(event.pop("detail_json", "") or "{}")
    return out


def _print_status(status: epb.EmergencyStatus, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status_json(status)))
    else:
        Console().print(summary_text(status))


def summary_text(s: epb.EmergencyStatus) -> str:
    def secs(v: float) -> str:
        return f"{v:.2f} s" if v >= 0 else "-"

    return (f"emergency {s.emergency_id}: {s.kind} {s.scope} {s.name} at {s.capacity_frac:.2f} "
            f"of normal ({s.power_limit_w:.0f} W limit), {s.state}; nodes {s.nodes_acked}/"
            f"{s.nodes} acknowledged; scope now {s.scope_power_w:.0f}; shortfall "
            f"{s.shortfall_w:.0f} W; issued {secs(s.issued_s)}, acknowledged {secs(s.acked_s)}, "
            f"under the limit {secs(s.under_limit_s)}")


def timeline_table(s: epb.EmergencyStatus, last: int = 0) -> Table:
    """The timeline (the last `last` events when > 0)."""
    table = Table("t s", "event", "node", "detail")
    for e in s.timeline[-last:] if last > 0 else s.timeline:
        table.add_row(f"{e.t_s:.3f}", e.kind, e.node_id, e.detail_json[:100])
    return table
