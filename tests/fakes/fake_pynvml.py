"""A stateful fake of the pynvml module: an 8-GPU A100/H100 box that enforces the driver's rules.

Functions have pynvml's names and signatures; constants, ctypes structures and the NVMLError
class hierarchy are the REAL ones from pynvml (delegated through __getattr__), so error mapping is
tested against the real hierarchy. Inject an instance: `NvmlBackend(nvml=FakeNvml(...))`.

Rules enforced as the driver does: power limits in mW within the constraints, locked clocks within
the supported table, NO_PERMISSION for writes when not root, GPU_IS_LOST once a GPU is lost, MIG
mode changes and instance changes refused while processes run (IN_USE), instances only with MIG
on, placements only at valid starts and without overlap (INSUFFICIENT_RESOURCES).
"""

from __future__ import annotations

import ctypes
import inspect
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

from shapeshifter.hw.models import GPU_MODELS, GpuModel
from shapeshifter.hw.types import MigProfile

MIB = 1024 * 1024
# GPU-instance profile enum -> (index into the model's MIG profiles, NVML profile id), as on
# A100/H100: 1_SLICE=1g.10gb(id 19), 1_SLICE_REV2=1g.20gb(15), 2_SLICE(14), 3_SLICE(9),
# 4_SLICE(5), 7_SLICE(0). The +me variants are left out.
_GI_PROFILES = {pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE: (0, 19),
                pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2: (1, 15),
                pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE: (2, 14),
                pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE: (3, 9),
                pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE: (4, 5),
                pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE: (5, 0)}
_CI_SLICES = {pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE: 1,
              pynvml.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE: 2,
              pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE: 3,
              pynvml.NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE: 4,
              pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE: 7}


def _err(name: str) -> pynvml.NVMLError:
    return pynvml.NVMLError(getattr(pynvml, name))


@dataclass
class FakeGi:
    gi_id: int
    profile_id: int
    start: int
    size: int
    slices: int
    memory_mib: int
    ci_ids: list[int] = field(default_factory=list)


@dataclass
class FakeGpu:
    index: int
    model: GpuModel
    power_limit_mw: int
    demand_mw: int  # what the load would draw; the reading is capped by the limit
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
    pids: list[int] = field(default_factory=list)
    gis: dict[int, FakeGi] = field(default_factory=dict)
    lost: bool = False

    @property
    def uuid(self) -> str:
        return f"GPU-fake0000-0000-0000-0000-{self.index:012d}"


@dataclass(frozen=True)
class FakeMigDevice:
    gpu: FakeGpu
    gi_id: int
    ci_id: int


@dataclass(frozen=True)
class FakeCi:
    gpu: FakeGpu
    gi_id: int
    ci_id: int


class FakeNvml:
    """The pynvml module, faked. Test knobs are the attributes without an nvml prefix."""

    def __init__(self, gpu_type: str = "a100-80gb", n_gpus: int = 8, *, root: bool = True,
                 init_error: int | None = None, mig_needs_reset: bool = False,
                 power_average_supported: bool = True) -> None:
        self.model = GPU_MODELS[gpu_type]
        self.root = root
        self.init_error = init_error
        self.mig_needs_reset = mig_needs_reset
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

    def _profile(self, profile_id: int) -> MigProfile:
        for slot, pid in _GI_PROFILES.values():
            if pid == profile_id:
                return self.model.mig_profiles[slot]
        raise _err("NVML_ERROR_INVALID_ARGUMENT")

    def _gi_handle(self, gpu: FakeGpu, gi_id: int) -> Any:
        # Opaque handles that fit pynvml's ctypes arrays: the pointer value encodes GPU and id.
        return ctypes.cast(ctypes.c_void_p(0x10000 + gpu.index * 256 + gi_id),
                           pynvml.c_nvmlGpuInstance_t)

    def _gi(self, handle: Any) -> tuple[FakeGpu, FakeGi]:
        key = ctypes.cast(handle, ctypes.c_void_p).value or 0
        gpu = self._gpu(self.gpus[(key - 0x10000) // 256])
        gi = gpu.gis.get((key - 0x10000) % 256)
        if gi is None:
            raise _err("NVML_ERROR_INVALID_ARGUMENT")
        return gpu, gi

    def _mig_devices(self, gpu: FakeGpu) -> list[FakeMigDevice]:
        return [FakeMigDevice(gpu, gi.gi_id, ci) for gi in sorted(gpu.gis.values(),
                                                                   key=lambda g: g.gi_id)
                for ci in gi.ci_ids]

    # ---- init, discovery ----

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
        return self._gpu(handle).model.driver_name

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
        return min(gpu.demand_mw, gpu.power_limit_mw)

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
        return [SimpleNamespace(pid=p, usedGpuMemory=None) for p in self._gpu(handle).pids]

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

    # ---- MIG ----

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        gpu = self._gpu(handle)
        return [gpu.mig_current, gpu.mig_pending]

    def nvmlDeviceSetMigMode(self, handle: Any, mode: int) -> int:
        gpu = self._gpu(handle)
        if mode not in (pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_DISABLE):
            raise _err("NVML_ERROR_INVALID_ARGUMENT")
        if gpu.pids or gpu.gis:
            raise _err("NVML_ERROR_IN_USE")
        self._write(handle, "nvmlDeviceSetMigMode")
        gpu.mig_pending = mode
        if self.mig_needs_reset:
            return pynvml.NVML_ERROR_RESET_REQUIRED
        gpu.mig_current = mode
        return pynvml.NVML_SUCCESS

    def _require_mig(self, gpu: FakeGpu) -> None:
        if gpu.mig_current != pynvml.NVML_DEVICE_MIG_ENABLE:
            raise _err("NVML_ERROR_NOT_SUPPORTED")

    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle: Any, profile: int,
                                            version: int = 2) -> Any:
        gpu = self._gpu(handle)
        self._require_mig(gpu)
        if profile not in _GI_PROFILES:
            raise _err("NVML_ERROR_NOT_SUPPORTED")
        slot, profile_id = _GI_PROFILES[profile]
        p = gpu.model.mig_profiles[slot]
        info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
        info.id, info.sliceCount, info.instanceCount = profile_id, p.slices, p.max_count
        info.memorySizeMB, info.name = p.memory_mib, f"MIG {p.name}".encode()
        return info

    def nvmlDeviceGetGpuInstancePossiblePlacements(self, handle: Any, profile_id: int,
                                                   placements: Any, count_ref: Any) -> int:
        self._require_mig(self._gpu(handle))
        p = self._profile(profile_id)
        if placements is not None:
            if len(placements) < len(p.placement_starts):
                raise _err("NVML_ERROR_INSUFFICIENT_SIZE")
            for i, start in enumerate(p.placement_starts):
                placements[i].start, placements[i].size = start, p.placement_size
        count_ref.contents.value = len(p.placement_starts)
        return pynvml.NVML_SUCCESS

    def nvmlDeviceCreateGpuInstanceWithPlacement(self, handle: Any, profile_id: int,
                                                 placement: Any) -> Any:
        gpu = self._gpu(handle)
        self._require_mig(gpu)
        p = self._profile(profile_id)
        if placement.start not in p.placement_starts or placement.size != p.placement_size:
            raise _err("NVML_ERROR_INVALID_ARGUMENT")
        taken = {s for gi in gpu.gis.values() for s in range(gi.start, gi.start + gi.size)}
        same = sum(1 for gi in gpu.gis.values() if gi.profile_id == profile_id)
        if taken & set(range(placement.start, placement.start + p.placement_size)) \
                or same >= p.max_count:
            raise _err("NVML_ERROR_INSUFFICIENT_RESOURCES")
        self._write(handle, "nvmlDeviceCreateGpuInstanceWithPlacement")
        gi_id = min(set(range(1, 15)) - set(gpu.gis))
        gpu.gis[gi_id] = FakeGi(gi_id, profile_id, placement.start, p.placement_size, p.slices,
                                p.memory_mib)
        return self._gi_handle(gpu, gi_id)

    def nvmlDeviceGetGpuInstances(self, handle: Any, profile_id: int, handles: Any,
                                  count_ref: Any) -> int:
        gpu = self._gpu(handle)
        self._require_mig(gpu)
        self._profile(profile_id)
        matching = [gi for gi in gpu.gis.values() if gi.profile_id == profile_id]
        if len(matching) > len(handles):
            raise _err("NVML_ERROR_INSUFFICIENT_SIZE")
        for i, gi in enumerate(matching):
            handles[i] = self._gi_handle(gpu, gi.gi_id)
        count_ref.contents.value = len(matching)
        return pynvml.NVML_SUCCESS

    def nvmlDeviceGetGpuInstanceById(self, handle: Any, gi_id: int) -> Any:
        gpu = self._gpu(handle)
        self._require_mig(gpu)
        if gi_id not in gpu.gis:
            raise _err("NVML_ERROR_NOT_FOUND")
        return self._gi_handle(gpu, gi_id)

    def nvmlGpuInstanceGetInfo(self, gi_handle: Any) -> Any:
        _, gi = self._gi(gi_handle)
        info = pynvml.c_nvmlGpuInstanceInfo_t()
        info.id, info.profileId = gi.gi_id, gi.profile_id
        info.placement.start, info.placement.size = gi.start, gi.size
        return info

    def nvmlGpuInstanceDestroy(self, gi_handle: Any) -> int:
        gpu, gi = self._gi(gi_handle)
        if gi.ci_ids:
            raise _err("NVML_ERROR_IN_USE")
        self._write(gpu, "nvmlGpuInstanceDestroy")
        del gpu.gis[gi.gi_id]
        return pynvml.NVML_SUCCESS

    def nvmlGpuInstanceGetComputeInstanceProfileInfo(self, gi_handle: Any, profile: int,
                                                     eng_profile: int, version: int = 2) -> Any:
        _, gi = self._gi(gi_handle)
        slices = _CI_SLICES.get(profile)
        if slices is None or slices > gi.slices \
                or eng_profile != pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED:
            raise _err("NVML_ERROR_NOT_SUPPORTED")
        info = pynvml.c_nvmlComputeInstanceProfileInfo_v2_t()
        info.id, info.sliceCount, info.instanceCount = profile, slices, gi.slices // slices
        return info

    def nvmlGpuInstanceCreateComputeInstance(self, gi_handle: Any, profile_id: int) -> FakeCi:
        gpu, gi = self._gi(gi_handle)
        if _CI_SLICES.get(profile_id) != gi.slices:
            raise _err("NVML_ERROR_NOT_SUPPORTED")  # the fake models full-size CIs only
        if gi.ci_ids:
            raise _err("NVML_ERROR_INSUFFICIENT_RESOURCES")
        self._write(gpu, "nvmlGpuInstanceCreateComputeInstance")
        gi.ci_ids.append(0)
        return FakeCi(gpu, gi.gi_id, 0)

    def nvmlGpuInstanceGetComputeInstanceById(self, gi_handle: Any, ci_id: int) -> FakeCi:
        gpu, gi = self._gi(gi_handle)
        if ci_id not in gi.ci_ids:
            raise _err("NVML_ERROR_NOT_FOUND")
        return FakeCi(gpu, gi.gi_id, ci_id)

    def nvmlComputeInstanceDestroy(self, ci: FakeCi) -> int:
        gpu = self._gpu(ci)
        if gpu.pids:
            raise _err("NVML_ERROR_IN_USE")
        self._write(gpu, "nvmlComputeInstanceDestroy")
        gpu.gis[ci.gi_id].ci_ids.remove(ci.ci_id)
        return pynvml.NVML_SUCCESS

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        gpu = self._gpu(handle)
        return 7 if gpu.mig_current == pynvml.NVML_DEVICE_MIG_ENABLE else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> FakeMigDevice:
        devices = self._mig_devices(self._gpu(handle))
        if not 0 <= index < len(devices):
            raise _err("NVML_ERROR_NOT_FOUND")
        return devices[index]

    def nvmlDeviceGetGpuInstanceId(self, mig: FakeMigDevice) -> int:
        self._gpu(mig)
        return mig.gi_id

    def nvmlDeviceGetComputeInstanceId(self, mig: FakeMigDevice) -> int:
        self._gpu(mig)
        return mig.ci_id
