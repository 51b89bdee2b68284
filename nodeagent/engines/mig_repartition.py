"""MIG repartition of a GPU that runs instances, as one journaled sequence.

drain -> stop the affected instances -> apply the layout -> restart them on their new MIG
devices. The journal (state_dir/mig_repartition.json) records the phase before each step, so
after an agent crash `resume()` finishes the sequence or rolls it back:

  stopping   the layout is untouched: roll back (restart the stopped instances as they were)
  applying   re-read the layout: apply it if the old devices still exist, then restart
  restarting restart the affected instances not yet running on their new devices

Everything is validated before the first instance is stopped. Each instance keeps its MIG
profile unless `placement` names another one for it. If an instance fails to come back on its
new device, the error is raised and the journal stays in `restarting`: resume() retries.
One sequence at a time (a lock, and a journal left behind refuses a new one).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from nodeagent.device.backend import GpuBackend
from nodeagent.engines.journal import read_json, spec_from_json, spec_to_json, write_json
from nodeagent.engines.manager import InstanceManager, State
from nodeagent.engines.spec import InstanceSpec
from shapeshifter.common.errors import (
    DomainError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
)
from shapeshifter.hw.mig import place_mig_layout
from shapeshifter.hw.types import MigInstance

# Lazy: takes the logging configuration in force at first use, not at import.
log = structlog.get_logger(component="engines.mig")

JOURNAL_FILE = "mig_repartition.json"
_ACTIVE = (State.STARTING, State.READY, State.DRAINING)


@dataclass(frozen=True)
class RepartitionResult:
    gpu_index: int
    devices_by_instance: dict[str, tuple[str, ...]]  # where each affected instance runs now
    rolled_back: bool
    message: str


class MigRepartitioner:
    def __init__(
        self,
        manager: InstanceManager,
        backend: GpuBackend,
        state_dir: Path,
        *,
        apply_layout: Callable[[int, list[str]], object] | None = None,
        ready_timeout_s: float = 600.0,
    ) -> None:
        """apply_layout: how the layout is applied (the daemon passes the actuator's journaled
        apply_mig_layout); default backend.apply_mig_layout."""
        self._manager = manager
        self._backend = backend
        self._journal_path = state_dir / JOURNAL_FILE
        self._apply_layout = apply_layout or backend.apply_mig_layout
        self._ready_timeout_s = ready_timeout_s
        self._lock = threading.Lock()

    def repartition(
        self, gpu_index: int, profiles: Sequence[str], placement: Mapping[str, str] | None = None
    ) -> RepartitionResult:
        with self._lock:
            return self._repartition(gpu_index, profiles, placement or {})

    def _repartition(
        self, gpu_index: int, profiles: Sequence[str], placement: Mapping[str, str]
    ) -> RepartitionResult:
        if read_json(self._journal_path) is not None:
            raise FailedPrecondition("a MIG repartition is still journaled; resume() it first")
        state = self._backend.mig_state(gpu_index)
        place_mig_layout(self._backend.mig_profiles(gpu_index), list(profiles))  # validates
        specs = {
            iid: self._manager.get(iid).spec for iid in self._manager.busy_instances(gpu_index)
        }
        wanted = _wanted_profiles(specs, state.instances, placement)
        _check_fits(wanted, profiles)
        journal: dict[str, Any] = {
            "gpu_index": gpu_index, "profiles": list(profiles), "wanted": wanted,
            "specs": {iid: spec_to_json(s) for iid, s in specs.items()}, "phase": "stopping",
        }  # fmt: skip
        write_json(self._journal_path, journal)
        log.info(
            "mig_repartition_begin",
            gpu_index=gpu_index,
            profiles=list(profiles),
            instances=sorted(specs),
        )
        for iid in sorted(specs):
            self._manager.stop(iid)
        return self._apply_and_restart(journal)

    def resume(self) -> RepartitionResult | None:
        """Finish or roll back a sequence interrupted by an agent crash; None if there is none."""
        with self._lock:
            return self._resume()

    def _resume(self) -> RepartitionResult | None:
        journal = read_json(self._journal_path)
        if journal is None:
            return None
        log.warning(
            "mig_repartition_resume", phase=journal["phase"], gpu_index=journal["gpu_index"]
        )
        if journal["phase"] == "stopping":
            return self._roll_back(journal, "agent restarted before the layout was applied")
        return self._apply_and_restart(journal)

    # ------------------------------------------------------------------ steps

    def _apply_and_restart(self, journal: dict[str, Any]) -> RepartitionResult:
        gpu = journal["gpu_index"]
        specs = {iid: spec_from_json(s) for iid, s in journal["specs"].items()}
        if journal["phase"] in ("stopping", "applying"):
            journal["phase"] = "applying"
            write_json(self._journal_path, journal)
            old_devices = {d for s in specs.values() for d in s.devices}
            current = {m.uuid for m in self._backend.mig_state(gpu).instances}
            if not old_devices or old_devices & current:  # not applied yet (or no instances)
                try:
                    self._apply_layout(gpu, list(journal["profiles"]))
                except DomainError as exc:
                    return self._roll_back(journal, f"applying the layout failed: {exc}")
            journal["devices"] = _assign(journal["wanted"], self._backend.mig_state(gpu).instances)
            journal["phase"] = "restarting"
            write_json(self._journal_path, journal)
        devices = {iid: tuple(d) for iid, d in journal["devices"].items()}
        self._restart({iid: replace(specs[iid], devices=devices[iid]) for iid in specs})
        self._journal_path.unlink()
        log.info("mig_repartition_done", gpu_index=gpu, devices=devices)
        return RepartitionResult(gpu, devices, False, "repartitioned")

    def _roll_back(self, journal: dict[str, Any], reason: str) -> RepartitionResult:
        specs = {iid: spec_from_json(s) for iid, s in journal["specs"].items()}
        self._restart(specs)
        self._journal_path.unlink()
        log.warning("mig_repartition_rolled_back", gpu_index=journal["gpu_index"], reason=reason)
        return RepartitionResult(
            journal["gpu_index"], {iid: s.devices for iid, s in specs.items()}, True,
            f"{reason}; instances restarted on their old devices",
        )  # fmt: skip

    def _restart(self, specs: Mapping[str, InstanceSpec]) -> None:
        """Start each instance not already running with this spec, then wait for READY."""
        for iid, spec in sorted(specs.items()):
            if not self._running_as(iid, spec):
                self._manager.start(spec)
        for iid in sorted(specs):
            self._manager.wait_ready(iid, self._ready_timeout_s)

    def _running_as(self, iid: str, spec: InstanceSpec) -> bool:
        try:
            status = self._manager.get(iid)
        except NotFound:
            return False
        return status.state in _ACTIVE and status.spec.devices == spec.devices


def _wanted_profiles(
    specs: Mapping[str, InstanceSpec],
    instances: Sequence[MigInstance],
    placement: Mapping[str, str],
) -> dict[str, str]:
    """The MIG profile each affected instance needs on the new layout."""
    profile_of = {m.uuid: m.profile for m in instances}
    unknown = sorted(set(placement) - set(specs))
    if unknown:
        raise InvalidArgument(f"placement: {unknown} do not run on this GPU", field="placement")
    wanted = {}
    for iid, spec in specs.items():
        if len(spec.devices) != 1 or spec.devices[0] not in profile_of:
            raise InvalidArgument(
                f"placement: instance {iid} does not run on one MIG device of this GPU "
                f"(devices {list(spec.devices)})",
                field="placement",
            )
        wanted[iid] = placement.get(iid, profile_of[spec.devices[0]])
    return wanted


def _check_fits(wanted: Mapping[str, str], profiles: Sequence[str]) -> None:
    short = Counter(wanted.values()) - Counter(profiles)
    if short:
        raise InvalidArgument(
            f"placement: the new layout lacks MIG devices for the running instances: "
            f"{dict(short)} more needed",
            field="placement",
        )


def _assign(wanted: Mapping[str, str], instances: Sequence[MigInstance]) -> dict[str, list[str]]:
    """Each instance (by id) gets the first free new MIG device of its profile (by start)."""
    free = sorted(instances, key=lambda m: m.placement_start)
    devices: dict[str, list[str]] = {}
    for iid in sorted(wanted):
        mig = next((m for m in free if m.profile == wanted[iid]), None)
        if mig is None:
            raise Internal(f"the applied layout has no free {wanted[iid]} device for {iid}")
        free.remove(mig)
        devices[iid] = [mig.uuid]
    return devices
