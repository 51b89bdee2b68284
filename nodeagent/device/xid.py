"""Xid errors from NVML's event set: the newest per GPU, and a sticky "reset required" one.

Classification follows NVIDIA's Xid catalog (docs.nvidia.com/deploy/xid-errors, "Xid Errors"):
an Xid whose documented action is a GPU reset or a reboot leaves the GPU unhealthy until it is
reset, whatever benign Xid comes after it. Not unhealthy, although ECC-related:
  63  ECC page retirement / row-remapping recording event: the remap is pending and is applied
      at the next reset; informational, the GPU keeps working.
  92  High single-bit ECC error rate: corrected errors, informational (watch the trend).
  94  Contained ECC error: the driver contained it; the application that touched the memory is
      affected (restart it), not the GPU.
Application faults (13, 31, 43, 45, ...) are recorded as the last Xid and leave the GPU healthy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# Catalog action "reset GPU" / "reboot" / "contact support": the GPU is unusable until reset.
#  48 double-bit ECC error, 64 row-remapper recording failure, 74 NVLink error, 79 GPU has
#  fallen off the bus, 95 uncontained ECC error, 119/120 GSP RPC timeout / GSP error.
RESET_REQUIRED_XIDS = frozenset({48, 64, 74, 79, 95, 119, 120})
INFORMATIONAL_XIDS = frozenset({63, 92, 94})  # documented above: never unhealthy


class XidWatcher:
    """Drains the NVML event set on demand (from the sampling thread) and keeps per-GPU state."""

    def __init__(self, nvml: Any, handles: list[Any],
                 index_of: Callable[[Any], int | None]) -> None:
        self._nvml = nvml
        self._index_of = index_of  # event device handle -> GPU index
        self._lock = threading.Lock()
        self._last = [0] * len(handles)
        self._sticky = [0] * len(handles)  # the reset-required Xid, until the GPU is reset
        self._events = self._register(handles)

    def _register(self, handles: list[Any]) -> Any:
        """An event set for critical Xid errors, or None where the driver cannot provide one."""
        nvml = self._nvml
        try:
            events = nvml.nvmlEventSetCreate()
            for h in handles:
                nvml.nvmlDeviceRegisterEvents(h, nvml.nvmlEventTypeXidCriticalError, events)
        except nvml.NVMLError as e:
            log.warning("xid_events_unavailable", reason=str(e))
            return None
        return events

    @property
    def registered(self) -> bool:
        return self._events is not None

    def state(self, index: int) -> tuple[int, int]:
        """(newest Xid, sticky reset-required Xid) of GPU `index`, after draining pending events."""
        self.drain()
        with self._lock:
            return self._last[index], self._sticky[index]

    def record(self, index: int, xid: int) -> None:
        with self._lock:
            self._last[index] = xid
            if xid in RESET_REQUIRED_XIDS:
                self._sticky[index] = xid  # a later benign Xid must not clear it
        log.error("gpu_xid", gpu=index, xid=xid, reset_required=xid in RESET_REQUIRED_XIDS)

    def clear_after_reset(self, index: int) -> None:
        """The GPU was reset: what only a reset clears is cleared."""
        with self._lock:
            self._sticky[index] = 0

    def drain(self) -> None:
        nvml = self._nvml
        if self._events is None:
            return
        while True:
            try:
                event = nvml.nvmlEventSetWait(self._events, 0)
            except nvml.NVMLError as e:
                if e.value != nvml.NVML_ERROR_TIMEOUT:  # TIMEOUT = no event pending
                    log.warning("xid_event_read_failed", reason=str(e))
                return
            index = self._index_of(event.device)
            if index is not None:
                self.record(index, int(event.eventData))

    def close(self) -> None:
        if self._events is not None:
            self._nvml.nvmlEventSetFree(self._events)
            self._events = None
