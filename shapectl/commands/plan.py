"""Rebalancing, placement and routing against the coordinator's Planner, Placement and Routing.

    shapectl endpoint set NAME --model M --slo-p95 S [--model-path P] [--quantizations none,fp8]
                              [--priority-class saas] [--min-instances N] [--max-instances N]
                              [--demand-rps X] [--query-class LISO]
    shapectl endpoint list|delete NAME
    shapectl plan propose | show [ID] [--json] | list | diff [ID] | apply ID [--wait]
    shapectl plan mode [off|propose|auto]
    shapectl place --json --gpus N --class iaas|saas|best_effort [--power-w W] [--model M]
    shapectl routes ENDPOINT [--json] [--mode latency|energy]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from shapectl.channels import client_channel
from shapectl.targets import TargetError, actor_metadata, to_json_dict
from shapeshifter.api.v1 import rebalance_pb2 as rpb
from shapeshifter.api.v1 import rebalance_pb2_grpc as rpb_grpc

FINAL_STATES = ("applied", "failed", "paused", "superseded", "proposed")


def register(subparsers: Any) -> None:
    _register_endpoint(subparsers)
    _register_plan(subparsers)
    pl = subparsers.add_parser("place", help="rank nodes for a GPU VM/job or an LLM instance")
    pl.add_argument("--gpus", type=int, required=True, metavar="N", help="GPUs on one node")
    pl.add_argument("--class", dest="priority_class", required=True, metavar="CLASS",
                    help="iaas (opaque VM/job) | saas | best_effort (flexible LLM loads)")
    pl.add_argument("--power-w", type=float, default=0.0, metavar="W",
                    help="predicted peak power of all its GPUs (default: their TDP)")
    pl.add_argument("--gpu-type", default="", metavar="T", help="e.g. h100-80gb (default: any)")
    pl.add_argument("--model", default="", metavar="M", help="an LLM instance's model")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.set_defaults(func=cmd_place)
    r = subparsers.add_parser("routes", help="routing weights of an endpoint's instances")
    r.add_argument("endpoint", metavar="ENDPOINT")
    r.add_argument("--mode", default="", metavar="MODE", help="latency (default) | energy")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=cmd_routes)


def _register_endpoint(subparsers: Any) -> None:
    p = subparsers.add_parser("endpoint", help="declare the endpoints the rebalancer manages")
    sub = p.add_subparsers(dest="endpoint_command", metavar="ACTION", required=True)
    s = sub.add_parser("set", help="declare or replace an endpoint")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--model", required=True, metavar="M", help="model as named in the profiles")
    s.add_argument("--model-path", default="", metavar="P", help="on the nodes (default: M)")
    s.add_argument("--slo-p95", type=float, required=True, metavar="S", help="P95 latency SLO, s")
    s.add_argument("--quantizations", default="none", metavar="LIST",
                   help="allowed quantizations, comma-separated (the quality floor)")
    s.add_argument("--priority-class", default="saas", metavar="CLASS",
                   help="saas | iaas | best_effort")
    s.add_argument("--min-instances", type=int, default=1, metavar="N")
    s.add_argument("--max-instances", type=int, default=1000, metavar="N")
    s.add_argument("--demand-rps", type=float, default=0.0, metavar="X",
                   help="fixed demand instead of the measured one (0: measured)")
    s.add_argument("--query-class", default="", metavar="C",
                   help="SISO | SILO | LISO | LILO: class of the demand (default: inferred)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_endpoint_set)
    ls = sub.add_parser("list", help="declared endpoints and the demand used for each")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_endpoint_list)
    d = sub.add_parser("delete", help="stop managing an endpoint (its instances keep running)")
    d.add_argument("name", metavar="NAME")
    d.set_defaults(func=cmd_endpoint_delete)


def _register_plan(subparsers: Any) -> None:
    p = subparsers.add_parser("plan", help="rebalance plans: propose, show, diff, apply, mode")
    sub = p.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    pr = sub.add_parser("propose", help="run the rebalance policy now")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_plan_propose)
    sh = sub.add_parser("show", help="one plan (default: the latest) with its stages")
    sh.add_argument("plan_id", nargs="?", default="", metavar="ID")
    sh.add_argument("--json", action="store_true", help="print one JSON object")
    sh.set_defaults(func=cmd_plan_show)
    ls = sub.add_parser("list", help="recent plans, newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_plan_list)
    df = sub.add_parser("diff", help="what a plan starts (+), stops (-) and changes (~)")
    df.add_argument("plan_id", nargs="?", default="", metavar="ID")
    df.set_defaults(func=cmd_plan_diff)
    ap = sub.add_parser("apply", help="execute a proposed or paused plan stage by stage")
    ap.add_argument("plan_id", metavar="ID")
    ap.add_argument("--wait", action="store_true", help="until applied, paused or failed")
    ap.add_argument("--wait-timeout", type=float, default=900.0, metavar="S")
    ap.add_argument("--json", action="store_true")
    ap.set_defaults(func=cmd_plan_apply)
    md = sub.add_parser("mode", help="show or set the loop's mode")
    md.add_argument("mode", nargs="?", default="", metavar="MODE", help="off | propose | auto")
    md.add_argument("--json", action="store_true")
    md.set_defaults(func=cmd_plan_mode)


def _planner(channel: Any) -> rpb_grpc.PlannerStub:
    return rpb_grpc.PlannerStub(channel)


def _non_negative(name: str, value: int, high: int) -> int:
    if not 0 <= value <= high:
        raise TargetError(f"{name}={value} is outside the allowed range [0, {high}]")
    return value


# ---------------------------------------------------------------- endpoints


def cmd_endpoint_set(args: argparse.Namespace) -> int:
    req = rpb.Endpoint(
        name=args.name, model=args.model, model_path=args.model_path, slo_p95_s=args.slo_p95,
        allowed_quantizations=[q.strip() for q in args.quantizations.split(",") if q.strip()],
        priority_class=args.priority_class,
        min_instances=_non_negative("min_instances", args.min_instances, 10_000),
        max_instances=_non_negative("max_instances", args.max_instances, 10_000),
        demand_rps=args.demand_rps, query_class=args.query_class)
    with client_channel(args, args.coordinator) as channel:
        e = _planner(channel).SetEndpoint(req, timeout=args.timeout, metadata=actor_metadata())
    if args.json:
        print(json.dumps(to_json_dict(e)))
    else:
        print(f"endpoint {e.name}: {e.model}, SLO P95 {e.slo_p95_s:g} s, "
              f"{','.join(e.allowed_quantizations)}, {e.priority_class}")
    return 0


def cmd_endpoint_list(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        resp = _planner(channel).ListEndpoints(rpb.ListEndpointsRequest(), timeout=args.timeout)
    if args.json:
        print(json.dumps(to_json_dict(resp)))
        return 0
    table = Table("name", "model", "SLO p95 s", "quantizations", "class", "instances",
                  "demand req/s")
    for e in resp.endpoints:
        fixed = " (fixed)" if e.demand_rps > 0 else ""
        table.add_row(e.name, e.model, f"{e.slo_p95_s:g}", ",".join(e.allowed_quantizations),
                      e.priority_class, f"{e.min_instances}-{e.max_instances}",
                      f"{e.measured_rps:.2f}{fixed}")
    Console().print(table)
    return 0


def cmd_endpoint_delete(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        _planner(channel).DeleteEndpoint(rpb.DeleteEndpointRequest(name=args.name),
                                         timeout=args.timeout, metadata=actor_metadata())
    print(f"endpoint {args.name}: deleted")
    return 0


# ---------------------------------------------------------------- plans


def cmd_plan_propose(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        plan = _planner(channel).ProposePlan(rpb.ProposePlanRequest(), timeout=args.timeout,
                                             metadata=actor_metadata())
    _print_plan(plan, args.json)
    return 0


def cmd_plan_show(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        plan = _planner(channel).GetPlan(rpb.GetPlanRequest(plan_id=args.plan_id),
                                         timeout=args.timeout)
    _print_plan(plan, args.json)
    return 0


def cmd_plan_list(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        resp = _planner(channel).ListPlans(
            rpb.ListPlansRequest(limit=_non_negative("limit", args.limit, 1000)),
            timeout=args.timeout)
    if args.json:
        print(json.dumps(to_json_dict(resp)))
        return 0
    table = Table("id", "created", "state", "trigger", "GPUs", "reason")
    for p in resp.plans:
        table.add_row(p.plan_id, time.strftime("%Y-%m-%d %H:%M:%S",
                                               time.localtime(p.created_at_unix_s)),
                      p.state, p.trigger, f"{p.gpus_before} -> {p.gpus_after}", p.reason)
    Console().print(table)
    return 0


def cmd_plan_diff(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        diff = _planner(channel).GetPlanDiff(rpb.GetPlanRequest(plan_id=args.plan_id),
                                             timeout=args.timeout)
    print(f"plan {diff.plan_id}")
    for line in diff.lines or ["(no change)"]:
        print(line)
    return 0


def cmd_plan_apply(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        stub = _planner(channel)
        plan = stub.ApplyPlan(rpb.ApplyPlanRequest(plan_id=args.plan_id), timeout=args.timeout,
                              metadata=actor_metadata())
        deadline = time.monotonic() + args.wait_timeout
        while args.wait and plan.state not in FINAL_STATES and time.monotonic() < deadline:
            time.sleep(0.5)
            plan = stub.GetPlan(rpb.GetPlanRequest(plan_id=plan.plan_id), timeout=args.timeout)
    _print_plan(plan, args.json)
    return 0 if plan.state in ("applying", "applied") else 1


def cmd_plan_mode(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        stub = _planner(channel)
        status = (stub.SetMode(rpb.SetModeRequest(mode=args.mode), timeout=args.timeout,
                               metadata=actor_metadata()) if args.mode
                  else stub.GetMode(rpb.GetModeRequest(), timeout=args.timeout))
    if args.json:
        print(json.dumps(to_json_dict(status)))
    else:
        print(f"mode {status.mode}, every {status.interval_s:g} s; last plan "
              f"{status.last_plan_id or '-'}")
    return 0


def _print_plan(plan: rpb.PlanStatus, as_json: bool) -> None:
    if as_json:
        print(json.dumps(to_json_dict(plan)))
        return
    console = Console()
    error = f" ({plan.error})" if plan.error else ""
    console.print(f"plan {plan.plan_id}: {plan.state}{error}; GPUs {plan.gpus_before} -> "
                  f"{plan.gpus_after}, power {plan.power_before_w:.0f} -> "
                  f"{plan.power_after_w:.0f} W; {plan.reason}")
    for w in plan.warnings:
        console.print(f"warning: {w}")
    table = Table("stage", "action", "node", "instance", "config", "GPUs", "state", "reason")
    for i, stage in enumerate(plan.stages, 1):
        for a in stage.actions:
            table.add_row(str(i), a.kind, a.node_id, a.instance_id, a.config,
                          ",".join(map(str, a.gpu_indices)), a.state, a.error or a.reason)
    if plan.stages:
        console.print(table)
    outcomes = Table("endpoint", "decision", "demand", "capacity", "GPUs", "reason")
    for o in plan.outcomes:
        outcomes.add_row(o.endpoint, o.decision, f"{o.demand_rps:.2f}",
                         f"{o.capacity_before_rps:.2f} -> {o.capacity_after_rps:.2f}",
                         f"{o.gpus_before:.2f} -> {o.gpus_after:.2f}", o.reason)
    if plan.outcomes:
        console.print(outcomes)


# ---------------------------------------------------------------- placement, routing


def cmd_place(args: argparse.Namespace) -> int:
    req = rpb.PlaceRequest(gpus=_non_negative("gpus", args.gpus, 64),
                           priority_class=args.priority_class,
                           predicted_peak_power_w=args.power_w, gpu_type=args.gpu_type,
                           model=args.model)
    with client_channel(args, args.coordinator) as channel:
        resp = rpb_grpc.PlacementStub(channel).Place(req, timeout=args.timeout,
                                                     metadata=actor_metadata())
    if args.json:
        print(json.dumps(to_json_dict(resp)))
        return 0
    table = Table("rank", "node", "row", "aisle", "GPUs", "inlet C", "reason")
    for i, n in enumerate(resp.nodes, 1):
        table.add_row(str(i), n.node_id, n.row, n.aisle, ",".join(map(str, n.gpu_indices)),
                      f"{n.inlet_temp_c:.1f}", n.reason)
    Console().print(table if resp.nodes else "no node fits within the limits")
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    with client_channel(args, args.coordinator) as channel:
        resp = rpb_grpc.RoutingStub(channel).GetRoutingWeights(
            rpb.GetRoutingWeightsRequest(endpoint=args.endpoint, mode=args.mode),
            timeout=args.timeout)
    if args.json:
        print(json.dumps(to_json_dict(resp)))
        return 0
    table = Table("instance", "node", "weight", "url", "reason")
    for w in resp.weights:
        table.add_row(w.instance_id, w.node_id, f"{w.weight:.3f}", w.url, w.reason)
    Console().print(table)
    return 0
