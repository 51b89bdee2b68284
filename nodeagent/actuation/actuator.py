"""Safe actuation: validate against the device's reported constraints, read before write,
serialize per GPU, journal after every successful write, and undo everything on shutdown.

Actuator is the one object the rest of the agent holds; it composes the parts:
power limits and safety ceilings (power), clock locks (clocks), MIG (mig), plans and their epoch
fence (executor), and the saved defaults (defaults).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nodeagent.actuation.clocks import ClockControl
from nodeagent.actuation.defaults import DefaultsKeeper
from nodeagent.actuation.executor import PlanExecutor
from nodeagent.actuation.gpus import ManagedGpus
from nodeagent.actuation.journal import Journal
from nodeagent.actuation.mig import MigControl
from nodeagent.actuation.plan import (
    GpuAction,
    InstanceAction,
    InstanceActionRunner,
    NodePlan,
    NodePlanOutcome,
)
from nodeagent.actuation.power import PowerControl, PowerState
from nodeagent.device.backend import GpuBackend
from shapeshifter.common.clock import Clock
from shapeshifter.common.errors import DomainError


def _no_instances(_index: int) -> list[str]:
    return []


class Actuator:
    def __init__(
        self,
        backend: GpuBackend,
        journal: Journal,
        clock: Clock,
        log: Any,
        *,
        busy_instances: Callable[[int], list[str]] = _no_instances,
        instance_runner: InstanceActionRunner | None = None,
    ) -> None:
        self._journal = journal
        self._backend = backend
        self._gpus = ManagedGpus(backend, log)
        self._power = PowerControl(backend, journal, self._gpus, log)
        self._clocks = ClockControl(backend, journal, self._gpus, log)
        self._mig = MigControl(backend, journal, self._gpus, log, busy_instances)
        controls = (self._power, self._clocks, self._mig)
        self._plans = PlanExecutor(journal, clock, log, controls, instance_runner)
        self._defaults = DefaultsKeeper(backend, journal, self._gpus, log, controls)

    # ---------------------------------------------------------------- hooks the engines set

    @property
    def busy_instances(self) -> Callable[[int], list[str]]:
        """Managed instances per GPU; MIG changes are refused while there are any."""
        return self._mig.busy_instances

    @busy_instances.setter
    def busy_instances(self, value: Callable[[int], list[str]]) -> None:
        self._mig.busy_instances = value

    @property
    def instance_runner(self) -> InstanceActionRunner | None:
        return self._plans.instance_runner

    @instance_runner.setter
    def instance_runner(self, value: InstanceActionRunner | None) -> None:
        self._plans.instance_runner = value

    # ---------------------------------------------------------------- state

    @property
    def gpu_indices(self) -> list[int]:
        return self._gpus.indices

    @property
    def epoch_seen(self) -> int:
        return self._journal.epoch_seen

    def note_epoch(self, epoch: int) -> None:
        """A coordinator of this epoch registered us: plans of older epochs are refused from now
        on (a deposed leader's, coordinator.ha.election), even before the new one sends a plan."""
        self._journal.note_epoch(epoch)

    def power_state(self, index: int) -> PowerState:
        return self._power.power_state(index)

    def clock_lock_mhz(self, index: int) -> tuple[int, int] | None:
        return self._clocks.clock_lock_mhz(index)

    # ---------------------------------------------------------------- start / stop

    def capture_defaults(self) -> None:
        self._defaults.capture_defaults()

    def reapply_journal(self) -> list[DomainError]:
        return self._defaults.reapply_journal()

    def after_gpu_reset(self, index: int) -> list[DomainError]:
        """GPU `index` was reset (nvidia-smi -r, the reset that activates a pending MIG mode, a
        driver reload): the reset cleared its power limit, locked clocks and MIG instances.
        Tell the backend (sticky Xid, caches), then re-apply the journal for that GPU."""
        self._gpus.check(index)
        self._backend.gpu_was_reset(index)
        return self._defaults.reapply_gpu(index)

    def restore_defaults(self) -> list[DomainError]:
        return self._defaults.restore_defaults()

    # ---------------------------------------------------------------- actions

    def set_power_limit(self, index: int, power_limit_w: float) -> bool:
        return self._power.set_power_limit(index, power_limit_w)

    def set_power_ceilings_w(
        self, ceilings: dict[int, float | None], source: str
    ) -> dict[int, bool]:
        return self._power.set_power_ceilings_w(ceilings, source)

    def lock_clocks(self, index: int, min_mhz: int, max_mhz: int) -> bool:
        return self._clocks.lock_clocks(index, min_mhz, max_mhz)

    def reset_clocks(self, index: int) -> bool:
        return self._clocks.reset_clocks(index)

    def set_mig_mode(self, index: int, enabled: bool) -> bool:
        return self._mig.set_mig_mode(index, enabled)

    def apply_mig_layout(self, index: int, profiles: tuple[str, ...] | list[str]) -> bool:
        return self._mig.apply_mig_layout(index, profiles)

    def apply_mig_parted(self, yaml_text: str, config_name: str) -> bool:
        return self._mig.apply_mig_parted(yaml_text, config_name)

    def apply_plan(self, plan: NodePlan) -> NodePlanOutcome:
        return self._plans.apply_plan(plan)

    def run(self, action: GpuAction | InstanceAction) -> bool:
        return self._plans.run(action)
