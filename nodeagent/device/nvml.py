"""The real GPU backend on NVML (nvidia-ml-py, module `pynvml`).

The pynvml module is injected (tests pass tests/fakes/fake_pynvml.py) and imported lazily
otherwise. NVML errors are mapped to domain errors in one table (`_ERROR_TABLE`). NVML speaks
milliwatts and millijoules; they are converted here, at the boundary, and nowhere else.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import structlog

from shapeshifter.common.errors import (
    DomainError,
    FailedPrecondition,
    Internal,
    InUse,
    InvalidArgument,
    NotFound,
    NotSupported,
    PermissionDenied,
    Unavailable,
    out_of_range,
)
from shapeshifter.hw.mig import place_mig_layout
from shapeshifter.hw.models import GPU_MODELS, gpu_type_for
from shapeshifter.hw.types import (
    THROTTLE_REASONS,
    GpuHealth,
    GpuIdentity,
    GpuTelemetry,
    MigInstance,
    MigProfile,
    MigState,
    PowerConstraints,
    SupportedClocks,
    ThermalThresholds,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")

# NVML error constant name -> domain error; anything else is Internal. Names, not values, so the
# table reads against whichever module (real or fake) is injected.
_ERROR_TABLE: tuple[tuple[str, type[DomainError]], ...] = (
    ("NVML_ERROR_NOT_SUPPORTED", NotSupported),
    ("NVML_ERROR_NO_PERMISSION", PermissionDenied),
    ("NVML_ERROR_INVALID_ARGUMENT", InvalidArgument),
    ("NVML_ERROR_GPU_IS_LOST", Unavailable),
    ("NVML_ERROR_IN_USE", InUse),
)
MIB = 1024 * 1024
# Xid codes that mean the hardware (not the application) failed: memory, NVLink, GPU fell off the
# bus, uncontained ECC (NVIDIA "Xid Errors" table). 13/31/43 etc. are application faults.
_HARDWARE_XIDS = frozenset({48, 63, 64, 74, 79, 92, 94, 95, 119, 120})
# Full-GPU-instance compute profile for each GPU-instance slice count.
_CI_PROFILE_BY_SLICES = {1: "NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE",
                         2: "NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE",
                         3: "NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE",
                         4: "NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE",
                         7: "NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE"}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlBackend:
    kind = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as e:
                raise Unavailable(f"NVML failed to initialise: pynvml is not installed ({e}). "
                                  "Install nvidia-ml-py.") from e
        self._nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            raise Unavailable(
                f"NVML failed to initialise: {e}. Check that the NVIDIA driver is loaded "
                "(nvidia-smi works) and the agent can open /dev/nvidia*. The simulated backend "
                "is only used when configured (backend: sim).") from e
        self._lock = threading.Lock()  # guards the caches and the Xid event set
        try:
            with self._errors("discover GPUs"):
                self._handles = [nvml.nvmlDeviceGetHandleByIndex(i)
                                 for i in range(nvml.nvmlDeviceGetCount())]
                self._identities = [self._read_identity(i, h)
                                    for i, h in enumerate(self._handles)]
        except DomainError:
            nvml.nvmlShutdown()  # leave NVML as found; the caller stops on the error
            raise
        self._clocks: dict[int, SupportedClocks] = {}
        self._mig_profiles: dict[int, dict[int, MigProfile]] = {}  # index -> {profile id: profile}
        self._last_xid = [0] * len(self._handles)
        self._events = self._xid_event_set()

    # ---- error mapping (the one place NVML errors become domain errors) ----

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        nvml = self._nvml
        try:
            yield
        except nvml.NVMLError as e:
            cls = next((c for name, c in _ERROR_TABLE if e.value == getattr(nvml, name)), Internal)
            raise cls(f"{action}: NVML error {e.value}: {e}") from e

    def _optional(self, action: str, read: Callable[[], T]) -> T | None:
        """A read the device may not support: None when NVML says NOT_SUPPORTED."""
        try:
            with self._errors(action):
                return read()
        except NotSupported:
            return None

    def _handle(self, index: int) -> Any:
        if isinstance(index, bool) or not isinstance(index, int) \
                or not 0 <= index < len(self._handles):
            raise NotFound(f"gpu index {index!r} not found; this node has GPUs "
                           f"0..{len(self._handles) - 1}", field="index")
        return self._handles[index]

    # ---- discovery and constraints ----

    def _read_identity(self, index: int, handle: Any) -> GpuIdentity:
        nvml = self._nvml
        name = _text(nvml.nvmlDeviceGetName(handle))
        total_mib = nvml.nvmlDeviceGetMemoryInfo(handle).total // MIB
        serial = self._optional("read serial", lambda: _text(nvml.nvmlDeviceGetSerial(handle)))
        return GpuIdentity(index=index, uuid=_text(nvml.nvmlDeviceGetUUID(handle)), name=name,
                           serial=serial or "", memory_total_mib=int(total_mib),
                           gpu_type=gpu_type_for(name, int(total_mib)))

    def devices(self) -> list[GpuIdentity]:
        return list(self._identities)

    def power_constraints(self, index: int) -> PowerConstraints:
        h, nvml = self._handle(index), self._nvml
        with self._errors(f"gpu {index}: read power limit constraints"):
            min_mw, max_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(h)
            default_mw = nvml.nvmlDeviceGetPowerManagementDefaultLimit(h)
        return PowerConstraints(min_w=min_mw / 1000.0, max_w=max_mw / 1000.0,
                                default_w=default_mw / 1000.0)

    def thermal_thresholds(self, index: int) -> ThermalThresholds:
        h, nvml = self._handle(index), self._nvml
        with self._errors(f"gpu {index}: read temperature thresholds"):
            slowdown = nvml.nvmlDeviceGetTemperatureThreshold(
                h, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
            shutdown = nvml.nvmlDeviceGetTemperatureThreshold(
                h, nvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)
        return ThermalThresholds(slowdown_c=float(slowdown), shutdown_c=float(shutdown))

    def supported_clocks(self, index: int) -> SupportedClocks:
        h, nvml = self._handle(index), self._nvml
        with self._lock:
            cached = self._clocks.get(index)
        if cached is not None:
            return cached
        with self._errors(f"gpu {index}: read supported clocks"):
            table = {int(mem): tuple(sorted(map(int, nvml.nvmlDeviceGetSupportedGraphicsClocks(
                h, mem)), reverse=True)) for mem in nvml.nvmlDeviceGetSupportedMemoryClocks(h)}
        clocks = SupportedClocks(table)
        with self._lock:
            self._clocks[index] = clocks
        return clocks

    def mig_profiles(self, index: int) -> list[MigProfile]:
        return list(self._profiles_by_id(index).values())

    def _profiles_by_id(self, index: int) -> dict[int, MigProfile]:
        """GPU-instance profiles by NVML profile id. NVML lists them only while MIG is enabled;
        before that the known table for the GPU type stands in (ids unknown, so keyed -1..-n)."""
        with self._lock:
            cached = self._mig_profiles.get(index)
        if cached is not None:
            return cached
        mode = self._mig_mode(index)
        if mode is None:
            return {}
        if not mode[0]:
            model = GPU_MODELS.get(self._identities[index].gpu_type)
            return {-1 - i: p for i, p in enumerate(model.mig_profiles)} if model else {}
        profiles = self._read_mig_profiles(index)
        with self._lock:
            self._mig_profiles[index] = profiles
        return profiles

    def _read_mig_profiles(self, index: int) -> dict[int, MigProfile]:
        h, nvml = self._handle(index), self._nvml
        profiles: dict[int, MigProfile] = {}
        for enum_value in range(nvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            info = self._optional_profile(h, enum_value)
            if info is None or info.instanceCount == 0:
                continue
            count = ctypes.c_uint(0)
            with self._errors(f"gpu {index}: read MIG placements"):
                # First call sizes the array (NULL placements), the second fills it.
                nvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, info.id, None,
                                                                 ctypes.pointer(count))
                placements = (nvml.c_nvmlGpuInstancePlacement_t * count.value)()
                nvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, info.id, placements,
                                                                 ctypes.pointer(count))
            name = _text(info.name).removeprefix("MIG ")
            valid = placements[:count.value]
            profiles[int(info.id)] = MigProfile(
                name=name, slices=int(info.sliceCount), memory_mib=int(info.memorySizeMB),
                max_count=int(info.instanceCount),
                placement_starts=tuple(int(p.start) for p in valid),
                placement_size=int(valid[0].size) if valid else 0)
        return profiles

    def _optional_profile(self, handle: Any, enum_value: int) -> Any:
        """Profile info; None where the GPU lacks it (NOT_SUPPORTED / INVALID_ARGUMENT)."""
        try:
            with self._errors("read MIG profile"):
                return self._nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, enum_value)
        except (NotSupported, InvalidArgument):
            return None

    # ---- telemetry ----

    def telemetry(self, index: int) -> GpuTelemetry:
        h, nvml = self._handle(index), self._nvml
        with self._errors(f"gpu {index}: read telemetry"):
            power_mw = nvml.nvmlDeviceGetPowerUsage(h)
            avg_mw, mem_temp_c = self._power_avg_and_memory_temp(h)
            limit_mw = nvml.nvmlDeviceGetPowerManagementLimit(h)
            energy_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(h)
            temp_c = nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)
            sm_mhz = nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)
            mem_mhz = nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM)
            memory = nvml.nvmlDeviceGetMemoryInfo(h)
            reasons = nvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)
            pids = tuple(int(p.pid) for p in nvml.nvmlDeviceGetComputeRunningProcesses(h))
        # Not reported on MIG-enabled GPUs (NOT_SUPPORTED): -1 marks "unknown".
        util = self._optional(f"gpu {index}: read utilization",
                              lambda: nvml.nvmlDeviceGetUtilizationRates(h))
        return GpuTelemetry(
            index=index,
            power_draw_w=power_mw / 1000.0,
            power_draw_avg_w=(avg_mw if avg_mw is not None else power_mw) / 1000.0,
            power_limit_w=limit_mw / 1000.0,
            energy_j=energy_mj / 1000.0,
            temperature_c=float(temp_c),
            memory_temperature_c=mem_temp_c,
            sm_clock_mhz=int(sm_mhz),
            memory_clock_mhz=int(mem_mhz),
            utilization_gpu_pct=float(util.gpu) if util is not None else -1.0,
            utilization_memory_pct=float(util.memory) if util is not None else -1.0,
            memory_used_mib=int(memory.used // MIB),
            memory_total_mib=int(memory.total // MIB),
            throttle_reasons=throttle_reason_names(reasons),
            health=self._health(index, h),
            process_pids=pids,
        )

    def _power_avg_and_memory_temp(self, handle: Any) -> tuple[float | None, float | None]:
        """Averaged power (mW) and HBM temperature in one field-values call; None where absent."""
        nvml = self._nvml
        try:
            values = nvml.nvmlDeviceGetFieldValues(
                handle, [nvml.NVML_FI_DEV_POWER_AVERAGE, nvml.NVML_FI_DEV_MEMORY_TEMP])
        except nvml.NVMLError as e:
            if e.value != nvml.NVML_ERROR_NOT_SUPPORTED:
                raise
            return None, None
        avg, mem_temp = (self._field_value(v) for v in values)
        return avg, mem_temp

    def _field_value(self, fv: Any) -> float | None:
        nvml = self._nvml
        if fv.nvmlReturn != nvml.NVML_SUCCESS:
            return None
        attr = {nvml.NVML_VALUE_TYPE_DOUBLE: "dVal", nvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
                nvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
                nvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
                nvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
                nvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
                nvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal"}.get(fv.valueType)
        return float(getattr(fv.value, attr)) if attr else None

    def _health(self, index: int, handle: Any) -> GpuHealth:
        nvml = self._nvml
        ecc = self._optional(f"gpu {index}: read ECC counters",
                             lambda: nvml.nvmlDeviceGetTotalEccErrors(
                                 handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                 nvml.NVML_VOLATILE_ECC)) or 0
        self._drain_xid_events()
        with self._lock:
            xid = self._last_xid[index]
        return GpuHealth(ecc_uncorrected_volatile=int(ecc), last_xid=xid,
                         healthy=ecc == 0 and xid not in _HARDWARE_XIDS)

    def _xid_event_set(self) -> Any:
        """An event set for critical Xid errors, or None where the driver cannot provide one."""
        nvml = self._nvml
        try:
            events = nvml.nvmlEventSetCreate()
            for h in self._handles:
                nvml.nvmlDeviceRegisterEvents(h, nvml.nvmlEventTypeXidCriticalError, events)
        except nvml.NVMLError as e:
            log.warning("xid_events_unavailable", reason=str(e))
            return None
        return events

    def _drain_xid_events(self) -> None:
        nvml = self._nvml
        if self._events is None:
            return
        with self._lock:
            while True:
                try:
                    event = nvml.nvmlEventSetWait(self._events, 0)
                except nvml.NVMLError as e:
                    if e.value != nvml.NVML_ERROR_TIMEOUT:  # TIMEOUT = no event pending
                        log.warning("xid_event_read_failed", reason=str(e))
                    return
                index = self._index_of(event.device)
                if index is not None:
                    self._last_xid[index] = int(event.eventData)
                    log.error("gpu_xid", gpu=index, xid=int(event.eventData))

    def _index_of(self, handle: Any) -> int | None:
        uuid = _text(self._nvml.nvmlDeviceGetUUID(handle))
        return next((d.index for d in self._identities if d.uuid == uuid), None)

    def mig_state(self, index: int) -> MigState:
        mode = self._mig_mode(index)
        if mode is None:
            return MigState(enabled=False, pending_enabled=False)
        current, pending = mode
        instances = tuple(self._read_mig_instances(index)) if current else ()
        return MigState(enabled=current, pending_enabled=pending, instances=instances)

    def _mig_mode(self, index: int) -> tuple[bool, bool] | None:
        """(current, pending) MIG mode, None where the GPU has no MIG."""
        h, nvml = self._handle(index), self._nvml
        mode = self._optional(f"gpu {index}: read MIG mode", lambda: nvml.nvmlDeviceGetMigMode(h))
        if mode is None:
            return None
        enable = nvml.NVML_DEVICE_MIG_ENABLE
        return mode[0] == enable, mode[1] == enable

    def _read_mig_instances(self, index: int) -> list[MigInstance]:
        """Every compute instance is a MIG device; its GPU instance gives profile and placement."""
        h, nvml = self._handle(index), self._nvml
        profiles = self._profiles_by_id(index)
        instances: list[MigInstance] = []
        with self._errors(f"gpu {index}: read MIG instances"):
            for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(h)):
                mig = self._mig_device(h, slot)
                if mig is None:
                    continue
                gi_id = nvml.nvmlDeviceGetGpuInstanceId(mig)
                info = nvml.nvmlGpuInstanceGetInfo(nvml.nvmlDeviceGetGpuInstanceById(h, gi_id))
                profile = profiles.get(int(info.profileId))
                instances.append(MigInstance(
                    gpu_instance_id=int(gi_id),
                    compute_instance_id=int(nvml.nvmlDeviceGetComputeInstanceId(mig)),
                    profile=profile.name if profile else f"profile-{info.profileId}",
                    placement_start=int(info.placement.start),
                    placement_size=int(info.placement.size),
                    uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                    memory_mib=int(nvml.nvmlDeviceGetMemoryInfo(mig).total // MIB)))
        return sorted(instances, key=lambda i: (i.placement_start, i.compute_instance_id))

    def _mig_device(self, handle: Any, slot: int) -> Any:
        nvml = self._nvml
        try:
            return nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError as e:
            if e.value in (nvml.NVML_ERROR_NOT_FOUND, nvml.NVML_ERROR_INVALID_ARGUMENT):
                return None  # empty slot
            raise

    # ---- actuators ----

    def set_power_limit_w(self, index: int, power_limit_w: float) -> None:
        c = self.power_constraints(index)
        if not c.min_w <= power_limit_w <= c.max_w:
            raise out_of_range("power_limit_w", power_limit_w, c.min_w, c.max_w, "W")
        with self._errors(f"gpu {index}: set power limit to {power_limit_w:g} W"):
            self._nvml.nvmlDeviceSetPowerManagementLimit(self._handle(index),
                                                         round(power_limit_w * 1000))

    def lock_gpu_clocks_mhz(self, index: int, min_mhz: int, max_mhz: int) -> None:
        clocks = self.supported_clocks(index)
        lo, hi = clocks.sm_min_mhz, clocks.sm_max_mhz
        for name, value in (("min_mhz", min_mhz), ("max_mhz", max_mhz)):
            if not lo <= value <= hi:
                raise out_of_range(name, value, lo, hi, "MHz")
        if min_mhz > max_mhz:
            raise InvalidArgument(f"min_mhz={min_mhz} must be <= max_mhz={max_mhz}",
                                  field="min_mhz")
        with self._errors(f"gpu {index}: lock clocks to [{min_mhz}, {max_mhz}] MHz"):
            self._nvml.nvmlDeviceSetGpuLockedClocks(self._handle(index), min_mhz, max_mhz)

    def reset_gpu_clocks(self, index: int) -> None:
        with self._errors(f"gpu {index}: reset locked clocks"):
            self._nvml.nvmlDeviceResetGpuLockedClocks(self._handle(index))

    def set_mig_mode(self, index: int, enabled: bool) -> None:
        """Request MIG mode; where the driver needs a GPU reset, mig_state shows it as pending."""
        h, nvml = self._handle(index), self._nvml
        mode = self._mig_mode(index)
        if mode is None:
            raise NotSupported(f"gpu {index}: this GPU does not support MIG", field="index")
        if mode == (enabled, enabled):
            return  # already there: nothing to change, so nothing to refuse
        self._refuse_if_busy(index, "change MIG mode")
        mode = nvml.NVML_DEVICE_MIG_ENABLE if enabled else nvml.NVML_DEVICE_MIG_DISABLE
        with self._errors(f"gpu {index}: set MIG mode {'on' if enabled else 'off'}"):
            nvml.nvmlDeviceSetMigMode(h, mode)
        with self._lock:
            self._mig_profiles.pop(index, None)

    def apply_mig_layout(self, index: int, profiles: list[str]) -> list[MigInstance]:
        mode = self._mig_mode(index)
        if mode is None:
            raise NotSupported(f"gpu {index}: this GPU does not support MIG", field="index")
        placements = place_mig_layout(self.mig_profiles(index), profiles)
        if not mode[0]:
            raise FailedPrecondition(f"gpu {index}: MIG mode is disabled; enable it first",
                                     field="index")
        self._refuse_if_busy(index, "change the MIG layout")
        self._destroy_mig_instances(index)
        ids = {p.name: pid for pid, p in self._profiles_by_id(index).items()}
        for n, pl in enumerate(placements):
            try:
                self._create_mig_instance(index, ids[pl.profile.name], pl.start,
                                          pl.profile.placement_size, pl.profile.slices)
            except DomainError as e:
                raise type(e)(f"{e} (created {n} of {len(placements)} instances; the GPU is "
                              "left with those, apply a layout again)", field=e.field) from e
        return self._read_mig_instances(index)

    def _refuse_if_busy(self, index: int, action: str) -> None:
        h, nvml = self._handle(index), self._nvml
        with self._errors(f"gpu {index}: list processes"):
            pids = [int(p.pid) for p in nvml.nvmlDeviceGetComputeRunningProcesses(h)]
        if pids:
            raise InUse(f"gpu {index}: cannot {action} while processes {pids} run on it",
                        field="index")

    def _destroy_mig_instances(self, index: int) -> None:
        h, nvml = self._handle(index), self._nvml
        with self._errors(f"gpu {index}: destroy MIG instances"):
            for inst in self._read_mig_instances(index):
                gi = nvml.nvmlDeviceGetGpuInstanceById(h, inst.gpu_instance_id)
                nvml.nvmlComputeInstanceDestroy(
                    nvml.nvmlGpuInstanceGetComputeInstanceById(gi, inst.compute_instance_id))
            # GPU instances without compute instances are not MIG devices: list them per profile.
            for profile_id, profile in self._profiles_by_id(index).items():
                handles = (nvml.c_nvmlGpuInstance_t * max(profile.max_count, 1))()
                count = ctypes.c_uint(0)
                nvml.nvmlDeviceGetGpuInstances(h, profile_id, handles, ctypes.pointer(count))
                for gi in handles[:count.value]:
                    nvml.nvmlGpuInstanceDestroy(gi)

    def _create_mig_instance(self, index: int, profile_id: int, start: int, size: int,
                             slices: int) -> None:
        h, nvml = self._handle(index), self._nvml
        ci_enum_name = _CI_PROFILE_BY_SLICES.get(slices)
        if ci_enum_name is None:
            raise NotSupported(f"gpu {index}: no compute-instance profile for {slices} slices",
                               field="profiles")
        with self._errors(f"gpu {index}: create MIG instance (profile {profile_id} at {start})"):
            placement = nvml.c_nvmlGpuInstancePlacement_t(start, size)
            gi = nvml.nvmlDeviceCreateGpuInstanceWithPlacement(h, profile_id, placement)
            ci_profile = nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                gi, getattr(nvml, ci_enum_name),
                nvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
            nvml.nvmlGpuInstanceCreateComputeInstance(gi, ci_profile.id)

    def close(self) -> None:
        nvml = self._nvml
        with self._errors("shut NVML down"):
            if self._events is not None:
                nvml.nvmlEventSetFree(self._events)
                self._events = None
            nvml.nvmlShutdown()


def throttle_reason_names(mask: int) -> tuple[str, ...]:
    """NVML clocks-event bitmask -> names; bit i is THROTTLE_REASONS[i] (0x1 gpu_idle ...)."""
    return tuple(name for bit, name in enumerate(THROTTLE_REASONS) if mask & (1 << bit))
