"""gRPC: NodeAgentServicer hands requests to the actuator, sampler and engine manager (messages
built by nodeagent.rpc.codec) and maps DomainError to status codes. Nothing else happens here.
Also the server assembly (reflection + health).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nodeagent.actuation.actuator import Actuator
from nodeagent.actuation.plan import ActionOutcome
from nodeagent.rpc import codec
from nodeagent.telemetry.sampler import Sampler
from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import agent_pb2_grpc as pb_grpc
from shapeshifter.common.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    grpc_code,
    out_of_range,
)
from shapeshifter.net.transport import TlsMaterial, bind

WATCH_INTERVAL_RANGE_S = (0.1, 3600.0)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NodeAgent"].full_name
T = TypeVar("T")


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
        actuator: Actuator,
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
        return codec.node_to_pb(_call(context, self._sampler.fresh), self._instance_list())

    def latest_node(self) -> pb.Node:
        """The last sample with the instances: what the coordinator link reports."""
        return codec.node_to_pb(self._sampler.latest(), self._instance_list())

    def _instance_list(self) -> list[pb.Instance]:
        if self.instance_service is None:
            return []
        return list(self.instance_service.instances())

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
            yield codec.node_to_pb(self._sampler.latest())
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
        duration_s = self._clock.monotonic() - start_s
        return codec.outcome_to_pb(ActionOutcome("", True, changed, "OK", "", duration_s))

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
        return self._result(context, lambda: self._actuator.run(codec.mig_layout_from_pb(request)))

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
        plan = codec.plan_from_pb(request.plan)
        outcome = _call(context, lambda: self._actuator.apply_plan(plan))
        self._sampler.mark_changed()
        return codec.plan_outcome_to_pb(outcome)

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
        """tls: mTLS on the port (None: plaintext); interceptors: shapeshifter.net.authz."""
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
