"""What keeps the engines running without being asked: the monitor pass (log rotation, exits,
READY, metrics), crash restarts with exponential backoff (tenacity), and recovery after an agent
restart (re-adopt, relaunch on re-resolved MIG devices, finish a reconfigure left midway).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import structlog
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from nodeagent.engines.journal import read_json, spec_from_json
from nodeagent.engines.lifecycle import (
    ACTIVE,
    Cancelled,
    EngineCore,
    EngineStartError,
    MigSlice,
    ReconfigureResult,
    Record,
    State,
    engine_tree,
    kill_tree,
)
from nodeagent.engines.runner import rotate_log, run_concurrently, tail_lines
from nodeagent.engines.spec import InstanceSpec
from nodeagent.engines.types import EngineLoad
from shapeshifter.common.errors import DomainError, FailedPrecondition, Internal

# Lazy: takes the logging configuration in force at first use, not at import.
log = structlog.get_logger(component="engines")


def stopped_meanwhile(instance_id: str) -> FailedPrecondition:
    return FailedPrecondition(f"instance {instance_id} was stopped during the reconfigure")


def set_rollback(core: EngineCore, rec: Record, spec: InstanceSpec | None) -> None:
    with core.lock:
        rec.rollback_spec = spec
    core.write_journal()


def roll_back(
    core: EngineCore, rec: Record, old_spec: InstanceSpec, steps: list, error: Exception
) -> ReconfigureResult:
    """Start old_spec again after a failed reconfigure. Caller holds rec.op_lock."""
    with core.lock:
        rec.rollback_spec = None  # the rollback is the fallback: journaled as a plain start
    if rec.process is not None and rec.process.exit_code() is None:
        core.drain_and_stop(rec, force=True, drain_timeout_s=0)
    tail = tail_lines(core.log_path(rec.spec.instance_id), 5)
    reason = f"new spec failed: {error}; last log:\n{tail}"
    try:
        core.start_and_wait(rec, old_spec, steps)
    except Cancelled:
        raise stopped_meanwhile(rec.spec.instance_id) from None
    except (EngineStartError, DomainError) as exc:
        if rec.process is not None:
            core.terminate(rec, force=True, confirm_release=False)  # e.g. alive, never READY
        core.set_failed(rec, f"{reason}\nrollback failed too: {exc}", 0)
        raise Internal(
            f"reconfigure of {rec.spec.instance_id} failed: {error}; "
            f"rollback to the old spec failed too: {exc}"
        ) from exc
    return ReconfigureResult(
        core.status(rec), True, tuple(steps), f"{reason}\nrolled back to the old spec"
    )


def resolve_mig_devices(
    spec: InstanceSpec, journaled: Mapping[str, MigSlice], current: Mapping[str, MigSlice]
) -> InstanceSpec:
    """spec with each MIG UUID that no longer exists (a reboot recreates MIG devices under new
    UUIDs) replaced by the current device at the same GPU, profile and placement;
    FailedPrecondition when there is none or the journal does not say where it was."""
    devices = []
    for device in spec.devices:
        if not device.startswith("MIG-") or device in current:
            devices.append(device)
            continue
        where = journaled.get(device)
        if where is None:
            raise FailedPrecondition(
                f"devices: MIG device {device} no longer exists and the journal does not "
                "record its GPU, profile and placement; not relaunched", field="devices",
            )  # fmt: skip
        same = sorted(uuid for uuid, s in current.items() if s == where)
        if not same:
            raise FailedPrecondition(
                f"devices: MIG device {device} (GPU {where.gpu_index}, {where.profile} at "
                f"placement {where.placement_start}) no longer exists and no MIG device with "
                "that GPU, profile and placement does; not relaunched", field="devices",
            )  # fmt: skip
        log.warning("mig_device_reresolved", old=device, new=same[0], gpu_index=where.gpu_index)
        devices.append(same[0])
    return replace(spec, devices=tuple(devices))


class Supervisor:
    def __init__(
        self,
        core: EngineCore,
        engine_loads: Callable[[], dict[int, EngineLoad]],
        on_tick: Callable[[dict[int, EngineLoad]], None] | None,
    ) -> None:
        self._core = core
        self._engine_loads = engine_loads
        self._on_tick = on_tick
        self._monitor: threading.Thread | None = None

    # ------------------------------------------------------------------ monitor

    def start_monitor(self) -> None:
        self._monitor = threading.Thread(target=self._monitor_loop, name="engines", daemon=True)
        self._monitor.start()

    def join_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.join(timeout=10)

    def tick(self) -> None:
        """One monitoring pass: rotate logs, notice exits, mark READY, scrape metrics."""
        core = self._core
        with core.lock:
            records = list(core.records.values())

        def one(rec: Record) -> None:
            rotate_log(
                core.log_path(rec.spec.instance_id),
                max_bytes=core.settings.log_max_bytes,
                backups=core.settings.log_backups,
            )
            self.try_tick(rec)

        # Concurrently: a pass over N engines takes as long as the slowest scrape, not the sum
        # (each record's own op_lock keeps one operation on it at a time).
        run_concurrently(one, records)

    def try_tick(self, rec: Record) -> None:
        if rec.op_lock.acquire(blocking=False):  # a busy record is watched by its operation
            try:
                self._tick_one(rec)
            finally:
                rec.op_lock.release()

    def _monitor_loop(self) -> None:
        while not self._core.closing.wait(self._core.settings.health_interval_s):
            try:
                self.tick()
                if self._on_tick is not None:
                    self._on_tick(self._engine_loads())
            except Exception:  # the monitor must survive one bad pass; the error is logged
                log.exception("engine_monitor_failed")

    def _tick_one(self, rec: Record) -> None:
        if rec.state not in (State.STARTING, State.READY) or rec.process is None or rec.restarting:
            return
        code = rec.process.exit_code()
        if code is not None:
            self._on_unexpected_exit(rec, code)
        elif rec.state == State.STARTING:
            if self._core.runner.health_ok(self._core.settings.host, rec.spec.port):
                self._core.mark_ready(rec)
        else:
            try:
                self._core.scrape(rec)
            except (OSError, ValueError) as exc:
                log.warning("scrape_failed", instance_id=rec.spec.instance_id, error=str(exc))

    # ----------------------------------------------------------------- restarts

    def _on_unexpected_exit(self, rec: Record, code: int) -> None:
        core, s = self._core, self._core.settings
        assert rec.process is not None
        tree = engine_tree(rec.process.pid)  # the dead engine's workers must not linger
        rec.process.signal_group(signal.SIGKILL)
        kill_tree(tree)
        tail = tail_lines(core.log_path(rec.spec.instance_id), s.log_tail_lines)
        with core.lock:
            rec.exit_code, rec.last_log, rec.routable = code, tail, False
            rec.unreleased_pids |= {p.pid for p in tree} | {rec.process.pid}  # launch waits
            ran_s = core.clock.time() - rec.ready_at_unix_s
            if rec.ready_at_unix_s and ran_s >= s.stable_after_s:
                rec.crash_streak = 0
        log.warning("instance_exited", instance_id=rec.spec.instance_id, exit_code=code,
                    crash_streak=rec.crash_streak)  # fmt: skip
        if rec.crash_streak >= s.max_restarts:
            core.set_failed(
                rec, f"gave up after {s.max_restarts} restarts: engine exited with code {code}",
                code,
            )  # fmt: skip
            return
        with core.lock:
            rec.state, rec.restarting = State.STARTING, True
            rec.cancel.clear()
        threading.Thread(
            target=self._restart_with_backoff, args=(rec, rec.epoch),
            name=f"restart-{rec.spec.instance_id}", daemon=True,
        ).start()  # fmt: skip

    def _restart_with_backoff(self, rec: Record, epoch: int) -> None:
        """Restart number n of a streak waits restart_backoff_s * 2**n (capped); tenacity
        retries engines that exit before READY, up to the streak limit."""
        s = self._core.settings
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
        except Cancelled:
            pass
        except (EngineStartError, DomainError) as exc:
            with rec.op_lock:
                if rec.process is not None:
                    self._core.terminate(rec, force=True, confirm_release=False)
                code = exc.exit_code if isinstance(exc, EngineStartError) else 0
                self._core.set_failed(rec, f"gave up after {s.max_restarts} restarts: {exc}", code)
        finally:
            with self._core.lock:
                rec.restarting = False

    def _restart_once(self, rec: Record, epoch: int) -> None:
        core = self._core
        with rec.op_lock:
            if not rec.wanted or rec.epoch != epoch or core.closing.is_set():
                raise Cancelled()
            with core.lock:
                rec.restarts += 1
                rec.crash_streak += 1
            core.launch(rec)  # DeviceTimeout while the GPUs still hold the crashed engine
            try:
                core.await_ready(rec)
            except EngineStartError:
                core.terminate(rec, force=True, confirm_release=False)  # no hung start lingers
                raise

    def _backoff_sleep(self, rec: Record, seconds: float) -> None:
        if rec.cancel.wait(seconds):
            raise Cancelled()

    # ----------------------------------------------------------------- recovery

    def recover(self) -> tuple[list[str], list[str]]:
        """Re-adopt the journaled engines that still run; relaunch those that are gone (on
        their MIG devices re-resolved by GPU, profile and placement); finish (in the
        background) the reconfigures a crashed agent left midway.
        Returns (adopted ids, relaunched ids)."""
        core = self._core
        entries = read_json(core.journal_path) or {}
        adopted, relaunched, reconfiguring = [], [], []
        for iid, entry in sorted(entries.items()):
            rec = _record_from_entry(entry)
            proc = core.runner.adopt(int(entry["pid"]), float(entry["create_time"]), rec.command)
            with core.lock:
                core.records[iid] = rec
            self._adopt_standby(rec, entry.get("standby"))
            if proc is not None:
                rec.process = proc
                rec.started_at_unix_s = float(entry.get("started_at_unix_s", 0.0))
                adopted.append(iid)
                log.info("instance_adopted", instance_id=iid, pid=proc.pid)
            elif self._relaunch(rec):
                relaunched.append(iid)
                log.warning("instance_relaunched", instance_id=iid, old_pid=entry["pid"])
            if rec.rollback_spec is not None and rec.state in ACTIVE:
                rec.restarting = True  # the finishing thread owns it: the monitor leaves it alone
                reconfiguring.append(rec)
        core.write_journal()
        for rec in reconfiguring:
            threading.Thread(
                target=self._finish_reconfigure, args=(rec,),
                name=f"reconfigure-{rec.spec.instance_id}", daemon=True,
            ).start()  # fmt: skip
        return adopted, relaunched

    def _relaunch(self, rec: Record) -> bool:
        """Launch a journaled engine that is gone; FAILED (with the reason) when it cannot."""
        core = self._core
        with rec.op_lock:
            try:
                if rec.spec.uses_mig:
                    rec.spec = resolve_mig_devices(rec.spec, rec.mig_slices, core.mig_slices())
                core.launch(rec)
            except DomainError as exc:
                core.set_failed(rec, str(exc), 0)
                return False
        return True

    def _adopt_standby(self, rec: Record, entry: dict[str, Any] | None) -> None:
        """A sleeping standby survives an agent restart; one that is gone is forgotten."""
        if entry is None:
            return
        standby = Record(spec=spec_from_json(entry["spec"]), command=tuple(entry["command"]))
        proc = self._core.runner.adopt(int(entry["pid"]), float(entry["create_time"]),
                                       standby.command)
        if proc is None:
            log.warning("standby_gone", instance_id=rec.spec.instance_id, old_pid=entry["pid"])
            return
        standby.process, standby.state = proc, State.READY
        rec.standby = standby

    def _finish_reconfigure(self, rec: Record) -> None:
        """A reconfigure a crashed agent left midway: the journaled engine must become READY,
        else the old spec runs again, as reconfigure() would have done."""
        core, iid = self._core, rec.spec.instance_id
        try:
            with rec.op_lock:
                old_spec = rec.rollback_spec
                if old_spec is None or rec.state not in ACTIVE:
                    return  # a stop came first
                try:
                    core.await_ready(rec)
                except Cancelled:
                    return  # a stop takes over, or the agent closes (the journal keeps old_spec)
                except EngineStartError as exc:
                    log.warning("reconfigure_failed", instance_id=iid, error=str(exc))
                    roll_back(core, rec, old_spec, [], exc)
                    log.warning("reconfigure_rolled_back", instance_id=iid)
                    return
                set_rollback(core, rec, None)
                log.info("reconfigure_completed", instance_id=iid)
        except DomainError as exc:  # the rollback failed (FAILED, logged) or a stop came
            log.error("reconfigure_not_finished", instance_id=iid, error=str(exc))
        finally:
            with core.lock:
                rec.restarting = False


def _record_from_entry(entry: dict[str, Any]) -> Record:
    rollback = entry.get("rollback_spec")
    return Record(
        spec=spec_from_json(entry["spec"]),
        command=tuple(entry["command"]),
        restarts=int(entry.get("restarts", 0)),
        rollback_spec=spec_from_json(rollback) if rollback else None,
        mig_slices={u: MigSlice(**s) for u, s in entry.get("mig_slices", {}).items()},
    )
