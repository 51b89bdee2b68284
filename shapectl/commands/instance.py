"""Engine instances: `shapectl instance start|stop|reconfigure|list`, to an agent (--agent ADDR)
or through the coordinator (--node NODE).

A spec comes from flags, from --spec FILE (JSON or YAML with the InstanceSpec proto field names),
or both (flags win). `reconfigure` starts from the instance's current spec and changes only what
is given, so `shapectl instance reconfigure llama --max-num-seqs 8` does what it says.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from shapectl.targets import Target, target_for, to_json_dict
from shapeshifter.api.v1 import agent_pb2 as pb

# flag dest -> InstanceSpec field (scalars only; lists and maps are handled below)
_SCALAR_FLAGS = {
    "endpoint": "endpoint",
    "model": "model_path",
    "tp": "tensor_parallel_size",
    "quantization": "quantization",
    "dtype": "dtype",
    "max_num_seqs": "max_num_seqs",
    "max_model_len": "max_model_len",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "port": "port",
    "priority_class": "priority_class",
    "drain_timeout_s": "drain_timeout_s",
}


class SpecError(Exception):
    """A spec file or flag that cannot become an InstanceSpec."""


def register(subparsers: Any) -> None:
    inst = subparsers.add_parser("instance", help="engine instances (vLLM)").add_subparsers(
        dest="instance_command", metavar="ACTION", required=True
    )
    p = _spec_flags(_with_node(inst.add_parser("start", help="start an instance")))
    p.set_defaults(func=cmd_start)
    p = _with_node(inst.add_parser("stop", help="drain and stop an instance"))
    p.add_argument("instance_id")
    p.add_argument("--force", action="store_true", help="skip the drain")
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=0.0,
        metavar="S",
        help="drain deadline (0: the spec's)",
    )
    p.set_defaults(func=cmd_stop)
    p = _spec_flags(
        _with_node(
            inst.add_parser(
                "reconfigure",
                help="drain, stop, restart with the changed spec (rolls back on failure)",
            )
        )
    )
    p.set_defaults(func=cmd_reconfigure)
    p = _with_node(inst.add_parser("list", help="list instances"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_list)


def _with_node(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--node", default="", help="node name (via the coordinator)")
    return parser


def _spec_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("instance_id")
    p.add_argument("--spec", type=Path, metavar="FILE", help="InstanceSpec as JSON or YAML")
    p.add_argument("--endpoint", help="served model name")
    p.add_argument("--model", help="model directory")
    p.add_argument("--devices", help="comma-separated GPU indices or MIG UUIDs")
    p.add_argument("--tp", type=int, help="tensor-parallel size (= number of devices)")
    p.add_argument("--quantization", help="none | fp8 | awq | gptq | ...")
    p.add_argument("--dtype")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--port", type=int, help="0: pick a free port")
    p.add_argument("--priority-class", choices=("saas", "iaas", "best_effort"))
    p.add_argument("--drain-timeout-s", type=float)
    p.add_argument(
        "--extra-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra engine argument (allow-listed by the agent); repeatable",
    )
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="repeatable")
    return p


def spec_from_args(
    args: argparse.Namespace, base: pb.InstanceSpec | None = None
) -> pb.InstanceSpec:
    """base (the current spec, for reconfigure) <- --spec FILE <- flags."""
    spec = pb.InstanceSpec()
    if base is not None:
        spec.CopyFrom(base)
    if args.spec is not None:
        spec.MergeFrom(_load_spec_file(args.spec))
    for flag, field in _SCALAR_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(spec, field, value)
    if args.devices is not None:
        spec.ClearField("devices")
        spec.devices.extend(d.strip() for d in args.devices.split(",") if d.strip())
    if args.extra_arg:
        spec.ClearField("extra_args")
        spec.extra_args.extend(args.extra_arg)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--env {item!r}: expected KEY=VALUE")
        spec.env[key] = value
    spec.instance_id = args.instance_id
    return spec


def _load_spec_file(path: Path) -> pb.InstanceSpec:
    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except OSError as err:
        raise SpecError(f"--spec {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise SpecError(f"--spec {path}: not JSON or YAML: {err}") from err
    if not isinstance(data, dict):
        raise SpecError(f"--spec {path}: expected a mapping of InstanceSpec fields")
    try:
        return json_format.ParseDict(data, pb.InstanceSpec())
    except json_format.ParseError as err:
        raise SpecError(f"--spec {path}: {err}") from err


def _run(args: argparse.Namespace, call: Any) -> int:
    target = target_for(args)
    try:
        print(call(target))
        return 0
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        target.close()


def cmd_start(args: argparse.Namespace) -> int:
    return _run(
        args, lambda t: t.start_instance(pb.StartInstanceRequest(spec=spec_from_args(args)))
    )


def cmd_stop(args: argparse.Namespace) -> int:
    request = pb.StopInstanceRequest(
        instance_id=args.instance_id, force=args.force, drain_timeout_s=args.drain_timeout_s
    )
    return _run(args, lambda t: t.stop_instance(request))


def cmd_reconfigure(args: argparse.Namespace) -> int:
    def call(t: Target) -> str:
        current = {i.spec.instance_id: i.spec for i in t.list_instances()}
        if args.instance_id not in current:
            known = ", ".join(sorted(current)) or "none"
            raise SpecError(f"instance_id {args.instance_id!r} is unknown; known: {known}")
        spec = spec_from_args(args, base=current[args.instance_id])
        return t.reconfigure_instance(
            pb.ReconfigureInstanceRequest(instance_id=args.instance_id, new_spec=spec)
        )

    return _run(args, call)


def cmd_list(args: argparse.Namespace) -> int:
    target = target_for(args)
    try:
        instances = target.list_instances()
    finally:
        target.close()
    if args.json:
        print(json.dumps({"instances": [to_json_dict(i) for i in instances]}))
        return 0
    table = Table(title="instances")
    for column in (
        "id",
        "endpoint",
        "state",
        "pid",
        "devices",
        "TP",
        "quant",
        "max seqs",
        "running",
        "waiting",
        "KV %",
        "routable",
        "restarts",
    ):
        table.add_column(column)
    for i in instances:
        s, m = i.spec, i.metrics
        table.add_row(
            s.instance_id,
            s.endpoint,
            i.state,
            str(i.pid),
            ",".join(s.devices),
            str(s.tensor_parallel_size),
            s.quantization or "none",
            str(s.max_num_seqs),
            f"{m.requests_running:.0f}",
            f"{m.requests_waiting:.0f}",
            f"{100 * m.kv_cache_usage_frac:.0f}",
            "yes" if i.routable else "no",
            str(i.restarts),
        )
    Console().print(table)
    return 0
