"""gRPC: NodeAgentServicer translates proto <-> domain and maps DomainError to status codes.
Nothing else happens here. Also the server assembly (reflection + health) and the proto
conversions the coordinator link reuses (node_to_pb, plan_from_pb, plan_outcome_to_pb).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nodeagent import actuation as act
from nodeagent.budgets import Budget
from nodeagent.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    grpc_code,
    out_of_range,
)
from nodeagent.sampler import GpuSnapshot, NodeSnapshot, Sampler
from nodeagent.transport import TlsMaterial, bind
from nodeagent.v1 import agent_pb2 as pb
from nodeagent.v1 import agent_pb2_grpc as pb_grpc

WATCH_INTERVAL_RANGE_S = (0.1, 3600.0)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NodeAgent"].full_name
T = TypeVar("T")


# ---------------------------------------------------------------- conversions


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


def node_to_pb(s: NodeSnapshot) -> pb.Node:
    nb = s.budget
    node = pb.Node(
        node_id=s.identity.node_id,
        hostname=s.identity.hostname,
        labels=s.identity.labels,
        backend=s.identity.backend,
        software_version=s.identity.software_version,
        gpus=[gpu_to_pb(g) for g in s.gpus],
        budget=pb.NodeBudget(
            node_power_w=nb.node_power_w,
            gpu_power_w=nb.gpu_power_w,
            idle_power_w=nb.idle_power_w,
            fan_power_w=nb.fan_power_w,
            gpu_power_limit_w=nb.gpu_power_limit_w,
            airflow_cfm=nb.airflow_cfm,
            totals=budget_to_pb(nb.totals),
        ),
        host=pb.HostStats(
            cpu_pct=s.host.cpu_pct,
            memory_used_mib=s.host.memory_used_mib,
            memory_total_mib=s.host.memory_total_mib,
        ),
        epoch_seen=s.epoch_seen,
        safety_state=s.safety.state,
        sampled_at_unix_s=s.sampled_at_unix_s,
    )
    lease = s.safety.lease
    if lease is not None:
        node.lease.CopyFrom(
            pb.Lease(
                lease_id=lease.lease_id,
                epoch=lease.epoch,
                ttl_s=lease.ttl_s,
                gpu_power_limit_w=lease.gpu_power_limit_w,
                remaining_s=lease.remaining_s,
            )
        )
    return node


def _mig_layout(r: pb.ApplyMigLayoutRequest) -> act.ApplyMigLayout:
    return act.ApplyMigLayout(
        r.gpu_index, tuple(r.profiles), r.mig_parted_yaml, r.mig_parted_config
    )


def action_from_pb(a: pb.Action) -> act.GpuAction | act.InstanceAction:
    kind = a.WhichOneof("kind")
    match kind:
        case "set_power_limit":
            return act.SetPowerLimit(a.set_power_limit.gpu_index, a.set_power_limit.power_limit_w)
        case "lock_clocks":
            r = a.lock_clocks
            return act.LockClocks(r.gpu_index, r.min_mhz, r.max_mhz)
        case "reset_clocks":
            return act.ResetClocks(a.reset_clocks.gpu_index)
        case "set_mig_mode":
            return act.SetMigMode(a.set_mig_mode.gpu_index, a.set_mig_mode.enabled)
        case "apply_mig_layout":
            return _mig_layout(a.apply_mig_layout)
        case "start_instance" | "stop_instance" | "reconfigure_instance":
            return act.InstanceAction(kind, getattr(a, kind))
    raise InvalidArgument(f"action {a.action_id!r}: kind is not set", field="kind")


def plan_from_pb(p: pb.Plan) -> act.Plan:
    actions = tuple(act.PlanAction(a.action_id, action_from_pb(a), a.reason) for a in p.actions)
    return act.Plan(p.plan_id, p.epoch, actions, p.reason)


def outcome_to_pb(o: act.ActionOutcome) -> pb.ActionResult:
    return pb.ActionResult(
        action_id=o.action_id,
        ok=o.ok,
        changed=o.changed,
        code=o.code,
        message=o.message,
        duration_s=o.duration_s,
    )


def plan_outcome_to_pb(o: act.PlanOutcome) -> pb.ApplyPlanResponse:
    return pb.ApplyPlanResponse(
        plan_id=o.plan_id, results=[outcome_to_pb(r) for r in o.results], completed=o.completed
    )


# ---------------------------------------------------------------- servicer


def _abort(context: grpc.ServicerContext, err: DomainError) -> NoReturn:
    context.abort(grpc_code(err), str(err))
    raise AssertionError("unreachable")  # context.abort raises


def _call(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except DomainError as err:
        _abort(context, err)


class NodeAgentServicer(pb_grpc.NodeAgentServicer):
    def __init__(
        self,
        actuator: act.Actuator,
        sampler: Sampler,
        clock: Any,
        *,
        instance_service: Any | None = None,
    ) -> None:
        self._actuator = actuator
        self._sampler = sampler
        self._clock = clock
        self.instance_service = instance_service  # the engine manager sets this when enabled
        self.repartitioner: Any = None  # likewise: the engines' MigRepartitioner

    # -------- snapshot

    def GetNode(self, request: pb.GetNodeRequest, context: grpc.ServicerContext) -> pb.Node:
        return self._with_instances(node_to_pb(_call(context, self._sampler.fresh)))

    def latest_node(self) -> pb.Node:
        """The last sample with the instances: what the coordinator link reports."""
        return self._with_instances(node_to_pb(self._sampler.latest()))

    def _with_instances(self, node: pb.Node) -> pb.Node:
        if self.instance_service is not None:
            node.instances.extend(self.instance_service.instances())
        return node

    def WatchTelemetry(
        self, request: pb.WatchTelemetryRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Node]:
        interval_s = request.interval_s or self._sampler.interval_s
        low, high = WATCH_INTERVAL_RANGE_S
        if request.interval_s and not low <= request.interval_s <= high:
            _abort(context, out_of_range("interval_s", request.interval_s, low, high, "s"))
        done = threading.Event()
        context.add_callback(done.set)
        sent = 0
        while context.is_active():  # server.stop() cancels the stream, which sets `done`
            yield node_to_pb(self._sampler.latest())
            sent += 1
            if request.max_samples and sent >= request.max_samples:
                return
            if done.wait(interval_s):
                return

    # -------- actuators

    def _result(self, context: grpc.ServicerContext, fn: Callable[[], bool]) -> pb.ActionResult:
        start_s = self._clock.monotonic()
        changed = _call(context, fn)
        self._sampler.mark_changed()
        return pb.ActionResult(
            ok=True, changed=changed, code="OK", duration_s=self._clock.monotonic() - start_s
        )

    def SetPowerLimit(
        self, request: pb.SetPowerLimitRequest, context: grpc.ServicerContext
    ) -> pb.ActionResult:
        return self._result(
            context,
            lambda: self._actuator.set_power_limit(request.gpu_index, request.power_limit_w),
        )

    def LockClocks(
        self, request: pb.LockClocksRequest, context: grpc.ServicerContext
    ) -> pb.ActionResult:
        r = request
        return self._result(
            context, lambda: self._actuator.lock_clocks(r.gpu_index, r.min_mhz, r.max_mhz)
        )

    def ResetClocks(
        self, request: pb.ResetClocksRequest, context: grpc.ServicerContext
    ) -> pb.ActionResult:
        return self._result(context, lambda: self._actuator.reset_clocks(request.gpu_index))

    def SetMigMode(
        self, request: pb.SetMigModeRequest, context: grpc.ServicerContext
    ) -> pb.ActionResult:
        return self._result(
            context, lambda: self._actuator.set_mig_mode(request.gpu_index, request.enabled)
        )

    def ApplyMigLayout(
        self, request: pb.ApplyMigLayoutRequest, context: grpc.ServicerContext
    ) -> pb.ActionResult:
        if request.restart_instances:
            return self._result(context, lambda: self._repartition(request))
        return self._result(context, lambda: self._actuator.run(_mig_layout(request)))

    def _repartition(self, request: pb.ApplyMigLayoutRequest) -> bool:
        """The journaled drain -> stop -> layout -> restart sequence (engines enabled only)."""
        if request.mig_parted_yaml or request.mig_parted_config:
            raise InvalidArgument("restart_instances works with profiles, not a mig-parted file",
                                  field="restart_instances")
        if self.repartitioner is None:
            raise FailedPrecondition(
                "restart_instances needs the engine manager (engines.enabled: true)",
                field="restart_instances")
        result = self.repartitioner.repartition(request.gpu_index, list(request.profiles))
        if result.rolled_back:
            raise FailedPrecondition(f"MIG repartition rolled back: {result.message}",
                                     field="profiles")
        return True

    def ApplyPlan(
        self, request: pb.ApplyPlanRequest, context: grpc.ServicerContext
    ) -> pb.ApplyPlanResponse:
        outcome = _call(context, lambda: self._actuator.apply_plan(plan_from_pb(request.plan)))
        self._sampler.mark_changed()
        return plan_outcome_to_pb(outcome)

    # -------- instances (forwarded to the engine manager)

    def _instances(self, context: grpc.ServicerContext) -> Any:
        if self.instance_service is None:
            _abort(context, FailedPrecondition("no engine manager configured"))
        return self.instance_service

    def StartInstance(
        self, request: pb.StartInstanceRequest, context: grpc.ServicerContext
    ) -> pb.Instance:
        return self._instances(context).StartInstance(request, context)

    def StopInstance(
        self, request: pb.StopInstanceRequest, context: grpc.ServicerContext
    ) -> pb.Instance:
        return self._instances(context).StopInstance(request, context)

    def ReconfigureInstance(
        self, request: pb.ReconfigureInstanceRequest, context: grpc.ServicerContext
    ) -> pb.ReconfigureInstanceResponse:
        return self._instances(context).ReconfigureInstance(request, context)

    def ListInstances(
        self, request: pb.ListInstancesRequest, context: grpc.ServicerContext
    ) -> pb.ListInstancesResponse:
        return self._instances(context).ListInstances(request, context)


# ---------------------------------------------------------------- assembly


class AgentServer:
    """The gRPC server with the NodeAgent service, reflection and health."""

    def __init__(
        self,
        servicer: NodeAgentServicer,
        listen: str,
        *,
        max_workers: int = 16,
        tls: TlsMaterial | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
    ) -> None:
        """tls: mTLS on the port (None: plaintext); interceptors: nodeagent.authz."""
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors
        )
        pb_grpc.add_NodeAgentServicer_to_server(servicer, self.grpc_server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
        )
        self.port = bind(self.grpc_server, listen, tls)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")

    def start(self) -> None:
        self.grpc_server.start()

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def stop(self, grace_s: float = 5.0) -> None:
        self.set_serving(False)
        self.grpc_server.stop(grace_s).wait()
