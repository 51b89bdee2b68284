from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LeafRow(_message.Message):
    __slots__ = ("site", "row", "row_power_limit_w")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    ROW_POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    site: str
    row: str
    row_power_limit_w: float
    def __init__(self, site: _Optional[str] = ..., row: _Optional[str] = ..., row_power_limit_w: _Optional[float] = ...) -> None: ...

class LeafRegister(_message.Message):
    __slots__ = ("leaf_id", "rows", "software_version", "report_interval_s")
    LEAF_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    leaf_id: str
    rows: _containers.RepeatedCompositeFieldContainer[LeafRow]
    software_version: str
    report_interval_s: float
    def __init__(self, leaf_id: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[LeafRow, _Mapping]]] = ..., software_version: _Optional[str] = ..., report_interval_s: _Optional[float] = ...) -> None: ...

class RowEmergency(_message.Message):
    __slots__ = ("emergency_id", "source", "state", "power_limit_w", "capacity_frac", "nodes", "nodes_acked", "note")
    EMERGENCY_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FRAC_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    NODES_ACKED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    emergency_id: str
    source: str
    state: str
    power_limit_w: float
    capacity_frac: float
    nodes: int
    nodes_acked: int
    note: str
    def __init__(self, emergency_id: _Optional[str] = ..., source: _Optional[str] = ..., state: _Optional[str] = ..., power_limit_w: _Optional[float] = ..., capacity_frac: _Optional[float] = ..., nodes: _Optional[int] = ..., nodes_acked: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class RowRollup(_message.Message):
    __slots__ = ("site", "row", "power_draw_w", "row_power_limit_w", "floor_w", "nodes", "nodes_up", "gpus", "emergency")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_W_FIELD_NUMBER: _ClassVar[int]
    ROW_POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    FLOOR_W_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    NODES_UP_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    EMERGENCY_FIELD_NUMBER: _ClassVar[int]
    site: str
    row: str
    power_draw_w: float
    row_power_limit_w: float
    floor_w: float
    nodes: int
    nodes_up: int
    gpus: int
    emergency: RowEmergency
    def __init__(self, site: _Optional[str] = ..., row: _Optional[str] = ..., power_draw_w: _Optional[float] = ..., row_power_limit_w: _Optional[float] = ..., floor_w: _Optional[float] = ..., nodes: _Optional[int] = ..., nodes_up: _Optional[int] = ..., gpus: _Optional[int] = ..., emergency: _Optional[_Union[RowEmergency, _Mapping]] = ...) -> None: ...

class LeafReport(_message.Message):
    __slots__ = ("seq", "sent_at_unix_s", "rows")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    sent_at_unix_s: float
    rows: _containers.RepeatedCompositeFieldContainer[RowRollup]
    def __init__(self, seq: _Optional[int] = ..., sent_at_unix_s: _Optional[float] = ..., rows: _Optional[_Iterable[_Union[RowRollup, _Mapping]]] = ...) -> None: ...

class RowAck(_message.Message):
    __slots__ = ("site", "row", "power_limit_w", "action", "emergency_id", "emergency_source", "in_force_limit_w", "agents_acked", "nodes", "nodes_acked", "message")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    EMERGENCY_ID_FIELD_NUMBER: _ClassVar[int]
    EMERGENCY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    IN_FORCE_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    AGENTS_ACKED_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    NODES_ACKED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    site: str
    row: str
    power_limit_w: float
    action: str
    emergency_id: str
    emergency_source: str
    in_force_limit_w: float
    agents_acked: bool
    nodes: int
    nodes_acked: int
    message: str
    def __init__(self, site: _Optional[str] = ..., row: _Optional[str] = ..., power_limit_w: _Optional[float] = ..., action: _Optional[str] = ..., emergency_id: _Optional[str] = ..., emergency_source: _Optional[str] = ..., in_force_limit_w: _Optional[float] = ..., agents_acked: _Optional[bool] = ..., nodes: _Optional[int] = ..., nodes_acked: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class LimitsAck(_message.Message):
    __slots__ = ("seq", "rows")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    rows: _containers.RepeatedCompositeFieldContainer[RowAck]
    def __init__(self, seq: _Optional[int] = ..., rows: _Optional[_Iterable[_Union[RowAck, _Mapping]]] = ...) -> None: ...

class LeafMessage(_message.Message):
    __slots__ = ("register", "report", "ack")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    register: LeafRegister
    report: LeafReport
    ack: LimitsAck
    def __init__(self, register: _Optional[_Union[LeafRegister, _Mapping]] = ..., report: _Optional[_Union[LeafReport, _Mapping]] = ..., ack: _Optional[_Union[LimitsAck, _Mapping]] = ...) -> None: ...

class LeafRegistered(_message.Message):
    __slots__ = ("leaf_id", "message")
    LEAF_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    leaf_id: str
    message: str
    def __init__(self, leaf_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RowLimit(_message.Message):
    __slots__ = ("site", "row", "power_limit_w", "normal_limit_w", "limit_id", "source", "note")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    NORMAL_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    LIMIT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    site: str
    row: str
    power_limit_w: float
    normal_limit_w: float
    limit_id: str
    source: str
    note: str
    def __init__(self, site: _Optional[str] = ..., row: _Optional[str] = ..., power_limit_w: _Optional[float] = ..., normal_limit_w: _Optional[float] = ..., limit_id: _Optional[str] = ..., source: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class RowLimits(_message.Message):
    __slots__ = ("seq", "rows")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    rows: _containers.RepeatedCompositeFieldContainer[RowLimit]
    def __init__(self, seq: _Optional[int] = ..., rows: _Optional[_Iterable[_Union[RowLimit, _Mapping]]] = ...) -> None: ...

class ParentMessage(_message.Message):
    __slots__ = ("registered", "limits")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    registered: LeafRegistered
    limits: RowLimits
    def __init__(self, registered: _Optional[_Union[LeafRegistered, _Mapping]] = ..., limits: _Optional[_Union[RowLimits, _Mapping]] = ...) -> None: ...

class SetSiteLimitRequest(_message.Message):
    __slots__ = ("site", "capacity_frac", "power_limit_w", "source", "note")
    SITE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FRAC_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    site: str
    capacity_frac: float
    power_limit_w: float
    source: str
    note: str
    def __init__(self, site: _Optional[str] = ..., capacity_frac: _Optional[float] = ..., power_limit_w: _Optional[float] = ..., source: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class ClearSiteLimitRequest(_message.Message):
    __slots__ = ("site", "note")
    SITE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    site: str
    note: str
    def __init__(self, site: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class GetSiteRequest(_message.Message):
    __slots__ = ("site",)
    SITE_FIELD_NUMBER: _ClassVar[int]
    site: str
    def __init__(self, site: _Optional[str] = ...) -> None: ...

class SiteRowStatus(_message.Message):
    __slots__ = ("row", "leaf_id", "leaf_connected", "normal_limit_w", "floor_w", "power_draw_w", "limit_w", "acked", "agents_acked", "action", "emergency_id", "in_force_limit_w", "nodes", "nodes_up", "gpus", "report_age_s", "emergency", "message")
    ROW_FIELD_NUMBER: _ClassVar[int]
    LEAF_ID_FIELD_NUMBER: _ClassVar[int]
    LEAF_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    NORMAL_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    FLOOR_W_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_W_FIELD_NUMBER: _ClassVar[int]
    LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    AGENTS_ACKED_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    EMERGENCY_ID_FIELD_NUMBER: _ClassVar[int]
    IN_FORCE_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    NODES_UP_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    REPORT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    EMERGENCY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    row: str
    leaf_id: str
    leaf_connected: bool
    normal_limit_w: float
    floor_w: float
    power_draw_w: float
    limit_w: float
    acked: bool
    agents_acked: bool
    action: str
    emergency_id: str
    in_force_limit_w: float
    nodes: int
    nodes_up: int
    gpus: int
    report_age_s: float
    emergency: RowEmergency
    message: str
    def __init__(self, row: _Optional[str] = ..., leaf_id: _Optional[str] = ..., leaf_connected: _Optional[bool] = ..., normal_limit_w: _Optional[float] = ..., floor_w: _Optional[float] = ..., power_draw_w: _Optional[float] = ..., limit_w: _Optional[float] = ..., acked: _Optional[bool] = ..., agents_acked: _Optional[bool] = ..., action: _Optional[str] = ..., emergency_id: _Optional[str] = ..., in_force_limit_w: _Optional[float] = ..., nodes: _Optional[int] = ..., nodes_up: _Optional[int] = ..., gpus: _Optional[int] = ..., report_age_s: _Optional[float] = ..., emergency: _Optional[_Union[RowEmergency, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class LeafStatus(_message.Message):
    __slots__ = ("leaf_id", "connected", "rows", "acked_seq", "report_age_s")
    LEAF_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    REPORT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    leaf_id: str
    connected: bool
    rows: _containers.RepeatedScalarFieldContainer[str]
    acked_seq: int
    report_age_s: float
    def __init__(self, leaf_id: _Optional[str] = ..., connected: _Optional[bool] = ..., rows: _Optional[_Iterable[str]] = ..., acked_seq: _Optional[int] = ..., report_age_s: _Optional[float] = ...) -> None: ...

class SiteStatus(_message.Message):
    __slots__ = ("site", "state", "limit_id", "normal_limit_w", "power_limit_w", "capacity_frac", "source", "note", "declared_at_unix_s", "cleared_at_unix_s", "infeasible", "seq", "power_draw_w", "floor_w", "acked_s", "rows", "leaves")
    SITE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_ID_FIELD_NUMBER: _ClassVar[int]
    NORMAL_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FRAC_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    DECLARED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    CLEARED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    INFEASIBLE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_W_FIELD_NUMBER: _ClassVar[int]
    FLOOR_W_FIELD_NUMBER: _ClassVar[int]
    ACKED_S_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    LEAVES_FIELD_NUMBER: _ClassVar[int]
    site: str
    state: str
    limit_id: str
    normal_limit_w: float
    power_limit_w: float
    capacity_frac: float
    source: str
    note: str
    declared_at_unix_s: float
    cleared_at_unix_s: float
    infeasible: bool
    seq: int
    power_draw_w: float
    floor_w: float
    acked_s: float
    rows: _containers.RepeatedCompositeFieldContainer[SiteRowStatus]
    leaves: _containers.RepeatedCompositeFieldContainer[LeafStatus]
    def __init__(self, site: _Optional[str] = ..., state: _Optional[str] = ..., limit_id: _Optional[str] = ..., normal_limit_w: _Optional[float] = ..., power_limit_w: _Optional[float] = ..., capacity_frac: _Optional[float] = ..., source: _Optional[str] = ..., note: _Optional[str] = ..., declared_at_unix_s: _Optional[float] = ..., cleared_at_unix_s: _Optional[float] = ..., infeasible: _Optional[bool] = ..., seq: _Optional[int] = ..., power_draw_w: _Optional[float] = ..., floor_w: _Optional[float] = ..., acked_s: _Optional[float] = ..., rows: _Optional[_Iterable[_Union[SiteRowStatus, _Mapping]]] = ..., leaves: _Optional[_Iterable[_Union[LeafStatus, _Mapping]]] = ...) -> None: ...
