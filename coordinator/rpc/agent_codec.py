"""The coordinator -> agent codec: registration answers, leases, the plan envelope, the
emergency messages (directives, pre-arms, the emergency's actions) and the ids of everything sent
to an agent, and the rebalance loop's plan actions and instance specs."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from shapeshifter.api.v1 import agent_pb2, link_pb2
from shapeshifter.common import errors


def new_id() -> str:
    """A fresh plan, action, directive or prearm id."""
    return uuid.uuid4().hex


def registered(node_id: str, epoch: int, topology_known: bool,
               message: str = "") -> link_pb2.Registered:
    return link_pb2.Registered(node_id=node_id, epoch=epoch, topology_known=topology_known,
                               message=message)


def lease(node_id: str, epoch: int, grant: int, ttl_s: float,
          caps_w: dict[int, float]) -> agent_pb2.Lease:
    """A lease; ``grant`` numbers the grants to this node within one epoch."""
    return agent_pb2.Lease(lease_id=f"{node_id}/e{epoch}/g{grant}", epoch=epoch, ttl_s=ttl_s,
                           gpu_power_limit_w=caps_w)


def plan(actions: Sequence[agent_pb2.Action], epoch: int, reason: str,
         plan_id: str = "") -> agent_pb2.Plan:
    return agent_pb2.Plan(plan_id=plan_id or new_id(), epoch=epoch, actions=list(actions),
                          reason=reason)


# ---------------------------------------------------------------- emergencies


def emergency_directive(epoch: int, emergency_id: str, capacity_frac: float,
                        caps_w: dict[int, float] | None, fallback_after_s: float, reason: str,
                        active: bool = True) -> agent_pb2.EmergencyDirective:
    """An emergency's directive to one node; caps_w None: the broadcast (no caps of its own)."""
    return agent_pb2.EmergencyDirective(
        directive_id=new_id(), epoch=epoch, emergency_id=emergency_id, active=active,
        capacity_frac=capacity_frac, gpu_power_ceiling_w=caps_w or {},
        has_caps=caps_w is not None, fallback_after_s=fallback_after_s, reason=reason)


def all_clear(epoch: int) -> agent_pb2.EmergencyDirective:
    """What a (re)connected node outside every emergency is told."""
    return agent_pb2.EmergencyDirective(directive_id=new_id(), epoch=epoch, active=False,
                                        reason="no emergency")


def emergency_prearm(epoch: int,
                     levels: dict[float, dict[int, float]]) -> agent_pb2.EmergencyPrearm:
    """A node's pre-armed caps: per severity (capacity fraction), its GPUs' ceilings."""
    return agent_pb2.EmergencyPrearm(
        prearm_id=new_id(), epoch=epoch,
        levels=[agent_pb2.PrearmedLevel(capacity_frac=s, gpu_power_ceiling_w=caps)
                for s, caps in sorted(levels.items())])


def emergency_message(directive: agent_pb2.EmergencyDirective) -> link_pb2.CoordinatorMessage:
    return link_pb2.CoordinatorMessage(emergency=directive)


def plan_message(p: agent_pb2.Plan) -> link_pb2.CoordinatorMessage:
    return link_pb2.CoordinatorMessage(plan=p)


def prearm_message(prearm: agent_pb2.EmergencyPrearm) -> link_pb2.CoordinatorMessage:
    return link_pb2.CoordinatorMessage(prearm=prearm)


def stop_instance(instance_id: str, reason: str) -> agent_pb2.Action:
    """A forced stop (no action id: the pass-through path validates and audits it)."""
    return agent_pb2.Action(stop_instance=agent_pb2.StopInstanceRequest(
        instance_id=instance_id, force=True), reason=reason)


def lock_clocks(gpu_index: int, min_mhz: int, max_mhz: int, reason: str) -> agent_pb2.Action:
    return agent_pb2.Action(action_id=new_id(), reason=reason,
                            lock_clocks=agent_pb2.LockClocksRequest(
                                gpu_index=gpu_index, min_mhz=min_mhz, max_mhz=max_mhz))


def reset_clocks(gpu_index: int) -> agent_pb2.Action:
    return agent_pb2.Action(action_id=new_id(),
                            reset_clocks=agent_pb2.ResetClocksRequest(gpu_index=gpu_index))


# ---------------------------------------------------------------- rebalance plans


def rebalance_action(a: Mapping[str, Any], spec: agent_pb2.InstanceSpec | None = None,
                     min_mhz: int = 0) -> agent_pb2.Action:
    """A rebalance plan's stored action (coordinator.rebalance.plandoc) as an agent Action.
    spec: a start's instance (instance_spec); min_mhz: the lower end of a clock lock."""
    ex = a["exec"]
    action = agent_pb2.Action(action_id=new_id(), reason=a["reason"][:500])
    kind = a["kind"]
    if kind == "set_mig_mode":
        action.set_mig_mode.CopyFrom(agent_pb2.SetMigModeRequest(
            gpu_index=a["gpu_indices"][0], enabled=ex["mig_enabled"]))
    elif kind == "apply_mig_layout":
        action.apply_mig_layout.CopyFrom(agent_pb2.ApplyMigLayoutRequest(
            gpu_index=a["gpu_indices"][0], profiles=a["mig_profiles"]))
    elif kind == "stop_instance":
        action.stop_instance.CopyFrom(agent_pb2.StopInstanceRequest(
            instance_id=a["instance_id"]))
    elif kind == "start_instance" and spec is not None:
        action.start_instance.CopyFrom(agent_pb2.StartInstanceRequest(spec=spec))
    elif kind == "lock_clocks":
        action.lock_clocks.CopyFrom(agent_pb2.LockClocksRequest(
            gpu_index=a["gpu_indices"][0], min_mhz=min_mhz, max_mhz=int(a["sm_clock_mhz"])))
    elif kind == "reset_clocks":
        action.reset_clocks.CopyFrom(agent_pb2.ResetClocksRequest(
            gpu_index=a["gpu_indices"][0]))
    else:
        raise errors.InvalidArgument(f"action kind {kind!r} is not executable", field="kind")
    return action


def instance_spec(template: agent_pb2.InstanceSpec | None, instance_id: str, endpoint: str,
                  model_path: str, devices: Sequence[str], tensor_parallel_size: int,
                  quantization: str, priority_class: str) -> agent_pb2.InstanceSpec:
    """A new instance: the template's engine settings (a running instance of the endpoint) with
    these placement and reshape knobs; the agent picks the port."""
    spec = agent_pb2.InstanceSpec()
    if template is not None:
        spec.CopyFrom(template)
    spec.instance_id, spec.endpoint = instance_id, endpoint
    spec.model_path = model_path
    del spec.devices[:]
    spec.devices.extend(devices)
    spec.tensor_parallel_size = tensor_parallel_size
    spec.quantization = quantization
    spec.priority_class = priority_class
    spec.port = 0
    return spec
