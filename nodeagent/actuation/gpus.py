"""The GPUs the actuator manages: one lock and the safety ceilings per GPU, the index check, and
the one place a device write is logged when the device refuses it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nodeagent.device.backend import GpuBackend
from shapeshifter.common.errors import DomainError, NotFound


@dataclass
class GpuSlot:
    """What the actuator holds per GPU: writes are serialized on ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ceilings_w: dict[str, float] = field(default_factory=dict)  # source -> ceiling


class ManagedGpus:
    def __init__(self, backend: GpuBackend, log: Any) -> None:
        self._log = log
        self.uuids = {d.index: d.uuid for d in backend.devices()}
        self._slots = {index: GpuSlot() for index in self.uuids}

    @property
    def indices(self) -> list[int]:
        return sorted(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def slot(self, index: int) -> GpuSlot:
        return self._slots[index]

    def check(self, index: int) -> None:
        if index not in self._slots:
            raise NotFound(
                f"gpu_index={index} not found; valid range [0, {len(self._slots) - 1}]",
                field="gpu_index",
            )

    @contextlib.contextmanager
    def locked(self, index: int) -> Iterator[GpuSlot]:
        slot = self._slots[index]
        with slot.lock:
            yield slot

    def write(self, index: int, action: str, write: Callable[..., object], *args: Any) -> None:
        """One actuator write to the device; a refusal is logged here and raised to the caller."""
        try:
            write(index, *args)
        except DomainError as err:
            self._log.error("device write failed", gpu=index, action=action, error=str(err))
            raise
