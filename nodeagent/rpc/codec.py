"""The agent's wire codec: the one module that builds protobufs on the node.

Coordinator/operator -> agent: plans and actions decoded into nodeagent.actuation.plan values.
Agent -> coordinator/operator: the Node snapshot, action and plan results, and the link's
Register / NodeReport / plan_result messages. Elsewhere received protobufs are only read.
"""

from __future__ import annotations

from collections.abc import Iterable

from nodeagent.actuation import plan as np
from nodeagent.telemetry.budgets import Budget, NodeBudget
from nodeagent.telemetry.sampler import GpuSnapshot, LeaseView, NodeSnapshot
from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import link_pb2 as lpb
from shapeshifter.common.errors import InvalidArgument

# ---------------------------------------------------------------- decode: plans and actions


def mig_layout_from_pb(r: pb.ApplyMigLayoutRequest) -> np.ApplyMigLayout:
    return np.ApplyMigLayout(r.gpu_index, tuple(r.profiles), r.mig_parted_yaml, r.mig_parted_config)


def action_from_pb(a: pb.Action) -> np.GpuAction | np.InstanceAction:
    kind = a.WhichOneof("kind")
    match kind:
        case "set_power_limit":
            return np.SetPowerLimit(a.set_power_limit.gpu_index, a.set_power_limit.power_limit_w)
        case "lock_clocks":
            r = a.lock_clocks
            return np.LockClocks(r.gpu_index, r.min_mhz, r.max_mhz)
        case "reset_clocks":
            return np.ResetClocks(a.reset_clocks.gpu_index)
        case "set_mig_mode":
            return np.SetMigMode(a.set_mig_mode.gpu_index, a.set_mig_mode.enabled)
        case "apply_mig_layout":
            return mig_layout_from_pb(a.apply_mig_layout)
        case "start_instance" | "stop_instance" | "reconfigure_instance":
            return np.InstanceAction(kind, getattr(a, kind))
    raise InvalidArgument(f"action {a.action_id!r}: kind is not set", field="kind")


def plan_from_pb(p: pb.Plan) -> np.NodePlan:
    actions = tuple(np.NodeAction(a.action_id, action_from_pb(a), a.reason) for a in p.actions)
    return np.NodePlan(p.plan_id, p.epoch, actions, p.reason)


# ---------------------------------------------------------------- encode: results


def outcome_to_pb(o: np.ActionOutcome) -> pb.ActionResult:
    return pb.ActionResult(
        action_id=o.action_id,
        ok=o.ok,
        changed=o.changed,
        code=o.code,
        message=o.message,
        duration_s=o.duration_s,
    )


def plan_outcome_to_pb(o: np.NodePlanOutcome) -> pb.ApplyPlanResponse:
    return pb.ApplyPlanResponse(
        plan_id=o.plan_id, results=[outcome_to_pb(r) for r in o.results], completed=o.completed
    )


# ---------------------------------------------------------------- encode: the Node snapshot


def budget_to_pb(b: Budget) -> pb.Budget:
    return pb.Budget(
        memory_used_mib=b.memory_used_mib,
        memory_total_mib=b.memory_total_mib,
        kv_cache_usage_frac=b.kv_cache_usage_frac,
        requests_in_flight=b.requests_in_flight,
        requests_capacity=b.requests_capacity,
        utilization_pct=b.utilization_pct,
        power_draw_w=b.power_draw_w,
        power_limit_w=b.power_limit_w,
        temperature_c=b.temperature_c,
        slowdown_temp_c=b.slowdown_temp_c,
        memory_headroom_mib=b.memory_headroom_mib,
        compute_headroom_requests=b.compute_headroom_requests,
        power_headroom_w=b.power_headroom_w,
        thermal_headroom_c=b.thermal_headroom_c,
    )


def gpu_to_pb(g: GpuSnapshot) -> pb.Gpu:
    ident, t = g.static.identity, g.telemetry
    msg = pb.Gpu(
        index=ident.index,
        uuid=ident.uuid,
        name=ident.name,
        serial=ident.serial,
        gpu_type=ident.gpu_type,
        power_draw_w=t.power_draw_w,
        power_draw_avg_w=t.power_draw_avg_w,
        power_limit_w=t.power_limit_w,
        power_limit_min_w=g.static.power.min_w,
        power_limit_max_w=g.static.power.max_w,
        power_limit_default_w=g.static.power.default_w,
        energy_j=t.energy_j,
        power_limit_requested_w=g.power_state.requested_w,
        power_ceiling_w=g.power_state.ceiling_w or 0.0,
        power_ceiling_source=g.power_state.ceiling_source,
        temperature_c=t.temperature_c,
        memory_temperature_c=-1.0 if t.memory_temperature_c is None else t.memory_temperature_c,
        slowdown_temp_c=g.static.thermal.slowdown_c,
        shutdown_temp_c=g.static.thermal.shutdown_c,
        sm_clock_mhz=t.sm_clock_mhz,
        memory_clock_mhz=t.memory_clock_mhz,
        sm_clock_max_mhz=g.static.sm_clock_max_mhz,
        supported_sm_clocks_mhz=g.static.supported_sm_clocks_mhz,
        utilization_gpu_pct=t.utilization_gpu_pct,
        utilization_memory_pct=t.utilization_memory_pct,
        memory_used_mib=t.memory_used_mib,
        memory_total_mib=t.memory_total_mib,
        throttle_reasons=t.throttle_reasons,
        mig_enabled=g.mig.enabled,
        mig_pending_enabled=g.mig.pending_enabled,
        ecc_uncorrected_volatile=t.health.ecc_uncorrected_volatile,
        last_xid=t.health.last_xid,
        healthy=t.health.healthy,
        process_pids=t.process_pids,
        budget=budget_to_pb(g.budget),
    )
    if g.clock_lock_mhz is not None:
        msg.clock_lock.CopyFrom(
            pb.ClockLock(min_mhz=g.clock_lock_mhz[0], max_mhz=g.clock_lock_mhz[1])
        )
    for m in g.mig.instances:
        msg.mig_instances.add(
            gpu_instance_id=m.gpu_instance_id,
            compute_instance_id=m.compute_instance_id,
            profile=m.profile,
            placement_start=m.placement_start,
            placement_size=m.placement_size,
            uuid=m.uuid,
            memory_mib=m.memory_mib,
        )
    return msg


def _node_budget_to_pb(nb: NodeBudget) -> pb.NodeBudget:
    return pb.NodeBudget(
        node_power_w=nb.node_power_w,
        gpu_power_w=nb.gpu_power_w,
        idle_power_w=nb.idle_power_w,
        fan_power_w=nb.fan_power_w,
        gpu_power_limit_w=nb.gpu_power_limit_w,
        airflow_cfm=nb.airflow_cfm,
        totals=budget_to_pb(nb.totals),
    )


def _lease_to_pb(lease: LeaseView) -> pb.Lease:
    return pb.Lease(
        lease_id=lease.lease_id,
        epoch=lease.epoch,
        ttl_s=lease.ttl_s,
        gpu_power_limit_w=lease.gpu_power_limit_w,
        remaining_s=lease.remaining_s,
    )


def node_to_pb(s: NodeSnapshot, instances: Iterable[pb.Instance] = ()) -> pb.Node:
    """The snapshot as the Node message; instances: the engine manager's (already messages)."""
    node = pb.Node(
        node_id=s.identity.node_id,
        hostname=s.identity.hostname,
        labels=s.identity.labels,
        backend=s.identity.backend,
        software_version=s.identity.software_version,
        gpus=[gpu_to_pb(g) for g in s.gpus],
        budget=_node_budget_to_pb(s.budget),
        host=pb.HostStats(
            cpu_pct=s.host.cpu_pct,
            memory_used_mib=s.host.memory_used_mib,
            memory_total_mib=s.host.memory_total_mib,
        ),
        epoch_seen=s.epoch_seen,
        safety_state=s.safety.state,
        sampled_at_unix_s=s.sampled_at_unix_s,
    )
    if s.safety.lease is not None:
        node.lease.CopyFrom(_lease_to_pb(s.safety.lease))
    node.instances.extend(instances)
    return node


# ---------------------------------------------------------------- encode: the coordinator link


def register_message(node: pb.Node, report_interval_s: float) -> lpb.AgentMessage:
    """Register, from the node's current snapshot."""
    register = lpb.Register(
        node_id=node.node_id,
        hostname=node.hostname,
        labels=node.labels,
        software_version=node.software_version,
        backend=node.backend,
        gpus=node.gpus,
        report_interval_s=report_interval_s,
    )
    return lpb.AgentMessage(register=register)


def report_message(node: pb.Node, seq: int, sent_at_unix_s: float) -> lpb.AgentMessage:
    report = lpb.NodeReport(node=node, seq=seq, sent_at_unix_s=sent_at_unix_s)
    return lpb.AgentMessage(report=report)


def plan_result_message(outcome: np.NodePlanOutcome) -> lpb.AgentMessage:
    """The answer to a plan, an emergency directive or a pre-arm message."""
    return lpb.AgentMessage(plan_result=plan_outcome_to_pb(outcome))
