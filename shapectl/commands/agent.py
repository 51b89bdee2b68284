"""Per-node commands: node, gpu set-power|lock-clocks|reset-clocks|mig-mode, mig apply."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from shapectl.targets import target_for, to_json_dict
from shapeshifter.api.v1 import agent_pb2 as pb


def register(subparsers: Any) -> None:
    node = subparsers.add_parser("node", help="show one node's GPUs, telemetry and budgets")
    node.add_argument("node", nargs="?", default="", help="node name (via the coordinator)")
    node.add_argument("--json", action="store_true", help="print one JSON object")
    node.set_defaults(func=cmd_node)

    gpu = subparsers.add_parser("gpu", help="change a GPU").add_subparsers(
        dest="gpu_command", metavar="ACTION", required=True
    )
    p = _with_node(gpu.add_parser("set-power", help="set the power limit (W)"))
    p.add_argument("gpu", type=int)
    p.add_argument("watts", type=float)
    p.set_defaults(func=cmd_set_power)
    p = _with_node(gpu.add_parser("lock-clocks", help="lock SM clocks to [MIN, MAX] MHz"))
    p.add_argument("gpu", type=int)
    p.add_argument("min_mhz", type=int)
    p.add_argument("max_mhz", type=int)
    p.set_defaults(func=cmd_lock_clocks)
    p = _with_node(gpu.add_parser("reset-clocks", help="unlock SM clocks"))
    p.add_argument("gpu", type=int)
    p.set_defaults(func=cmd_reset_clocks)
    p = _with_node(gpu.add_parser("mig-mode", help="enable or disable MIG"))
    p.add_argument("gpu", type=int)
    p.add_argument("mode", choices=("on", "off"))
    p.set_defaults(func=cmd_mig_mode)

    mig = subparsers.add_parser("mig", help="MIG layouts").add_subparsers(
        dest="mig_command", metavar="ACTION", required=True
    )
    p = _with_node(mig.add_parser("apply", help="apply GPU PROFILE... or --file F --config NAME"))
    p.add_argument("gpu", type=int, nargs="?")
    p.add_argument("profiles", nargs="*", help='e.g. 3g.40gb 2g.20gb ("" for none)')
    p.add_argument("--file", type=Path, help="mig-parted v1 YAML file")
    p.add_argument("--config", dest="mig_config", help="config name in --file")
    p.add_argument("--restart-instances", action="store_true",
                   help="on a GPU in use: drain, stop, apply, restart each instance on a new "
                        "device of its profile (journaled)")
    p.set_defaults(func=cmd_mig_apply)


def _with_node(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--node", default="", help="node name (via the coordinator)")
    return parser


def _report(what: str, result: pb.ActionResult) -> int:
    print(f"{what}: {'changed' if result.changed else 'already so, unchanged'}")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    target = target_for(args)
    try:
        node = target.node()
    finally:
        target.close()
    if args.json:
        print(json.dumps(to_json_dict(node)))
    else:
        Console().print(node_table(node))
    return 0


def node_table(node: pb.Node) -> Table:
    table = Table(
        title=f"{node.node_id} ({node.backend}, {node.safety_state}) "
        f"node power {node.budget.node_power_w:.0f} W"
    )
    for column in (
        "GPU",
        "name",
        "power W",
        "limit W (range)",
        "temp °C",
        "SM MHz",
        "lock",
        "memory MiB",
        "util %",
        "MIG",
        "throttle",
    ):
        table.add_column(column)
    for g in node.gpus:
        lock = f"{g.clock_lock.min_mhz}-{g.clock_lock.max_mhz}" if g.HasField("clock_lock") else ""
        mig = ",".join(i.profile for i in g.mig_instances) if g.mig_enabled else "off"
        table.add_row(
            str(g.index),
            g.name,
            f"{g.power_draw_w:.0f}",
            f"{g.power_limit_w:.0f} ({g.power_limit_min_w:.0f}-{g.power_limit_max_w:.0f})",
            f"{g.temperature_c:.1f}",
            str(g.sm_clock_mhz),
            lock,
            f"{g.memory_used_mib}/{g.memory_total_mib}",
            f"{g.utilization_gpu_pct:.0f}",
            mig or "on",
            ",".join(g.throttle_reasons),
        )
    return table


def _act(args: argparse.Namespace, what: str, call: Any) -> int:
    target = target_for(args)
    try:
        return _report(what, call(target))
    finally:
        target.close()


def cmd_set_power(args: argparse.Namespace) -> int:
    return _act(
        args,
        f"gpu {args.gpu}: power limit {args.watts:g} W",
        lambda t: t.set_power(args.gpu, args.watts),
    )


def cmd_lock_clocks(args: argparse.Namespace) -> int:
    return _act(
        args,
        f"gpu {args.gpu}: clocks locked to {args.min_mhz}-{args.max_mhz} MHz",
        lambda t: t.lock_clocks(args.gpu, args.min_mhz, args.max_mhz),
    )


def cmd_reset_clocks(args: argparse.Namespace) -> int:
    return _act(args, f"gpu {args.gpu}: clocks reset", lambda t: t.reset_clocks(args.gpu))


def cmd_mig_mode(args: argparse.Namespace) -> int:
    return _act(
        args,
        f"gpu {args.gpu}: MIG {args.mode}",
        lambda t: t.set_mig_mode(args.gpu, args.mode == "on"),
    )


def cmd_mig_apply(args: argparse.Namespace) -> int:
    if args.file is not None:
        if not args.mig_config:
            return _usage("mig apply --file needs --config NAME")
        try:
            text = args.file.read_text()
        except OSError as err:
            return _usage(f"cannot read --file {args.file}: {err.strerror}")
        request = pb.ApplyMigLayoutRequest(mig_parted_yaml=text, mig_parted_config=args.mig_config)
        what = f"MIG config {args.mig_config} from {args.file}"
    else:
        if args.gpu is None:
            return _usage("mig apply needs GPU PROFILE... or --file F --config NAME")
        profiles = [p for p in args.profiles if p]
        request = pb.ApplyMigLayoutRequest(gpu_index=args.gpu, profiles=profiles,
                                           restart_instances=args.restart_instances)
        what = f"gpu {args.gpu}: MIG layout [{', '.join(profiles)}]"
    return _act(args, what, lambda t: t.mig_apply(request))


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
