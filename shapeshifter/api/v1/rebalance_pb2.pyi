from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Endpoint(_message.Message):
    __slots__ = ("name", "model", "model_path", "slo_p95_s", "allowed_quantizations", "priority_class", "min_instances", "max_instances", "demand_rps", "query_class", "measured_rps", "updated_at_unix_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    SLO_P95_S_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_QUANTIZATIONS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_CLASS_FIELD_NUMBER: _ClassVar[int]
    MIN_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    MAX_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    DEMAND_RPS_FIELD_NUMBER: _ClassVar[int]
    QUERY_CLASS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_RPS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    model_path: str
    slo_p95_s: float
    allowed_quantizations: _containers.RepeatedScalarFieldContainer[str]
    priority_class: str
    min_instances: int
    max_instances: int
    demand_rps: float
    query_class: str
    measured_rps: float
    updated_at_unix_s: float
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., model_path: _Optional[str] = ..., slo_p95_s: _Optional[float] = ..., allowed_quantizations: _Optional[_Iterable[str]] = ..., priority_class: _Optional[str] = ..., min_instances: _Optional[int] = ..., max_instances: _Optional[int] = ..., demand_rps: _Optional[float] = ..., query_class: _Optional[str] = ..., measured_rps: _Optional[float] = ..., updated_at_unix_s: _Optional[float] = ...) -> None: ...

class DeleteEndpointRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteEndpointResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEndpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEndpointsResponse(_message.Message):
    __slots__ = ("endpoints",)
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    def __init__(self, endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ...) -> None: ...

class ProposePlanRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ("plan_id",)
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    def __init__(self, plan_id: _Optional[str] = ...) -> None: ...

class ListPlansRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListPlansResponse(_message.Message):
    __slots__ = ("plans",)
    PLANS_FIELD_NUMBER: _ClassVar[int]
    plans: _containers.RepeatedCompositeFieldContainer[PlanStatus]
    def __init__(self, plans: _Optional[_Iterable[_Union[PlanStatus, _Mapping]]] = ...) -> None: ...

class PlanAction(_message.Message):
    __slots__ = ("kind", "node_id", "reason", "endpoint", "instance_id", "config", "gpu_indices", "mig_profiles", "capacity_rps", "state", "error", "sm_clock_mhz")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    MIG_PROFILES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_RPS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    kind: str
    node_id: str
    reason: str
    endpoint: str
    instance_id: str
    config: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    mig_profiles: _containers.RepeatedScalarFieldContainer[str]
    capacity_rps: float
    state: str
    error: str
    sm_clock_mhz: int
    def __init__(self, kind: _Optional[str] = ..., node_id: _Optional[str] = ..., reason: _Optional[str] = ..., endpoint: _Optional[str] = ..., instance_id: _Optional[str] = ..., config: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., mig_profiles: _Optional[_Iterable[str]] = ..., capacity_rps: _Optional[float] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., sm_clock_mhz: _Optional[int] = ...) -> None: ...

class PlanStage(_message.Message):
    __slots__ = ("reason", "actions", "state", "row_power_after_w")
    class RowPowerAfterWEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROW_POWER_AFTER_W_FIELD_NUMBER: _ClassVar[int]
    reason: str
    actions: _containers.RepeatedCompositeFieldContainer[PlanAction]
    state: str
    row_power_after_w: _containers.ScalarMap[str, float]
    def __init__(self, reason: _Optional[str] = ..., actions: _Optional[_Iterable[_Union[PlanAction, _Mapping]]] = ..., state: _Optional[str] = ..., row_power_after_w: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EndpointOutcome(_message.Message):
    __slots__ = ("endpoint", "demand_rps", "capacity_before_rps", "capacity_after_rps", "gpus_before", "gpus_after", "decision", "reason")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DEMAND_RPS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BEFORE_RPS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_AFTER_RPS_FIELD_NUMBER: _ClassVar[int]
    GPUS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    GPUS_AFTER_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    demand_rps: float
    capacity_before_rps: float
    capacity_after_rps: float
    gpus_before: float
    gpus_after: float
    decision: str
    reason: str
    def __init__(self, endpoint: _Optional[str] = ..., demand_rps: _Optional[float] = ..., capacity_before_rps: _Optional[float] = ..., capacity_after_rps: _Optional[float] = ..., gpus_before: _Optional[float] = ..., gpus_after: _Optional[float] = ..., decision: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PlanStatus(_message.Message):
    __slots__ = ("plan_id", "epoch", "created_at_unix_s", "state", "reason", "error", "gpus_before", "gpus_after", "power_before_w", "power_after_w", "stages", "outcomes", "warnings", "trigger", "updated_at_unix_s")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GPUS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    GPUS_AFTER_FIELD_NUMBER: _ClassVar[int]
    POWER_BEFORE_W_FIELD_NUMBER: _ClassVar[int]
    POWER_AFTER_W_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    epoch: int
    created_at_unix_s: float
    state: str
    reason: str
    error: str
    gpus_before: int
    gpus_after: int
    power_before_w: float
    power_after_w: float
    stages: _containers.RepeatedCompositeFieldContainer[PlanStage]
    outcomes: _containers.RepeatedCompositeFieldContainer[EndpointOutcome]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    trigger: str
    updated_at_unix_s: float
    def __init__(self, plan_id: _Optional[str] = ..., epoch: _Optional[int] = ..., created_at_unix_s: _Optional[float] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., error: _Optional[str] = ..., gpus_before: _Optional[int] = ..., gpus_after: _Optional[int] = ..., power_before_w: _Optional[float] = ..., power_after_w: _Optional[float] = ..., stages: _Optional[_Iterable[_Union[PlanStage, _Mapping]]] = ..., outcomes: _Optional[_Iterable[_Union[EndpointOutcome, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., trigger: _Optional[str] = ..., updated_at_unix_s: _Optional[float] = ...) -> None: ...

class PlanDiff(_message.Message):
    __slots__ = ("plan_id", "lines")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    lines: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, plan_id: _Optional[str] = ..., lines: _Optional[_Iterable[str]] = ...) -> None: ...

class ApplyPlanRequest(_message.Message):
    __slots__ = ("plan_id",)
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    def __init__(self, plan_id: _Optional[str] = ...) -> None: ...

class SetModeRequest(_message.Message):
    __slots__ = ("mode",)
    MODE_FIELD_NUMBER: _ClassVar[int]
    mode: str
    def __init__(self, mode: _Optional[str] = ...) -> None: ...

class GetModeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModeStatus(_message.Message):
    __slots__ = ("mode", "interval_s", "last_run_unix_s", "last_plan_id")
    MODE_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LAST_RUN_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    LAST_PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    mode: str
    interval_s: float
    last_run_unix_s: float
    last_plan_id: str
    def __init__(self, mode: _Optional[str] = ..., interval_s: _Optional[float] = ..., last_run_unix_s: _Optional[float] = ..., last_plan_id: _Optional[str] = ...) -> None: ...

class PlaceRequest(_message.Message):
    __slots__ = ("gpus", "priority_class", "predicted_peak_power_w", "gpu_type", "model")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_CLASS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_PEAK_POWER_W_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    gpus: int
    priority_class: str
    predicted_peak_power_w: float
    gpu_type: str
    model: str
    def __init__(self, gpus: _Optional[int] = ..., priority_class: _Optional[str] = ..., predicted_peak_power_w: _Optional[float] = ..., gpu_type: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class RankedNode(_message.Message):
    __slots__ = ("node_id", "row", "aisle", "gpu_indices", "inlet_temp_c", "row_power_after_w", "row_mix_opaque_frac_after", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    AISLE_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    INLET_TEMP_C_FIELD_NUMBER: _ClassVar[int]
    ROW_POWER_AFTER_W_FIELD_NUMBER: _ClassVar[int]
    ROW_MIX_OPAQUE_FRAC_AFTER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    row: str
    aisle: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    inlet_temp_c: float
    row_power_after_w: float
    row_mix_opaque_frac_after: float
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., row: _Optional[str] = ..., aisle: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., inlet_temp_c: _Optional[float] = ..., row_power_after_w: _Optional[float] = ..., row_mix_opaque_frac_after: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class PlaceResponse(_message.Message):
    __slots__ = ("nodes", "workload")
    NODES_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[RankedNode]
    workload: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[RankedNode, _Mapping]]] = ..., workload: _Optional[str] = ...) -> None: ...

class GetRoutingWeightsRequest(_message.Message):
    __slots__ = ("endpoint", "mode")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    mode: str
    def __init__(self, endpoint: _Optional[str] = ..., mode: _Optional[str] = ...) -> None: ...

class RouteWeight(_message.Message):
    __slots__ = ("instance_id", "node_id", "weight", "reason", "url")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    node_id: str
    weight: float
    reason: str
    url: str
    def __init__(self, instance_id: _Optional[str] = ..., node_id: _Optional[str] = ..., weight: _Optional[float] = ..., reason: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class RoutingWeights(_message.Message):
    __slots__ = ("endpoint", "weights")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    weights: _containers.RepeatedCompositeFieldContainer[RouteWeight]
    def __init__(self, endpoint: _Optional[str] = ..., weights: _Optional[_Iterable[_Union[RouteWeight, _Mapping]]] = ...) -> None: ...
