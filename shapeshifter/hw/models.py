"""Specifications of the GPU types the agent knows, as the driver reports them.

Figures are from the NVIDIA A100/H100 datasheets and from `nvidia-smi -q` / `nvidia-smi mig -lgip`
on DGX A100 and DGX H100 systems (driver R535+). The simulated backend enforces exactly these
constraints; the NVML backend uses the table only to name a device's type.
"""

from __future__ import annotations

from dataclasses import dataclass

from shapeshifter.hw.types import MigProfile, PowerConstraints, SupportedClocks, ThermalThresholds


@dataclass(frozen=True)
class GpuModel:
    key: str  # "a100-40gb" | "a100-80gb" | "h100-80gb"
    driver_name: str  # nvmlDeviceGetName
    memory_total_mib: int
    power: PowerConstraints
    sm_clocks_mhz: tuple[int, ...]  # supported graphics clocks, descending
    sm_idle_clock_mhz: int
    memory_clock_mhz: int
    thermal: ThermalThresholds
    max_operating_c: float  # "GPU Max Operating Temp": clocks start to drop above this
    idle_power_w: float  # P0 idle draw at the idle clock
    dynamic_power_max_w: float  # extra draw at full activity and max clock (TDP - idle)
    thermal_c_per_w: float  # steady-state GPU temperature rise per watt (TAPAS eq. 2)
    mig_profiles: tuple[MigProfile, ...]

    @property
    def sm_max_clock_mhz(self) -> int:
        return self.sm_clocks_mhz[0]

    @property
    def sm_min_clock_mhz(self) -> int:
        return self.sm_clocks_mhz[-1]

    @property
    def supported_clocks(self) -> SupportedClocks:
        return SupportedClocks({self.memory_clock_mhz: self.sm_clocks_mhz})

    def mig_profile(self, name: str) -> MigProfile | None:
        return next((p for p in self.mig_profiles if p.name == name), None)


def _clock_table_mhz(max_mhz: int, min_mhz: int, step_mhz: int = 15) -> tuple[int, ...]:
    """Graphics clocks in 15 MHz steps, descending, as `nvidia-smi -q -d SUPPORTED_CLOCKS` lists."""
    return tuple(range(max_mhz, min_mhz - 1, -step_mhz))


# Placement starts and sizes are the same on A100 and H100 (8 memory slots, 7 compute slices):
# `nvidia-smi mig -lgipp` prints e.g. "MIG 3g.40gb  Placements: {0,4}:4".
_STARTS_1G = (0, 1, 2, 3, 4, 5, 6)
_STARTS_1G_DOUBLE = (0, 2, 4, 6)  # 1g with two memory slots (1g.10gb on 40GB, 1g.20gb on 80GB)
_STARTS_2G = (0, 2, 4)
_STARTS_3G = (0, 4)
_STARTS_FULL = (0,)


def _mig(name: str, slices: int, memory_mib: int, max_count: int, starts: tuple[int, ...],
         size: int) -> MigProfile:
    return MigProfile(name=name, slices=slices, memory_mib=memory_mib, max_count=max_count,
                      placement_starts=starts, placement_size=size)


def _mig_profile_set(gb: tuple[int, int, int, int],
                     mib: tuple[int, int, int, int]) -> tuple[MigProfile, ...]:
    """The six-profile set every A100/H100/H200 has: `gb` names and `mib` memory of the 1-slot,
    2-slot, 4-slot and 8-slot memory slices (1g.5gb/1g.10gb/3g.20gb/7g.40gb on A100 40GB)."""
    g1, g2, g4, g8 = gb
    m1, m2, m4, m8 = mib
    return (
        _mig(f"1g.{g1}gb", 1, m1, 7, _STARTS_1G, 1),
        _mig(f"1g.{g2}gb", 1, m2, 4, _STARTS_1G_DOUBLE, 2),
        _mig(f"2g.{g2}gb", 2, m2, 3, _STARTS_2G, 2),
        _mig(f"3g.{g4}gb", 3, m4, 2, _STARTS_3G, 4),
        _mig(f"4g.{g4}gb", 4, m4, 1, _STARTS_FULL, 4),
        _mig(f"7g.{g8}gb", 7, m8, 1, _STARTS_FULL, 8),
    )


def _mig_profiles_80gb(mib: tuple[int, int, int, int]) -> tuple[MigProfile, ...]:
    """The 80 GB profile set; `mib`: memory of the 1g.10gb, 1g.20gb/2g, 3g/4g and 7g slices."""
    return _mig_profile_set((10, 20, 40, 80), mib)


_A100_POWER = PowerConstraints(min_w=100.0, max_w=400.0, default_w=400.0)
_A100_CLOCKS = _clock_table_mhz(1410, 210)
# nvidia-smi -q on DGX A100: Shutdown 92 C, Slowdown 89 C, Max Operating 85 C.
_A100_THERMAL = ThermalThresholds(slowdown_c=89.0, shutdown_c=92.0)

GPU_MODELS: dict[str, GpuModel] = {
    "a100-40gb": GpuModel(
        key="a100-40gb",
        driver_name="NVIDIA A100-SXM4-40GB",
        memory_total_mib=40960,
        power=_A100_POWER,
        sm_clocks_mhz=_A100_CLOCKS,
        sm_idle_clock_mhz=210,
        memory_clock_mhz=1215,
        thermal=_A100_THERMAL,
        max_operating_c=85.0,
        idle_power_w=55.0,
        dynamic_power_max_w=345.0,
        thermal_c_per_w=0.1,  # 400 W at 25 C inlet -> 65-75 C, as DGX A100 GPUs run
        mig_profiles=_mig_profile_set((5, 10, 20, 40), (4864, 9856, 19968, 40192)),
    ),
    "a100-80gb": GpuModel(
        key="a100-80gb",
        driver_name="NVIDIA A100-SXM4-80GB",
        memory_total_mib=81920,
        power=_A100_POWER,
        sm_clocks_mhz=_A100_CLOCKS,
        sm_idle_clock_mhz=210,
        memory_clock_mhz=1593,
        thermal=_A100_THERMAL,
        max_operating_c=85.0,
        idle_power_w=60.0,
        dynamic_power_max_w=340.0,
        thermal_c_per_w=0.1,
        mig_profiles=_mig_profiles_80gb((9728, 19968, 40192, 80896)),
    ),
    "h100-80gb": GpuModel(
        key="h100-80gb",
        driver_name="NVIDIA H100 80GB HBM3",
        memory_total_mib=81559,
        power=PowerConstraints(min_w=200.0, max_w=700.0, default_w=700.0),
        sm_clocks_mhz=_clock_table_mhz(1980, 345),
        sm_idle_clock_mhz=345,
        memory_clock_mhz=2619,
        # nvidia-smi -q on DGX H100: Shutdown 92 C, Slowdown 89 C, Max Operating 87 C.
        thermal=ThermalThresholds(slowdown_c=89.0, shutdown_c=92.0),
        max_operating_c=87.0,
        idle_power_w=75.0,
        dynamic_power_max_w=625.0,
        thermal_c_per_w=0.065,  # 700 W at 25 C inlet -> 70-80 C
        mig_profiles=_mig_profiles_80gb((9984, 20096, 40448, 81408)),
    ),
}


def gpu_model(key: str) -> GpuModel:
    """The model for a type key; KeyError names the valid keys."""
    try:
        return GPU_MODELS[key]
    except KeyError:
        valid = ", ".join(sorted(GPU_MODELS))
        raise KeyError(f"unknown GPU type {key!r}; valid: {valid}") from None


# Other boards of the same chip configuration, matched by name family and memory when the exact
# SXM name does not: A100 PCIe ("NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe") has the SXM
# part's SMs, clocks and MIG geometry (only its power range differs, and that is read from NVML).
_FAMILIES = (("A100", "a100-40gb"), ("A100", "a100-80gb"))


def _slot_share(gb: tuple[int, int, int, int], memory_total_mib: int) -> tuple[MigProfile, ...]:
    slot_mib = memory_total_mib // 8
    return _mig_profile_set(gb, (slot_mib, 2 * slot_mib, 4 * slot_mib, 8 * slot_mib))


# MIG-capable boards with no GpuModel (different SM counts, memory or power: no simulated
# physics), with their MIG profiles as NVIDIA's MIG User Guide lists them (`nvidia-smi mig
# -lgip`). H100 PCIe has the H100 SXM profile table; for H100 NVL (94 GB) and H200 (141 GB)
# memory is taken as the slice's share of the board (NVML reports exact figures once MIG is on).
# (name family, memory MiB, profiles); the first family and memory match wins.
_MIG_ONLY: tuple[tuple[str, int, tuple[MigProfile, ...]], ...] = (
    ("H100", 81559, GPU_MODELS["h100-80gb"].mig_profiles),
    ("H100", 95830, _slot_share((12, 24, 47, 94), 95830)),
    ("H200", 143771, _slot_share((18, 35, 71, 141), 143771)),
)


def _memory_matches(memory_total_mib: int, expected_mib: int) -> bool:
    """Within 5%: drivers differ in how much memory they reserve."""
    return abs(memory_total_mib - expected_mib) <= 0.05 * expected_mib


def gpu_type_for(driver_name: str, memory_total_mib: int) -> str:
    """The type key for a device as NVML names it ("" when unknown).

    Matches the exact name first, then the chip family in the name (PCIe boards), each
    disambiguated by memory.
    """
    name = driver_name.strip()
    for model in GPU_MODELS.values():
        if name == model.driver_name and _memory_matches(memory_total_mib,
                                                         model.memory_total_mib):
            return model.key
    for family, key in _FAMILIES:
        if family in name.upper() and _memory_matches(memory_total_mib,
                                                      GPU_MODELS[key].memory_total_mib):
            return key
    return ""


def mig_profiles_for(driver_name: str, memory_total_mib: int) -> tuple[MigProfile, ...]:
    """MIG profiles of a board as NVIDIA documents them (used while MIG is off, when NVML does not
    list them); () when the board is not in the catalog."""
    key = gpu_type_for(driver_name, memory_total_mib)
    if key:
        return GPU_MODELS[key].mig_profiles
    name = driver_name.upper()
    for family, memory_mib, profiles in _MIG_ONLY:
        if family in name and _memory_matches(memory_total_mib, memory_mib):
            return profiles
    return ()
