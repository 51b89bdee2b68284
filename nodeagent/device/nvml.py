"""The real GPU backend on NVML (nvidia-ml-py, module `pynvml`).

The pynvml module is injected (tests pass tests/fakes/fake_pynvml.py) and imported lazily
otherwise. NVML errors are mapped to domain errors in one table (nvml_errors.py). NVML speaks
milliwatts and millijoules; they are converted here, at the boundary, and nowhere else. MIG lives
in nvml_mig.py, Xid events in xid.py.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
from typing import Any

import structlog

from nodeagent.device.nvml_errors import MIB, nvml_errors, optional_read, text
from nodeagent.device.nvml_mig import NvmlMig
from nodeagent.device.xid import XidWatcher
from shapeshifter.common.errors import (
    DomainError,
    InUse,
    InvalidArgument,
    NotFound,
    Unavailable,
    out_of_range,
)
from shapeshifter.hw.models import gpu_type_for
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


def _handle_key(handle: Any) -> int:
    """Identity of a device handle: the pointer value of a real one, the object for a fake."""
    if isinstance(handle, ctypes._Pointer):
        return ctypes.cast(handle, ctypes.c_void_p).value or 0
    return id(handle)


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
        self._lock = threading.Lock()  # guards the clock and power-constraint caches
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
        self._power: dict[int, PowerConstraints] = {}
        self._mig = NvmlMig(nvml, self._handles, self._identities)
        self._xid = XidWatcher(nvml, self._handles, self._index_of)

    def _errors(self, action: str) -> Any:
        return nvml_errors(self._nvml, action)

    def _handle(self, index: int) -> Any:
        if isinstance(index, bool) or not isinstance(index, int) \
                or not 0 <= index < len(self._handles):
            raise NotFound(f"gpu index {index!r} not found; this node has GPUs "
                           f"0..{len(self._handles) - 1}", field="index")
        return self._handles[index]

    def _index_of(self, handle: Any) -> int | None:
        """The index of an event's device: by handle, then by UUID (never raising: the device
        of an Xid 79 event no longer answers)."""
        key = _handle_key(handle)
        found = next((i for i, h in enumerate(self._handles) if _handle_key(h) == key), None)
        if found is not None:
            return found
        try:
            uuid = text(self._nvml.nvmlDeviceGetUUID(handle))
        except self._nvml.NVMLError:
            return None
        return next((d.index for d in self._identities if d.uuid == uuid), None)

    # ---- discovery and constraints ----

    def _read_identity(self, index: int, handle: Any) -> GpuIdentity:
        nvml = self._nvml
        name = text(nvml.nvmlDeviceGetName(handle))
        total_mib = nvml.nvmlDeviceGetMemoryInfo(handle).total // MIB
        serial = optional_read(nvml, "read serial", lambda: text(nvml.nvmlDeviceGetSerial(handle)))
        return GpuIdentity(index=index, uuid=text(nvml.nvmlDeviceGetUUID(handle)), name=name,
                           serial=serial or "", memory_total_mib=int(total_mib),
                           gpu_type=gpu_type_for(name, int(total_mib)))

    def devices(self) -> list[GpuIdentity]:
        return list(self._identities)

    def power_constraints(self, index: int) -> PowerConstraints:
        """Read once (they are fixed while the driver runs): the actuator asks every sample,
        and a GPU lost later must still answer this."""
        h, nvml = self._handle(index), self._nvml
        with self._lock:
            cached = self._power.get(index)
        if cached is not None:
            return cached
        with self._errors(f"gpu {index}: read power limit constraints"):
            min_mw, max_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(h)
            default_mw = nvml.nvmlDeviceGetPowerManagementDefaultLimit(h)
        constraints = PowerConstraints(min_w=min_mw / 1000.0, max_w=max_mw / 1000.0,
                                       default_w=default_mw / 1000.0)
        with self._lock:
            self._power[index] = constraints
        return constraints

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
        self._handle(index)
        return list(self._mig.profiles_by_id(index).values())

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
        # The limit the GPU really enforces: lower than ours under a BMC or another tool's cap.
        enforced_mw = optional_read(nvml, f"gpu {index}: read enforced power limit",
                                    lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h))
        # Not reported on MIG-enabled GPUs (NOT_SUPPORTED): -1 marks "unknown".
        util = optional_read(nvml, f"gpu {index}: read utilization",
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
            process_pids=tuple(sorted(self.compute_pids(index))),
            enforced_power_limit_w=enforced_mw / 1000.0 if enforced_mw is not None else None,
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
        ecc = optional_read(nvml, f"gpu {index}: read ECC counters",
                            lambda: nvml.nvmlDeviceGetTotalEccErrors(
                                handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                nvml.NVML_VOLATILE_ECC)) or 0
        last_xid, reset_xid = self._xid.state(index)
        return GpuHealth(ecc_uncorrected_volatile=int(ecc), last_xid=last_xid,
                         reset_required_xid=reset_xid, healthy=ecc == 0 and reset_xid == 0)

    def compute_pids(self, index: int) -> frozenset[int]:
        """Processes holding a compute context on GPU `index` or any of its MIG instances (the
        parent's list is aggregate only for privileged callers, so each MIG device is asked)."""
        h, nvml = self._handle(index), self._nvml
        migs = self._mig.device_handles(index)
        with self._errors(f"gpu {index}: list compute processes"):
            try:
                pids = {int(p.pid) for p in nvml.nvmlDeviceGetComputeRunningProcesses(h)}
            except nvml.NVMLError as e:
                if not (migs and e.value == nvml.NVML_ERROR_NO_PERMISSION):
                    raise
                pids = set()  # an unprivileged caller on a MIG GPU: the instances answer
            for mig in migs:
                pids.update(int(p.pid) for p in nvml.nvmlDeviceGetComputeRunningProcesses(mig))
        return frozenset(pids)

    def mig_state(self, index: int) -> MigState:
        self._handle(index)
        return self._mig.state(index)

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
        """Request MIG mode; raises ResetRequired while the change waits for a GPU reset."""
        self._handle(index)
        self._mig.set_mode(index, enabled, lambda: self._refuse_if_busy(index, "change MIG mode"))

    def apply_mig_layout(self, index: int, profiles: list[str]) -> list[MigInstance]:
        self._handle(index)
        return self._mig.apply_layout(
            index, profiles, lambda: self._refuse_if_busy(index, "change the MIG layout"))

    def _refuse_if_busy(self, index: int, action: str) -> None:
        pids = sorted(self.compute_pids(index))
        if pids:
            raise InUse(f"gpu {index}: cannot {action} while processes {pids} run on it",
                        field="index")

    def gpu_was_reset(self, index: int) -> None:
        """GPU `index` was reset (nvidia-smi -r, reboot): forget the sticky reset-required Xid
        and the cached MIG inventory. The actuator re-applies power and clocks after this."""
        self._handle(index)
        self._xid.clear_after_reset(index)
        self._mig.invalidate(index)

    def close(self) -> None:
        with self._errors("shut NVML down"):
            self._xid.close()
            self._nvml.nvmlShutdown()


def throttle_reason_names(mask: int) -> tuple[str, ...]:
    """NVML clocks-event bitmask -> names; bit i is THROTTLE_REASONS[i] (0x1 gpu_idle ...)."""
    return tuple(name for bit, name in enumerate(THROTTLE_REASONS) if mask & (1 << bit))
