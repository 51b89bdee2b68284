"""The MIG half of the fake pynvml (fake_pynvml.FakeNvml mixes it in): mode with its pending
state, GPU and compute instances, placements, MIG device handles and their processes.

As the driver: a mode change waits for a GPU reset where the GPU needs one (A100, or any GPU
while the test says so) and applies at once on H100 when nothing runs; creating a GPU instance
takes the placement by pointer (pynvml forwards it unconverted to a C function taking
nvmlGpuInstancePlacement_t*), so a structure passed by value is refused.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pynvml

from shapeshifter.hw.types import MigProfile

if TYPE_CHECKING:
    from tests.fakes.fake_pynvml import FakeGpu

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


def _pointee(arg: Any, ctype: type) -> Any:
    """The structure a ctypes pointer argument points to; TypeError for anything else (what
    the C function would misread: a structure passed by value)."""
    if type(arg).__name__ == "CArgObject" and isinstance(getattr(arg, "_obj", None), ctype):
        return arg._obj  # ctypes.byref(structure)
    if isinstance(arg, ctypes._Pointer) and isinstance(arg.contents, ctype):
        return arg.contents
    raise TypeError(f"expected a pointer to {ctype.__name__} (ctypes.byref or ctypes.pointer), "
                    f"got {type(arg).__name__}: the C function takes a pointer")


class FakeMigMixin:
    """MIG functions of FakeNvml; relies on its _gpu, _write, model, root and gpus."""

    model: Any
    root: bool
    gpus: list[FakeGpu]
    mig_needs_reset: bool
    mig_supported: bool

    if TYPE_CHECKING:
        def _gpu(self, handle: Any) -> FakeGpu: ...
        def _write(self, handle: Any, call: str) -> FakeGpu: ...

    # ---- helpers ----

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

    def _require_mig(self, gpu: FakeGpu) -> None:
        if gpu.mig_current != pynvml.NVML_DEVICE_MIG_ENABLE:
            raise _err("NVML_ERROR_NOT_SUPPORTED")

    def _mig_processes(self, gpu: FakeGpu, gi_id: int, ci_id: int) -> list[int]:
        return list(gpu.mig_pids.get((gi_id, ci_id), []))

    # ---- mode ----

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        gpu = self._gpu(handle)
        if not self.mig_supported:
            raise _err("NVML_ERROR_NOT_SUPPORTED")
        return [gpu.mig_current, gpu.mig_pending]

    def nvmlDeviceSetMigMode(self, handle: Any, mode: int) -> int:
        """Returns the activation status, as pynvml does: SUCCESS when the mode is active, else
        the reason it is still pending (RESET_REQUIRED)."""
        gpu = self._gpu(handle)
        if not self.mig_supported:
            raise _err("NVML_ERROR_NOT_SUPPORTED")
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

    # ---- GPU instances ----

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
        placement = _pointee(placement, pynvml.c_nvmlGpuInstancePlacement_t)
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
        if gpu.pids or self._mig_processes(gpu, ci.gi_id, ci.ci_id):
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
