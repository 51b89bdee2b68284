"""SM clock locks: validated against the device's supported clocks, journaled after each write."""

from __future__ import annotations

from typing import Any

from nodeagent.actuation.gpus import ManagedGpus
from nodeagent.actuation.journal import Journal
from nodeagent.device.backend import GpuBackend
from shapeshifter.common.errors import InvalidArgument, out_of_range


class ClockControl:
    def __init__(self, backend: GpuBackend, journal: Journal, gpus: ManagedGpus, log: Any) -> None:
        self._backend = backend
        self._journal = journal
        self._gpus = gpus
        self._log = log

    def lock_clocks(self, index: int, min_mhz: int, max_mhz: int) -> bool:
        self._gpus.check(index)
        clocks = self._backend.supported_clocks(index)
        low, high = clocks.sm_min_mhz, clocks.sm_max_mhz
        for name, value in (("min_mhz", min_mhz), ("max_mhz", max_mhz)):
            if not low <= value <= high:
                raise out_of_range(name, value, low, high, "MHz")
        if min_mhz > max_mhz:
            raise InvalidArgument(
                f"min_mhz={min_mhz} MHz must not exceed max_mhz={max_mhz} MHz", field="min_mhz"
            )
        with self._gpus.locked(index):
            if self._journal.requested(index).clock_lock_mhz == (min_mhz, max_mhz):
                return False
            return self.relock(index, (min_mhz, max_mhz))

    def relock(self, index: int, lock_mhz: tuple[int, int] | None) -> bool:
        """Lock the device to lock_mhz (already validated) and journal it."""
        assert lock_mhz is not None
        self._gpus.write(index, "lock_clocks", self._backend.lock_gpu_clocks_mhz, *lock_mhz)
        self._journal.update_requested(index, clock_lock_mhz=lock_mhz)
        self._log.info("clocks locked", gpu=index, min_mhz=lock_mhz[0], max_mhz=lock_mhz[1])
        return True

    def reset_clocks(self, index: int) -> bool:
        """Always resets the device (it may have been locked by someone else); changed only when
        the agent had a lock."""
        self._gpus.check(index)
        with self._gpus.locked(index):
            had_lock = self._journal.requested(index).clock_lock_mhz is not None
            self.reset_held(index)
        self._log.info("clocks reset", gpu=index)
        return had_lock

    def reset_held(self, index: int) -> None:
        """Reset the device's clocks and forget the lock. Caller holds the GPU lock."""
        self._gpus.write(index, "reset_clocks", self._backend.reset_gpu_clocks)
        self._journal.update_requested(index, clock_lock_mhz=None)

    def clock_lock_mhz(self, index: int) -> tuple[int, int] | None:
        return self._journal.requested(index).clock_lock_mhz
