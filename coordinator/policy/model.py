"""The frozen inputs and outputs of the rebalance, placement and routing policies.

A `ClusterSnapshot` is what the coordinator knows at one instant (nodes, GPUs, instances,
endpoints and their demand); `Limits` are the row power and aisle airflow budgets and the
per-GPU thermal headroom; a `Plan` is a list of stages, each a list of actions with a reason.
Units are in the field names. Nothing here reads a clock or a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from coordinator.profiles.schema import FULL_GPU, QueryClass
from shapeshifter.common.errors import InvalidArgument, out_of_range

PRIORITY_CLASSES = ("saas", "iaas", "best_effort")
FIT_METRICS = ("dot", "l2")


@dataclass(frozen=True)
class MigSlice:
    """A MIG instance that exists on a GPU now."""

    profile: str  # e.g. "3g.40gb"
    uuid: str  # MIG device UUID ("" when not known yet)
    in_use: bool  # an instance (managed or not) runs on it


@dataclass(frozen=True)
class GpuState:
    index: int
    gpu_type: str  # "a100-80gb" | "h100-80gb" | ...
    power_draw_w: float = 0.0  # measured now
    temperature_c: float = 0.0
    mig_enabled: bool = False
    mig_slices: tuple[MigSlice, ...] = ()
    healthy: bool = True
    # Used by something that is not an instance of a managed endpoint (an opaque VM or job):
    # never a bin for the rebalancer, and its measured power stays in the row's budget.
    reserved: bool = False
    emergency_cap_w: float = 0.0  # an emergency power ceiling in force below the maximum; 0 = none
    sm_clock_locked_mhz: int | None = None  # the upper SM clock of a lock in force; None = unlocked
    # Under an emergency cap: the relative throughput of its instance at the clock the cap
    # allows (coordinator.policy.capping.phase2); 0 = not known (routing's capped_weight_frac
    # instead).
    capped_throughput_frac: float = 0.0


@dataclass(frozen=True)
class NodeState:
    node_id: str
    row: str
    aisle: str
    gpus: tuple[GpuState, ...]
    inlet_temp_c: float = 25.0
    power_draw_w: float = 0.0  # measured node power (idle + GPUs + fans)
    airflow_cfm: float = 0.0  # estimated by the agent from load
    rack: str = ""


@dataclass(frozen=True)
class InstanceState:
    """One running (or starting) engine instance, as the node reports it."""

    instance_id: str
    endpoint: str
    node_id: str
    gpu_indices: tuple[int, ...]
    model: str
    tensor_parallel: int = 1
    quantization: str = "none"
    mig_profile: str = FULL_GPU
    sm_clock_mhz: int | None = None
    ready: bool = True
    routable: bool = True
    requests_running: float = 0.0
    requests_waiting: float = 0.0
    kv_cache_usage_frac: float = 0.0
    e2e_latency_p95_s: float = 0.0
    power_draw_w: float = 0.0
    changed_at_s: float = 0.0  # when it was last started or reconfigured (snapshot time base)
    mig_uuid: str = ""  # the MIG device it runs on, when mig_profile is not "full"


@dataclass(frozen=True)
class EndpointSpec:
    """A served endpoint and its quality floor: the model variants and quantizations allowed."""

    name: str
    model: str
    slo_p95_s: float = 20.0
    allowed_models: tuple[str, ...] = ()  # variants meeting the quality floor; () = (model,)
    allowed_quantizations: tuple[str, ...] = ("none",)
    priority_class: str = "saas"
    min_instances: int = 1
    max_instances: int = 1000
    model_paths: Mapping[str, str] = field(default_factory=dict)  # model -> path on the nodes

    @property
    def models(self) -> tuple[str, ...]:
        return self.allowed_models or (self.model,)

    def model_path(self, model: str) -> str:
        return self.model_paths.get(model, model)


def validate_endpoint(spec: EndpointSpec) -> EndpointSpec:
    """Raise InvalidArgument naming the first bad field; return the spec when valid."""
    if not spec.name.strip():
        raise InvalidArgument("endpoint name must not be empty", field="name")
    if not spec.model.strip():
        raise InvalidArgument("model must not be empty", field="model")
    if not 0.01 <= spec.slo_p95_s <= 3600:
        raise out_of_range("slo_p95_s", spec.slo_p95_s, 0.01, 3600, "s")
    if not spec.allowed_quantizations:
        raise InvalidArgument("allowed_quantizations must list at least one (e.g. none)",
                              field="allowed_quantizations")
    if spec.priority_class not in PRIORITY_CLASSES:
        raise InvalidArgument(f"priority_class={spec.priority_class!r} is unknown; allowed: "
                              f"{', '.join(PRIORITY_CLASSES)}", field="priority_class")
    if not 0 <= spec.min_instances <= 10_000:
        raise out_of_range("min_instances", spec.min_instances, 0, 10_000)
    if not max(1, spec.min_instances) <= spec.max_instances <= 10_000:
        raise out_of_range("max_instances", spec.max_instances, max(1, spec.min_instances),
                           10_000)
    return spec


Demand = Mapping[QueryClass, float]  # requests/s per query class


@dataclass(frozen=True)
class ClusterSnapshot:
    nodes: tuple[NodeState, ...]
    instances: tuple[InstanceState, ...] = ()
    endpoints: tuple[EndpointSpec, ...] = ()
    demand_rps: Mapping[str, Demand] = field(default_factory=dict)  # endpoint -> class -> rps
    now_s: float = 0.0  # the time base of InstanceState.changed_at_s (for hysteresis)


@dataclass(frozen=True)
class Limits:
    row_power_limit_w: Mapping[str, float] = field(default_factory=dict)  # absent row: no limit
    aisle_airflow_cfm: Mapping[str, float] = field(default_factory=dict)
    gpu_thermal_headroom_c: float = 5.0  # keep predicted GPU temperature this far below slowdown


@dataclass(frozen=True)
class RebalanceConfig:
    headroom_frac: float = 0.2  # provision demand x (1 + headroom)
    max_restarts_per_round: int = 8  # instance starts + stops in one plan
    hysteresis_s: float = 600.0  # don't reshape an endpoint changed this recently (unless short)
    min_gpu_saving: float = 0.5  # reshape a covered endpoint only if it saves this many GPUs
    fit: str = "dot"  # "dot" (dot product) or "l2" (L2 norm) best fit, Panigrahy et al. 2011
    allow_mig: bool = True
    busy_power_frac: float = 0.7  # estimate when a profile row has no power: idle + frac x dyn
    # Phase 2 (issue 18): an endpoint that cannot cover its demand within the row and aisle
    # limits may still start instances over them, where power caps hold the scopes (an
    # emergency in force, the simulator's enforcement). Off: such a change is kept as is.
    place_over_limits: bool = False

    def validate(self) -> RebalanceConfig:
        if not 0 <= self.headroom_frac <= 10:
            raise out_of_range("headroom_frac", self.headroom_frac, 0, 10)
        if not 0 <= self.max_restarts_per_round <= 100_000:
            raise out_of_range("max_restarts_per_round", self.max_restarts_per_round, 0, 100_000)
        if not 0 <= self.hysteresis_s <= 7 * 86400:
            raise out_of_range("hysteresis_s", self.hysteresis_s, 0, 7 * 86400, "s")
        if self.fit not in FIT_METRICS:
            raise InvalidArgument(f"fit={self.fit!r} is unknown; allowed: {', '.join(FIT_METRICS)}",
                                  field="fit")
        if not 0 < self.busy_power_frac <= 1:
            raise out_of_range("busy_power_frac", self.busy_power_frac, 0, 1)
        return self


@dataclass(frozen=True)
class InstanceConfig:
    """What an instance runs as: the reshape knobs (model variant, TP, quantization, MIG, clock)."""

    gpu_type: str
    model: str
    tensor_parallel: int = 1
    quantization: str = "none"
    mig_profile: str = FULL_GPU
    sm_clock_mhz: int | None = None

    def describe(self) -> str:
        where = f"TP{self.tensor_parallel}" if self.mig_profile == FULL_GPU else self.mig_profile
        clock = f" @{self.sm_clock_mhz} MHz" if self.sm_clock_mhz else ""
        return f"{self.model} {self.quantization} {where} on {self.gpu_type}{clock}"


@dataclass(frozen=True)
class PlanAction:
    """One step. kind: start_instance | stop_instance | set_mig_mode | apply_mig_layout |
    lock_clocks | reset_clocks (one GPU each: gpu_indices holds it)."""

    kind: str
    node_id: str
    reason: str
    endpoint: str = ""
    instance_id: str = ""
    config: InstanceConfig | None = None
    gpu_indices: tuple[int, ...] = ()
    mig_profiles: tuple[str, ...] = ()  # apply_mig_layout: the GPU's whole new layout;
    # start_instance on a slice: its profile
    mig_uuid: str = ""  # start_instance: an existing free slice ("" = find one after a layout)
    mig_enabled: bool = False  # set_mig_mode
    capacity_rps: float = 0.0  # start/stop: serving capacity added/removed (at the demand mix)
    sm_clock_mhz: int | None = None  # lock_clocks: the highest SM clock the GPU may run at


@dataclass(frozen=True)
class Stage:
    """Actions that may run together; the next stage starts once all of them are verified."""

    actions: tuple[PlanAction, ...]
    reason: str
    # predicted once the stage has run (from the server and profile models)
    row_power_after_w: Mapping[str, float] = field(default_factory=dict)
    aisle_airflow_after_cfm: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EndpointOutcome:
    endpoint: str
    demand_rps: float
    capacity_before_rps: float
    capacity_after_rps: float
    gpus_before: float
    gpus_after: float
    decision: str  # kept | reshaped | deferred | unplaceable
    reason: str


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    outcomes: tuple[EndpointOutcome, ...]
    gpus_used_before: int
    gpus_used_after: int
    power_before_w: float  # predicted GPU power of the managed instances
    power_after_w: float
    reason: str
    warnings: tuple[str, ...] = ()
    row_power_before_w: Mapping[str, float] = field(default_factory=dict)  # predicted, now
    aisle_airflow_before_cfm: Mapping[str, float] = field(default_factory=dict)

    @property
    def actions(self) -> tuple[PlanAction, ...]:
        return tuple(a for s in self.stages for a in s.actions)

    @property
    def restarts(self) -> int:
        return sum(a.kind in ("start_instance", "stop_instance") for a in self.actions)
