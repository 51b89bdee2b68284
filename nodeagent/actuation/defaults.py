"""The GPUs' lifecycle under the agent: save the defaults found at the first start, re-apply the
journaled requests at each start, and put everything back on shutdown."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nodeagent.actuation.clocks import ClockControl
from nodeagent.actuation.gpus import ManagedGpus
from nodeagent.actuation.journal import GpuDefaults, Journal
from nodeagent.actuation.mig import MigControl
from nodeagent.actuation.power import PowerControl
from nodeagent.device.backend import GpuBackend
from shapeshifter.common.errors import DomainError


class DefaultsKeeper:
    def __init__(
        self,
        backend: GpuBackend,
        journal: Journal,
        gpus: ManagedGpus,
        log: Any,
        controls: tuple[PowerControl, ClockControl, MigControl],
    ) -> None:
        self._backend = backend
        self._journal = journal
        self._gpus = gpus
        self._log = log
        self._power, self._clocks, self._mig = controls

    def capture_defaults(self) -> None:
        """Save what each GPU looks like now, unless the journal already has its defaults."""
        for index, uuid in self._gpus.uuids.items():
            saved = self._journal.defaults(index)
            if saved is not None and saved.uuid == uuid:
                continue
            if saved is not None:
                self._log.warning("gpu replaced; forgetting its journal", gpu=index, uuid=uuid)
            tel = self._backend.telemetry(index)
            mig = self._backend.mig_state(index)
            defaults = GpuDefaults(
                uuid=uuid,
                power_limit_w=tel.power_limit_w,
                mig_enabled=mig.enabled,
                mig_profiles=tuple(i.profile for i in mig.instances),
            )
            self._journal.record_defaults(index, defaults, replace_existing=saved is not None)
            self._log.info("saved gpu defaults", gpu=index, power_limit_w=tel.power_limit_w)

    def reapply_journal(self) -> list[DomainError]:
        """Re-apply journaled requests (the driver forgets limits on reload/reboot). Runs once at
        start, before anything else can call the actuator."""
        return [err for index in self._gpus.indices for err in self.reapply_gpu(index)]

    def reapply_gpu(self, index: int) -> list[DomainError]:
        """Re-apply GPU `index`'s journaled requests: MIG mode and layout, clock lock, power
        limit (with its ceilings). Each step is tried; the failures are returned."""
        self._gpus.check(index)
        failures: list[DomainError] = []
        for step in self._reapply_steps(index):
            try:
                step()
            except DomainError as err:
                self._log.error("reapply failed", gpu=index, error=str(err))
                failures.append(err)
        return failures

    def _reapply_steps(self, index: int) -> list[Callable[[], bool]]:
        req = self._journal.requested(index)
        steps: list[Callable[[], bool]] = []
        if req.mig_enabled is not None:
            steps.append(lambda: self._mig.set_mig_mode(index, bool(req.mig_enabled)))
        if req.mig_profiles is not None:
            steps.append(lambda: self._mig.apply_mig_layout(index, req.mig_profiles or ()))
        if req.clock_lock_mhz is not None:
            steps.append(lambda: self._clocks.relock(index, req.clock_lock_mhz))
        steps.append(lambda: self._power.enforce(index))
        return steps

    def restore_defaults(self) -> list[DomainError]:
        """Put every GPU back as found at the first start; the journal then holds no requests."""
        failures: list[DomainError] = []
        for index in self._gpus.indices:
            try:
                self._restore_gpu(index)
            except DomainError as err:
                self._log.error("restore failed", gpu=index, error=str(err))
                failures.append(err)
        return failures

    def _restore_gpu(self, index: int) -> None:
        """Clocks and power first (they never fail for being busy), then MIG; the journal
        forgets each request only once it is undone."""
        defaults = self._journal.defaults(index)
        if defaults is None:
            return
        with self._gpus.locked(index) as gpu:
            gpu.ceilings_w.clear()
            req = self._journal.requested(index)
            if req.clock_lock_mhz is not None:
                self._clocks.reset_held(index)
            self._power.write(index, defaults.power_limit_w)
            self._journal.update_requested(index, power_limit_w=None)
            if req.mig_enabled is not None or req.mig_profiles is not None:
                self._mig.restore_held(index, defaults)
                self._journal.update_requested(index, mig_enabled=None, mig_profiles=None)
        self._log.info("restored gpu defaults", gpu=index, power_limit_w=defaults.power_limit_w)
