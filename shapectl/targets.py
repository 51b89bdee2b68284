"""Where per-node shapectl commands go: straight to an agent (AgentTarget), or through the
coordinator (CoordinatorTarget, added with the coordinator). Both speak the agent's messages.
"""

from __future__ import annotations

import getpass
import socket
from typing import Any, Protocol

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from coordinator.rpc.util import ACTOR_METADATA_KEY
from shapectl.channels import ClientSecurity, open_channel
from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import agent_pb2_grpc as pb_grpc
from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.api.v1 import coordinator_pb2_grpc as cpb_grpc


class Target(Protocol):
    def node(self) -> pb.Node: ...
    def set_power(self, gpu_index: int, power_limit_w: float) -> pb.ActionResult: ...
    def lock_clocks(self, gpu_index: int, min_mhz: int, max_mhz: int) -> pb.ActionResult: ...
    def reset_clocks(self, gpu_index: int) -> pb.ActionResult: ...
    def set_mig_mode(self, gpu_index: int, enabled: bool) -> pb.ActionResult: ...
    def mig_apply(self, request: pb.ApplyMigLayoutRequest) -> pb.ActionResult: ...
    def start_instance(self, request: pb.StartInstanceRequest) -> str: ...
    def stop_instance(self, request: pb.StopInstanceRequest) -> str: ...
    def reconfigure_instance(self, request: pb.ReconfigureInstanceRequest) -> str: ...
    def list_instances(self) -> list[pb.Instance]: ...
    def close(self) -> None: ...


class AgentTarget:
    """A nodeagent's gRPC API at HOST:PORT."""

    def __init__(self, address: str, timeout_s: float = 10.0,
                 instance_timeout_s: float = 900.0, security: ClientSecurity | None = None) -> None:
        self._channel = open_channel(address, security)
        self._stub = pb_grpc.NodeAgentStub(self._channel)
        self._timeout_s = timeout_s
        self._instance_timeout_s = instance_timeout_s

    def node(self) -> pb.Node:
        return self._stub.GetNode(pb.GetNodeRequest(), timeout=self._timeout_s)

    def set_power(self, gpu_index: int, power_limit_w: float) -> pb.ActionResult:
        request = pb.SetPowerLimitRequest(gpu_index=gpu_index, power_limit_w=power_limit_w)
        return self._stub.SetPowerLimit(request, timeout=self._timeout_s)

    def lock_clocks(self, gpu_index: int, min_mhz: int, max_mhz: int) -> pb.ActionResult:
        request = pb.LockClocksRequest(gpu_index=gpu_index, min_mhz=min_mhz, max_mhz=max_mhz)
        return self._stub.LockClocks(request, timeout=self._timeout_s)

    def reset_clocks(self, gpu_index: int) -> pb.ActionResult:
        return self._stub.ResetClocks(
            pb.ResetClocksRequest(gpu_index=gpu_index), timeout=self._timeout_s
        )

    def set_mig_mode(self, gpu_index: int, enabled: bool) -> pb.ActionResult:
        request = pb.SetMigModeRequest(gpu_index=gpu_index, enabled=enabled)
        return self._stub.SetMigMode(request, timeout=self._timeout_s)

    def mig_apply(self, request: pb.ApplyMigLayoutRequest) -> pb.ActionResult:
        return self._stub.ApplyMigLayout(request, timeout=self._timeout_s)

    # Instance calls return a one-line outcome; they wait for the engine, hence instance_timeout_s.
    def start_instance(self, request: pb.StartInstanceRequest) -> str:
        inst = self._stub.StartInstance(request, timeout=self._instance_timeout_s)
        return f"{inst.spec.instance_id}: {inst.state} pid {inst.pid} port {inst.spec.port}"

    def stop_instance(self, request: pb.StopInstanceRequest) -> str:
        inst = self._stub.StopInstance(request, timeout=self._instance_timeout_s)
        return f"{inst.spec.instance_id}: {inst.state}"

    def reconfigure_instance(self, request: pb.ReconfigureInstanceRequest) -> str:
        r = self._stub.ReconfigureInstance(request, timeout=self._instance_timeout_s)
        steps = " ".join(f"{s.step}={s.seconds:.1f}s" for s in r.steps)
        verdict = "ROLLED BACK" if r.rolled_back else "reconfigured"
        return f"{r.instance.spec.instance_id}: {verdict} {steps} {r.message}".strip()

    def list_instances(self) -> list[pb.Instance]:
        return list(self._stub.ListInstances(pb.ListInstancesRequest(),
                                             timeout=self._timeout_s).instances)

    def close(self) -> None:
        self._channel.close()


def actor_metadata() -> tuple[tuple[str, str], ...]:
    """Who is acting, for the coordinator's audit log."""
    return ((ACTOR_METADATA_KEY, f"shapectl:{getpass.getuser()}@{socket.gethostname()}"),)


class CoordinatorTarget:
    """One node through the coordinator's admin API: validated there, sent over the agent's
    stream as a one-action plan, audited."""

    def __init__(self, address: str, node_id: str, timeout_s: float = 10.0,
                 instance_timeout_s: float = 900.0, security: ClientSecurity | None = None) -> None:
        self._channel = open_channel(address, security)
        self._stub = cpb_grpc.CoordinatorStub(self._channel)
        self._node_id = node_id
        self._timeout_s = timeout_s
        self._instance_timeout_s = instance_timeout_s

    def node(self) -> pb.Node:
        status = self._stub.GetNode(cpb.GetNodeRequest(node_id=self._node_id),
                                    timeout=self._timeout_s)
        return status.last_report

    def _call(self, rpc: Any, request: Message) -> pb.ActionResult:
        return rpc(request, timeout=self._timeout_s, metadata=actor_metadata())

    def set_power(self, gpu_index: int, power_limit_w: float) -> pb.ActionResult:
        req = pb.SetPowerLimitRequest(gpu_index=gpu_index, power_limit_w=power_limit_w)
        return self._call(self._stub.SetPowerLimit,
                          cpb.NodeSetPowerLimitRequest(node_id=self._node_id, request=req))

    def lock_clocks(self, gpu_index: int, min_mhz: int, max_mhz: int) -> pb.ActionResult:
        req = pb.LockClocksRequest(gpu_index=gpu_index, min_mhz=min_mhz, max_mhz=max_mhz)
        return self._call(self._stub.LockClocks,
                          cpb.NodeLockClocksRequest(node_id=self._node_id, request=req))

    def reset_clocks(self, gpu_index: int) -> pb.ActionResult:
        req = pb.ResetClocksRequest(gpu_index=gpu_index)
        return self._call(self._stub.ResetClocks,
                          cpb.NodeResetClocksRequest(node_id=self._node_id, request=req))

    def set_mig_mode(self, gpu_index: int, enabled: bool) -> pb.ActionResult:
        req = pb.SetMigModeRequest(gpu_index=gpu_index, enabled=enabled)
        return self._call(self._stub.SetMigMode,
                          cpb.NodeSetMigModeRequest(node_id=self._node_id, request=req))

    def mig_apply(self, request: pb.ApplyMigLayoutRequest) -> pb.ActionResult:
        return self._call(self._stub.ApplyMigLayout,
                          cpb.NodeApplyMigLayoutRequest(node_id=self._node_id, request=request))

    def _instance_call(self, rpc: Any, request: Message) -> str:
        r = rpc(request, timeout=self._instance_timeout_s, metadata=actor_metadata())
        return f"{'changed' if r.changed else 'unchanged'} in {r.duration_s:.1f}s {r.message}"

    def start_instance(self, request: pb.StartInstanceRequest) -> str:
        return self._instance_call(self._stub.StartInstance, cpb.NodeStartInstanceRequest(
            node_id=self._node_id, request=request))

    def stop_instance(self, request: pb.StopInstanceRequest) -> str:
        return self._instance_call(self._stub.StopInstance, cpb.NodeStopInstanceRequest(
            node_id=self._node_id, request=request))

    def reconfigure_instance(self, request: pb.ReconfigureInstanceRequest) -> str:
        return self._instance_call(self._stub.ReconfigureInstance,
                                   cpb.NodeReconfigureInstanceRequest(node_id=self._node_id,
                                                                      request=request))

    def list_instances(self) -> list[pb.Instance]:
        resp = self._stub.ListInstances(cpb.NodeListInstancesRequest(node_id=self._node_id),
                                        timeout=self._timeout_s)
        return list(resp.instances)

    def close(self) -> None:
        self._channel.close()


class TargetError(Exception):
    """No usable target for the command line given."""


def target_for(args: Any) -> Target:
    """The target a per-node command addresses: --agent wins, else the coordinator."""
    security = getattr(args, "security", None)
    if args.agent:
        return AgentTarget(args.agent, args.timeout, security=security)
    node_id = getattr(args, "node", "")
    if not node_id:
        raise TargetError("per-node commands need a node name (--node NODE, or NODE for `node`) "
                          "to go through the coordinator, or --agent ADDR")
    return CoordinatorTarget(args.coordinator, node_id, args.timeout, security=security)


_INT64_TYPES = (
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
)


def to_json_dict(message: Message) -> dict[str, Any]:
    """The proto as a dict with proto field names, defaults included, and 64-bit integers as
    numbers (the proto3 JSON mapping writes them as strings)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _ints_to_numbers(message.DESCRIPTOR, data)
    return data


def _ints_to_numbers(desc: Descriptor, data: dict[str, Any]) -> None:
    for f in desc.fields:
        if f.name not in data:
            continue
        value = data[f.name]
        if f.type in _INT64_TYPES:
            data[f.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif f.message_type is not None and not f.message_type.GetOptions().map_entry:
            for item in value if isinstance(value, list) else [value]:
                _ints_to_numbers(f.message_type, item)
