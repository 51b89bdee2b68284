from shapeshifter.api.v1 import agent_pb2 as _agent_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Register(_message.Message):
    __slots__ = ("node_id", "hostname", "labels", "software_version", "backend", "gpus", "report_interval_s")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hostname: str
    labels: _containers.ScalarMap[str, str]
    software_version: str
    backend: str
    gpus: _containers.RepeatedCompositeFieldContainer[_agent_pb2.Gpu]
    report_interval_s: float
    def __init__(self, node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., software_version: _Optional[str] = ..., backend: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[_agent_pb2.Gpu, _Mapping]]] = ..., report_interval_s: _Optional[float] = ...) -> None: ...

class NodeReport(_message.Message):
    __slots__ = ("node", "seq", "sent_at_unix_s")
    NODE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    node: _agent_pb2.Node
    seq: int
    sent_at_unix_s: float
    def __init__(self, node: _Optional[_Union[_agent_pb2.Node, _Mapping]] = ..., seq: _Optional[int] = ..., sent_at_unix_s: _Optional[float] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("register", "report", "plan_result")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    PLAN_RESULT_FIELD_NUMBER: _ClassVar[int]
    register: Register
    report: NodeReport
    plan_result: _agent_pb2.ApplyPlanResponse
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., report: _Optional[_Union[NodeReport, _Mapping]] = ..., plan_result: _Optional[_Union[_agent_pb2.ApplyPlanResponse, _Mapping]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("node_id", "epoch", "topology_known", "message")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_KNOWN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    topology_known: bool
    message: str
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., topology_known: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("registered", "lease", "plan", "emergency", "prearm")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    EMERGENCY_FIELD_NUMBER: _ClassVar[int]
    PREARM_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    lease: _agent_pb2.Lease
    plan: _agent_pb2.Plan
    emergency: _agent_pb2.EmergencyDirective
    prearm: _agent_pb2.EmergencyPrearm
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., lease: _Optional[_Union[_agent_pb2.Lease, _Mapping]] = ..., plan: _Optional[_Union[_agent_pb2.Plan, _Mapping]] = ..., emergency: _Optional[_Union[_agent_pb2.EmergencyDirective, _Mapping]] = ..., prearm: _Optional[_Union[_agent_pb2.EmergencyPrearm, _Mapping]] = ...) -> None: ...
