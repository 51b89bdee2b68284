"""Safe actuation: validate against the device's reported constraints, read before write,
serialize per GPU, journal after every successful write, and undo everything on shutdown.

Power has two layers. ``requested`` is what an operator or plan asked for; ``ceilings`` are
safety caps keyed by source (lease, failsafe, thermal, emergency). The limit applied to the device
is min(requested, every ceiling), clamped to the device's range.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from nodeagent.clock import Clock
from nodeagent.errors import (
    DomainError,
    FailedPrecondition,
    InUse,
    InvalidArgument,
    NotFound,
    NotSupported,
    grpc_code,
    out_of_range,
)
from nodeagent.gpu.backend import GpuBackend
from nodeagent.gpu.mig import parse_mig_parted, place_mig_layout
from nodeagent.gpu.types import PowerConstraints
from nodeagent.journal import GpuDefaults, Journal

POWER_TOLERANCE_W = 0.01  # NVML works in milliwatts


# ---------------------------------------------------------------- domain plan


@dataclass(frozen=True)
class SetPowerLimit:
    gpu_index: int
    power_limit_w: float


@dataclass(frozen=True)
class LockClocks:
    gpu_index: int
    min_mhz: int
    max_mhz: int


@dataclass(frozen=True)
class ResetClocks:
    gpu_index: int


@dataclass(frozen=True)
class SetMigMode:
    gpu_index: int
    enabled: bool


@dataclass(frozen=True)
class ApplyMigLayout:
    """One GPU's profile list, or (when mig_parted_yaml is set) a mig-parted file and config."""

    gpu_index: int
    profiles: tuple[str, ...] = ()
    mig_parted_yaml: str = ""
    mig_parted_config: str = ""


@dataclass(frozen=True)
class InstanceAction:
    """An engine action; ``request`` is passed untouched to the instance action runner."""

    kind: Literal["start_instance", "stop_instance", "reconfigure_instance"]
    request: Any


GpuAction = SetPowerLimit | LockClocks | ResetClocks | SetMigMode | ApplyMigLayout


@dataclass(frozen=True)
class PlanAction:
    action_id: str
    action: GpuAction | InstanceAction
    reason: str = ""


@dataclass(frozen=True)
class Plan:
    plan_id: str
    epoch: int
    actions: tuple[PlanAction, ...]
    reason: str = ""


@dataclass(frozen=True)
class ActionOutcome:
    action_id: str
    ok: bool
    changed: bool
    code: str  # gRPC status code name, "OK" on success
    message: str
    duration_s: float


@dataclass(frozen=True)
class PlanOutcome:
    plan_id: str
    results: tuple[ActionOutcome, ...]
    completed: bool


class InstanceActionRunner(Protocol):
    """Implemented by the engine manager; returns True when something changed."""

    def run_instance_action(self, action: InstanceAction) -> bool: ...


@dataclass(frozen=True)
class PowerState:
    requested_w: float  # the operator/plan request, or the saved default
    ceiling_w: float | None  # the lowest safety ceiling, None when there is none
    ceiling_source: str  # which source set it ("" when none)
    applied_w: float  # what the device is told


@dataclass
class _GpuState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    ceilings_w: dict[str, float] = field(default_factory=dict)  # source -> ceiling


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
        self._backend = backend
        self._journal = journal
        self._clock = clock
        self._log = log
        self.busy_instances = busy_instances  # settable: the engine manager comes later
        self.instance_runner = instance_runner
        self._uuids = {d.index: d.uuid for d in backend.devices()}
        self._gpus = {index: _GpuState() for index in self._uuids}
        self._mig_lock = threading.Lock()  # mig-parted files span GPUs: one at a time

    @property
    def gpu_indices(self) -> list[int]:
        return sorted(self._gpus)

    @property
    def epoch_seen(self) -> int:
        return self._journal.epoch_seen

    def note_epoch(self, epoch: int) -> None:
        """A coordinator of this epoch registered us: plans of older epochs are refused from now
        on (a deposed leader's, coordinator.election), even before the new one sends a plan."""
        self._journal.note_epoch(epoch)

    # ---------------------------------------------------------------- start / stop

    def capture_defaults(self) -> None:
        """Save what each GPU looks like now, unless the journal already has its defaults."""
        for index, uuid in self._uuids.items():
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
        failures: list[DomainError] = []
        for index in self.gpu_indices:
            req = self._journal.requested(index)
            steps: list[Callable[[], bool]] = []
            if req.mig_enabled is not None:
                steps.append(lambda i=index, r=req: self.set_mig_mode(i, bool(r.mig_enabled)))
            if req.mig_profiles is not None:
                steps.append(lambda i=index, r=req: self.apply_mig_layout(i, r.mig_profiles or ()))
            if req.clock_lock_mhz is not None:
                steps.append(lambda i=index, r=req: self._relock(i, r.clock_lock_mhz))
            steps.append(lambda i=index: self._enforce_power(i))
            for step in steps:
                try:
                    step()
                except DomainError as err:
                    self._log.error("reapply failed", gpu=index, error=str(err))
                    failures.append(err)
        return failures

    def restore_defaults(self) -> list[DomainError]:
        """Put every GPU back as found at the first start; the journal then holds no requests."""
        failures: list[DomainError] = []
        for index in self.gpu_indices:
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
        with self._locked(index) as gpu:
            gpu.ceilings_w.clear()
            req = self._journal.requested(index)
            if req.clock_lock_mhz is not None:
                self._device_write(index, "reset_clocks", self._backend.reset_gpu_clocks)
                self._journal.update_requested(index, clock_lock_mhz=None)
            self._write_power(index, defaults.power_limit_w)
            self._journal.update_requested(index, power_limit_w=None)
            if req.mig_enabled is not None or req.mig_profiles is not None:
                self._restore_mig(index, defaults)
                self._journal.update_requested(index, mig_enabled=None, mig_profiles=None)
        self._log.info("restored gpu defaults", gpu=index, power_limit_w=defaults.power_limit_w)

    def _restore_mig(self, index: int, defaults: GpuDefaults) -> None:
        self._check_idle(index)
        state = self._backend.mig_state(index)
        layout_differs = sorted(i.profile for i in state.instances) != sorted(defaults.mig_profiles)
        if state.enabled and layout_differs:  # instances must go before the mode can change
            self._device_write(index, "apply_mig_layout", self._backend.apply_mig_layout, [])
        if state.pending_enabled != defaults.mig_enabled:
            mode = defaults.mig_enabled
            self._device_write(index, "set_mig_mode", self._backend.set_mig_mode, mode)
        if defaults.mig_enabled and layout_differs and defaults.mig_profiles:
            layout = list(defaults.mig_profiles)
            self._device_write(index, "apply_mig_layout", self._backend.apply_mig_layout, layout)

    # ---------------------------------------------------------------- power

    def set_power_limit(self, index: int, power_limit_w: float) -> bool:
        """Set the requested limit; the applied one may be lower under a safety ceiling."""
        self._check_gpu(index)
        c = self._backend.power_constraints(index)
        if not math.isfinite(power_limit_w) or not c.min_w <= power_limit_w <= c.max_w:
            raise out_of_range("power_limit_w", power_limit_w, c.min_w, c.max_w, "W")
        with self._locked(index) as gpu:
            target_w = self._target_power_w(index, gpu.ceilings_w, requested_w=power_limit_w)
            changed = self._write_power(index, target_w)
            self._journal.update_requested(index, power_limit_w=power_limit_w)  # after the write
            return changed

    def set_power_ceilings_w(
        self, ceilings: dict[int, float | None], source: str
    ) -> dict[int, bool]:
        """Set (or with None lift) ``source``'s ceiling per GPU. Returns changed per GPU."""
        for index, ceiling_w in ceilings.items():
            self._check_gpu(index)
            if ceiling_w is not None and not (math.isfinite(ceiling_w) and ceiling_w > 0):
                raise InvalidArgument(
                    f"power_ceiling_w={ceiling_w} for gpu {index} must be a positive number",
                    field="power_ceiling_w",
                )
        changed: dict[int, bool] = {}
        failures: list[DomainError] = []
        for index, ceiling_w in ceilings.items():  # a safety cap: one GPU failing stops no other
            with self._locked(index) as gpu:
                if ceiling_w is None:
                    gpu.ceilings_w.pop(source, None)
                else:
                    gpu.ceilings_w[source] = ceiling_w  # kept on failure: the next write retries
                try:
                    changed[index] = self._enforce_power(index)
                except DomainError as err:  # already logged by _device_write
                    failures.append(err)
        if failures:
            raise failures[0]
        return changed

    def power_state(self, index: int) -> PowerState:
        self._check_gpu(index)
        gpu = self._gpus[index]
        requested_w = self._requested_power_w(index)
        ceilings = dict(gpu.ceilings_w)
        source = min(ceilings, key=ceilings.__getitem__) if ceilings else ""
        ceiling_w = ceilings[source] if ceilings else None
        return PowerState(requested_w, ceiling_w, source, self._target_power_w(index, ceilings))

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

    def _enforce_power(self, index: int) -> bool:
        """Write the applied limit if the device differs. Caller holds the GPU lock."""
        return self._write_power(index, self._target_power_w(index, self._gpus[index].ceilings_w))

    def _write_power(self, index: int, power_limit_w: float) -> bool:
        current_w = self._backend.telemetry(index).power_limit_w
        if abs(current_w - power_limit_w) < POWER_TOLERANCE_W:
            return False
        self._device_write(index, "set_power_limit", self._backend.set_power_limit_w, power_limit_w)
        self._log.info("power limit set", gpu=index, power_limit_w=power_limit_w, was_w=current_w)
        return True

    # ---------------------------------------------------------------- clocks

    def lock_clocks(self, index: int, min_mhz: int, max_mhz: int) -> bool:
        self._check_gpu(index)
        clocks = self._backend.supported_clocks(index)
        low, high = clocks.sm_min_mhz, clocks.sm_max_mhz
        for name, value in (("min_mhz", min_mhz), ("max_mhz", max_mhz)):
            if not low <= value <= high:
                raise out_of_range(name, value, low, high, "MHz")
        if min_mhz > max_mhz:
            raise InvalidArgument(
                f"min_mhz={min_mhz} MHz must not exceed max_mhz={max_mhz} MHz", field="min_mhz"
            )
        with self._locked(index):
            if self._journal.requested(index).clock_lock_mhz == (min_mhz, max_mhz):
                return False
            return self._relock(index, (min_mhz, max_mhz))

    def _relock(self, index: int, lock_mhz: tuple[int, int] | None) -> bool:
        assert lock_mhz is not None
        self._device_write(index, "lock_clocks", self._backend.lock_gpu_clocks_mhz, *lock_mhz)
        self._journal.update_requested(index, clock_lock_mhz=lock_mhz)
        self._log.info("clocks locked", gpu=index, min_mhz=lock_mhz[0], max_mhz=lock_mhz[1])
        return True

    def reset_clocks(self, index: int) -> bool:
        """Always resets the device (it may have been locked by someone else); changed only when
        the agent had a lock."""
        self._check_gpu(index)
        with self._locked(index):
            had_lock = self._journal.requested(index).clock_lock_mhz is not None
            self._device_write(index, "reset_clocks", self._backend.reset_gpu_clocks)
            self._journal.update_requested(index, clock_lock_mhz=None)
        self._log.info("clocks reset", gpu=index)
        return had_lock

    def clock_lock_mhz(self, index: int) -> tuple[int, int] | None:
        return self._journal.requested(index).clock_lock_mhz

    # ---------------------------------------------------------------- MIG

    def set_mig_mode(self, index: int, enabled: bool) -> bool:
        self._check_gpu(index)
        self._check_mig_supported(index)
        with self._locked(index):
            if self._backend.mig_state(index).pending_enabled == enabled:
                return False
            self._check_idle(index)
            self._device_write(index, "set_mig_mode", self._backend.set_mig_mode, enabled)
            self._journal.update_requested(index, mig_enabled=enabled)
        self._log.info("mig mode set", gpu=index, enabled=enabled)
        return True

    def apply_mig_layout(self, index: int, profiles: tuple[str, ...] | list[str]) -> bool:
        self._check_gpu(index)
        self._check_mig_supported(index)
        place_mig_layout(self._backend.mig_profiles(index), list(profiles))  # validates
        with self._locked(index):
            return self._apply_layout_locked(index, tuple(profiles))

    def _apply_layout_locked(self, index: int, profiles: tuple[str, ...]) -> bool:
        state = self._backend.mig_state(index)
        if not state.enabled:
            raise FailedPrecondition(
                f"gpu_index={index}: MIG mode is disabled; enable it first (SetMigMode)",
                field="gpu_index",
            )
        if sorted(i.profile for i in state.instances) == sorted(profiles):
            return False
        self._check_idle(index)
        self._device_write(
            index, "apply_mig_layout", self._backend.apply_mig_layout, list(profiles)
        )
        self._journal.update_requested(index, mig_profiles=profiles)
        self._log.info("mig layout applied", gpu=index, profiles=list(profiles))
        return True

    def apply_mig_parted(self, yaml_text: str, config_name: str) -> bool:
        """Apply a mig-parted v1 config to the GPUs it lists, validating all before any change."""
        wanted = parse_mig_parted(yaml_text, config_name, len(self._gpus))
        for index, (enabled, profiles) in wanted.items():
            self._check_gpu(index)
            self._check_mig_supported(index)
            place_mig_layout(self._backend.mig_profiles(index), profiles)
            if self._mig_differs(index, enabled, profiles):
                self._check_idle(index)
        changed = False
        with self._mig_lock:
            for index, (enabled, profiles) in sorted(wanted.items()):
                if enabled:
                    changed |= self.set_mig_mode(index, True)
                    with self._locked(index):
                        changed |= self._apply_layout_locked(index, tuple(profiles))
                else:
                    if self._backend.mig_state(index).instances:
                        with self._locked(index):
                            changed |= self._apply_layout_locked(index, ())
                    changed |= self.set_mig_mode(index, False)
        return changed

    def _mig_differs(self, index: int, enabled: bool, profiles: list[str]) -> bool:
        state = self._backend.mig_state(index)
        current = sorted(i.profile for i in state.instances)
        return state.pending_enabled != enabled or (enabled and current != sorted(profiles))

    def _check_mig_supported(self, index: int) -> None:
        if not self._backend.mig_profiles(index):
            raise NotSupported(
                f"gpu_index={index}: this GPU does not support MIG", field="gpu_index"
            )

    def _check_idle(self, index: int) -> None:
        pids = list(self._backend.telemetry(index).process_pids)
        instances = self.busy_instances(index)
        if pids or instances:
            raise InUse(
                f"gpu_index={index} is in use (processes {pids}, managed instances {instances}); "
                "drain it before changing MIG",
                field="gpu_index",
            )

    # ---------------------------------------------------------------- plans

    def apply_plan(self, plan: Plan) -> PlanOutcome:
        """Run a plan's actions in order, stopping at the first failure.

        Raises FailedPrecondition when the plan's epoch is older than the newest seen."""
        if plan.epoch < self._journal.epoch_seen:
            raise FailedPrecondition(
                f"plan epoch {plan.epoch} is older than the newest seen epoch "
                f"{self._journal.epoch_seen}",
                field="epoch",
            )
        self._journal.note_epoch(plan.epoch)
        results: list[ActionOutcome] = []
        for item in plan.actions:
            outcome = self._run_action(item)
            results.append(outcome)
            if not outcome.ok:
                self._log.warning("plan stopped", plan_id=plan.plan_id, action_id=item.action_id)
                return PlanOutcome(plan.plan_id, tuple(results), completed=False)
        self._log.info("plan applied", plan_id=plan.plan_id, epoch=plan.epoch, actions=len(results))
        return PlanOutcome(plan.plan_id, tuple(results), completed=True)

    def run(self, action: GpuAction | InstanceAction) -> bool:
        """Execute one action; raises DomainError on refusal."""
        match action:
            case SetPowerLimit(i, w):
                return self.set_power_limit(i, w)
            case LockClocks(i, lo, hi):
                return self.lock_clocks(i, lo, hi)
            case ResetClocks(i):
                return self.reset_clocks(i)
            case SetMigMode(i, enabled):
                return self.set_mig_mode(i, enabled)
            case ApplyMigLayout(i, profiles, yaml_text, config) if yaml_text:
                return self.apply_mig_parted(yaml_text, config)
            case ApplyMigLayout(i, profiles):
                return self.apply_mig_layout(i, profiles)
            case InstanceAction():
                if self.instance_runner is None:
                    raise FailedPrecondition("no engine manager configured")
                return self.instance_runner.run_instance_action(action)
        raise InvalidArgument(f"action: unknown kind {type(action).__name__}", field="action")

    def _run_action(self, item: PlanAction) -> ActionOutcome:
        start_s = self._clock.monotonic()
        try:
            changed = self.run(item.action)
        except DomainError as err:
            return ActionOutcome(
                item.action_id, False, False, grpc_code(err).name, str(err), self._since(start_s)
            )
        return ActionOutcome(item.action_id, True, changed, "OK", "", self._since(start_s))

    def _since(self, start_s: float) -> float:
        return self._clock.monotonic() - start_s

    # ---------------------------------------------------------------- helpers

    def _device_write(
        self, index: int, action: str, write: Callable[..., object], *args: Any
    ) -> None:
        """One actuator write to the device; a refusal is logged here and raised to the caller."""
        try:
            write(index, *args)
        except DomainError as err:
            self._log.error("device write failed", gpu=index, action=action, error=str(err))
            raise

    def _check_gpu(self, index: int) -> None:
        if index not in self._gpus:
            raise NotFound(
                f"gpu_index={index} not found; valid range [0, {len(self._gpus) - 1}]",
                field="gpu_index",
            )

    @contextlib.contextmanager
    def _locked(self, index: int) -> Iterator[_GpuState]:
        gpu = self._gpus[index]
        with gpu.lock:
            yield gpu
