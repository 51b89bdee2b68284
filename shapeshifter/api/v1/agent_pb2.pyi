from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetNodeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchTelemetryRequest(_message.Message):
    __slots__ = ("interval_s", "max_samples")
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    interval_s: float
    max_samples: int
    def __init__(self, interval_s: _Optional[float] = ..., max_samples: _Optional[int] = ...) -> None: ...

class ClockLock(_message.Message):
    __slots__ = ("min_mhz", "max_mhz")
    MIN_MHZ_FIELD_NUMBER: _ClassVar[int]
    MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    min_mhz: int
    max_mhz: int
    def __init__(self, min_mhz: _Optional[int] = ..., max_mhz: _Optional[int] = ...) -> None: ...

class MigInstance(_message.Message):
    __slots__ = ("gpu_instance_id", "compute_instance_id", "profile", "placement_start", "placement_size", "uuid", "memory_mib")
    GPU_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_START_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    gpu_instance_id: int
    compute_instance_id: int
    profile: str
    placement_start: int
    placement_size: int
    uuid: str
    memory_mib: int
    def __init__(self, gpu_instance_id: _Optional[int] = ..., compute_instance_id: _Optional[int] = ..., profile: _Optional[str] = ..., placement_start: _Optional[int] = ..., placement_size: _Optional[int] = ..., uuid: _Optional[str] = ..., memory_mib: _Optional[int] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("memory_used_mib", "memory_total_mib", "kv_cache_usage_frac", "requests_in_flight", "requests_capacity", "utilization_pct", "power_draw_w", "power_limit_w", "temperature_c", "slowdown_temp_c", "memory_headroom_mib", "compute_headroom_requests", "power_headroom_w", "thermal_headroom_c")
    MEMORY_USED_MIB_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_MIB_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FRAC_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_TEMP_C_FIELD_NUMBER: _ClassVar[int]
    MEMORY_HEADROOM_MIB_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_HEADROOM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    POWER_HEADROOM_W_FIELD_NUMBER: _ClassVar[int]
    THERMAL_HEADROOM_C_FIELD_NUMBER: _ClassVar[int]
    memory_used_mib: float
    memory_total_mib: float
    kv_cache_usage_frac: float
    requests_in_flight: float
    requests_capacity: float
    utilization_pct: float
    power_draw_w: float
    power_limit_w: float
    temperature_c: float
    slowdown_temp_c: float
    memory_headroom_mib: float
    compute_headroom_requests: float
    power_headroom_w: float
    thermal_headroom_c: float
    def __init__(self, memory_used_mib: _Optional[float] = ..., memory_total_mib: _Optional[float] = ..., kv_cache_usage_frac: _Optional[float] = ..., requests_in_flight: _Optional[float] = ..., requests_capacity: _Optional[float] = ..., utilization_pct: _Optional[float] = ..., power_draw_w: _Optional[float] = ..., power_limit_w: _Optional[float] = ..., temperature_c: _Optional[float] = ..., slowdown_temp_c: _Optional[float] = ..., memory_headroom_mib: _Optional[float] = ..., compute_headroom_requests: _Optional[float] = ..., power_headroom_w: _Optional[float] = ..., thermal_headroom_c: _Optional[float] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "uuid", "name", "serial", "gpu_type", "power_draw_w", "power_draw_avg_w", "power_limit_w", "power_limit_min_w", "power_limit_max_w", "power_limit_default_w", "energy_j", "power_limit_requested_w", "power_ceiling_w", "power_ceiling_source", "temperature_c", "memory_temperature_c", "slowdown_temp_c", "shutdown_temp_c", "sm_clock_mhz", "memory_clock_mhz", "sm_clock_max_mhz", "clock_lock", "supported_sm_clocks_mhz", "utilization_gpu_pct", "utilization_memory_pct", "memory_used_mib", "memory_total_mib", "throttle_reasons", "mig_enabled", "mig_pending_enabled", "mig_instances", "ecc_uncorrected_volatile", "last_xid", "healthy", "process_pids", "budget")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_W_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_AVG_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_MIN_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_MAX_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_DEFAULT_W_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_REQUESTED_W_FIELD_NUMBER: _ClassVar[int]
    POWER_CEILING_W_FIELD_NUMBER: _ClassVar[int]
    POWER_CEILING_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_TEMP_C_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_TEMP_C_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    CLOCK_LOCK_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_SM_CLOCKS_MHZ_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_GPU_PCT_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_MEMORY_PCT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_MIB_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_MIB_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_REASONS_FIELD_NUMBER: _ClassVar[int]
    MIG_ENABLED_FIELD_NUMBER: _ClassVar[int]
    MIG_PENDING_ENABLED_FIELD_NUMBER: _ClassVar[int]
    MIG_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    ECC_UNCORRECTED_VOLATILE_FIELD_NUMBER: _ClassVar[int]
    LAST_XID_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    PROCESS_PIDS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    serial: str
    gpu_type: str
    power_draw_w: float
    power_draw_avg_w: float
    power_limit_w: float
    power_limit_min_w: float
    power_limit_max_w: float
    power_limit_default_w: float
    energy_j: float
    power_limit_requested_w: float
    power_ceiling_w: float
    power_ceiling_source: str
    temperature_c: float
    memory_temperature_c: float
    slowdown_temp_c: float
    shutdown_temp_c: float
    sm_clock_mhz: int
    memory_clock_mhz: int
    sm_clock_max_mhz: int
    clock_lock: ClockLock
    supported_sm_clocks_mhz: _containers.RepeatedScalarFieldContainer[int]
    utilization_gpu_pct: float
    utilization_memory_pct: float
    memory_used_mib: int
    memory_total_mib: int
    throttle_reasons: _containers.RepeatedScalarFieldContainer[str]
    mig_enabled: bool
    mig_pending_enabled: bool
    mig_instances: _containers.RepeatedCompositeFieldContainer[MigInstance]
    ecc_uncorrected_volatile: int
    last_xid: int
    healthy: bool
    process_pids: _containers.RepeatedScalarFieldContainer[int]
    budget: Budget
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., serial: _Optional[str] = ..., gpu_type: _Optional[str] = ..., power_draw_w: _Optional[float] = ..., power_draw_avg_w: _Optional[float] = ..., power_limit_w: _Optional[float] = ..., power_limit_min_w: _Optional[float] = ..., power_limit_max_w: _Optional[float] = ..., power_limit_default_w: _Optional[float] = ..., energy_j: _Optional[float] = ..., power_limit_requested_w: _Optional[float] = ..., power_ceiling_w: _Optional[float] = ..., power_ceiling_source: _Optional[str] = ..., temperature_c: _Optional[float] = ..., memory_temperature_c: _Optional[float] = ..., slowdown_temp_c: _Optional[float] = ..., shutdown_temp_c: _Optional[float] = ..., sm_clock_mhz: _Optional[int] = ..., memory_clock_mhz: _Optional[int] = ..., sm_clock_max_mhz: _Optional[int] = ..., clock_lock: _Optional[_Union[ClockLock, _Mapping]] = ..., supported_sm_clocks_mhz: _Optional[_Iterable[int]] = ..., utilization_gpu_pct: _Optional[float] = ..., utilization_memory_pct: _Optional[float] = ..., memory_used_mib: _Optional[int] = ..., memory_total_mib: _Optional[int] = ..., throttle_reasons: _Optional[_Iterable[str]] = ..., mig_enabled: _Optional[bool] = ..., mig_pending_enabled: _Optional[bool] = ..., mig_instances: _Optional[_Iterable[_Union[MigInstance, _Mapping]]] = ..., ecc_uncorrected_volatile: _Optional[int] = ..., last_xid: _Optional[int] = ..., healthy: _Optional[bool] = ..., process_pids: _Optional[_Iterable[int]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class HostStats(_message.Message):
    __slots__ = ("cpu_pct", "memory_used_mib", "memory_total_mib")
    CPU_PCT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_MIB_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_MIB_FIELD_NUMBER: _ClassVar[int]
    cpu_pct: float
    memory_used_mib: int
    memory_total_mib: int
    def __init__(self, cpu_pct: _Optional[float] = ..., memory_used_mib: _Optional[int] = ..., memory_total_mib: _Optional[int] = ...) -> None: ...

class NodeBudget(_message.Message):
    __slots__ = ("node_power_w", "gpu_power_w", "idle_power_w", "fan_power_w", "gpu_power_limit_w", "airflow_cfm", "totals")
    NODE_POWER_W_FIELD_NUMBER: _ClassVar[int]
    GPU_POWER_W_FIELD_NUMBER: _ClassVar[int]
    IDLE_POWER_W_FIELD_NUMBER: _ClassVar[int]
    FAN_POWER_W_FIELD_NUMBER: _ClassVar[int]
    GPU_POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    AIRFLOW_CFM_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    node_power_w: float
    gpu_power_w: float
    idle_power_w: float
    fan_power_w: float
    gpu_power_limit_w: float
    airflow_cfm: float
    totals: Budget
    def __init__(self, node_power_w: _Optional[float] = ..., gpu_power_w: _Optional[float] = ..., idle_power_w: _Optional[float] = ..., fan_power_w: _Optional[float] = ..., gpu_power_limit_w: _Optional[float] = ..., airflow_cfm: _Optional[float] = ..., totals: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "epoch", "ttl_s", "gpu_power_limit_w", "remaining_s")
    class GpuPowerLimitWEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    GPU_POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    epoch: int
    ttl_s: float
    gpu_power_limit_w: _containers.ScalarMap[int, float]
    remaining_s: float
    def __init__(self, lease_id: _Optional[str] = ..., epoch: _Optional[int] = ..., ttl_s: _Optional[float] = ..., gpu_power_limit_w: _Optional[_Mapping[int, float]] = ..., remaining_s: _Optional[float] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("node_id", "hostname", "labels", "backend", "software_version", "gpus", "budget", "host", "epoch_seen", "lease", "safety_state", "sampled_at_unix_s", "instances")
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
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SEEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    SAFETY_STATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hostname: str
    labels: _containers.ScalarMap[str, str]
    backend: str
    software_version: str
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    budget: NodeBudget
    host: HostStats
    epoch_seen: int
    lease: Lease
    safety_state: str
    sampled_at_unix_s: float
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., backend: _Optional[str] = ..., software_version: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., budget: _Optional[_Union[NodeBudget, _Mapping]] = ..., host: _Optional[_Union[HostStats, _Mapping]] = ..., epoch_seen: _Optional[int] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., safety_state: _Optional[str] = ..., sampled_at_unix_s: _Optional[float] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ...) -> None: ...

class SetPowerLimitRequest(_message.Message):
    __slots__ = ("gpu_index", "power_limit_w")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    power_limit_w: float
    def __init__(self, gpu_index: _Optional[int] = ..., power_limit_w: _Optional[float] = ...) -> None: ...

class LockClocksRequest(_message.Message):
    __slots__ = ("gpu_index", "min_mhz", "max_mhz")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    MIN_MHZ_FIELD_NUMBER: _ClassVar[int]
    MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    min_mhz: int
    max_mhz: int
    def __init__(self, gpu_index: _Optional[int] = ..., min_mhz: _Optional[int] = ..., max_mhz: _Optional[int] = ...) -> None: ...

class ResetClocksRequest(_message.Message):
    __slots__ = ("gpu_index",)
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    def __init__(self, gpu_index: _Optional[int] = ...) -> None: ...

class SetMigModeRequest(_message.Message):
    __slots__ = ("gpu_index", "enabled")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    enabled: bool
    def __init__(self, gpu_index: _Optional[int] = ..., enabled: _Optional[bool] = ...) -> None: ...

class ApplyMigLayoutRequest(_message.Message):
    __slots__ = ("gpu_index", "profiles", "mig_parted_yaml", "mig_parted_config", "restart_instances")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    MIG_PARTED_YAML_FIELD_NUMBER: _ClassVar[int]
    MIG_PARTED_CONFIG_FIELD_NUMBER: _ClassVar[int]
    RESTART_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    profiles: _containers.RepeatedScalarFieldContainer[str]
    mig_parted_yaml: str
    mig_parted_config: str
    restart_instances: bool
    def __init__(self, gpu_index: _Optional[int] = ..., profiles: _Optional[_Iterable[str]] = ..., mig_parted_yaml: _Optional[str] = ..., mig_parted_config: _Optional[str] = ..., restart_instances: _Optional[bool] = ...) -> None: ...

class ActionResult(_message.Message):
    __slots__ = ("action_id", "ok", "changed", "code", "message", "duration_s")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    ok: bool
    changed: bool
    code: str
    message: str
    duration_s: float
    def __init__(self, action_id: _Optional[str] = ..., ok: _Optional[bool] = ..., changed: _Optional[bool] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., duration_s: _Optional[float] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("action_id", "reason", "set_power_limit", "lock_clocks", "reset_clocks", "set_mig_mode", "apply_mig_layout", "start_instance", "stop_instance", "reconfigure_instance")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SET_POWER_LIMIT_FIELD_NUMBER: _ClassVar[int]
    LOCK_CLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESET_CLOCKS_FIELD_NUMBER: _ClassVar[int]
    SET_MIG_MODE_FIELD_NUMBER: _ClassVar[int]
    APPLY_MIG_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    START_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    STOP_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    RECONFIGURE_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    reason: str
    set_power_limit: SetPowerLimitRequest
    lock_clocks: LockClocksRequest
    reset_clocks: ResetClocksRequest
    set_mig_mode: SetMigModeRequest
    apply_mig_layout: ApplyMigLayoutRequest
    start_instance: StartInstanceRequest
    stop_instance: StopInstanceRequest
    reconfigure_instance: ReconfigureInstanceRequest
    def __init__(self, action_id: _Optional[str] = ..., reason: _Optional[str] = ..., set_power_limit: _Optional[_Union[SetPowerLimitRequest, _Mapping]] = ..., lock_clocks: _Optional[_Union[LockClocksRequest, _Mapping]] = ..., reset_clocks: _Optional[_Union[ResetClocksRequest, _Mapping]] = ..., set_mig_mode: _Optional[_Union[SetMigModeRequest, _Mapping]] = ..., apply_mig_layout: _Optional[_Union[ApplyMigLayoutRequest, _Mapping]] = ..., start_instance: _Optional[_Union[StartInstanceRequest, _Mapping]] = ..., stop_instance: _Optional[_Union[StopInstanceRequest, _Mapping]] = ..., reconfigure_instance: _Optional[_Union[ReconfigureInstanceRequest, _Mapping]] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("plan_id", "epoch", "actions", "reason")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    epoch: int
    actions: _containers.RepeatedCompositeFieldContainer[Action]
    reason: str
    def __init__(self, plan_id: _Optional[str] = ..., epoch: _Optional[int] = ..., actions: _Optional[_Iterable[_Union[Action, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class ApplyPlanRequest(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class ApplyPlanResponse(_message.Message):
    __slots__ = ("plan_id", "results", "completed")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    results: _containers.RepeatedCompositeFieldContainer[ActionResult]
    completed: bool
    def __init__(self, plan_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ActionResult, _Mapping]]] = ..., completed: _Optional[bool] = ...) -> None: ...

class InstanceSpec(_message.Message):
    __slots__ = ("instance_id", "endpoint", "model_path", "devices", "tensor_parallel_size", "quantization", "dtype", "max_num_seqs", "max_model_len", "gpu_memory_utilization", "port", "extra_args", "env", "priority_class", "drain_timeout_s")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    EXTRA_ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_CLASS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    endpoint: str
    model_path: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    tensor_parallel_size: int
    quantization: str
    dtype: str
    max_num_seqs: int
    max_model_len: int
    gpu_memory_utilization: float
    port: int
    extra_args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    priority_class: str
    drain_timeout_s: float
    def __init__(self, instance_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., model_path: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., tensor_parallel_size: _Optional[int] = ..., quantization: _Optional[str] = ..., dtype: _Optional[str] = ..., max_num_seqs: _Optional[int] = ..., max_model_len: _Optional[int] = ..., gpu_memory_utilization: _Optional[float] = ..., port: _Optional[int] = ..., extra_args: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., priority_class: _Optional[str] = ..., drain_timeout_s: _Optional[float] = ...) -> None: ...

class InstanceMetrics(_message.Message):
    __slots__ = ("kv_cache_usage_frac", "requests_running", "requests_waiting", "prompt_tokens_total", "generation_tokens_total", "prompt_tokens_per_s", "generation_tokens_per_s", "engine_sleep_state", "e2e_latency_p95_s", "ttft_p95_s")
    KV_CACHE_USAGE_FRAC_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SLEEP_STATE_FIELD_NUMBER: _ClassVar[int]
    E2E_LATENCY_P95_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_P95_S_FIELD_NUMBER: _ClassVar[int]
    kv_cache_usage_frac: float
    requests_running: float
    requests_waiting: float
    prompt_tokens_total: float
    generation_tokens_total: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    engine_sleep_state: float
    e2e_latency_p95_s: float
    ttft_p95_s: float
    def __init__(self, kv_cache_usage_frac: _Optional[float] = ..., requests_running: _Optional[float] = ..., requests_waiting: _Optional[float] = ..., prompt_tokens_total: _Optional[float] = ..., generation_tokens_total: _Optional[float] = ..., prompt_tokens_per_s: _Optional[float] = ..., generation_tokens_per_s: _Optional[float] = ..., engine_sleep_state: _Optional[float] = ..., e2e_latency_p95_s: _Optional[float] = ..., ttft_p95_s: _Optional[float] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("spec", "state", "pid", "exit_code", "last_log", "restarts", "metrics", "routable", "started_at_unix_s", "ready_at_unix_s", "command")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ROUTABLE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    READY_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    spec: InstanceSpec
    state: str
    pid: int
    exit_code: int
    last_log: str
    restarts: int
    metrics: InstanceMetrics
    routable: bool
    started_at_unix_s: float
    ready_at_unix_s: float
    command: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, spec: _Optional[_Union[InstanceSpec, _Mapping]] = ..., state: _Optional[str] = ..., pid: _Optional[int] = ..., exit_code: _Optional[int] = ..., last_log: _Optional[str] = ..., restarts: _Optional[int] = ..., metrics: _Optional[_Union[InstanceMetrics, _Mapping]] = ..., routable: _Optional[bool] = ..., started_at_unix_s: _Optional[float] = ..., ready_at_unix_s: _Optional[float] = ..., command: _Optional[_Iterable[str]] = ...) -> None: ...

class StartInstanceRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: InstanceSpec
    def __init__(self, spec: _Optional[_Union[InstanceSpec, _Mapping]] = ...) -> None: ...

class StopInstanceRequest(_message.Message):
    __slots__ = ("instance_id", "force", "drain_timeout_s")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    force: bool
    drain_timeout_s: float
    def __init__(self, instance_id: _Optional[str] = ..., force: _Optional[bool] = ..., drain_timeout_s: _Optional[float] = ...) -> None: ...

class ReconfigureInstanceRequest(_message.Message):
    __slots__ = ("instance_id", "new_spec")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_SPEC_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    new_spec: InstanceSpec
    def __init__(self, instance_id: _Optional[str] = ..., new_spec: _Optional[_Union[InstanceSpec, _Mapping]] = ...) -> None: ...

class StepTiming(_message.Message):
    __slots__ = ("step", "seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: str
    seconds: float
    def __init__(self, step: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class ReconfigureInstanceResponse(_message.Message):
    __slots__ = ("instance", "rolled_back", "steps", "message")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    instance: Instance
    rolled_back: bool
    steps: _containers.RepeatedCompositeFieldContainer[StepTiming]
    message: str
    def __init__(self, instance: _Optional[_Union[Instance, _Mapping]] = ..., rolled_back: _Optional[bool] = ..., steps: _Optional[_Iterable[_Union[StepTiming, _Mapping]]] = ..., message: _Optional[str] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ...) -> None: ...

class EmergencyDirective(_message.Message):
    __slots__ = ("directive_id", "epoch", "emergency_id", "active", "capacity_frac", "gpu_power_ceiling_w", "has_caps", "fallback_after_s", "reason")
    class GpuPowerCeilingWEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    DIRECTIVE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EMERGENCY_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FRAC_FIELD_NUMBER: _ClassVar[int]
    GPU_POWER_CEILING_W_FIELD_NUMBER: _ClassVar[int]
    HAS_CAPS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    directive_id: str
    epoch: int
    emergency_id: str
    active: bool
    capacity_frac: float
    gpu_power_ceiling_w: _containers.ScalarMap[int, float]
    has_caps: bool
    fallback_after_s: float
    reason: str
    def __init__(self, directive_id: _Optional[str] = ..., epoch: _Optional[int] = ..., emergency_id: _Optional[str] = ..., active: _Optional[bool] = ..., capacity_frac: _Optional[float] = ..., gpu_power_ceiling_w: _Optional[_Mapping[int, float]] = ..., has_caps: _Optional[bool] = ..., fallback_after_s: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class EmergencyPrearm(_message.Message):
    __slots__ = ("prearm_id", "epoch", "levels")
    PREARM_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    prearm_id: str
    epoch: int
    levels: _containers.RepeatedCompositeFieldContainer[PrearmedLevel]
    def __init__(self, prearm_id: _Optional[str] = ..., epoch: _Optional[int] = ..., levels: _Optional[_Iterable[_Union[PrearmedLevel, _Mapping]]] = ...) -> None: ...

class PrearmedLevel(_message.Message):
    __slots__ = ("capacity_frac", "gpu_power_ceiling_w")
    class GpuPowerCeilingWEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    CAPACITY_FRAC_FIELD_NUMBER: _ClassVar[int]
    GPU_POWER_CEILING_W_FIELD_NUMBER: _ClassVar[int]
    capacity_frac: float
    gpu_power_ceiling_w: _containers.ScalarMap[int, float]
    def __init__(self, capacity_frac: _Optional[float] = ..., gpu_power_ceiling_w: _Optional[_Mapping[int, float]] = ...) -> None: ...
