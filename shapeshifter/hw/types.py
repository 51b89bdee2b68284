"""Plain value types shared by every GPU backend. Units are in the names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuIdentity:
    index: int
    uuid: str
    name: str  # as the driver reports it, e.g. "NVIDIA H100 80GB HBM3"
    serial: str
    memory_total_mib: int
    gpu_type: str  # "a100-40gb" | "a100-80gb" | "h100-80gb" | "" when unknown


@dataclass(frozen=True)
class PowerConstraints:
    min_w: float
    max_w: float
    default_w: float


@dataclass(frozen=True)
class ThermalThresholds:
    slowdown_c: float
    shutdown_c: float


@dataclass(frozen=True)
class SupportedClocks:
    """Supported graphics (SM) clocks per memory clock, each list descending."""

    sm_clocks_mhz_by_memory_mhz: dict[int, tuple[int, ...]]

    @property
    def all_sm_clocks_mhz(self) -> tuple[int, ...]:
        seen = {c for cs in self.sm_clocks_mhz_by_memory_mhz.values() for c in cs}
        return tuple(sorted(seen, reverse=True))

    @property
    def sm_min_mhz(self) -> int:
        return min(self.all_sm_clocks_mhz)

    @property
    def sm_max_mhz(self) -> int:
        return max(self.all_sm_clocks_mhz)


@dataclass(frozen=True)
class MigProfile:
    """A GPU-instance profile the device supports, e.g. 3g.40gb, and where it may be placed."""

    name: str
    slices: int  # compute slices (the "3" of 3g)
    memory_mib: int
    max_count: int
    placement_starts: tuple[int, ...]  # valid start slots
    placement_size: int  # memory slots it occupies (1g=1, 2g=2, 3g=4, 4g=4, 7g=8 on A100/H100)


@dataclass(frozen=True)
class MigInstance:
    gpu_instance_id: int
    compute_instance_id: int
    profile: str
    placement_start: int
    placement_size: int
    uuid: str
    memory_mib: int


@dataclass(frozen=True)
class MigState:
    enabled: bool
    pending_enabled: bool
    instances: tuple[MigInstance, ...] = ()


@dataclass(frozen=True)
class GpuHealth:
    ecc_uncorrected_volatile: int = 0
    last_xid: int = 0  # the newest Xid seen
    healthy: bool = True
    # An Xid that only a GPU reset clears (79, 48, ...); sticky until the reset, 0 when none.
    reset_required_xid: int = 0
    lost: bool = False  # the GPU stopped answering (NVML GPU_IS_LOST); the reading is stale
    error: str = ""  # why the GPU could not be read, when lost


@dataclass(frozen=True)
class GpuTelemetry:
    index: int
    power_draw_w: float
    power_draw_avg_w: float
    power_limit_w: float
    energy_j: float
    temperature_c: float
    memory_temperature_c: float | None
    sm_clock_mhz: int
    memory_clock_mhz: int
    utilization_gpu_pct: float  # -1 where the device does not report it (NVML in MIG mode)
    utilization_memory_pct: float  # -1 likewise
    memory_used_mib: int
    memory_total_mib: int
    throttle_reasons: tuple[str, ...]
    health: GpuHealth = field(default_factory=GpuHealth)
    process_pids: tuple[int, ...] = ()
    # The limit the GPU actually enforces: the lower of ours and any external cap (BMC, another
    # tool). None where the device does not report it.
    enforced_power_limit_w: float | None = None

    @property
    def effective_power_limit_w(self) -> float:
        """What the GPU may draw: our limit, or a lower enforced (external) one."""
        enforced = self.enforced_power_limit_w
        return self.power_limit_w if enforced is None else min(self.power_limit_w, enforced)


# Names used in GpuTelemetry.throttle_reasons (NVML clocks-event reasons, snake-cased).
THROTTLE_REASONS = (
    "gpu_idle",
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal",
    "hw_thermal",
    "hw_power_brake",
    "display_clocks_setting",
)
