"""InstanceManager: the lifecycle of the vLLM instances on this node.

States: STARTING -> READY (GET /health answered 200) -> DRAINING -> STOPPED; FAILED with the exit
code and the log's last lines. Every stop drains (not routable, wait until running+waiting is
zero or the drain deadline, SIGTERM, SIGKILL after the grace period) unless forced, kills the
engine's whole process tree, and waits until the GPUs no longer list any of its processes (a
timeout is an error: no engine starts on memory still held). A crashed engine is restarted with
exponential backoff (tenacity) up to a limit, then FAILED. Running engines are recorded in a
journal in the state dir and re-adopted (pid + create time + command line) when the agent
restarts, never killed nor started twice; one that is gone is relaunched on its MIG devices
re-resolved by GPU, profile and placement (a reboot renames them). A reconfigure journals the
old spec beside the new engine, so after an agent crash the new engine is awaited and, if it
never becomes READY, the old spec is started again (completed or rolled back, never lost).

Sleep mode: prestage() starts a standby engine for an instance's next spec on the same shape
(devices, TP, quantization) with vLLM's --enable-sleep-mode and puts it to sleep (POST
/sleep?level=1: weights offloaded to CPU RAM, KV cache dropped); a reconfigure to exactly that
spec stops the old engine and wakes the standby (POST /wake_up) instead of a cold start. The
instance then serves on the standby's port. Both engines must fit the GPUs while the standby
starts (e.g. each at gpu_memory_utilization <= 0.45).

Threads: gRPC handlers call start/stop/reconfigure; a monitor thread calls tick(); restarts run
on their own thread. The core's `lock` guards the table and each record's fields; a record's
`op_lock` serializes the operations that change its process.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import replace

import structlog

from nodeagent.engines.lifecycle import (
    ACTIVE,
    JOURNAL_FILE,
    Cancelled,
    EngineCore,
    EngineSettings,
    EngineStartError,
    InstanceStatus,
    MigSlice,
    ReconfigureResult,
    Record,
    State,
    gpus_of,
    wait_until_idle,
)
from nodeagent.engines.runner import EngineRunner, engine_url, pick_free_port
from nodeagent.engines.spec import DeviceInventory, InstanceSpec
from nodeagent.engines.supervisor import (
    Supervisor,
    roll_back,
    set_rollback,
    stopped_meanwhile,
)
from nodeagent.engines.types import EngineLoad
from shapeshifter.common.clock import Clock, SystemClock
from shapeshifter.common.errors import DomainError, FailedPrecondition, InvalidArgument

__all__ = [
    "JOURNAL_FILE", "EngineSettings", "EngineStartError", "InstanceManager", "InstanceStatus",
    "MigSlice", "ReconfigureResult", "State", "wait_until_idle",
]  # fmt: skip

# Lazy: takes the logging configuration in force at first use, not at import.
log = structlog.get_logger(component="engines")

SLEEP_LEVEL = 1  # weights kept in CPU RAM: a wake is a copy back, not a reload


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
        compute_pids: Callable[[int], frozenset[int]] | None = None,
        mig_slices: Callable[[], Mapping[str, MigSlice]] = dict,
    ) -> None:
        """on_tick: called with engine_loads() after each monitor pass (the sim backend's load
        follows the engines through it). compute_pids: the pids holding a compute context on a
        GPU (or its MIG devices); None skips the release check. mig_slices: each current MIG
        device's GPU, profile and placement, by UUID."""
        self._core = EngineCore(settings, runner, inventory, clock=clock or SystemClock(),
                                sleep=sleep, compute_pids=compute_pids, mig_slices=mig_slices)
        self._supervisor = Supervisor(self._core, self.engine_loads, on_tick)

    # ------------------------------------------------------------------ queries

    def list(self) -> list[InstanceStatus]:
        with self._core.lock:
            return [self._core.status(r) for _, r in sorted(self._core.records.items())]

    def get(self, instance_id: str) -> InstanceStatus:
        rec = self._core.record(instance_id)
        with self._core.lock:
            return self._core.status(rec)

    def standby(self, instance_id: str) -> InstanceStatus | None:
        """The instance's pre-staged sleeping engine, None when there is none."""
        rec = self._core.record(instance_id)
        with self._core.lock:
            return self._core.status(rec.standby) if rec.standby is not None else None

    def busy_instances(self, gpu_index: int) -> list[str]:
        """Ids of the active instances using a GPU (or one of its MIG devices)."""
        inventory = self._core.inventory()
        with self._core.lock:
            return sorted(
                iid for iid, r in self._core.records.items()
                if r.state in ACTIVE and gpu_index in gpus_of(r.spec, inventory)
            )  # fmt: skip

    def engine_loads(self) -> dict[int, EngineLoad]:
        """Per-GPU load of READY/DRAINING instances, for the budgets.

        A TP instance loads each of its GPUs with all its running requests (every GPU works on
        every request) and an equal share of its token rates; MIG instances on one GPU add up;
        the KV fraction is the fullest instance's.
        """
        inventory = self._core.inventory()
        loads: dict[int, EngineLoad] = {}
        with self._core.lock:
            for rec in self._core.records.values():
                if rec.state not in (State.READY, State.DRAINING):
                    continue
                gpus = gpus_of(rec.spec, inventory)
                for gpu in gpus:
                    loads[gpu] = add_load(loads.get(gpu), rec, len(gpus))
        return loads

    # --------------------------------------------------------------- operations

    def start(self, spec: InstanceSpec) -> InstanceStatus:
        """Validate and launch; returns STARTING (the monitor marks READY on /health 200)."""
        core = self._core
        with core.lock:
            old = core.records.get(spec.instance_id)
            if old is not None and old.state in ACTIVE:
                raise FailedPrecondition(
                    f"instance_id={spec.instance_id!r} is already {old.state}; stop it or "
                    "reconfigure it",
                    field="instance_id",
                )
            core.validate(spec)
            spec = replace(spec, port=spec.port or pick_free_port(core.settings.host))
            rec = Record(spec=spec, unreleased_pids=old.unreleased_pids if old else frozenset())
            core.records[spec.instance_id] = rec
        with rec.op_lock:
            try:
                core.launch(rec)
            except DomainError as exc:
                core.set_failed(rec, str(exc), 0)
                raise
            return self.get(spec.instance_id)

    def wait_ready(self, instance_id: str, timeout_s: float) -> InstanceStatus:
        """Block until READY; FailedPrecondition if it is FAILED/STOPPED or still not READY."""
        core = self._core
        deadline_s = core.clock.monotonic() + timeout_s
        while True:
            status = self.get(instance_id)
            if status.state == State.READY:
                return status
            if status.state in (State.FAILED, State.STOPPED):
                raise FailedPrecondition(
                    f"instance {instance_id} is {status.state} (exit code {status.exit_code}): "
                    f"{status.last_log[-2000:]}"
                )
            if core.clock.monotonic() >= deadline_s:
                raise FailedPrecondition(f"instance {instance_id} not READY within {timeout_s}s")
            self._supervisor.try_tick(core.record(instance_id))
            core.sleep(min(core.settings.health_interval_s, 0.2))

    def stop(
        self, instance_id: str, *, force: bool = False, drain_timeout_s: float | None = None
    ) -> InstanceStatus:
        """Drain (unless force) then stop, with the instance's standby; idempotent on a stopped
        instance. DeviceTimeout (the instance FAILED) when the GPUs keep its memory."""
        core = self._core
        rec = core.record(instance_id)
        if drain_timeout_s is not None and not 0 <= drain_timeout_s <= 3600:
            raise InvalidArgument(
                f"drain_timeout_s={drain_timeout_s:g} is outside the allowed range [0, 3600] s",
                field="drain_timeout_s",
            )
        with core.lock:
            rec.wanted = False
            rec.epoch += 1
            rec.cancel.set()  # interrupts a restart or a reconfigure waiting for READY
            rec.rollback_spec = None  # a stop ends a reconfigure in flight
        with rec.op_lock:
            self._discard_standby(rec)
            if rec.process is not None and rec.state != State.STOPPED:
                core.drain_and_stop(rec, force=force, drain_timeout_s=drain_timeout_s)
            with core.lock:
                rec.state = State.STOPPED
            core.write_journal()
        log.info("instance_stopped", instance_id=instance_id, force=force)
        return self.get(instance_id)

    def reconfigure(self, instance_id: str, new_spec: InstanceSpec) -> ReconfigureResult:
        """drain -> stop -> start(new) -> READY, timing each step, or drain -> stop -> wake
        when a sleeping standby runs exactly new_spec on the same shape; on failure roll back
        to the old spec (its result and the new spec's error are both reported)."""
        core = self._core
        rec = core.record(instance_id)
        if new_spec.instance_id != instance_id:
            raise InvalidArgument(
                f"new_spec.instance_id={new_spec.instance_id!r} must be {instance_id!r}",
                field="new_spec.instance_id",
            )
        with core.lock:
            if rec.state not in ACTIVE:
                raise FailedPrecondition(f"instance {instance_id} is {rec.state}; start it")
            wake = _standby_fits(rec, new_spec)
            new_spec = replace(new_spec, port=new_spec.port or rec.spec.port)
            core.validate(new_spec)  # also the cold start that follows a failed wake
            rec.epoch += 1  # a pending crash restart must not start the old spec afterwards
            rec.cancel.set()
        with rec.op_lock:
            rec.cancel.clear()
            old_spec = rec.spec
            set_rollback(core, rec, old_spec)  # journaled: a restarted agent can still roll back
            try:
                return self._replace_engine(rec, old_spec, new_spec, wake=wake)
            finally:
                if not core.closing.is_set():  # an agent going away leaves it to the next one
                    set_rollback(core, rec, None)

    def prestage(self, spec: InstanceSpec) -> InstanceStatus:
        """Start a sleeping standby engine for spec.instance_id's next spec (sleep mode):
        READY, then POST /sleep?level=1. The shape (devices, TP, quantization) must be the
        instance's; a standby staged before is replaced. Returns the standby's status."""
        core = self._core
        rec = core.record(spec.instance_id)
        with core.lock:
            if rec.state not in ACTIVE:
                raise FailedPrecondition(f"instance {spec.instance_id} is {rec.state}; start it")
            if _shape(spec) != _shape(rec.spec):
                raise InvalidArgument(
                    f"spec: a standby must keep the instance's shape (devices, "
                    f"tensor_parallel_size, quantization) {_shape(rec.spec)}, not {_shape(spec)}",
                    field="spec",
                )
            core.validate(spec)
            spec = replace(spec, enable_sleep_mode=True,
                           port=spec.port or pick_free_port(core.settings.host))
        standby = Record(spec=spec)
        with rec.op_lock:
            self._discard_standby(rec)
            try:
                core.launch(standby, standby=True)
                core.await_ready(standby)
                post_engine(core.settings.host, spec.port, f"/sleep?level={SLEEP_LEVEL}", 60.0)
                if not engine_is_sleeping(core.settings.host, spec.port, 10.0):
                    raise OSError("the engine answered /sleep but /is_sleeping is false")
            except (EngineStartError, Cancelled, OSError, ValueError, KeyError) as exc:
                if standby.process is not None:
                    core.terminate(standby, force=True, confirm_release=False)
                raise FailedPrecondition(
                    f"standby for {spec.instance_id} did not start asleep: {exc}"
                ) from exc
            with core.lock:
                standby.routable, rec.standby = False, standby
            core.write_journal()
        log.info("standby_sleeping", instance_id=spec.instance_id, port=spec.port)
        with core.lock:
            return core.status(standby)

    def _replace_engine(
        self, rec: Record, old_spec: InstanceSpec, new_spec: InstanceSpec, *, wake: bool
    ) -> ReconfigureResult:
        """reconfigure()'s steps. Caller holds rec.op_lock."""
        core, instance_id = self._core, rec.spec.instance_id
        steps: list[tuple[str, float]] = []
        drain_s, stop_s = core.drain_and_stop(rec, force=False, drain_timeout_s=None)
        steps += [("drain", drain_s), ("stop", stop_s)]
        try:
            if wake and self._wake_standby(rec, steps):
                log.info("instance_woken", instance_id=instance_id, steps=steps)
                return ReconfigureResult(self.get(instance_id), False, tuple(steps),
                                         "reconfigured: woke the pre-staged standby")
            core.start_and_wait(rec, new_spec, steps)
        except Cancelled:
            raise stopped_meanwhile(instance_id) from None
        except (EngineStartError, DomainError) as exc:
            log.warning("reconfigure_failed", instance_id=instance_id, error=str(exc))
            return roll_back(core, rec, old_spec, steps, exc)
        log.info("instance_reconfigured", instance_id=instance_id, steps=steps)
        return ReconfigureResult(self.get(instance_id), False, tuple(steps), "reconfigured")

    def _wake_standby(self, rec: Record, steps: list[tuple[str, float]]) -> bool:
        """POST /wake_up to the standby and make it the instance's engine; False (standby
        discarded, a cold start follows) when the wake fails. Caller holds rec.op_lock."""
        core, standby = self._core, rec.standby
        assert standby is not None and standby.process is not None
        host, t0 = core.settings.host, core.clock.monotonic()
        try:
            post_engine(host, standby.spec.port, "/wake_up", core.settings.ready_timeout_s)
            if engine_is_sleeping(host, standby.spec.port, 10.0):
                raise OSError("/is_sleeping is still true after /wake_up")
        except (OSError, ValueError, KeyError) as exc:
            log.warning("standby_wake_failed", instance_id=rec.spec.instance_id, error=str(exc))
            self._discard_standby(rec)
            return False
        with core.lock:
            rec.spec, rec.process, rec.command = standby.spec, standby.process, standby.command
            rec.exit_code, rec.last_log, rec.sample, rec.mig_slices = 0, "", None, \
                standby.mig_slices
            rec.started_at_unix_s = standby.started_at_unix_s
            rec.standby = None
        steps.append(("wake", core.clock.monotonic() - t0))
        t1 = core.clock.monotonic()
        core.await_ready(rec)  # marks READY and routable, journals nothing
        steps.append(("ready", core.clock.monotonic() - t1))
        core.write_journal()
        return True

    def _discard_standby(self, rec: Record) -> None:
        """Kill the instance's standby, if any. Caller holds rec.op_lock."""
        standby = rec.standby
        if standby is None:
            return
        with self._core.lock:
            rec.standby = None
        if standby.process is not None:
            self._core.terminate(standby, force=True)
        self._core.write_journal()
        log.info("standby_discarded", instance_id=rec.spec.instance_id)

    # ------------------------------------------------------- recovery, monitor

    def recover(self) -> tuple[list[str], list[str]]:
        """Re-adopt the journaled engines that still run; relaunch those that are gone; finish
        (in the background) the reconfigures a crashed agent left midway.
        Returns (adopted ids, relaunched ids)."""
        return self._supervisor.recover()

    def start_monitor(self) -> None:
        self._supervisor.start_monitor()

    def close(self, *, stop_instances: bool = False) -> None:
        """Stop the monitor; engines keep running (re-adopted later) unless stop_instances."""
        core = self._core
        core.closing.set()
        if stop_instances:
            for status in self.list():
                if status.state in ACTIVE:
                    self.stop(status.spec.instance_id)
        with core.lock:
            for rec in core.records.values():
                rec.cancel.set()
        self._supervisor.join_monitor()

    def tick(self) -> None:
        """One monitoring pass: rotate logs, notice exits, mark READY, scrape metrics."""
        self._supervisor.tick()


def _shape(spec: InstanceSpec) -> tuple[tuple[str, ...], int, str]:
    return spec.devices, spec.tensor_parallel_size, spec.quantization


def _standby_fits(rec: Record, new_spec: InstanceSpec) -> bool:
    """Whether rec's standby is alive, runs exactly new_spec, on rec's shape. Caller holds
    the lock."""
    sb = rec.standby
    if sb is None or sb.process is None or sb.process.exit_code() is not None:
        return False
    if new_spec.port not in (0, sb.spec.port) or _shape(new_spec) != _shape(rec.spec):
        return False
    return replace(new_spec, port=0, enable_sleep_mode=True) == replace(sb.spec, port=0)


def add_load(load: EngineLoad | None, rec: Record, n_gpus: int) -> EngineLoad:
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


def post_engine(host: str, port: int, path: str, timeout_s: float) -> str:
    """POST with an empty body to an engine; OSError unless it answers 200. No proxy: the
    engine is on this node."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(engine_url(host, port, path), data=b"", method="POST")
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            return resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        raise OSError(f"POST {path} answered HTTP {exc.code}") from exc


def engine_is_sleeping(host: str, port: int, timeout_s: float) -> bool:
    """GET /is_sleeping ({"is_sleeping": bool}, vLLM sleep mode)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(engine_url(host, port, "/is_sleeping"), timeout=timeout_s) as resp:
        return bool(json.loads(resp.read())["is_sleeping"])
