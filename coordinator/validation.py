"""Pre-validation of operator actions against a node's last report (pure).

The agent validates again against the device itself; checking here first gives the operator a
clear INVALID_ARGUMENT without a round trip and keeps obviously bad plans off the wire.
"""

from __future__ import annotations

from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common.errors import InvalidArgument, out_of_range


def gpu_of(node: agent_pb2.Node, gpu_index: int, field: str = "request.gpu_index") -> agent_pb2.Gpu:
    for g in node.gpus:
        if g.index == gpu_index:
            return g
    indices = sorted(g.index for g in node.gpus)
    allowed = f"[{indices[0]}, {indices[-1]}]" if indices else "none (the node reported no GPUs)"
    raise InvalidArgument(
        f"{field}={gpu_index} is not a GPU of node {node.node_id}; allowed range {allowed}",
        field=field,
    )


def validate_action(node: agent_pb2.Node, action: agent_pb2.Action) -> None:
    """Raise InvalidArgument naming the field and allowed range; return when the action may go."""
    kind = action.WhichOneof("kind")
    if kind == "set_power_limit":
        req = action.set_power_limit
        g = gpu_of(node, req.gpu_index)
        if not g.power_limit_min_w <= req.power_limit_w <= g.power_limit_max_w:
            raise out_of_range("request.power_limit_w", req.power_limit_w, g.power_limit_min_w,
                               g.power_limit_max_w, "W")
    elif kind == "lock_clocks":
        req = action.lock_clocks
        g = gpu_of(node, req.gpu_index)
        clocks = g.supported_sm_clocks_mhz
        low, high = (min(clocks), max(clocks)) if clocks else (0, g.sm_clock_max_mhz)
        for name, mhz in (("min_mhz", req.min_mhz), ("max_mhz", req.max_mhz)):
            if not low <= mhz <= high:
                raise out_of_range(f"request.{name}", mhz, low, high, "MHz")
        if req.min_mhz > req.max_mhz:
            raise InvalidArgument(
                f"request.min_mhz={req.min_mhz} must not exceed request.max_mhz={req.max_mhz}",
                field="request.min_mhz",
            )
    elif kind == "reset_clocks":
        gpu_of(node, action.reset_clocks.gpu_index)
    elif kind == "set_mig_mode":
        gpu_of(node, action.set_mig_mode.gpu_index)
    elif kind == "apply_mig_layout":
        req = action.apply_mig_layout
        if req.mig_parted_yaml:
            if not req.mig_parted_config:
                raise InvalidArgument("request.mig_parted_config is required with mig_parted_yaml",
                                      field="request.mig_parted_config")
        else:
            gpu_of(node, req.gpu_index)
    elif kind in ("start_instance", "stop_instance", "reconfigure_instance"):
        _validate_instance_action(node, action)
    else:
        raise InvalidArgument(f"action kind {kind!r} is not an operator pass-through",
                              field="action")


def _validate_instance_action(node: agent_pb2.Node, action: agent_pb2.Action) -> None:
    """Identity checks only: the agent validates the spec itself against its devices and ports."""
    kind = action.WhichOneof("kind")
    known = {i.spec.instance_id for i in node.instances}
    if kind == "start_instance":
        instance_id = action.start_instance.spec.instance_id
        if not instance_id:
            raise InvalidArgument("request.spec.instance_id must not be empty",
                                  field="request.spec.instance_id")
        return
    instance_id = (action.stop_instance.instance_id if kind == "stop_instance"
                   else action.reconfigure_instance.instance_id)
    if instance_id not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise InvalidArgument(
            f"request.instance_id={instance_id!r} is not an instance of node {node.node_id}; "
            f"known: {listed}", field="request.instance_id")
