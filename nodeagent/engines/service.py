"""gRPC translation for the instance RPCs and plan actions; all logic lives in the manager.

The agent's servicer (nodeagent/rpc/server.py) forwards StartInstance, StopInstance,
ReconfigureInstance and ListInstances here; the actuator hands plan actions of those kinds to
run_instance_action. Domain errors become gRPC statuses through errors.grpc_code only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, fields
from typing import NoReturn, TypeVar

import grpc

from nodeagent.engines.manager import InstanceManager, InstanceStatus, State
from nodeagent.engines.spec import InstanceSpec
from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.common.errors import DomainError, FailedPrecondition, InvalidArgument, grpc_code

T = TypeVar("T")
DEFAULT_DRAIN_TIMEOUT_S = InstanceSpec.__dataclass_fields__["drain_timeout_s"].default


def spec_from_pb(msg: pb.InstanceSpec) -> InstanceSpec:
    """Proto -> spec. Empty/zero fields take the defaults: quantization none, dtype auto,
    priority saas, drain_timeout_s 30 (use StopInstance.force for no drain)."""
    return InstanceSpec(
        instance_id=msg.instance_id,
        endpoint=msg.endpoint,
        model_path=msg.model_path,
        devices=tuple(msg.devices),
        tensor_parallel_size=msg.tensor_parallel_size,
        quantization=msg.quantization or "none",
        dtype=msg.dtype or "auto",
        max_num_seqs=msg.max_num_seqs,
        max_model_len=msg.max_model_len,
        gpu_memory_utilization=msg.gpu_memory_utilization,
        port=msg.port,
        extra_args=tuple(msg.extra_args),
        env=dict(msg.env),
        priority_class=msg.priority_class or "saas",
        drain_timeout_s=msg.drain_timeout_s or DEFAULT_DRAIN_TIMEOUT_S,
    )


def spec_to_pb(spec: InstanceSpec) -> pb.InstanceSpec:
    return pb.InstanceSpec(
        instance_id=spec.instance_id,
        endpoint=spec.endpoint,
        model_path=spec.model_path,
        devices=list(spec.devices),
        tensor_parallel_size=spec.tensor_parallel_size,
        quantization=spec.quantization,
        dtype=spec.dtype,
        max_num_seqs=spec.max_num_seqs,
        max_model_len=spec.max_model_len,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        port=spec.port,
        extra_args=list(spec.extra_args),
        env=dict(spec.env),
        priority_class=spec.priority_class,
        drain_timeout_s=spec.drain_timeout_s,
    )


def status_to_pb(status: InstanceStatus) -> pb.Instance:
    metrics = asdict(status.metrics)
    return pb.Instance(
        spec=spec_to_pb(status.spec),
        state=str(status.state),
        pid=status.pid,
        exit_code=status.exit_code,
        last_log=status.last_log,
        restarts=status.restarts,
        metrics=pb.InstanceMetrics(**{f.name: metrics[f.name] for f in fields(status.metrics)}),
        routable=status.routable,
        started_at_unix_s=status.started_at_unix_s,
        ready_at_unix_s=status.ready_at_unix_s,
        command=list(status.command),
    )


def _drain_timeout(request: pb.StopInstanceRequest) -> float | None:
    return request.drain_timeout_s or None  # 0 = the spec's


class InstanceService:
    """The object nodeagent/rpc/server.py forwards the instance RPCs to."""

    def __init__(self, manager: InstanceManager) -> None:
        self._manager = manager

    def StartInstance(
        self, request: pb.StartInstanceRequest, context: grpc.ServicerContext
    ) -> pb.Instance:
        return _call(context, lambda: status_to_pb(self._manager.start(_spec(request))))

    def StopInstance(
        self, request: pb.StopInstanceRequest, context: grpc.ServicerContext
    ) -> pb.Instance:
        return _call(context, lambda: status_to_pb(self._manager.stop(
            request.instance_id, force=request.force, drain_timeout_s=_drain_timeout(request)
        )))  # fmt: skip

    def ReconfigureInstance(
        self, request: pb.ReconfigureInstanceRequest, context: grpc.ServicerContext
    ) -> pb.ReconfigureInstanceResponse:
        return _call(context, lambda: _reconfigure_to_pb(self._manager, request))

    def ListInstances(
        self, request: pb.ListInstancesRequest, context: grpc.ServicerContext
    ) -> pb.ListInstancesResponse:
        return pb.ListInstancesResponse(instances=self.instances())

    def instances(self) -> list[pb.Instance]:
        return [status_to_pb(s) for s in self._manager.list()]

    def run_instance_action(self, action: object) -> bool:
        """Plan actions (nodeagent.actuation.actuator.InstanceAction: .kind, .request proto).
        Returns True when something changed; a rolled-back reconfigure is a failure."""
        kind, request = action.kind, action.request  # type: ignore[attr-defined]
        if kind == "start_instance":
            self._manager.start(_spec(request))
            return True
        if kind == "stop_instance":
            before = self._manager.get(request.instance_id).state
            self._manager.stop(
                request.instance_id, force=request.force, drain_timeout_s=_drain_timeout(request)
            )
            return before != State.STOPPED
        if kind == "reconfigure_instance":
            result = self._manager.reconfigure(request.instance_id, spec_from_pb(request.new_spec))
            if result.rolled_back:
                raise FailedPrecondition(result.message)
            return True
        raise InvalidArgument(f"action: unknown instance action {kind!r}", field="kind")


def _spec(request: pb.StartInstanceRequest) -> InstanceSpec:
    if not request.HasField("spec"):
        raise InvalidArgument("spec is required", field="spec")
    return spec_from_pb(request.spec)


def _reconfigure_to_pb(
    manager: InstanceManager, request: pb.ReconfigureInstanceRequest
) -> pb.ReconfigureInstanceResponse:
    if not request.HasField("new_spec"):
        raise InvalidArgument("new_spec is required", field="new_spec")
    result = manager.reconfigure(request.instance_id, spec_from_pb(request.new_spec))
    return pb.ReconfigureInstanceResponse(
        instance=status_to_pb(result.instance),
        rolled_back=result.rolled_back,
        steps=[pb.StepTiming(step=name, seconds=s) for name, s in result.steps],
        message=result.message,
    )


def _call(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except DomainError as err:
        _abort(context, err)


def _abort(context: grpc.ServicerContext, err: DomainError) -> NoReturn:
    context.abort(grpc_code(err), str(err))
    raise AssertionError("unreachable")  # context.abort raises
