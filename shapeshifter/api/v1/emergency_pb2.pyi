from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeclareEmergencyRequest(_message.Message):
    __slots__ = ("scope", "name", "kind", "capacity_frac", "capacity_w", "capacity_cfm", "source", "note")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FRAC_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_W_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_CFM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    scope: str
    name: str
    kind: str
    capacity_frac: float
    capacity_w: float
    capacity_cfm: float
    source: str
    note: str
    def __init__(self, scope: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., capacity_frac: _Optional[float] = ..., capacity_w: _Optional[float] = ..., capacity_cfm: _Optional[float] = ..., source: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class ClearEmergencyRequest(_message.Message):
    __slots__ = ("emergency_id", "note")
    EMERGENCY_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    emergency_id: str
    note: str
    def __init__(self, emergency_id: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class GetEmergencyRequest(_message.Message):
    __slots__ = ("emergency_id",)
    EMERGENCY_ID_FIELD_NUMBER: _ClassVar[int]
    emergency_id: str
    def __init__(self, emergency_id: _Optional[str] = ...) -> None: ...

class ListEmergenciesRequest(_message.Message):
    __slots__ = ("active_only",)
    ACTIVE_ONLY_FIELD_NUMBER: _ClassVar[int]
    active_only: bool
    def __init__(self, active_only: _Optional[bool] = ...) -> None: ...

class EmergencyEvent(_message.Message):
    __slots__ = ("at_unix_s", "t_s", "kind", "node_id", "detail_json")
    AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    T_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    at_unix_s: float
    t_s: float
    kind: str
    node_id: str
    detail_json: str
    def __init__(self, at_unix_s: _Optional[float] = ..., t_s: _Optional[float] = ..., kind: _Optional[str] = ..., node_id: _Optional[str] = ..., detail_json: _Optional[str] = ...) -> None: ...

class EmergencyStatus(_message.Message):
    __slots__ = ("emergency_id", "scope", "name", "kind", "state", "capacity_frac", "normal_limit", "new_limit", "power_limit_w", "source", "note", "declared_at_unix_s", "cleared_at_unix_s", "shortfall_w", "nodes", "nodes_acked", "scope_power_w", "issued_s", "acked_s", "under_limit_s", "timeline")
    EMERGENCY_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FRAC_FIELD_NUMBER: _ClassVar[int]
    NORMAL_LIMIT_FIELD_NUMBER: _ClassVar[int]
    NEW_LIMIT_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    DECLARED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    CLEARED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    SHORTFALL_W_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    NODES_ACKED_FIELD_NUMBER: _ClassVar[int]
    SCOPE_POWER_W_FIELD_NUMBER: _ClassVar[int]
    ISSUED_S_FIELD_NUMBER: _ClassVar[int]
    ACKED_S_FIELD_NUMBER: _ClassVar[int]
    UNDER_LIMIT_S_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    emergency_id: str
    scope: str
    name: str
    kind: str
    state: str
    capacity_frac: float
    normal_limit: float
    new_limit: float
    power_limit_w: float
    source: str
    note: str
    declared_at_unix_s: float
    cleared_at_unix_s: float
    shortfall_w: float
    nodes: int
    nodes_acked: int
    scope_power_w: float
    issued_s: float
    acked_s: float
    under_limit_s: float
    timeline: _containers.RepeatedCompositeFieldContainer[EmergencyEvent]
    def __init__(self, emergency_id: _Optional[str] = ..., scope: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[str] = ..., capacity_frac: _Optional[float] = ..., normal_limit: _Optional[float] = ..., new_limit: _Optional[float] = ..., power_limit_w: _Optional[float] = ..., source: _Optional[str] = ..., note: _Optional[str] = ..., declared_at_unix_s: _Optional[float] = ..., cleared_at_unix_s: _Optional[float] = ..., shortfall_w: _Optional[float] = ..., nodes: _Optional[int] = ..., nodes_acked: _Optional[int] = ..., scope_power_w: _Optional[float] = ..., issued_s: _Optional[float] = ..., acked_s: _Optional[float] = ..., under_limit_s: _Optional[float] = ..., timeline: _Optional[_Iterable[_Union[EmergencyEvent, _Mapping]]] = ...) -> None: ...

class ListEmergenciesResponse(_message.Message):
    __slots__ = ("emergencies", "prearmed_nodes")
    EMERGENCIES_FIELD_NUMBER: _ClassVar[int]
    PREARMED_NODES_FIELD_NUMBER: _ClassVar[int]
    emergencies: _containers.RepeatedCompositeFieldContainer[EmergencyStatus]
    prearmed_nodes: int
    def __init__(self, emergencies: _Optional[_Iterable[_Union[EmergencyStatus, _Mapping]]] = ..., prearmed_nodes: _Optional[int] = ...) -> None: ...
