"""MIG mode and layout changes: validated before any write, refused while the GPU is in use,
journaled after each write; mig-parted files (which span GPUs) one at a time.

A mode change the device holds pending until a GPU reset (A100) raises ResetRequired: the request
is journaled (the device accepted it), but nothing reports it as done, and a layout is refused
with that reason until the reset (Actuator.after_gpu_reset then re-applies the journal)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from nodeagent.actuation.gpus import ManagedGpus
from nodeagent.actuation.journal import GpuDefaults, Journal
from nodeagent.device.backend import GpuBackend
from shapeshifter.common.errors import FailedPrecondition, InUse, NotSupported, ResetRequired
from shapeshifter.hw.mig import parse_mig_parted, place_mig_layout


def _no_instances(_index: int) -> list[str]:
    return []


class MigControl:
    def __init__(
        self,
        backend: GpuBackend,
        journal: Journal,
        gpus: ManagedGpus,
        log: Any,
        busy_instances: Callable[[int], list[str]] = _no_instances,
    ) -> None:
        self._backend = backend
        self._journal = journal
        self._gpus = gpus
        self._log = log
        self.busy_instances = busy_instances  # settable: the engine manager comes later
        self._mig_parted_lock = threading.Lock()

    def set_mig_mode(self, index: int, enabled: bool) -> bool:
        self._gpus.check(index)
        self._check_supported(index)
        with self._gpus.locked(index):
            state = self._backend.mig_state(index)
            if (state.enabled, state.pending_enabled) == (enabled, enabled):
                return False
            # Pending (waiting for a reset) is asked again: the driver retries the activation.
            self.check_idle(index)
            try:
                self._gpus.write(index, "set_mig_mode", self._backend.set_mig_mode, enabled)
            except ResetRequired:
                self._journal.update_requested(index, mig_enabled=enabled)  # accepted, pending
                raise
            self._journal.update_requested(index, mig_enabled=enabled)
        self._log.info("mig mode set", gpu=index, enabled=enabled)
        return True

    def apply_mig_layout(self, index: int, profiles: tuple[str, ...] | list[str]) -> bool:
        self._gpus.check(index)
        self._check_supported(index)
        place_mig_layout(self._backend.mig_profiles(index), list(profiles))  # validates
        with self._gpus.locked(index):
            return self._apply_layout_held(index, tuple(profiles))

    def apply_mig_parted(self, yaml_text: str, config_name: str) -> bool:
        """Apply a mig-parted v1 config to the GPUs it lists, validating all before any change."""
        wanted = parse_mig_parted(yaml_text, config_name, len(self._gpus))
        for index, (enabled, profiles) in wanted.items():
            self._gpus.check(index)
            self._check_supported(index)
            place_mig_layout(self._backend.mig_profiles(index), profiles)
            if self._differs(index, enabled, profiles):
                self.check_idle(index)
        changed = False
        with self._mig_parted_lock:
            for index, (enabled, profiles) in sorted(wanted.items()):
                if enabled:
                    changed |= self.set_mig_mode(index, True)
                    with self._gpus.locked(index):
                        changed |= self._apply_layout_held(index, tuple(profiles))
                else:
                    if self._backend.mig_state(index).instances:
                        with self._gpus.locked(index):
                            changed |= self._apply_layout_held(index, ())
                    changed |= self.set_mig_mode(index, False)
        return changed

    def restore_held(self, index: int, defaults: GpuDefaults) -> None:
        """Put mode and layout back as in defaults. Caller holds the GPU lock."""
        self.check_idle(index)
        state = self._backend.mig_state(index)
        layout_differs = sorted(i.profile for i in state.instances) != sorted(defaults.mig_profiles)
        apply_layout = self._backend.apply_mig_layout
        if state.enabled and layout_differs:  # instances must go before the mode can change
            self._gpus.write(index, "apply_mig_layout", apply_layout, [])
        if (state.enabled, state.pending_enabled) != (defaults.mig_enabled,) * 2:
            mode = defaults.mig_enabled
            try:
                self._gpus.write(index, "set_mig_mode", self._backend.set_mig_mode, mode)
            except ResetRequired:  # the original mode returns with the next reset or reboot
                self._log.warning("mig mode restore pending a gpu reset", gpu=index, enabled=mode)
                return
        if defaults.mig_enabled and layout_differs and defaults.mig_profiles:
            self._gpus.write(index, "apply_mig_layout", apply_layout, list(defaults.mig_profiles))

    def check_idle(self, index: int) -> None:
        pids = list(self._backend.telemetry(index).process_pids)
        instances = self.busy_instances(index)
        if pids or instances:
            raise InUse(
                f"gpu_index={index} is in use (processes {pids}, managed instances {instances}); "
                "drain it before changing MIG",
                field="gpu_index",
            )

    def _apply_layout_held(self, index: int, profiles: tuple[str, ...]) -> bool:
        state = self._backend.mig_state(index)
        if not state.enabled and state.pending_enabled:
            raise ResetRequired(
                f"gpu_index={index}: MIG mode on is pending a GPU reset (nvidia-smi -r -i "
                f"{index}, with no processes on it) or a reboot; apply the layout after it",
                field="gpu_index",
            )
        if not state.enabled:
            raise FailedPrecondition(
                f"gpu_index={index}: MIG mode is disabled; enable it first (SetMigMode)",
                field="gpu_index",
            )
        if sorted(i.profile for i in state.instances) == sorted(profiles):
            return False
        self.check_idle(index)
        self._gpus.write(
            index, "apply_mig_layout", self._backend.apply_mig_layout, list(profiles)
        )
        self._journal.update_requested(index, mig_profiles=profiles)
        self._log.info("mig layout applied", gpu=index, profiles=list(profiles))
        return True

    def _differs(self, index: int, enabled: bool, profiles: list[str]) -> bool:
        state = self._backend.mig_state(index)
        current = sorted(i.profile for i in state.instances)
        return state.pending_enabled != enabled or (enabled and current != sorted(profiles))

    def _check_supported(self, index: int) -> None:
        if not self._backend.mig_profiles(index):
            raise NotSupported(
                f"gpu_index={index}: this GPU does not support MIG", field="gpu_index"
            )
