"""A stateful fake of the pynvml module: an 8-GPU A100/H100 box that enforces the driver's rules.

Functions have pynvml's names and signatures; constants, ctypes structures and the NVMLError
class hierarchy are the REAL ones from pynvml (delegated through __getattr__), so error mapping is
tested against the real hierarchy. Inject an instance: `NvmlBackend(nvml=FakeNvml(...))`.

Rules enforced as the driver does: power limits in mW within the constraints, locked clocks within
the supported table, NO_PERMISSION for writes when not root, GPU_IS_LOST once a GPU is lost, MIG
mode changes and instance changes refused while processes run (IN_USE), instances only with MIG
on, placements only at valid starts and without overlap (INSUFFICIENT_RESOURCES), placements by
pointer only, MIG mode pending until a reset on A100, an external (BMC) power cap enforced below
the set limit, processes per MIG device. The MIG half is in fake_pynvml_mig.py.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

from shapeshifter.hw.models import GPU_MODELS, GpuModel
from tests.fakes.fake_pynvml_mig import FakeCi, FakeGi, FakeMigDevice, FakeMigMixin, _err

MIB = 1024 * 1024


@dataclass
class FakeGpu:
    index: int
    model: GpuModel
    power_limit_mw: int
    demand_mw: int  # what the load would draw; the reading is capped by the enforced limit
    temperature_c: int = 40
    memory_temperature_c: int = 45
    energy_mj: int = 1_000_000
    memory_used_mib: int = 0
    utilization_pct: tuple[int, int] = (0, 0)
    throttle_mask: int = 0
    ecc_uncorrected: int = 0
    locked_mhz: tuple[int, int] | None = None
    mig_current: int = pynvml.NVML_DEVICE_MIG_DISABLE
    mig_pending: int = pynvml.NVML_DEVICE_MIG_DISABLE
    pids: list[int] = field(default_factory=list)  # contexts on the whole GPU
    mig_pids: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (gi, ci) -> pids
    gis: dict[int, FakeGi] = field(default_factory=dict)
    lost: bool = False
    external_cap_mw: int | None = None  # a BMC / other tool's cap below ours

    @property
    def uuid(self) -> str:
        return f"GPU-fake0000-0000-0000-0000-{self.index:012d}"

    @property
    def enforced_mw(self) -> int:
        cap = self.external_cap_mw
        return self.power_limit_mw if cap is None else min(self.power_limit_mw, cap)


class FakeNvml(FakeMigMixin):
    """The pynvml module, faked. Test knobs are the attributes without an nvml prefix.

    `mig_needs_reset` None: as the GPU type does (A100 needs a reset to change MIG mode, H100
    applies it at once when idle). `name` overrides the driver name (a PCIe or NVL board);
    `mig_supported` False makes nvmlDeviceGetMigMode answer NOT_SUPPORTED.
    """

    def __init__(self, gpu_type: str = "a100-80gb", n_gpus: int = 8, *, root: bool = True,
                 init_error: int | None = None, mig_needs_reset: bool | None = None,
                 power_average_supported: bool = True, name: str | None = None,
                 mig_supported: bool = True) -> None:
        self.model = GPU_MODELS[gpu_type]
        self.root = root
        self.init_error = init_error
        self.mig_needs_reset = gpu_type.startswith("a100") if mig_needs_reset is None \
            else mig_needs_reset
        self.name = name or self.model.driver_name
        self.mig_supported = mig_supported
        self.power_average_supported = power_average_supported
        self.initialized = False
        self.calls: list[str] = []  # names of the write calls made, in order
        self.events: list[tuple[int, int]] = []  # queued (gpu index, xid)
        self.gpus = [FakeGpu(i, self.model, power_limit_mw=int(self.model.power.default_w * 1000),
                             demand_mw=int(self.model.idle_power_w * 1000))
                     for i in range(n_gpus)]

    def __getattr__(self, name: str) -> Any:
        """Constants, structures and error classes come from the real module; functions do not."""
        value = getattr(pynvml, name)
        if inspect.isfunction(value):
            raise AttributeError(f"FakeNvml does not implement {name}")
        return value

    # ---- test knobs ----

    def lose_gpu(self, index: int) -> None:
        self.gpus[index].lost = True

    def inject_xid(self, index: int, xid: int) -> None:
        self.events.append((index, xid))

    def reset_gpu(self, index: int) -> None:
        """nvidia-smi -r: refused while processes run; activates a pending MIG mode and, as a
        reset does, drops MIG instances, locked clocks and the power limit (back to default)."""
        gpu = self.gpus[index]
        if gpu.pids or any(gpu.mig_pids.values()):
            raise _err("NVML_ERROR_IN_USE")
        gpu.lost = False
        gpu.mig_current = gpu.mig_pending
        gpu.gis.clear()
        gpu.mig_pids.clear()
        gpu.locked_mhz = None
        gpu.power_limit_mw = int(gpu.model.power.default_w * 1000)

    # ---- helpers ----

    def _gpu(self, handle: Any) -> FakeGpu:
        if not self.initialized:
            raise _err("NVML_ERROR_UNINITIALIZED")
        gpu = handle.gpu if isinstance(handle, FakeMigDevice | FakeCi) else handle
        if not isinstance(gpu, FakeGpu):
            raise _err("NVML_ERROR_INVALID_ARGUMENT")
        if gpu.lost:
            raise _err("NVML_ERROR_GPU_IS_LOST")
        return gpu

    def _write(self, handle: Any, call: str) -> FakeGpu:
        gpu = self._gpu(handle)
        if not self.root:
            raise _err("NVML_ERROR_NO_PERMISSION")
        self.calls.append(call)
        return gpu

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        if not self.initialized:
            raise _err("NVML_ERROR_UNINITIALIZED")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if not 0 <= index < len(self.gpus):
            raise _err("NVML_ERROR_INVALID_ARGUMENT")
        return self._gpu(self.gpus[index])

    def nvmlDeviceGetName(self, handle: Any) -> str:
        self._gpu(handle)
        return self.name

    def nvmlDeviceGetSerial(self, handle: Any) -> str:
        return f"{1650000000000 + self._gpu(handle).index}"

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        gpu = self._gpu(handle)
        if isinstance(handle, FakeMigDevice):
            return f"MIG-fake{gpu.index:04d}-{handle.gi_id:04d}-{handle.ci_id:04d}"
        return gpu.uuid

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> SimpleNamespace:
        gpu = self._gpu(handle)
        if isinstance(handle, FakeMigDevice):
            total = gpu.gis[handle.gi_id].memory_mib * MIB
            return SimpleNamespace(total=total, used=0, free=total)
        total, used = gpu.model.memory_total_mib * MIB, gpu.memory_used_mib * MIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    # ---- power ----

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        gpu = self._gpu(handle)
        return min(gpu.demand_mw, gpu.enforced_mw)

    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: list[int]) -> Any:
        gpu = self._gpu(handle)
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        readings = {pynvml.NVML_FI_DEV_MEMORY_TEMP: gpu.memory_temperature_c}
        if self.power_average_supported:
            readings[pynvml.NVML_FI_DEV_POWER_AVERAGE] = self.nvmlDeviceGetPowerUsage(handle) - 500
        for v, fid in zip(values, field_ids, strict=True):
            v.fieldId = fid
            v.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
            if fid in readings:
                v.nvmlReturn = pynvml.NVML_SUCCESS
                v.value.uiVal = readings[fid]
            else:
                v.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        return self._gpu(handle).power_limit_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return self._gpu(handle).enforced_mw

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Any) -> list[int]:
        p = self._gpu(handle).model.power
        return [int(p.min_w * 1000), int(p.max_w * 1000)]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int:
        return int(self._gpu(handle).model.power.default_w * 1000)

    def nvmlDeviceSetPowerManagementLimit(self, handle: Any, limit_mw: int) -> None:
        gpu = self._gpu(handle)
        lo, hi = self.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        if not isinstance(limit_mw, int) or not lo <= limit_mw <= hi:
            raise _err("NVML_ERROR_INVALID_ARGUMENT")
        self._write(handle, "nvmlDeviceSetPowerManagementLimit")
        gpu.power_limit_mw = limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        return self._gpu(handle).energy_mj

    # ---- thermal ----

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _err("NVML_ERROR_INVALID_ARGUMENT")
        return self._gpu(handle).temperature_c

    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: int) -> int:
        t = self._gpu(handle).model.thermal
        if threshold == pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN:
            return int(t.slowdown_c)
        if threshold == pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN:
            return int(t.shutdown_c)
        raise _err("NVML_ERROR_NOT_SUPPORTED")

    # ---- clocks ----

    def nvmlDeviceGetClockInfo(self, handle: Any, clock_type: int) -> int:
        gpu = self._gpu(handle)
        if clock_type == pynvml.NVML_CLOCK_MEM:
            return gpu.model.memory_clock_mhz
        if clock_type in (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_GRAPHICS):
            return gpu.locked_mhz[1] if gpu.locked_mhz else gpu.model.sm_max_clock_mhz
        raise _err("NVML_ERROR_INVALID_ARGUMENT")

    def nvmlDeviceGetSupportedMemoryClocks(self, handle: Any) -> list[int]:
        return [self._gpu(handle).model.memory_clock_mhz]

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle: Any, memory_mhz: int) -> list[int]:
        gpu = self._gpu(handle)
        if memory_mhz != gpu.model.memory_clock_mhz:
            raise _err("NVML_ERROR_NOT_FOUND")
        return list(gpu.model.sm_clocks_mhz)

    def nvmlDeviceSetGpuLockedClocks(self, handle: Any, min_mhz: int, max_mhz: int) -> None:
        gpu = self._gpu(handle)
        m = gpu.model
        if not m.sm_min_clock_mhz <= min_mhz <= max_mhz <= m.sm_max_clock_mhz:
            raise _err("NVML_ERROR_INVALID_ARGUMENT")
        self._write(handle, "nvmlDeviceSetGpuLockedClocks")
        gpu.locked_mhz = (min_mhz, max_mhz)

    def nvmlDeviceResetGpuLockedClocks(self, handle: Any) -> None:
        self._write(handle, "nvmlDeviceResetGpuLockedClocks").locked_mhz = None

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self._gpu(handle).throttle_mask

    # ---- utilization, processes, health ----

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> SimpleNamespace:
        gpu = self._gpu(handle)
        if gpu.mig_current == pynvml.NVML_DEVICE_MIG_ENABLE:
            raise _err("NVML_ERROR_NOT_SUPPORTED")  # as the driver: no utilization in MIG mode
        return SimpleNamespace(gpu=gpu.utilization_pct[0], memory=gpu.utilization_pct[1])

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[SimpleNamespace]:
        """On a MIG device: its processes. On the GPU: its own, plus (aggregate) every MIG
        device's only for a privileged caller, as the driver does."""
        gpu = self._gpu(handle)
        if isinstance(handle, FakeMigDevice):
            pids = self._mig_processes(gpu, handle.gi_id, handle.ci_id)
        else:
            pids = gpu.pids + ([p for ps in gpu.mig_pids.values() for p in ps] if self.root
                               else [])
        return [SimpleNamespace(pid=p, usedGpuMemory=None) for p in pids]

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter: int) -> int:
        gpu = self._gpu(handle)
        if (error_type, counter) != (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                     pynvml.NVML_VOLATILE_ECC):
            raise _err("NVML_ERROR_NOT_SUPPORTED")
        return gpu.ecc_uncorrected

    def nvmlEventSetCreate(self) -> object:
        return object()

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: object) -> None:
        self._gpu(handle)

    def nvmlEventSetWait(self, event_set: object, timeout_ms: int) -> SimpleNamespace:
        if not self.events:
            raise _err("NVML_ERROR_TIMEOUT")
        index, xid = self.events.pop(0)
        return SimpleNamespace(device=self.gpus[index],
                               eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=xid,
                               gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)

    def nvmlEventSetFree(self, event_set: object) -> None:
        return None
