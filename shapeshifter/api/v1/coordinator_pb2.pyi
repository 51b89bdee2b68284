from shapeshifter.api.v1 import agent_pb2 as _agent_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeSummary(_message.Message):
    __slots__ = ("name", "state", "site", "row", "rack", "aisle", "topology_known", "power_draw_w", "gpu_power_limit_w", "max_gpu_temp_c", "gpus", "last_seen_age_s", "safety_state", "airflow_cfm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    RACK_FIELD_NUMBER: _ClassVar[int]
    AISLE_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_KNOWN_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_W_FIELD_NUMBER: _ClassVar[int]
    GPU_POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    MAX_GPU_TEMP_C_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_AGE_S_FIELD_NUMBER: _ClassVar[int]
    SAFETY_STATE_FIELD_NUMBER: _ClassVar[int]
    AIRFLOW_CFM_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    site: str
    row: str
    rack: str
    aisle: str
    topology_known: bool
    power_draw_w: float
    gpu_power_limit_w: float
    max_gpu_temp_c: float
    gpus: int
    last_seen_age_s: float
    safety_state: str
    airflow_cfm: float
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., site: _Optional[str] = ..., row: _Optional[str] = ..., rack: _Optional[str] = ..., aisle: _Optional[str] = ..., topology_known: _Optional[bool] = ..., power_draw_w: _Optional[float] = ..., gpu_power_limit_w: _Optional[float] = ..., max_gpu_temp_c: _Optional[float] = ..., gpus: _Optional[int] = ..., last_seen_age_s: _Optional[float] = ..., safety_state: _Optional[str] = ..., airflow_cfm: _Optional[float] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeSummary]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeSummary, _Mapping]]] = ...) -> None: ...

class GetNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("summary", "last_report", "lease")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    summary: NodeSummary
    last_report: _agent_pb2.Node
    lease: _agent_pb2.Lease
    def __init__(self, summary: _Optional[_Union[NodeSummary, _Mapping]] = ..., last_report: _Optional[_Union[_agent_pb2.Node, _Mapping]] = ..., lease: _Optional[_Union[_agent_pb2.Lease, _Mapping]] = ...) -> None: ...

class GetClusterRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Rollup(_message.Message):
    __slots__ = ("name", "kind", "power_draw_w", "power_limit_w", "airflow_cfm", "airflow_limit_cfm", "max_gpu_temp_c", "nodes", "nodes_up", "nodes_suspect", "nodes_lost", "gpus", "gpus_in_use", "memory_used_mib", "memory_total_mib", "requests_in_flight", "requests_capacity", "inlet_temp_c")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    AIRFLOW_CFM_FIELD_NUMBER: _ClassVar[int]
    AIRFLOW_LIMIT_CFM_FIELD_NUMBER: _ClassVar[int]
    MAX_GPU_TEMP_C_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    NODES_UP_FIELD_NUMBER: _ClassVar[int]
    NODES_SUSPECT_FIELD_NUMBER: _ClassVar[int]
    NODES_LOST_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    GPUS_IN_USE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_MIB_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_MIB_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    INLET_TEMP_C_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    power_draw_w: float
    power_limit_w: float
    airflow_cfm: float
    airflow_limit_cfm: float
    max_gpu_temp_c: float
    nodes: int
    nodes_up: int
    nodes_suspect: int
    nodes_lost: int
    gpus: int
    gpus_in_use: int
    memory_used_mib: float
    memory_total_mib: float
    requests_in_flight: float
    requests_capacity: float
    inlet_temp_c: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., power_draw_w: _Optional[float] = ..., power_limit_w: _Optional[float] = ..., airflow_cfm: _Optional[float] = ..., airflow_limit_cfm: _Optional[float] = ..., max_gpu_temp_c: _Optional[float] = ..., nodes: _Optional[int] = ..., nodes_up: _Optional[int] = ..., nodes_suspect: _Optional[int] = ..., nodes_lost: _Optional[int] = ..., gpus: _Optional[int] = ..., gpus_in_use: _Optional[int] = ..., memory_used_mib: _Optional[float] = ..., memory_total_mib: _Optional[float] = ..., requests_in_flight: _Optional[float] = ..., requests_capacity: _Optional[float] = ..., inlet_temp_c: _Optional[float] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("rows", "aisles", "racks", "sites", "nodes", "epoch", "generated_at_unix_s")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    AISLES_FIELD_NUMBER: _ClassVar[int]
    RACKS_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[Rollup]
    aisles: _containers.RepeatedCompositeFieldContainer[Rollup]
    racks: _containers.RepeatedCompositeFieldContainer[Rollup]
    sites: _containers.RepeatedCompositeFieldContainer[Rollup]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeSummary]
    epoch: int
    generated_at_unix_s: float
    def __init__(self, rows: _Optional[_Iterable[_Union[Rollup, _Mapping]]] = ..., aisles: _Optional[_Iterable[_Union[Rollup, _Mapping]]] = ..., racks: _Optional[_Iterable[_Union[Rollup, _Mapping]]] = ..., sites: _Optional[_Iterable[_Union[Rollup, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[NodeSummary, _Mapping]]] = ..., epoch: _Optional[int] = ..., generated_at_unix_s: _Optional[float] = ...) -> None: ...

class NodeSetPowerLimitRequest(_message.Message):
    __slots__ = ("node_id", "request")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    request: _agent_pb2.SetPowerLimitRequest
    def __init__(self, node_id: _Optional[str] = ..., request: _Optional[_Union[_agent_pb2.SetPowerLimitRequest, _Mapping]] = ...) -> None: ...

class NodeLockClocksRequest(_message.Message):
    __slots__ = ("node_id", "request")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    request: _agent_pb2.LockClocksRequest
    def __init__(self, node_id: _Optional[str] = ..., request: _Optional[_Union[_agent_pb2.LockClocksRequest, _Mapping]] = ...) -> None: ...

class NodeResetClocksRequest(_message.Message):
    __slots__ = ("node_id", "request")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    request: _agent_pb2.ResetClocksRequest
    def __init__(self, node_id: _Optional[str] = ..., request: _Optional[_Union[_agent_pb2.ResetClocksRequest, _Mapping]] = ...) -> None: ...

class NodeApplyMigLayoutRequest(_message.Message):
    __slots__ = ("node_id", "request")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    request: _agent_pb2.ApplyMigLayoutRequest
    def __init__(self, node_id: _Optional[str] = ..., request: _Optional[_Union[_agent_pb2.ApplyMigLayoutRequest, _Mapping]] = ...) -> None: ...

class NodeSetMigModeRequest(_message.Message):
    __slots__ = ("node_id", "request")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    request: _agent_pb2.SetMigModeRequest
    def __init__(self, node_id: _Optional[str] = ..., request: _Optional[_Union[_agent_pb2.SetMigModeRequest, _Mapping]] = ...) -> None: ...

class NodeStartInstanceRequest(_message.Message):
    __slots__ = ("node_id", "request")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    request: _agent_pb2.StartInstanceRequest
    def __init__(self, node_id: _Optional[str] = ..., request: _Optional[_Union[_agent_pb2.StartInstanceRequest, _Mapping]] = ...) -> None: ...

class NodeStopInstanceRequest(_message.Message):
    __slots__ = ("node_id", "request")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    request: _agent_pb2.StopInstanceRequest
    def __init__(self, node_id: _Optional[str] = ..., request: _Optional[_Union[_agent_pb2.StopInstanceRequest, _Mapping]] = ...) -> None: ...

class NodeReconfigureInstanceRequest(_message.Message):
    __slots__ = ("node_id", "request")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    request: _agent_pb2.ReconfigureInstanceRequest
    def __init__(self, node_id: _Optional[str] = ..., request: _Optional[_Union[_agent_pb2.ReconfigureInstanceRequest, _Mapping]] = ...) -> None: ...

class NodeListInstancesRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("limit", "node_id")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    limit: int
    node_id: str
    def __init__(self, limit: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "at_unix_s", "epoch", "node_id", "action", "request_json", "ok", "code", "message", "actor")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    id: int
    at_unix_s: float
    epoch: int
    node_id: str
    action: str
    request_json: str
    ok: bool
    code: str
    message: str
    actor: str
    def __init__(self, id: _Optional[int] = ..., at_unix_s: _Optional[float] = ..., epoch: _Optional[int] = ..., node_id: _Optional[str] = ..., action: _Optional[str] = ..., request_json: _Optional[str] = ..., ok: _Optional[bool] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class GetIngestStatsRequest(_message.Message):
    __slots__ = ("reset_window",)
    RESET_WINDOW_FIELD_NUMBER: _ClassVar[int]
    reset_window: bool
    def __init__(self, reset_window: _Optional[bool] = ...) -> None: ...

class IngestStats(_message.Message):
    __slots__ = ("reports_total", "window_reports", "delay_p50_ms", "delay_p99_ms", "delay_max_ms", "connected_agents", "epoch")
    REPORTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_REPORTS_FIELD_NUMBER: _ClassVar[int]
    DELAY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    DELAY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    DELAY_MAX_MS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_AGENTS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    reports_total: int
    window_reports: int
    delay_p50_ms: float
    delay_p99_ms: float
    delay_max_ms: float
    connected_agents: int
    epoch: int
    def __init__(self, reports_total: _Optional[int] = ..., window_reports: _Optional[int] = ..., delay_p50_ms: _Optional[float] = ..., delay_p99_ms: _Optional[float] = ..., delay_max_ms: _Optional[float] = ..., connected_agents: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...
