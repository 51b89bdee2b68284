"""The one small Protocol every GPU backend (NVML, simulated) implements.

Backends report what the device says and apply what they are told; they do not decide policy.
Validation against constraints lives in the actuation layer, which reads the constraints from
here, but backends still refuse invalid values the way the device would (the simulated backend
and the fake pynvml enforce the same limits as the real driver), raising shapeshifter.common.errors
types.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from shapeshifter.hw.types import (
    GpuIdentity,
    GpuTelemetry,
    MigInstance,
    MigProfile,
    MigState,
    PowerConstraints,
    SupportedClocks,
    ThermalThresholds,
)


@runtime_checkable
class GpuBackend(Protocol):
    kind: str  # "nvml" | "sim"

    # discovery and constraints
    def devices(self) -> list[GpuIdentity]: ...
    def power_constraints(self, index: int) -> PowerConstraints: ...
    def thermal_thresholds(self, index: int) -> ThermalThresholds: ...
    def supported_clocks(self, index: int) -> SupportedClocks: ...
    def mig_profiles(self, index: int) -> list[MigProfile]: ...  # [] when MIG is unsupported

    # telemetry
    def telemetry(self, index: int) -> GpuTelemetry: ...
    def mig_state(self, index: int) -> MigState: ...
    # Process ids holding a compute context on GPU `index` or any of its MIG instances.
    def compute_pids(self, index: int) -> frozenset[int]: ...

    # actuators (each raises a shapeshifter.common.errors.DomainError on refusal)
    def set_power_limit_w(self, index: int, power_limit_w: float) -> None: ...
    def lock_gpu_clocks_mhz(self, index: int, min_mhz: int, max_mhz: int) -> None: ...
    def reset_gpu_clocks(self, index: int) -> None: ...
    # Raises ResetRequired while the mode change waits for a GPU reset (pending in mig_state).
    def set_mig_mode(self, index: int, enabled: bool) -> None: ...
    def apply_mig_layout(self, index: int, profiles: list[str]) -> list[MigInstance]: ...

    # The GPU was reset: drop what only a reset clears (sticky Xid) and cached MIG inventory.
    def gpu_was_reset(self, index: int) -> None: ...

    def close(self) -> None: ...
