"""The sampling loop: reads every GPU at interval_s into an immutable snapshot (the `Node` view
the gRPC server, the metrics endpoint and the coordinator link read), computes budgets, drives
the thermal guard, and pings the systemd watchdog from the loop itself (a stuck loop stops the
pings, so systemd restarts the agent).
"""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import psutil

from nodeagent.actuation.actuator import Actuator
from nodeagent.actuation.power import PowerState
from nodeagent.device.backend import GpuBackend
from nodeagent.engines.types import EngineLoad
from nodeagent.safety.thermal import ThermalGuard
from nodeagent.telemetry.budgets import Budget, NodeBudget, gpu_budget, node_budget
from shapeshifter.common.clock import Clock
from shapeshifter.common.errors import DomainError
from shapeshifter.hw.types import (
    GpuHealth,
    GpuIdentity,
    GpuTelemetry,
    MigState,
    PowerConstraints,
    ThermalThresholds,
)

# Slow-moving reads (host /proc, MIG enumeration: several NVML calls per GPU) are refreshed at
# most this often, or at once after an actuator change; power/thermal/clocks every sample.
SLOW_REFRESH_S = 1.0


@dataclass(frozen=True)
class StaticGpuInfo:
    """What does not change while the agent runs; read once at start."""

    identity: GpuIdentity
    power: PowerConstraints
    thermal: ThermalThresholds
    supported_sm_clocks_mhz: tuple[int, ...]  # descending
    sm_clock_max_mhz: int


@dataclass(frozen=True)
class GpuSnapshot:
    static: StaticGpuInfo
    telemetry: GpuTelemetry
    mig: MigState
    clock_lock_mhz: tuple[int, int] | None
    power_state: PowerState
    budget: Budget


@dataclass(frozen=True)
class LeaseView:
    lease_id: str
    epoch: int
    ttl_s: float
    gpu_power_limit_w: dict[int, float]
    remaining_s: float


@dataclass(frozen=True)
class SafetyView:
    state: str = "standalone"  # standalone | leased | failsafe
    lease: LeaseView | None = None


@dataclass(frozen=True)
class HostStats:
    cpu_pct: float
    memory_used_mib: int
    memory_total_mib: int


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    labels: dict[str, str]
    backend: str
    software_version: str
    hostname: str = field(default_factory=socket.gethostname)


@dataclass(frozen=True)
class NodeSnapshot:
    identity: NodeIdentity
    gpus: tuple[GpuSnapshot, ...]
    budget: NodeBudget
    host: HostStats
    epoch_seen: int
    safety: SafetyView
    thermal_ceilings_w: dict[int, float]
    sampled_at_unix_s: float


def read_static_info(backend: GpuBackend) -> list[StaticGpuInfo]:
    infos = []
    for ident in backend.devices():
        clocks = backend.supported_clocks(ident.index)
        infos.append(
            StaticGpuInfo(
                identity=ident,
                power=backend.power_constraints(ident.index),
                thermal=backend.thermal_thresholds(ident.index),
                supported_sm_clocks_mhz=clocks.all_sm_clocks_mhz,
                sm_clock_max_mhz=clocks.sm_max_mhz,
            )
        )
    return infos


def _no_engine_loads() -> dict[int, EngineLoad]:
    return {}


def _standalone() -> SafetyView:
    return SafetyView()


class Sampler:
    def __init__(
        self,
        backend: GpuBackend,
        actuator: Actuator,
        identity: NodeIdentity,
        clock: Clock,
        log: Any,
        *,
        interval_s: float,
        watchdog_ping: Callable[[], None] = lambda: None,
        watchdog_interval_s: float | None = None,
        engine_loads: Callable[[], dict[int, EngineLoad]] = _no_engine_loads,
        safety: Callable[[], SafetyView] = _standalone,
        thermal_guard: ThermalGuard | None = None,
        drive_load: Callable[[float], None] | None = None,
    ) -> None:
        self._backend = backend
        self._actuator = actuator
        self._identity = identity
        self._clock = clock
        self._log = log
        self.interval_s = interval_s
        self._watchdog_ping = watchdog_ping
        self._watchdog_every_s = watchdog_interval_s / 4 if watchdog_interval_s else math.inf
        self.engine_loads = engine_loads  # the engine manager may set this after construction
        self._safety = safety
        self._guard = thermal_guard
        self._drive_load = drive_load
        self._static = read_static_info(backend)
        self._gpu_type = self._static[0].identity.gpu_type if self._static else ""
        self._latest: NodeSnapshot | None = None
        self._latest_at_s = 0.0
        self._changed = threading.Event()
        self._stale = threading.Event()  # inputs other than the devices changed (engine loads)
        self._collect_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._slow: tuple[HostStats, dict[int, MigState]] | None = None
        self._slow_read_s = 0.0
        # Per GPU: the last good reading, and the error that made it unreadable (None when fine).
        self._last_good: dict[int, GpuTelemetry] = {}
        self._gpu_errors: dict[int, str | None] = {}
        psutil.cpu_percent(interval=None)  # prime: the first call has no reference point

    # ---------------------------------------------------------------- reads

    def latest(self) -> NodeSnapshot:
        """The newest snapshot (taking one first if the loop has not run yet)."""
        snapshot = self._latest
        return snapshot if snapshot is not None else self.sample_now()

    def peek(self) -> NodeSnapshot | None:
        """The newest snapshot without sampling (None before the first)."""
        return self._latest

    def fresh(self) -> NodeSnapshot:
        """The latest snapshot if no change was made since and it is younger than one interval;
        otherwise a new sample (so a read right after a change shows it)."""
        snapshot = self._latest
        if (
            snapshot is None
            or self._changed.is_set()
            or self._stale.is_set()
            or self._clock.monotonic() - self._latest_at_s >= self.interval_s
        ):
            return self.sample_now()
        return snapshot

    def mark_changed(self) -> None:
        """Called after an actuator change: the next fresh() samples again."""
        self._changed.set()

    def mark_stale(self) -> None:
        """The engine loads changed: the next fresh() samples again (no slow device reads)."""
        self._stale.set()

    def sample_now(self) -> NodeSnapshot:
        """Read the devices now and publish the result (used after an actuator change)."""
        with self._collect_lock:
            refresh_slow = self._changed.is_set()
            self._changed.clear()  # before reading: a change made during the read re-marks it
            self._stale.clear()
            snapshot = self._collect(refresh_slow)
            self._latest, self._latest_at_s = snapshot, self._clock.monotonic()
            return snapshot

    # ---------------------------------------------------------------- loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        next_s = self._clock.monotonic()
        while not self._stop.is_set():
            self.tick()
            next_s += self.interval_s
            if next_s < self._clock.monotonic():  # overran: skip missed ticks, don't burst
                next_s = self._clock.monotonic() + self.interval_s
            self._wait_until(next_s)

    def _wait_until(self, deadline_s: float) -> None:
        """Sleep to the deadline, waking to ping the watchdog when the interval is longer than
        a quarter of the watchdog period (the pings still come from this loop only)."""
        while (remaining_s := deadline_s - self._clock.monotonic()) > 0:
            if self._stop.wait(min(remaining_s, self._watchdog_every_s)):
                return
            self._watchdog_ping()

    def tick(self) -> None:
        """One pass of the loop: load, sample, guard, watchdog. Errors are logged, not fatal."""
        try:
            if self._drive_load is not None:
                self._drive_load(self._clock.monotonic())
            snapshot = self.sample_now()
        except Exception:
            self._log.exception("sampling failed")
        else:
            try:
                self._guard_step(snapshot)
            except Exception:
                self._log.exception("thermal guard action failed")
        self._watchdog_ping()

    def _guard_step(self, snapshot: NodeSnapshot) -> None:
        if self._guard is None:
            return
        for gpu in snapshot.gpus:
            self._guard.observe(
                gpu.static.identity.index,
                gpu.telemetry.temperature_c,
                gpu.static.thermal.slowdown_c,
                gpu.telemetry.power_limit_w,
                gpu.static.power,
            )

    def _slow_reads(self, force: bool) -> tuple[HostStats, dict[int, MigState]]:
        now_s = self._clock.monotonic()
        if force or self._slow is None or now_s - self._slow_read_s >= SLOW_REFRESH_S:
            mem = psutil.virtual_memory()
            host = HostStats(
                cpu_pct=psutil.cpu_percent(interval=None),
                memory_used_mib=(mem.total - mem.available) // 2**20,
                memory_total_mib=mem.total // 2**20,
            )
            old = self._slow[1] if self._slow is not None else {}
            migs = {s.identity.index: self._mig_state(s.identity.index, old) for s in self._static}
            self._slow, self._slow_read_s = (host, migs), now_s
        return self._slow

    def _mig_state(self, index: int, previous: dict[int, MigState]) -> MigState:
        """One GPU's MIG state; a GPU that cannot be read keeps its last one."""
        try:
            return self._backend.mig_state(index)
        except DomainError:
            return previous.get(index, MigState(enabled=False, pending_enabled=False))

    def _telemetry(self, static: StaticGpuInfo) -> GpuTelemetry:
        """One GPU's reading, isolated: a GPU the device layer cannot read (lost after Xid 79,
        NVML GPU_IS_LOST) is reported unhealthy and lost with its last reading, and the others
        keep sampling. Errors that are not the device's (bugs) still fail the whole sample."""
        index = static.identity.index
        try:
            tel = self._backend.telemetry(index)
        except DomainError as err:
            if self._gpu_errors.get(index) != str(err):
                self._log.error("gpu unreadable", gpu=index, error=str(err))
            self._gpu_errors[index] = str(err)
            return _lost(static, self._last_good.get(index), str(err))
        if self._gpu_errors.get(index) is not None:
            self._log.info("gpu readable again", gpu=index)
        self._gpu_errors[index] = None
        self._last_good[index] = tel
        return tel

    def _collect(self, refresh_slow: bool) -> NodeSnapshot:
        host, migs = self._slow_reads(refresh_slow)
        loads = self.engine_loads()
        gpus = []
        for static in self._static:
            index = static.identity.index
            tel = self._telemetry(static)
            gpus.append(
                GpuSnapshot(
                    static=static,
                    telemetry=tel,
                    mig=migs[index],
                    clock_lock_mhz=self._actuator.clock_lock_mhz(index),
                    power_state=self._actuator.power_state(index),
                    budget=gpu_budget(tel, static.thermal, loads.get(index)),
                )
            )
        budgets = [g.budget for g in gpus]
        max_power_w = [s.power.max_w for s in self._static]
        return NodeSnapshot(
            identity=self._identity,
            gpus=tuple(gpus),
            budget=node_budget(budgets, max_power_w, self._gpu_type),
            host=host,
            epoch_seen=self._actuator.epoch_seen,
            safety=self._safety(),
            thermal_ceilings_w=self._guard.ceilings_w if self._guard else {},
            sampled_at_unix_s=self._clock.time(),
        )


def _lost(static: StaticGpuInfo, last: GpuTelemetry | None, error: str) -> GpuTelemetry:
    """The reading of a GPU that does not answer: the last good one (power and memory stay
    counted, conservatively), or zeros; always unhealthy and lost."""
    health = GpuHealth(healthy=False, lost=True, error=error,
                       last_xid=last.health.last_xid if last else 0,
                       reset_required_xid=last.health.reset_required_xid if last else 0,
                       ecc_uncorrected_volatile=last.health.ecc_uncorrected_volatile if last else 0)
    if last is not None:
        return replace(last, health=health, utilization_gpu_pct=-1.0,
                       utilization_memory_pct=-1.0, process_pids=())
    ident = static.identity
    return GpuTelemetry(
        index=ident.index, power_draw_w=0.0, power_draw_avg_w=0.0,
        power_limit_w=static.power.default_w, energy_j=0.0, temperature_c=0.0,
        memory_temperature_c=None, sm_clock_mhz=0, memory_clock_mhz=0, utilization_gpu_pct=-1.0,
        utilization_memory_pct=-1.0, memory_used_mib=0, memory_total_mib=ident.memory_total_mib,
        throttle_reasons=(), health=health)
