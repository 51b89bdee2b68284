"""Power limits in two layers. ``requested`` is what an operator or plan asked for; ``ceilings``
are safety caps keyed by source (lease, failsafe, thermal, emergency). The limit applied to the
device is min(requested, every ceiling), clamped to the device's range."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from nodeagent.actuation.gpus import ManagedGpus
from nodeagent.actuation.journal import Journal
from nodeagent.device.backend import GpuBackend
from shapeshifter.common.errors import DomainError, InvalidArgument, NotFound, out_of_range
from shapeshifter.hw.types import PowerConstraints

POWER_TOLERANCE_W = 0.01  # NVML works in milliwatts


@dataclass(frozen=True)
class PowerState:
    requested_w: float  # the operator/plan request, or the saved default
    ceiling_w: float | None  # the lowest safety ceiling, None when there is none
    ceiling_source: str  # which source set it ("" when none)
    applied_w: float  # what the device is told


def failsafe_ceilings_w(
    power_limit_frac: float, power_limit_w: dict[int, float], max_w: dict[int, float]
) -> dict[int, float]:
    """Fail-safe caps per GPU: the configured watts where given, else a fraction of the max."""
    return {i: power_limit_w.get(i, power_limit_frac * m) for i, m in max_w.items()}


def check_failsafe_w(
    power_limit_w: dict[int, float], constraints: dict[int, PowerConstraints]
) -> None:
    """Configured per-GPU fail-safe watts must name a GPU and lie in its range (at start)."""
    for index, watts in power_limit_w.items():
        field = f"failsafe.power_limit_w[{index}]"
        if index not in constraints:
            raise NotFound(
                f"{field}: gpu_index={index} not found; valid range [0, {len(constraints) - 1}]",
                field=field,
            )
        c = constraints[index]
        if not c.min_w <= watts <= c.max_w:
            raise out_of_range(field, watts, c.min_w, c.max_w, "W")


class PowerControl:
    """Requested limits (journaled after each write) and the safety ceilings over them."""

    def __init__(self, backend: GpuBackend, journal: Journal, gpus: ManagedGpus, log: Any) -> None:
        self._backend = backend
        self._journal = journal
        self._gpus = gpus
        self._log = log

    def set_power_limit(self, index: int, power_limit_w: float) -> bool:
        """Set the requested limit; the applied one may be lower under a safety ceiling."""
        self._gpus.check(index)
        c = self._backend.power_constraints(index)
        if not math.isfinite(power_limit_w) or not c.min_w <= power_limit_w <= c.max_w:
            raise out_of_range("power_limit_w", power_limit_w, c.min_w, c.max_w, "W")
        with self._gpus.locked(index) as gpu:
            target_w = self._target_power_w(index, gpu.ceilings_w, requested_w=power_limit_w)
            changed = self.write(index, target_w)
            self._journal.update_requested(index, power_limit_w=power_limit_w)  # after the write
            return changed

    def set_power_ceilings_w(
        self, ceilings: dict[int, float | None], source: str
    ) -> dict[int, bool]:
        """Set (or with None lift) ``source``'s ceiling per GPU. Returns changed per GPU."""
        for index, ceiling_w in ceilings.items():
            self._gpus.check(index)
            if ceiling_w is not None and not (math.isfinite(ceiling_w) and ceiling_w > 0):
                raise InvalidArgument(
                    f"power_ceiling_w={ceiling_w} for gpu {index} must be a positive number",
                    field="power_ceiling_w",
                )
        changed: dict[int, bool] = {}
        failures: list[DomainError] = []
        for index, ceiling_w in ceilings.items():  # a safety cap: one GPU failing stops no other
            with self._gpus.locked(index) as gpu:
                if ceiling_w is None:
                    gpu.ceilings_w.pop(source, None)
                else:
                    gpu.ceilings_w[source] = ceiling_w  # kept on failure: the next write retries
                try:
                    changed[index] = self.enforce(index)
                except DomainError as err:  # already logged by ManagedGpus.write
                    failures.append(err)
        if failures:
            raise failures[0]
        return changed

    def power_state(self, index: int) -> PowerState:
        self._gpus.check(index)
        requested_w = self._requested_power_w(index)
        ceilings = dict(self._gpus.slot(index).ceilings_w)
        source = min(ceilings, key=ceilings.__getitem__) if ceilings else ""
        ceiling_w = ceilings[source] if ceilings else None
        return PowerState(requested_w, ceiling_w, source, self._target_power_w(index, ceilings))

    def enforce(self, index: int) -> bool:
        """Write the applied limit if the device differs. Caller holds the GPU lock."""
        return self.write(index, self._target_power_w(index, self._gpus.slot(index).ceilings_w))

    def write(self, index: int, power_limit_w: float) -> bool:
        """Tell the device power_limit_w unless it has it already. Caller holds the GPU lock."""
        current_w = self._backend.telemetry(index).power_limit_w
        if abs(current_w - power_limit_w) < POWER_TOLERANCE_W:
            return False
        self._gpus.write(index, "set_power_limit", self._backend.set_power_limit_w, power_limit_w)
        self._log.info("power limit set", gpu=index, power_limit_w=power_limit_w, was_w=current_w)
        return True

    def _requested_power_w(self, index: int) -> float:
        requested = self._journal.requested(index).power_limit_w
        if requested is not None:
            return requested
        defaults = self._journal.defaults(index)
        if defaults is not None:
            return defaults.power_limit_w
        return self._backend.power_constraints(index).default_w

    def _target_power_w(
        self, index: int, ceilings: dict[str, float], requested_w: float | None = None
    ) -> float:
        c = self._backend.power_constraints(index)
        if requested_w is None:
            requested_w = self._requested_power_w(index)
        target_w = min([requested_w, *ceilings.values()])
        return min(max(target_w, c.min_w), c.max_w)
