"""MIG on NVML: mode (with its pending state), profiles, the instance inventory (cached), and
layout changes that roll back what they created when a later step fails.

MIG capability is NVML's answer, as mig-parted reads it: nvmlDeviceGetMigMode raising
NOT_SUPPORTED means no MIG. A mode change may stay pending until a GPU reset (A100; also any GPU
the driver could not reset because something held it): that is reported as ResetRequired, never
as done. NvmlBackend validates the GPU index before calling in here.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from nodeagent.device.nvml_errors import MIB, nvml_errors, optional_read, text
from shapeshifter.common.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotSupported,
    ResetRequired,
)
from shapeshifter.hw.mig import MigPlacement, place_mig_layout
from shapeshifter.hw.models import mig_profiles_for
from shapeshifter.hw.types import GpuIdentity, MigInstance, MigProfile, MigState

log = structlog.get_logger(__name__)

# Full-GPU-instance compute profile for each GPU-instance slice count.
_CI_PROFILE_BY_SLICES = {1: "NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE",
                         2: "NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE",
                         3: "NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE",
                         4: "NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE",
                         7: "NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE"}


@dataclass(frozen=True)
class _Inventory:
    """MIG instances and their device handles as enumerated for one current mode."""

    enabled: bool
    instances: tuple[MigInstance, ...]
    handles: tuple[Any, ...]  # MIG device handles, for per-instance process lists


class NvmlMig:
    def __init__(self, nvml: Any, handles: list[Any], identities: list[GpuIdentity]) -> None:
        self._nvml = nvml
        self._handles = handles
        self._identities = identities
        self._lock = threading.Lock()  # guards the caches
        self._profiles: dict[int, dict[int, MigProfile]] = {}  # index -> {profile id: profile}
        self._inventory: dict[int, _Inventory] = {}

    def invalidate(self, index: int) -> None:
        """Forget what was read about GPU `index` (after a mode or layout change, or a reset)."""
        with self._lock:
            self._profiles.pop(index, None)
            self._inventory.pop(index, None)

    # ---- reads ----

    def mode(self, index: int) -> tuple[bool, bool] | None:
        """(current, pending) MIG mode, None where the GPU has no MIG."""
        h, nvml = self._handles[index], self._nvml
        mode = optional_read(nvml, f"gpu {index}: read MIG mode",
                             lambda: nvml.nvmlDeviceGetMigMode(h))
        if mode is None:
            return None
        enable = nvml.NVML_DEVICE_MIG_ENABLE
        return mode[0] == enable, mode[1] == enable

    def state(self, index: int) -> MigState:
        mode = self.mode(index)
        if mode is None:
            return MigState(enabled=False, pending_enabled=False)
        return MigState(enabled=mode[0], pending_enabled=mode[1],
                        instances=self._inventory_for(index, mode[0]).instances)

    def device_handles(self, index: int) -> tuple[Any, ...]:
        """The MIG device handles of GPU `index` (none while MIG is off), from the cache."""
        mode = self.mode(index)
        return self._inventory_for(index, mode[0]).handles if mode else ()

    def _inventory_for(self, index: int, enabled: bool) -> _Inventory:
        """Cached: enumerating costs several NVML calls per instance. Re-read when the current
        mode differs from the cached one (a reset activated a pending mode) or after invalidate."""
        with self._lock:
            cached = self._inventory.get(index)
        if cached is not None and cached.enabled == enabled:
            return cached
        inventory = _Inventory(enabled, *self._read_instances(index)) if enabled \
            else _Inventory(False, (), ())
        with self._lock:
            self._inventory[index] = inventory
        return inventory

    def profiles_by_id(self, index: int) -> dict[int, MigProfile]:
        """GPU-instance profiles by NVML profile id. NVML lists them only while MIG is enabled;
        before that NVIDIA's documented table for the board stands in (ids unknown: -1..-n)."""
        with self._lock:
            cached = self._profiles.get(index)
        if cached is not None:
            return cached
        mode = self.mode(index)
        if mode is None:
            return {}
        if not mode[0]:
            ident = self._identities[index]
            known = mig_profiles_for(ident.name, ident.memory_total_mib)
            return {-1 - i: p for i, p in enumerate(known)}
        profiles = self._read_profiles(index)
        with self._lock:
            self._profiles[index] = profiles
        return profiles

    def _read_profiles(self, index: int) -> dict[int, MigProfile]:
        h, nvml = self._handles[index], self._nvml
        profiles: dict[int, MigProfile] = {}
        for enum_value in range(nvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            info = self._optional_profile(h, enum_value)
            if info is None or info.instanceCount == 0:
                continue
            count = ctypes.c_uint(0)
            with nvml_errors(nvml, f"gpu {index}: read MIG placements"):
                # First call sizes the array (NULL placements), the second fills it.
                nvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, info.id, None,
                                                                 ctypes.pointer(count))
                placements = (nvml.c_nvmlGpuInstancePlacement_t * count.value)()
                nvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, info.id, placements,
                                                                 ctypes.pointer(count))
            valid = placements[:count.value]
            profiles[int(info.id)] = MigProfile(
                name=text(info.name).removeprefix("MIG "), slices=int(info.sliceCount),
                memory_mib=int(info.memorySizeMB), max_count=int(info.instanceCount),
                placement_starts=tuple(int(p.start) for p in valid),
                placement_size=int(valid[0].size) if valid else 0)
        return profiles

    def _optional_profile(self, handle: Any, enum_value: int) -> Any:
        """Profile info; None where the GPU lacks it (NOT_SUPPORTED / INVALID_ARGUMENT)."""
        try:
            with nvml_errors(self._nvml, "read MIG profile"):
                return self._nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, enum_value)
        except (NotSupported, InvalidArgument):
            return None

    def _read_instances(self, index: int) -> tuple[tuple[MigInstance, ...], tuple[Any, ...]]:
        """Every compute instance is a MIG device; its GPU instance gives profile and placement."""
        h, nvml = self._handles[index], self._nvml
        profiles = self.profiles_by_id(index)
        found: list[tuple[MigInstance, Any]] = []
        with nvml_errors(nvml, f"gpu {index}: read MIG instances"):
            for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(h)):
                mig = self._mig_device(h, slot)
                if mig is None:
                    continue
                gi_id = nvml.nvmlDeviceGetGpuInstanceId(mig)
                info = nvml.nvmlGpuInstanceGetInfo(nvml.nvmlDeviceGetGpuInstanceById(h, gi_id))
                profile = profiles.get(int(info.profileId))
                found.append((MigInstance(
                    gpu_instance_id=int(gi_id),
                    compute_instance_id=int(nvml.nvmlDeviceGetComputeInstanceId(mig)),
                    profile=profile.name if profile else f"profile-{info.profileId}",
                    placement_start=int(info.placement.start),
                    placement_size=int(info.placement.size),
                    uuid=text(nvml.nvmlDeviceGetUUID(mig)),
                    memory_mib=int(nvml.nvmlDeviceGetMemoryInfo(mig).total // MIB)), mig))
        found.sort(key=lambda f: (f[0].placement_start, f[0].compute_instance_id))
        return tuple(f[0] for f in found), tuple(f[1] for f in found)

    def _mig_device(self, handle: Any, slot: int) -> Any:
        nvml = self._nvml
        try:
            return nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError as e:
            if e.value in (nvml.NVML_ERROR_NOT_FOUND, nvml.NVML_ERROR_INVALID_ARGUMENT):
                return None  # empty slot
            raise

    # ---- changes ----

    def set_mode(self, index: int, enabled: bool, refuse_if_busy: Callable[[], None]) -> None:
        """Request MIG mode. Where the driver could not activate it (a reset is needed), the
        request stays pending and ResetRequired says so; asking again once the GPU is idle
        retries the activation."""
        h, nvml = self._handles[index], self._nvml
        mode = self.mode(index)
        if mode is None:
            raise NotSupported(f"gpu {index}: this GPU does not support MIG", field="index")
        if mode == (enabled, enabled):
            return  # already there: nothing to change, so nothing to refuse
        refuse_if_busy()
        word = "on" if enabled else "off"
        value = nvml.NVML_DEVICE_MIG_ENABLE if enabled else nvml.NVML_DEVICE_MIG_DISABLE
        try:
            with nvml_errors(nvml, f"gpu {index}: set MIG mode {word}"):
                status = nvml.nvmlDeviceSetMigMode(h, value)  # the activation status
        finally:
            self.invalidate(index)
        now = self.mode(index)
        if now is None or now[0] != enabled:
            raise ResetRequired(
                f"gpu {index}: MIG mode {word} is pending (activation status: NVML "
                f"{status}); it takes effect after a GPU reset with no processes on the GPU "
                f"(nvidia-smi -r -i {index}) or a reboot", field="index")

    def apply_layout(self, index: int, names: list[str],
                     refuse_if_busy: Callable[[], None]) -> list[MigInstance]:
        mode = self.mode(index)
        if mode is None:
            raise NotSupported(f"gpu {index}: this GPU does not support MIG", field="index")
        placements = place_mig_layout(list(self.profiles_by_id(index).values()), names)
        if not mode[0]:
            if mode[1]:
                raise ResetRequired(f"gpu {index}: MIG mode on is pending a GPU reset "
                                    f"(nvidia-smi -r -i {index}) or a reboot", field="index")
            raise FailedPrecondition(f"gpu {index}: MIG mode is disabled; enable it first",
                                     field="index")
        refuse_if_busy()
        try:
            self._destroy_all(index)
            self._create_all(index, placements)
        finally:
            self.invalidate(index)
        return list(self.state(index).instances)

    def _create_all(self, index: int, placements: list[MigPlacement]) -> None:
        """Create every placement; when one fails, destroy what this call created."""
        ids = {p.name: pid for pid, p in self.profiles_by_id(index).items()}
        created: list[tuple[Any, Any]] = []
        for n, pl in enumerate(placements):
            try:
                created.append(self._create(index, ids[pl.profile.name], pl))
            except DomainError as e:
                undo = self._rollback(index, created)
                raise type(e)(
                    f"{e} (instance {n + 1} of {len(placements)} failed; {undo}; the previous "
                    "layout was removed first, so the GPU has no MIG instances now: apply a "
                    "layout again)", field=e.field) from e

    def _create(self, index: int, profile_id: int, pl: MigPlacement) -> tuple[Any, Any]:
        """One GPU instance and its full-size compute instance; the GPU instance is destroyed
        again when the compute instance cannot be made."""
        h, nvml = self._handles[index], self._nvml
        ci_enum_name = _CI_PROFILE_BY_SLICES.get(pl.profile.slices)
        if ci_enum_name is None:
            raise NotSupported(f"gpu {index}: no compute-instance profile for "
                               f"{pl.profile.slices} slices", field="profiles")
        with nvml_errors(nvml, f"gpu {index}: create MIG instance {pl.profile.name} "
                               f"(profile {profile_id} at {pl.start})"):
            placement = nvml.c_nvmlGpuInstancePlacement_t(pl.start, pl.profile.placement_size)
            # The C function takes a pointer; pynvml forwards the argument unconverted.
            gi = nvml.nvmlDeviceCreateGpuInstanceWithPlacement(h, profile_id,
                                                               ctypes.byref(placement))
            try:
                ci_profile = nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                    gi, getattr(nvml, ci_enum_name),
                    nvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
                ci = nvml.nvmlGpuInstanceCreateComputeInstance(gi, ci_profile.id)
            except nvml.NVMLError:
                nvml.nvmlGpuInstanceDestroy(gi)
                raise
        return gi, ci

    def _rollback(self, index: int, created: list[tuple[Any, Any]]) -> str:
        """Destroy what this call created (compute, then GPU instance); says how it went."""
        nvml, failed = self._nvml, []
        for gi, ci in reversed(created):
            try:
                nvml.nvmlComputeInstanceDestroy(ci)
                nvml.nvmlGpuInstanceDestroy(gi)
            except nvml.NVMLError as e:
                failed.append(str(e))
        if failed:
            log.error("mig_rollback_failed", gpu=index, errors=failed)
            return f"rolling back the {len(created)} created failed ({'; '.join(failed)})"
        return f"the {len(created)} created by this call were destroyed"

    def _destroy_all(self, index: int) -> None:
        h, nvml = self._handles[index], self._nvml
        with nvml_errors(nvml, f"gpu {index}: destroy MIG instances"):
            for inst in self._read_instances(index)[0]:
                gi = nvml.nvmlDeviceGetGpuInstanceById(h, inst.gpu_instance_id)
                nvml.nvmlComputeInstanceDestroy(
                    nvml.nvmlGpuInstanceGetComputeInstanceById(gi, inst.compute_instance_id))
            # GPU instances without compute instances are not MIG devices: list them per profile.
            for profile_id, profile in self.profiles_by_id(index).items():
                handles = (nvml.c_nvmlGpuInstance_t * max(profile.max_count, 1))()
                count = ctypes.c_uint(0)
                nvml.nvmlDeviceGetGpuInstances(h, profile_id, handles, ctypes.pointer(count))
                for gi in handles[:count.value]:
                    nvml.nvmlGpuInstanceDestroy(gi)
