"""The engine manager's value types and its core: one record per instance, and the process-level
steps every operation is built from (launch, wait for READY, drain, terminate, confirm that the
GPUs let go of the engine's memory, fail, journal).

`EngineCore` holds the shared state (the table, `lock`, the closing flag); InstanceManager, the
Supervisor (monitor, restarts, recovery) and the reconfigure path all act through it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

import psutil
import structlog

from nodeagent.engines.command import ENGINE_FLAGS, build_command, build_env
from nodeagent.engines.journal import spec_to_json, write_json
from nodeagent.engines.runner import EngineProcess, EngineRunner, port_is_free, tail_lines
from nodeagent.engines.spec import DeviceInventory, InstanceSpec, validate_spec
from shapeshifter.common.clock import Clock
from shapeshifter.common.errors import DeviceTimeout, Internal, NotFound
from shapeshifter.vllm.metrics import EngineMetrics, EngineSample, parse_metrics, update_metrics

# Lazy: takes the logging configuration in force at first use, not at import.
log = structlog.get_logger(component="engines")

JOURNAL_FILE = "engines.json"
# vLLM registers /sleep, /wake_up and /is_sleeping only in its server dev mode.
SLEEP_MODE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}


class State(StrEnum):
    STARTING = "STARTING"
    READY = "READY"
    DRAINING = "DRAINING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"


ACTIVE = (State.STARTING, State.READY, State.DRAINING)


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
    release_timeout_s: float = 30.0  # an exited engine's GPU contexts must be gone by then


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
    steps: tuple[tuple[str, float], ...]  # (drain|stop|start|wake|ready, seconds)
    message: str


@dataclass(frozen=True)
class MigSlice:
    """Where a MIG device sits: what survives a reboot, unlike its UUID."""

    gpu_index: int
    profile: str
    placement_start: int


class EngineStartError(Exception):
    """The engine exited or did not become READY in time."""

    def __init__(self, message: str, exit_code: int = 0) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Cancelled(Exception):
    """A stop (or agent shutdown) interrupted a start or restart."""


@dataclass(eq=False)
class Record:
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
    mig_slices: dict[str, MigSlice] = field(default_factory=dict)  # of spec.devices, at launch
    unreleased_pids: frozenset[int] = frozenset()  # exited engine pids the GPUs may still list
    standby: Record | None = None  # a pre-staged sleeping engine (sleep mode), see manager
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


def engine_tree(pid: int) -> list[psutil.Process]:
    """The engine's processes: the main one, its descendants, and its process group (workers
    whose parent died were reparented but keep the group)."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        found[pid] = root
        for child in root.children(recursive=True):
            found[child.pid] = child
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid not in found and os.getpgid(proc.pid) == pid:
                found[proc.pid] = proc
    return list(found.values())


def kill_tree(tree: Iterable[psutil.Process]) -> None:
    """SIGKILL every process of a tree snapshot (psutil refuses a reused pid)."""
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            proc.kill()


def gpus_of(spec: InstanceSpec, inventory: DeviceInventory) -> list[int]:
    gpus = []
    for device in spec.devices:
        try:
            gpus.append(inventory.gpu_of(device))
        except NotFound:
            continue  # a MIG device removed under a running instance: nothing to attribute
    return sorted(set(gpus))


class EngineCore:
    def __init__(
        self,
        settings: EngineSettings,
        runner: EngineRunner,
        inventory: Callable[[], DeviceInventory],
        *,
        clock: Clock,
        sleep: Callable[[float], None],
        compute_pids: Callable[[int], frozenset[int]] | None,
        mig_slices: Callable[[], Mapping[str, MigSlice]],
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.inventory = inventory
        self.clock = clock
        self.sleep = sleep
        self.compute_pids = compute_pids
        self.mig_slices = mig_slices
        self.lock = threading.RLock()
        self.records: dict[str, Record] = {}
        self.closing = threading.Event()

    @property
    def journal_path(self) -> Path:
        return self.settings.state_dir / JOURNAL_FILE

    def log_path(self, instance_id: str, *, standby: bool = False) -> Path:
        return self.settings.log_dir / f"{instance_id}{'.standby' if standby else ''}.log"

    def record(self, instance_id: str) -> Record:
        with self.lock:
            rec = self.records.get(instance_id)
        if rec is None:
            raise NotFound(f"instance_id={instance_id!r} is not known", field="instance_id")
        return rec

    def status(self, rec: Record) -> InstanceStatus:
        return InstanceStatus(
            spec=rec.spec, state=rec.state, pid=rec.process.pid if rec.process else 0,
            exit_code=rec.exit_code, last_log=rec.last_log, restarts=rec.restarts,
            metrics=rec.metrics, routable=rec.routable,
            started_at_unix_s=rec.started_at_unix_s, ready_at_unix_s=rec.ready_at_unix_s,
            command=rec.command,
        )  # fmt: skip

    def validate(self, spec: InstanceSpec) -> None:
        """Raise before anything starts. Caller holds lock."""
        others = [
            r for iid, r in self.records.items()
            if iid != spec.instance_id and r.state in ACTIVE
        ]  # fmt: skip
        ports = {r.spec.port for r in others} | {r.standby.spec.port for r in others if r.standby}
        own = self.records.get(spec.instance_id)
        own_port = own.spec.port if own is not None and own.state in ACTIVE else None
        # Probe only a port in range: bind() raises OverflowError beyond 65535 (found by
        # bench/fuzz.py); validate_spec then reports the range.
        probe = bool(spec.port) and spec.port != own_port and 1024 <= spec.port <= 65535
        if probe and not port_is_free(self.settings.host, spec.port):
            ports.add(spec.port)
        validate_spec(
            spec, inventory=self.inventory(),
            devices_in_use={d for r in others for d in r.spec.devices}, ports_in_use=ports,
            allowed_extra_flags=self.settings.allowed_extra_flags,
        )  # fmt: skip

    def launch(self, rec: Record, *, standby: bool = False) -> None:
        """Start the engine process for rec.spec, once the GPUs let go of the engine it
        replaces. Caller holds rec.op_lock."""
        self.wait_released(rec)
        s = self.settings
        command = tuple(
            build_command(
                rec.spec, launcher=s.launcher, port=rec.spec.port, host=s.host,
                shutdown_timeout_s=s.shutdown_timeout_s,
                supported_flags=ENGINE_FLAGS.flags(s.launcher, s.base_env),
            )
        )  # fmt: skip
        env = build_env(rec.spec, s.base_env)
        if rec.spec.enable_sleep_mode:
            env.update(SLEEP_MODE_ENV)
        proc = self.runner.launch(command, env, self.log_path(rec.spec.instance_id,
                                                              standby=standby))
        slices = self.mig_slices() if rec.spec.uses_mig else {}
        with self.lock:
            rec.process, rec.command, rec.state, rec.routable = proc, command, State.STARTING, False
            rec.exit_code, rec.last_log, rec.sample = 0, "", None
            rec.metrics = EngineMetrics()
            rec.started_at_unix_s, rec.ready_at_unix_s = self.clock.time(), 0.0
            rec.mig_slices = {d: slices[d] for d in rec.spec.devices if d in slices}
        if not standby:
            self.write_journal()
        log.info("instance_launched", instance_id=rec.spec.instance_id, pid=proc.pid,
                 command=list(command), standby=standby)  # fmt: skip

    def await_ready(self, rec: Record) -> None:
        """Block until /health answers 200. Caller holds rec.op_lock."""
        assert rec.process is not None
        deadline_s = self.clock.monotonic() + self.settings.ready_timeout_s
        while True:
            code = rec.process.exit_code()
            if code is not None:
                raise EngineStartError(f"engine exited with code {code} before READY", code)
            if self.runner.health_ok(self.settings.host, rec.spec.port):
                self.mark_ready(rec)
                return
            if rec.cancel.is_set():
                raise Cancelled()
            if self.clock.monotonic() >= deadline_s:
                raise EngineStartError(
                    f"engine not READY within ready_timeout_s={self.settings.ready_timeout_s:g}"
                )
            self.sleep(min(self.settings.health_interval_s, 0.5))

    def start_and_wait(self, rec: Record, spec: InstanceSpec, steps: list) -> None:
        with self.lock:
            rec.spec = spec
        t0 = self.clock.monotonic()
        self.launch(rec)
        t1 = self.clock.monotonic()
        steps.append(("start", t1 - t0))
        self.await_ready(rec)  # Cancelled when a stop came in: the stop takes over
        steps.append(("ready", self.clock.monotonic() - t1))

    def mark_ready(self, rec: Record) -> None:
        with self.lock:
            rec.state, rec.routable = State.READY, True
            rec.ready_at_unix_s = self.clock.time()
        log.info("instance_ready", instance_id=rec.spec.instance_id,
                 pid=rec.process.pid if rec.process else 0)  # fmt: skip

    def queue_len(self, rec: Record) -> float | None:
        """running + waiting from a fresh scrape; 0 when the engine is gone, None if unknown."""
        if rec.process is None or rec.process.exit_code() is not None:
            return 0
        try:
            self.scrape(rec)
        except (OSError, ValueError):
            return None
        return rec.metrics.requests_running + rec.metrics.requests_waiting

    def scrape(self, rec: Record) -> None:
        text = self.runner.fetch_metrics(self.settings.host, rec.spec.port)
        sample = parse_metrics(text)
        now_s = self.clock.monotonic()
        with self.lock:
            rec.metrics = update_metrics(rec.metrics, rec.sample, sample, now_s - rec.sampled_at_s)
            rec.sample, rec.sampled_at_s = sample, now_s

    def drain_and_stop(
        self, rec: Record, *, force: bool, drain_timeout_s: float | None
    ) -> tuple[float, float]:
        """Returns (drain seconds, stop seconds). Caller holds rec.op_lock. DeviceTimeout (the
        record FAILED) when the GPUs still hold the engine's memory after it exited."""
        assert rec.process is not None
        timeout_s = rec.spec.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        t0 = self.clock.monotonic()
        with self.lock:
            rec.routable = False
            rec.state = State.DRAINING
        idle = force or wait_until_idle(
            lambda: self.queue_len(rec), timeout_s=timeout_s, clock=self.clock,
            sleep=self.sleep, poll_s=min(self.settings.health_interval_s, 0.5),
        )  # fmt: skip
        if not idle:
            log.warning("drain_deadline_passed", instance_id=rec.spec.instance_id,
                        drain_timeout_s=timeout_s, queue=self.queue_len(rec))  # fmt: skip
        t1 = self.clock.monotonic()
        code = self.terminate(rec, force=force, confirm_release=False)
        with self.lock:
            rec.state, rec.exit_code = State.STOPPED, code
            rec.last_log = tail_lines(
                self.log_path(rec.spec.instance_id), self.settings.log_tail_lines
            )
        try:
            self.wait_released(rec)
        except DeviceTimeout as exc:
            self.set_failed(rec, str(exc), code)
            raise
        return t1 - t0, self.clock.monotonic() - t1

    def terminate(self, rec: Record, *, force: bool, confirm_release: bool = True) -> int:
        """SIGTERM the main process (vLLM finishes in-flight work within --shutdown-timeout),
        SIGKILL after the grace period; then SIGKILL its group and every process of its tree
        anyway, so no worker outlives its engine; then (confirm_release) wait until the GPUs
        no longer list any of them."""
        proc = rec.process
        assert proc is not None
        tree = engine_tree(proc.pid)
        s = self.settings
        try:
            code = proc.exit_code()
            if code is None and not force:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(s.shutdown_timeout_s + s.kill_grace_s)
            if code is None:
                log.warning("engine_killed", pid=proc.pid, force=force)
                proc.signal_group(signal.SIGKILL)
                kill_tree(tree)
                code = proc.wait(s.kill_grace_s)
            if code is None:
                raise Internal(f"engine pid {proc.pid} did not exit after SIGKILL")
        finally:
            proc.signal_group(signal.SIGKILL)
            kill_tree(tree)
            with self.lock:
                rec.unreleased_pids |= {p.pid for p in tree} | {proc.pid}
        if confirm_release:
            self.wait_released(rec)
        return code

    def wait_released(self, rec: Record) -> None:
        """Block until no GPU lists a compute context of the record's exited engine processes;
        DeviceTimeout after release_timeout_s (the pids stay pending: no engine starts on
        memory still held)."""
        pids = rec.unreleased_pids
        if not pids or self.compute_pids is None:
            return
        gpus = sorted(self.inventory().mig_enabled_by_gpu)
        deadline_s = self.clock.monotonic() + self.settings.release_timeout_s
        while True:
            held = {g: sorted(pids & self.compute_pids(g)) for g in gpus}
            held = {g: p for g, p in held.items() if p}
            if not held:
                with self.lock:
                    rec.unreleased_pids = frozenset()
                return
            if self.clock.monotonic() >= deadline_s:
                raise DeviceTimeout(
                    f"instance {rec.spec.instance_id}: GPU memory not released within "
                    f"release_timeout_s={self.settings.release_timeout_s:g}: exited engine "
                    f"processes still hold compute contexts (GPU: pids) {held}"
                )
            self.sleep(min(self.settings.health_interval_s, 0.2))

    def set_failed(self, rec: Record, reason: str, exit_code: int) -> None:
        with self.lock:
            rec.state, rec.routable, rec.exit_code = State.FAILED, False, exit_code
            rec.last_log = (
                reason
                + "\n"
                + tail_lines(self.log_path(rec.spec.instance_id), self.settings.log_tail_lines)
            )
        self.write_journal()
        log.error("instance_failed", instance_id=rec.spec.instance_id, reason=reason,
                  exit_code=exit_code)  # fmt: skip

    def write_journal(self) -> None:
        """Journal every active instance with a process (what recover() needs)."""
        with self.lock:
            entries = {
                iid: journal_entry(r) for iid, r in self.records.items()
                if r.state in ACTIVE and r.process is not None
            }  # fmt: skip
            write_json(self.journal_path, entries)


def journal_entry(r: Record) -> dict:
    assert r.process is not None
    entry = {
        "spec": spec_to_json(r.spec), "command": list(r.command),
        "pid": r.process.pid, "create_time": r.process.create_time,
        "restarts": r.restarts, "started_at_unix_s": r.started_at_unix_s,
        "rollback_spec": spec_to_json(r.rollback_spec) if r.rollback_spec else None,
        "mig_slices": {uuid: asdict(s) for uuid, s in r.mig_slices.items()},
    }  # fmt: skip
    sb = r.standby
    if sb is not None and sb.process is not None:
        entry["standby"] = {
            "spec": spec_to_json(sb.spec), "command": list(sb.command),
            "pid": sb.process.pid, "create_time": sb.process.create_time,
        }  # fmt: skip
    return entry
