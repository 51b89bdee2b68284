"""InstanceManager: the lifecycle of the vLLM instances on this node.

States: STARTING -> READY (GET /health answered 200) -> DRAINING -> STOPPED; FAILED with the exit
code and the log's last lines. Every stop drains (not routable, wait until running+waiting is
zero or the drain deadline, SIGTERM, SIGKILL after the grace period) unless forced. A crashed
engine is restarted with exponential backoff (tenacity) up to a limit, then FAILED. Running
engines are recorded in a journal in the state dir and re-adopted (pid + create time + command
line) when the agent restarts, never killed nor started twice. A reconfigure journals the old
spec beside the new engine, so after an agent crash the new engine is awaited and, if it never
becomes READY, the old spec is started again (completed or rolled back, never lost).

Threads: gRPC handlers call start/stop/reconfigure; a monitor thread calls tick(); restarts run
on their own thread. `_lock` guards the table and each record's fields; a record's `op_lock`
serializes the operations that change its process.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

import structlog
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from nodeagent.engines.command import build_command, build_env
from nodeagent.engines.journal import read_json, spec_from_json, spec_to_json, write_json
from nodeagent.engines.runner import (
    EngineProcess,
    EngineRunner,
    pick_free_port,
    port_is_free,
    rotate_log,
    tail_lines,
)
from nodeagent.engines.spec import DeviceInventory, InstanceSpec, validate_spec
from nodeagent.engines.types import EngineLoad
from shapeshifter.common.clock import Clock, SystemClock
from shapeshifter.common.errors import (
    DomainError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
)
from shapeshifter.vllm.metrics import EngineMetrics, EngineSample, parse_metrics, update_metrics

# Lazy: takes the logging configuration in force at first use, not at import.
log = structlog.get_logger(component="engines")

JOURNAL_FILE = "engines.json"


class State(StrEnum):
    STARTING = "STARTING"
    READY = "READY"
    DRAINING = "DRAINING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"


_ACTIVE = (State.STARTING, State.READY, State.DRAINING)


@dataclass(frozen=True)
class EngineSettings:
    """How engines are run (from the agent config's `engines` section)."""

    launcher: tuple[str, ...]  # argv prefix: command.default_launcher(python) for vLLM
    state_dir: Path
    log_dir: Path
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    allowed_extra_flags: frozenset[str] = frozenset()
    host: str = "127.0.0.1"
    health_interval_s: float = 1.0
    ready_timeout_s: float = 600.0
    shutdown_timeout_s: float = 30.0  # vLLM --shutdown-timeout: in-flight work after SIGTERM
    kill_grace_s: float = 10.0  # SIGKILL this long after the shutdown timeout
    max_restarts: int = 5  # restarts in a row (not separated by a stable run) before FAILED
    stable_after_s: float = 300.0  # READY this long: the next crash starts a fresh count
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 60.0
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    log_tail_lines: int = 20


@dataclass(frozen=True)
class InstanceStatus:
    """A consistent snapshot of one instance for the API and the report."""

    spec: InstanceSpec  # port is the one in use
    state: State
    pid: int
    exit_code: int
    last_log: str
    restarts: int
    metrics: EngineMetrics
    routable: bool
    started_at_unix_s: float
    ready_at_unix_s: float
    command: tuple[str, ...]


@dataclass(frozen=True)
class ReconfigureResult:
    instance: InstanceStatus
    rolled_back: bool
    steps: tuple[tuple[str, float], ...]  # (drain|stop|start|ready, seconds)
    message: str


class EngineStartError(Exception):
    """The engine exited or did not become READY in time."""

    def __init__(self, message: str, exit_code: int = 0) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Cancelled(Exception):
    """A stop (or agent shutdown) interrupted a start or restart."""


@dataclass(eq=False)
class _Record:
    spec: InstanceSpec
    state: State = State.STARTING
    process: EngineProcess | None = None
    command: tuple[str, ...] = ()
    exit_code: int = 0
    last_log: str = ""
    restarts: int = 0
    metrics: EngineMetrics = field(default_factory=EngineMetrics)
    sample: EngineSample | None = None
    sampled_at_s: float = 0.0
    routable: bool = False
    started_at_unix_s: float = 0.0
    ready_at_unix_s: float = 0.0
    wanted: bool = True  # False once a stop was asked: no restart
    restarting: bool = False  # a restart thread owns the record: the monitor leaves it alone
    crash_streak: int = 0  # restarts since the engine last ran stable_after_s
    epoch: int = 0  # bumped by stop/reconfigure: a restart planned before is void
    rollback_spec: InstanceSpec | None = None  # a reconfigure in flight: the spec to go back to
    cancel: threading.Event = field(default_factory=threading.Event)
    op_lock: threading.Lock = field(default_factory=threading.Lock)


def wait_until_idle(
    queue_len: Callable[[], float | None],
    *,
    timeout_s: float,
    clock: Clock,
    sleep: Callable[[float], None],
    poll_s: float,
) -> bool:
    """Poll queue_len (running + waiting; None = unknown) until it is 0 or timeout_s passes.
    True when idle was seen, False when the deadline passed first."""
    deadline_s = clock.monotonic() + timeout_s
    while True:
        if queue_len() == 0:
            return True
        remaining_s = deadline_s - clock.monotonic()
        if remaining_s <= 0:
            return False
        sleep(min(poll_s, remaining_s))


class InstanceManager:
    def __init__(
        self,
        settings: EngineSettings,
        runner: EngineRunner,
        inventory: Callable[[], DeviceInventory],
        *,
        clock: Clock | None = None,
        sleep: Callable[[float], None] = time.sleep,
        on_tick: Callable[[dict[int, EngineLoad]], None] | None = None,
    ) -> None:
        """on_tick: called with engine_loads() after each monitor pass (the sim backend's load
        follows the engines through it)."""
        self._settings = settings
        self._on_tick = on_tick
        self._runner = runner
        self._inventory = inventory
        self._clock = clock or SystemClock()
        self._sleep = sleep
        self._lock = threading.RLock()
        self._records: dict[str, _Record] = {}
        self._closing = threading.Event()
        self._monitor: threading.Thread | None = None

    # ------------------------------------------------------------------ queries

    def list(self) -> list[InstanceStatus]:
        with self._lock:
            return [self._status(r) for _, r in sorted(self._records.items())]

    def get(self, instance_id: str) -> InstanceStatus:
        rec = self._record(instance_id)
        with self._lock:
            return self._status(rec)

    def busy_instances(self, gpu_index: int) -> list[str]:
        """Ids of the active instances using a GPU (or one of its MIG devices)."""
        inventory = self._inventory()
        with self._lock:
            return sorted(
                iid for iid, r in self._records.items()
                if r.state in _ACTIVE and gpu_index in _gpus_of(r.spec, inventory)
            )  # fmt: skip

    def engine_loads(self) -> dict[int, EngineLoad]:
        """Per-GPU load of READY/DRAINING instances, for the budgets.

        A TP instance loads each of its GPUs with all its running requests (every GPU works on
        every request) and an equal share of its token rates; MIG instances on one GPU add up;
        the KV fraction is the fullest instance's.
        """
        inventory = self._inventory()
        loads: dict[int, EngineLoad] = {}
        with self._lock:
            for rec in self._records.values():
                if rec.state not in (State.READY, State.DRAINING):
                    continue
                gpus = _gpus_of(rec.spec, inventory)
                for gpu in gpus:
                    loads[gpu] = _add_load(loads.get(gpu), rec, len(gpus))
        return loads

    # --------------------------------------------------------------- operations

    def start(self, spec: InstanceSpec) -> InstanceStatus:
        """Validate and launch; returns STARTING (the monitor marks READY on /health 200)."""
        with self._lock:
            old = self._records.get(spec.instance_id)
            if old is not None and old.state in _ACTIVE:
                raise FailedPrecondition(
                    f"instance_id={spec.instance_id!r} is already {old.state}; stop it or "
                    "reconfigure it",
                    field="instance_id",
                )
            self._validate(spec)
            spec = replace(spec, port=spec.port or pick_free_port(self._settings.host))
            rec = _Record(spec=spec)
            self._records[spec.instance_id] = rec
        with rec.op_lock:
            try:
                self._launch(rec)
            except DomainError as exc:
                self._set_failed(rec, str(exc), 0)
                raise
            return self.get(spec.instance_id)

    def wait_ready(self, instance_id: str, timeout_s: float) -> InstanceStatus:
        """Block until READY; FailedPrecondition if it is FAILED/STOPPED or still not READY."""
        deadline_s = self._clock.monotonic() + timeout_s
        while True:
            status = self.get(instance_id)
            if status.state == State.READY:
                return status
            if status.state in (State.FAILED, State.STOPPED):
                raise FailedPrecondition(
                    f"instance {instance_id} is {status.state} (exit code {status.exit_code}): "
                    f"{status.last_log[-2000:]}"
                )
            if self._clock.monotonic() >= deadline_s:
                raise FailedPrecondition(f"instance {instance_id} not READY within {timeout_s}s")
            self._try_tick(self._record(instance_id))
            self._sleep(min(self._settings.health_interval_s, 0.2))

    def stop(
        self, instance_id: str, *, force: bool = False, drain_timeout_s: float | None = None
    ) -> InstanceStatus:
        """Drain (unless force) then stop; idempotent on a stopped instance."""
        rec = self._record(instance_id)
        if drain_timeout_s is not None and not 0 <= drain_timeout_s <= 3600:
            raise InvalidArgument(
                f"drain_timeout_s={drain_timeout_s:g} is outside the allowed range [0, 3600] s",
                field="drain_timeout_s",
            )
        with self._lock:
            rec.wanted = False
            rec.epoch += 1
            rec.cancel.set()  # interrupts a restart or a reconfigure waiting for READY
            rec.rollback_spec = None  # a stop ends a reconfigure in flight
        with rec.op_lock:
            if rec.process is not None and rec.state != State.STOPPED:
                self._drain_and_stop(rec, force=force, drain_timeout_s=drain_timeout_s)
            with self._lock:
                rec.state = State.STOPPED
            self._write_journal()
        log.info("instance_stopped", instance_id=instance_id, force=force)
        return self.get(instance_id)

    def reconfigure(self, instance_id: str, new_spec: InstanceSpec) -> ReconfigureResult:
        """drain -> stop -> start(new) -> READY, timing each step; on failure roll back to the
        old spec (its result and the new spec's error are both reported)."""
        rec = self._record(instance_id)
        if new_spec.instance_id != instance_id:
            raise InvalidArgument(
                f"new_spec.instance_id={new_spec.instance_id!r} must be {instance_id!r}",
                field="new_spec.instance_id",
            )
        with self._lock:
            if rec.state not in _ACTIVE:
                raise FailedPrecondition(f"instance {instance_id} is {rec.state}; start it")
            new_spec = replace(new_spec, port=new_spec.port or rec.spec.port)
            self._validate(new_spec)
            rec.epoch += 1  # a pending crash restart must not start the old spec afterwards
            rec.cancel.set()
        with rec.op_lock:
            rec.cancel.clear()
            old_spec = rec.spec
            self._set_rollback(rec, old_spec)  # journaled: a restarted agent can still roll back
            try:
                return self._replace_engine(rec, old_spec, new_spec)
            finally:
                if not self._closing.is_set():  # an agent going away leaves it to the next one
                    self._set_rollback(rec, None)

    def _replace_engine(
        self, rec: _Record, old_spec: InstanceSpec, new_spec: InstanceSpec
    ) -> ReconfigureResult:
        """reconfigure()'s steps. Caller holds rec.op_lock."""
        instance_id = rec.spec.instance_id
        steps: list[tuple[str, float]] = []
        drain_s, stop_s = self._drain_and_stop(rec, force=False, drain_timeout_s=None)
        steps += [("drain", drain_s), ("stop", stop_s)]
        try:
            self._start_and_wait(rec, new_spec, steps)
        except _Cancelled:
            raise _stopped_meanwhile(instance_id) from None
        except (EngineStartError, DomainError) as exc:
            log.warning("reconfigure_failed", instance_id=instance_id, error=str(exc))
            return self._roll_back(rec, old_spec, steps, exc)
        log.info("instance_reconfigured", instance_id=instance_id, steps=steps)
        return ReconfigureResult(self.get(instance_id), False, tuple(steps), "reconfigured")

    # ------------------------------------------------------- recovery, monitor

    def recover(self) -> tuple[list[str], list[str]]:
        """Re-adopt the journaled engines that still run; relaunch those that are gone; finish
        (in the background) the reconfigures a crashed agent left midway.
        Returns (adopted ids, relaunched ids)."""
        entries = read_json(self._journal_path) or {}
        adopted, relaunched, reconfiguring = [], [], []
        for iid, entry in sorted(entries.items()):
            spec = spec_from_json(entry["spec"])
            command = tuple(entry["command"])
            rollback = entry.get("rollback_spec")
            rec = _Record(
                spec=spec,
                command=command,
                restarts=int(entry.get("restarts", 0)),
                rollback_spec=spec_from_json(rollback) if rollback else None,
            )
            proc = self._runner.adopt(int(entry["pid"]), float(entry["create_time"]), command)
            with self._lock:
                self._records[iid] = rec
            if proc is not None:
                rec.process = proc
                rec.started_at_unix_s = float(entry.get("started_at_unix_s", 0.0))
                adopted.append(iid)
                log.info("instance_adopted", instance_id=iid, pid=proc.pid)
            else:
                with rec.op_lock:
                    try:
                        self._launch(rec)
                        relaunched.append(iid)
                        log.warning("instance_relaunched", instance_id=iid, old_pid=entry["pid"])
                    except DomainError as exc:
                        self._set_failed(rec, str(exc), 0)
            if rec.rollback_spec is not None and rec.state in _ACTIVE:
                rec.restarting = True  # the finishing thread owns it: the monitor leaves it alone
                reconfiguring.append(rec)
        self._write_journal()
        for rec in reconfiguring:
            threading.Thread(
                target=self._finish_reconfigure,
                args=(rec,),
                name=f"reconfigure-{rec.spec.instance_id}",
                daemon=True,
            ).start()
        return adopted, relaunched

    def start_monitor(self) -> None:
        self._monitor = threading.Thread(target=self._monitor_loop, name="engines", daemon=True)
        self._monitor.start()

    def close(self, *, stop_instances: bool = False) -> None:
        """Stop the monitor; engines keep running (re-adopted later) unless stop_instances."""
        self._closing.set()
        if stop_instances:
            for status in self.list():
                if status.state in _ACTIVE:
                    self.stop(status.spec.instance_id)
        with self._lock:
            for rec in self._records.values():
                rec.cancel.set()
        if self._monitor is not None:
            self._monitor.join(timeout=10)

    def tick(self) -> None:
        """One monitoring pass: rotate logs, notice exits, mark READY, scrape metrics."""
        with self._lock:
            records = list(self._records.values())
        for rec in records:
            rotate_log(
                self._log_path(rec.spec.instance_id),
                max_bytes=self._settings.log_max_bytes,
                backups=self._settings.log_backups,
            )
            self._try_tick(rec)

    def _try_tick(self, rec: _Record) -> None:
        if rec.op_lock.acquire(blocking=False):  # a busy record is watched by its operation
            try:
                self._tick_one(rec)
            finally:
                rec.op_lock.release()

    # ----------------------------------------------------------------- internals

    @property
    def _journal_path(self) -> Path:
        return self._settings.state_dir / JOURNAL_FILE

    def _log_path(self, instance_id: str) -> Path:
        return self._settings.log_dir / f"{instance_id}.log"

    def _record(self, instance_id: str) -> _Record:
        with self._lock:
            rec = self._records.get(instance_id)
        if rec is None:
            raise NotFound(f"instance_id={instance_id!r} is not known", field="instance_id")
        return rec

    def _status(self, rec: _Record) -> InstanceStatus:
        return InstanceStatus(
            spec=rec.spec, state=rec.state, pid=rec.process.pid if rec.process else 0,
            exit_code=rec.exit_code, last_log=rec.last_log, restarts=rec.restarts,
            metrics=rec.metrics, routable=rec.routable,
            started_at_unix_s=rec.started_at_unix_s, ready_at_unix_s=rec.ready_at_unix_s,
            command=rec.command,
        )  # fmt: skip

    def _validate(self, spec: InstanceSpec) -> None:
        """Raise before anything starts. Caller holds _lock."""
        others = [
            r for iid, r in self._records.items()
            if iid != spec.instance_id and r.state in _ACTIVE
        ]  # fmt: skip
        ports = {r.spec.port for r in others}
        own = self._records.get(spec.instance_id)
        own_port = own.spec.port if own is not None and own.state in _ACTIVE else None
        # Probe only a port in range: bind() raises OverflowError beyond 65535 (found by
        # bench/fuzz.py); validate_spec then reports the range.
        probe = bool(spec.port) and spec.port != own_port and 1024 <= spec.port <= 65535
        if probe and not port_is_free(self._settings.host, spec.port):
            ports.add(spec.port)
        validate_spec(
            spec, inventory=self._inventory(),
            devices_in_use={d for r in others for d in r.spec.devices}, ports_in_use=ports,
            allowed_extra_flags=self._settings.allowed_extra_flags,
        )  # fmt: skip

    def _launch(self, rec: _Record) -> None:
        """Start the engine process for rec.spec. Caller holds rec.op_lock."""
        s = self._settings
        command = tuple(
            build_command(
                rec.spec,
                launcher=s.launcher,
                port=rec.spec.port,
                host=s.host,
                shutdown_timeout_s=s.shutdown_timeout_s,
            )
        )
        proc = self._runner.launch(
            command, build_env(rec.spec, s.base_env), self._log_path(rec.spec.instance_id)
        )
        with self._lock:
            rec.process, rec.command, rec.state, rec.routable = proc, command, State.STARTING, False
            rec.exit_code, rec.last_log, rec.sample = 0, "", None
            rec.metrics = EngineMetrics()
            rec.started_at_unix_s, rec.ready_at_unix_s = self._clock.time(), 0.0
        self._write_journal()
        log.info(
            "instance_launched",
            instance_id=rec.spec.instance_id,
            pid=proc.pid,
            command=list(command),
        )

    def _await_ready(self, rec: _Record) -> None:
        """Block until /health answers 200. Caller holds rec.op_lock."""
        assert rec.process is not None
        deadline_s = self._clock.monotonic() + self._settings.ready_timeout_s
        while True:
            code = rec.process.exit_code()
            if code is not None:
                raise EngineStartError(f"engine exited with code {code} before READY", code)
            if self._runner.health_ok(self._settings.host, rec.spec.port):
                self._mark_ready(rec)
                return
            if rec.cancel.is_set():
                raise _Cancelled()
            if self._clock.monotonic() >= deadline_s:
                raise EngineStartError(
                    f"engine not READY within ready_timeout_s={self._settings.ready_timeout_s:g}"
                )
            self._sleep(min(self._settings.health_interval_s, 0.5))

    def _start_and_wait(self, rec: _Record, spec: InstanceSpec, steps: list) -> None:
        with self._lock:
            rec.spec = spec
        t0 = self._clock.monotonic()
        self._launch(rec)
        t1 = self._clock.monotonic()
        steps.append(("start", t1 - t0))
        self._await_ready(rec)  # _Cancelled when a stop came in: the stop takes over
        steps.append(("ready", self._clock.monotonic() - t1))

    def _finish_reconfigure(self, rec: _Record) -> None:
        """A reconfigure a crashed agent left midway: the journaled engine must become READY,
        else the old spec runs again, as reconfigure() would have done."""
        iid = rec.spec.instance_id
        try:
            with rec.op_lock:
                old_spec = rec.rollback_spec
                if old_spec is None or rec.state not in _ACTIVE:
                    return  # a stop came first
                try:
                    self._await_ready(rec)
                except _Cancelled:
                    return  # a stop takes over, or the agent closes (the journal keeps old_spec)
                except EngineStartError as exc:
                    log.warning("reconfigure_failed", instance_id=iid, error=str(exc))
                    self._roll_back(rec, old_spec, [], exc)
                    log.warning("reconfigure_rolled_back", instance_id=iid)
                    return
                self._set_rollback(rec, None)
                log.info("reconfigure_completed", instance_id=iid)
        except DomainError as exc:  # the rollback failed (FAILED, logged) or a stop came
            log.error("reconfigure_not_finished", instance_id=iid, error=str(exc))
        finally:
            with self._lock:
                rec.restarting = False

    def _set_rollback(self, rec: _Record, spec: InstanceSpec | None) -> None:
        with self._lock:
            rec.rollback_spec = spec
        self._write_journal()

    def _roll_back(
        self, rec: _Record, old_spec: InstanceSpec, steps: list, error: Exception
    ) -> ReconfigureResult:
        with self._lock:
            rec.rollback_spec = None  # the rollback is the fallback: journaled as a plain start
        if rec.process is not None and rec.process.exit_code() is None:
            self._drain_and_stop(rec, force=True, drain_timeout_s=0)
        tail = tail_lines(self._log_path(rec.spec.instance_id), 5)
        reason = f"new spec failed: {error}; last log:\n{tail}"
        try:
            self._start_and_wait(rec, old_spec, steps)
        except _Cancelled:
            raise _stopped_meanwhile(rec.spec.instance_id) from None
        except (EngineStartError, DomainError) as exc:
            if rec.process is not None:
                self._terminate(rec.process, force=True)  # e.g. alive but never READY
            self._set_failed(rec, f"{reason}\nrollback failed too: {exc}", 0)
            raise Internal(
                f"reconfigure of {rec.spec.instance_id} failed: {error}; "
                f"rollback to the old spec failed too: {exc}"
            ) from exc
        return ReconfigureResult(
            self.get(rec.spec.instance_id),
            True,
            tuple(steps),
            f"{reason}\nrolled back to the old spec",
        )

    def _mark_ready(self, rec: _Record) -> None:
        with self._lock:
            rec.state, rec.routable = State.READY, True
            rec.ready_at_unix_s = self._clock.time()
        log.info(
            "instance_ready",
            instance_id=rec.spec.instance_id,
            pid=rec.process.pid if rec.process else 0,
        )

    def _queue_len(self, rec: _Record) -> float | None:
        """running + waiting from a fresh scrape; 0 when the engine is gone, None if unknown."""
        if rec.process is None or rec.process.exit_code() is not None:
            return 0
        try:
            self._scrape(rec)
        except (OSError, ValueError):
            return None
        return rec.metrics.requests_running + rec.metrics.requests_waiting

    def _drain_and_stop(
        self, rec: _Record, *, force: bool, drain_timeout_s: float | None
    ) -> tuple[float, float]:
        """Returns (drain seconds, stop seconds). Caller holds rec.op_lock."""
        assert rec.process is not None
        timeout_s = rec.spec.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        t0 = self._clock.monotonic()
        with self._lock:
            rec.routable = False
            rec.state = State.DRAINING
        idle = force or wait_until_idle(
            lambda: self._queue_len(rec), timeout_s=timeout_s, clock=self._clock,
            sleep=self._sleep, poll_s=min(self._settings.health_interval_s, 0.5),
        )  # fmt: skip
        if not idle:
            log.warning(
                "drain_deadline_passed",
                instance_id=rec.spec.instance_id,
                drain_timeout_s=timeout_s,
                queue=self._queue_len(rec),
            )
        t1 = self._clock.monotonic()
        code = self._terminate(rec.process, force=force)
        with self._lock:
            rec.state, rec.exit_code = State.STOPPED, code
            rec.last_log = tail_lines(
                self._log_path(rec.spec.instance_id), self._settings.log_tail_lines
            )
        return t1 - t0, self._clock.monotonic() - t1

    def _terminate(self, proc: EngineProcess, *, force: bool) -> int:
        """SIGTERM the main process (vLLM finishes in-flight work within --shutdown-timeout),
        SIGKILL the group after the grace period; then SIGKILL the group anyway, so no worker
        process outlives its engine."""
        s = self._settings
        try:
            code = proc.exit_code()
            if code is None and not force:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(s.shutdown_timeout_s + s.kill_grace_s)
            if code is None:
                log.warning("engine_killed", pid=proc.pid, force=force)
                proc.signal_group(signal.SIGKILL)
                code = proc.wait(s.kill_grace_s)
            if code is None:
                raise Internal(f"engine pid {proc.pid} did not exit after SIGKILL")
            return code
        finally:
            proc.signal_group(signal.SIGKILL)

    def _set_failed(self, rec: _Record, reason: str, exit_code: int) -> None:
        with self._lock:
            rec.state, rec.routable, rec.exit_code = State.FAILED, False, exit_code
            rec.last_log = (
                reason
                + "\n"
                + tail_lines(self._log_path(rec.spec.instance_id), self._settings.log_tail_lines)
            )
        self._write_journal()
        log.error(
            "instance_failed", instance_id=rec.spec.instance_id, reason=reason, exit_code=exit_code
        )

    def _write_journal(self) -> None:
        """Journal every active instance with a process (what recover() needs)."""
        with self._lock:
            entries = {
                iid: {
                    "spec": spec_to_json(r.spec), "command": list(r.command),
                    "pid": r.process.pid, "create_time": r.process.create_time,
                    "restarts": r.restarts, "started_at_unix_s": r.started_at_unix_s,
                    "rollback_spec": spec_to_json(r.rollback_spec) if r.rollback_spec else None,
                }
                for iid, r in self._records.items()
                if r.state in _ACTIVE and r.process is not None
            }  # fmt: skip
            write_json(self._journal_path, entries)

    def _monitor_loop(self) -> None:
        while not self._closing.wait(self._settings.health_interval_s):
            try:
                self.tick()
                if self._on_tick is not None:
                    self._on_tick(self.engine_loads())
            except Exception:  # the monitor must survive one bad pass; the error is logged
                log.exception("engine_monitor_failed")

    def _tick_one(self, rec: _Record) -> None:
        if rec.state not in (State.STARTING, State.READY) or rec.process is None or rec.restarting:
            return
        code = rec.process.exit_code()
        if code is not None:
            self._on_unexpected_exit(rec, code)
        elif rec.state == State.STARTING:
            if self._runner.health_ok(self._settings.host, rec.spec.port):
                self._mark_ready(rec)
        else:
            try:
                self._scrape(rec)
            except (OSError, ValueError) as exc:
                log.warning("scrape_failed", instance_id=rec.spec.instance_id, error=str(exc))

    def _scrape(self, rec: _Record) -> None:
        text = self._runner.fetch_metrics(self._settings.host, rec.spec.port)
        sample = parse_metrics(text)
        now_s = self._clock.monotonic()
        with self._lock:
            rec.metrics = update_metrics(rec.metrics, rec.sample, sample, now_s - rec.sampled_at_s)
            rec.sample, rec.sampled_at_s = sample, now_s

    def _on_unexpected_exit(self, rec: _Record, code: int) -> None:
        assert rec.process is not None
        rec.process.signal_group(signal.SIGKILL)  # the dead engine's workers must not linger
        tail = tail_lines(self._log_path(rec.spec.instance_id), self._settings.log_tail_lines)
        s = self._settings
        with self._lock:
            rec.exit_code, rec.last_log, rec.routable = code, tail, False
            ran_s = self._clock.time() - rec.ready_at_unix_s
            if rec.ready_at_unix_s and ran_s >= s.stable_after_s:
                rec.crash_streak = 0
        log.warning(
            "instance_exited",
            instance_id=rec.spec.instance_id,
            exit_code=code,
            crash_streak=rec.crash_streak,
        )
        if rec.crash_streak >= s.max_restarts:
            self._set_failed(
                rec,
                f"gave up after {s.max_restarts} restarts: engine exited with code {code}",
                code,
            )
            return
        with self._lock:
            rec.state, rec.restarting = State.STARTING, True
            rec.cancel.clear()
        threading.Thread(
            target=self._restart_with_backoff,
            args=(rec, rec.epoch),
            name=f"restart-{rec.spec.instance_id}",
            daemon=True,
        ).start()

    def _restart_with_backoff(self, rec: _Record, epoch: int) -> None:
        """Restart number n of a streak waits restart_backoff_s * 2**n (capped); tenacity
        retries engines that exit before READY, up to the streak limit."""
        s = self._settings
        streak = rec.crash_streak
        retrying = Retrying(
            stop=stop_after_attempt(s.max_restarts - streak),
            wait=wait_exponential(
                multiplier=s.restart_backoff_s * 2 ** (streak + 1), max=s.restart_backoff_max_s
            ),
            retry=retry_if_exception_type(EngineStartError),
            sleep=lambda seconds: self._backoff_sleep(rec, seconds),
            reraise=True,
        )
        try:
            self._backoff_sleep(rec, min(s.restart_backoff_s * 2**streak, s.restart_backoff_max_s))
            for attempt in retrying:
                with attempt:
                    self._restart_once(rec, epoch)
        except _Cancelled:
            pass
        except (EngineStartError, DomainError) as exc:
            with rec.op_lock:
                if rec.process is not None:
                    self._terminate(rec.process, force=True)
                code = exc.exit_code if isinstance(exc, EngineStartError) else 0
                self._set_failed(rec, f"gave up after {s.max_restarts} restarts: {exc}", code)
        finally:
            with self._lock:
                rec.restarting = False

    def _restart_once(self, rec: _Record, epoch: int) -> None:
        with rec.op_lock:
            if not rec.wanted or rec.epoch != epoch or self._closing.is_set():
                raise _Cancelled()
            with self._lock:
                rec.restarts += 1
                rec.crash_streak += 1
            self._launch(rec)
            try:
                self._await_ready(rec)
            except EngineStartError:
                assert rec.process is not None
                self._terminate(rec.process, force=True)  # a hung start must not linger
                raise

    def _backoff_sleep(self, rec: _Record, seconds: float) -> None:
        if rec.cancel.wait(seconds):
            raise _Cancelled()


def _stopped_meanwhile(instance_id: str) -> FailedPrecondition:
    return FailedPrecondition(f"instance {instance_id} was stopped during the reconfigure")


def _gpus_of(spec: InstanceSpec, inventory: DeviceInventory) -> list[int]:
    gpus = []
    for device in spec.devices:
        try:
            gpus.append(inventory.gpu_of(device))
        except NotFound:
            continue  # a MIG device removed under a running instance: nothing to attribute
    return sorted(set(gpus))


def _add_load(load: EngineLoad | None, rec: _Record, n_gpus: int) -> EngineLoad:
    m = rec.metrics
    load = load or EngineLoad()
    return EngineLoad(
        requests_running=load.requests_running + m.requests_running,
        requests_waiting=load.requests_waiting + m.requests_waiting,
        max_num_seqs=load.max_num_seqs + rec.spec.effective_max_num_seqs,
        kv_cache_usage_frac=max(load.kv_cache_usage_frac, m.kv_cache_usage_frac),
        generation_tokens_per_s=load.generation_tokens_per_s + m.generation_tokens_per_s / n_gpus,
        prompt_tokens_per_s=load.prompt_tokens_per_s + m.prompt_tokens_per_s / n_gpus,
    )
