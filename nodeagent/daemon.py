"""The nodeagent entry point: config -> logging -> state-dir lock -> backend -> journal/actuator
(reapply) -> sampler -> gRPC server -> metrics -> READY; on SIGTERM/SIGINT: STOPPING, stop
serving, exit 0, leaving the GPUs as they are.

Stop versus hand-back (issue 19). A stop or restart (SIGTERM, `systemctl restart`, a crash, a
watchdog kill) never touches the GPUs: power caps, locked clocks and the MIG layout stay in force
while the engines (which outlive the agent) keep serving, the journal keeps every request, and
the next agent re-applies them before it reports READY. Restoring on every exit would uncap
serving engines on each restart and fail on MIG in use.

Hand-back is explicit: `nodeagent --release` (same --config/--state-dir), run while the agent is
stopped, puts every GPU back as found at the agent's first start (power limit, clocks, MIG mode
and layout) and empties the journal's requests. It changes nothing and exits 3 while the agent
runs (it holds STATE_DIR/nodeagent.lock), while a managed engine is alive or while any GPU has
compute processes: stop the engines first (StopInstance), or run the agent once with
engines.stop_on_exit: true. Exit 0: handed back; 1: a restore failed (the journal keeps what was
not undone; rerun); 2: bad config, or restore_on_exit: false.

restore_on_exit (kept for old configs; default true) now means "a hand-back restores the
defaults". false: the agent never restores them; --release refuses (exit 2) and the GPUs keep
the agent's last settings (for sites where something else owns the GPUs' defaults).
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry

from nodeagent.actuation.actuator import Actuator
from nodeagent.actuation.journal import Journal, JournalError
from nodeagent.actuation.power import check_failsafe_w, failsafe_ceilings_w
from nodeagent.config import AgentConfig, ConfigError, build_arg_parser, load_config
from nodeagent.device.backend import GpuBackend
from nodeagent.rpc.link import CoordinatorLink, LinkSettings
from nodeagent.rpc.server import AgentServer, NodeAgentServicer
from nodeagent.safety.emergency import EmergencyGuard
from nodeagent.safety.lease import LeaseKeeper
from nodeagent.safety.thermal import GuardSettings, ThermalGuard
from nodeagent.security import agent_security
from nodeagent.telemetry.metrics import serve_metrics
from nodeagent.telemetry.sampler import NodeIdentity, SafetyView, Sampler
from shapeshifter import __version__
from shapeshifter.common.clock import Clock, SystemClock
from shapeshifter.common.errors import DomainError
from shapeshifter.common.logging import configure_logging, get_logger
from shapeshifter.common.sdnotify import Notifier


class StartupError(Exception):
    """The agent cannot start; the message says why."""


class StateDirBusy(StartupError):
    """Another nodeagent process (an agent or a --release) holds the state directory."""


LOCK_FILE = "nodeagent.lock"
EXIT_RELEASE_REFUSED = 3  # --release: agent running, engines alive or GPUs in use; nothing changed


def hold_state_dir(state_dir: Path) -> IO[str]:
    """An exclusive lock on STATE_DIR/nodeagent.lock, held while the returned file stays open
    (the kernel drops it when the process dies, kill -9 included). Holds this process's pid."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = open(state_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the process's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise StateDirBusy(
            f"state dir {state_dir} is in use by another nodeagent (pid {holder})"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def make_backend(cfg: AgentConfig, clock: Clock) -> GpuBackend:
    """The configured backend. NVML failing is fatal: never a silent switch to sim."""
    if cfg.backend == "sim":
        from nodeagent.device.sim import SimulatedBackend

        s = cfg.sim
        return SimulatedBackend(
            s.gpu_type,
            s.gpus,
            clock,
            seed=s.seed,
            inlet_temp_c=s.inlet_temp_c,
            node_name=cfg.node.id,
        )
    from nodeagent.device.nvml import NvmlBackend

    return NvmlBackend()


BUSY_LOAD = (1.0, 0.9)  # (activity, memory fraction) of sim.load: busy
LOAD_UPDATE_INTERVAL_S = 1.0  # the demo wave moves over tens of seconds; no need to drive faster


def sim_load_driver(backend: Any, load: str, seed: int) -> Callable[[float], None] | None:
    """What drives the sim GPUs' load each sample: the varying demo wave, a constant full load
    (busy), or nothing (idle)."""
    if load == "idle":
        return None
    from nodeagent.device.simload import demo_load

    totals_mib = {d.index: d.memory_total_mib for d in backend.devices()}
    last_s: list[float] = []

    def drive(t_s: float) -> None:
        if last_s and t_s - last_s[0] < LOAD_UPDATE_INTERVAL_S:
            return
        last_s[:] = [t_s]
        for index, total_mib in totals_mib.items():
            activity, mem_frac = demo_load(t_s, seed, index) if load == "demo" else BUSY_LOAD
            backend.set_load(index, activity, memory_used_mib=int(mem_frac * total_mib))

    return drive


@dataclass
class Agent:
    cfg: AgentConfig
    backend: GpuBackend
    actuator: Actuator
    sampler: Sampler
    servicer: NodeAgentServicer
    server: AgentServer
    notifier: Notifier
    log: Any
    metrics_server: Any = None
    metrics_port: int = 0
    lease_keeper: LeaseKeeper | None = None
    link: CoordinatorLink | None = None  # set when a coordinator address is configured
    engines: Any = None  # nodeagent.engines.wiring.Engines when cfg.engines.enabled

    def shutdown(self) -> bool:
        """Stop serving; the GPUs keep every setting (journaled: the next agent re-applies it).
        Defaults come back only at a hand-back (`nodeagent --release`, module docstring)."""
        self.notifier.stopping()
        if self.link is not None:
            self.link.stop()
        self.server.stop(grace_s=2.0)
        if self.engines is not None:  # engines keep running (re-adopted) unless stop_on_exit
            self.engines.close()
        self.sampler.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.backend.close()
        self.log.info("stopped", gpu_settings="kept", handback="nodeagent --release")
        return True


def build_agent(cfg: AgentConfig, clock: Clock, log: Any) -> Agent:
    security = agent_security(cfg, log)  # mTLS and authorization (docs/SECURITY.md); first
    try:
        backend = make_backend(cfg, clock)
    except DomainError as err:
        raise StartupError(f"backend {cfg.backend} unavailable: {err}") from None
    journal = Journal.open(cfg.state_dir)
    constraints = {d.index: backend.power_constraints(d.index) for d in backend.devices()}
    check_failsafe_w(cfg.failsafe.power_limit_w, constraints)
    actuator = Actuator(backend, journal, clock, log)
    actuator.capture_defaults()
    for err in actuator.reapply_journal():
        log.error("journaled setting not re-applied", error=str(err))
    notifier = Notifier(clock=clock)
    lease_keeper = _make_lease_keeper(cfg, backend, actuator, clock, log)
    sampler = _make_sampler(cfg, backend, actuator, notifier, clock, log, lease_keeper.view)
    servicer = NodeAgentServicer(actuator, sampler, clock)
    server = AgentServer(
        servicer, cfg.listen, tls=security.tls, interceptors=security.interceptors
    )
    agent = Agent(
        cfg, backend, actuator, sampler, servicer, server, notifier, log, lease_keeper=lease_keeper
    )
    if cfg.coordinator.effective_addresses:
        c = cfg.coordinator
        settings = LinkSettings(
            addresses=c.effective_addresses,
            report_interval_s=c.report_interval_s,
            reconnect_initial_s=c.reconnect_initial_s,
            reconnect_max_s=c.reconnect_max_s,
            credentials=security.link_credentials,
        )
        guard = EmergencyGuard(actuator, actuator.gpu_indices, clock, log)

        def note_epoch(epoch: int) -> None:
            for fence in (actuator, guard, lease_keeper):
                fence.note_epoch(epoch)

        agent.link = CoordinatorLink(
            settings, servicer.latest_node, actuator, lease_keeper, clock, log,
            on_change=sampler.mark_changed, emergency=guard, on_epoch=note_epoch,
        )
    return agent


def _make_lease_keeper(
    cfg: AgentConfig, backend: GpuBackend, actuator: Actuator, clock: Clock, log: Any
) -> LeaseKeeper:
    """Coordinator leases; on expiry the configured fail-safe caps (issue 3)."""
    max_w = {i: backend.power_constraints(i).max_w for i in actuator.gpu_indices}
    f = cfg.failsafe
    return LeaseKeeper(
        actuator, failsafe_ceilings_w(f.power_limit_frac, f.power_limit_w, max_w), clock, log
    )


def _make_sampler(
    cfg: AgentConfig,
    backend: Any,
    actuator: Actuator,
    notifier: Notifier,
    clock: Clock,
    log: Any,
    safety: Callable[[], SafetyView],
) -> Sampler:
    g = cfg.thermal_guard
    guard = None
    if g.enabled:
        settings = GuardSettings(g.margin_c, g.hysteresis_c, g.step_frac, g.cooldown_s)
        guard = ThermalGuard(actuator, clock, log, settings)
    drive = sim_load_driver(backend, cfg.sim.load, cfg.sim.seed) if cfg.backend == "sim" else None
    identity = NodeIdentity(cfg.node.id, dict(cfg.node.labels), backend.kind, __version__)
    return Sampler(
        backend,
        actuator,
        identity,
        clock,
        log,
        interval_s=cfg.sampling.interval_s,
        watchdog_ping=notifier.watchdog_ping,
        watchdog_interval_s=notifier.watchdog_interval_s,
        thermal_guard=guard,
        safety=safety,
        drive_load=drive,
    )


def start_agent(agent: Agent) -> None:
    cfg = agent.cfg
    agent.sampler.sample_now()
    agent.sampler.start()
    if cfg.engines.enabled:  # vLLM instances: servicer, actuator and sampler hooks (issue 4)
        from nodeagent.engines.wiring import attach_engines

        agent.engines = attach_engines(agent)
    if agent.link is not None:
        agent.link.start()  # dials the coordinator (leader), registers, reports (issue 3)
    agent.server.start()
    if cfg.metrics_listen:
        agent.metrics_server, agent.metrics_port = serve_metrics(
            cfg.metrics_listen, agent.sampler.peek, CollectorRegistry()
        )
    agent.server.set_serving(True)
    status = f"serving on port {agent.server.port}, {len(agent.actuator.gpu_indices)} GPUs"
    agent.log.info(
        "ready", grpc_port=agent.server.port, metrics_port=agent.metrics_port, backend=cfg.backend
    )
    agent.notifier.ready(status)


def install_signal_handlers() -> threading.Event:
    """SIGTERM/SIGINT set the returned event (installed before startup so none is lost)."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        stop.signum = signum  # type: ignore[attr-defined]
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def running_engines(state_dir: Path) -> list[str]:
    """'ID (pid N)' of each journaled engine whose process still runs (same pid, start time and
    command line: a recycled pid does not count)."""
    from nodeagent.engines.journal import read_json
    from nodeagent.engines.manager import JOURNAL_FILE
    from nodeagent.engines.runner import ProcessRunner

    runner = ProcessRunner()
    entries = read_json(state_dir / JOURNAL_FILE) or {}
    return [
        f"{iid} (pid {e['pid']})"
        for iid, e in sorted(entries.items())
        if runner.adopt(int(e["pid"]), float(e["create_time"]), e["command"]) is not None
    ]


def release(cfg: AgentConfig, clock: Clock, log: Any) -> int:
    """Hand the node back: restore every GPU's first-start defaults (module docstring)."""
    if not cfg.restore_on_exit:
        return _refuse(2, "restore_on_exit is false: this agent never restores the GPUs' "
                          "defaults; set restore_on_exit: true to hand the node back")
    try:
        lock = hold_state_dir(cfg.state_dir)
    except StateDirBusy as err:
        return _refuse(EXIT_RELEASE_REFUSED, f"{err}: stop it first (systemctl stop nodeagent)")
    with lock:
        engines = running_engines(cfg.state_dir)
        if engines:
            return _refuse(EXIT_RELEASE_REFUSED, f"engines still serving: {', '.join(engines)}; "
                           "stop them first (StopInstance, or engines.stop_on_exit: true)")
        try:
            backend = make_backend(cfg, clock)
        except DomainError as err:
            return _refuse(1, f"backend {cfg.backend} unavailable: {err}")
        try:
            return _restore_idle_gpus(backend, Journal.open(cfg.state_dir), clock, log)
        finally:
            backend.close()


def _restore_idle_gpus(backend: GpuBackend, journal: Journal, clock: Clock, log: Any) -> int:
    actuator = Actuator(backend, journal, clock, log)
    busy = {i: list(p) for i in actuator.gpu_indices if (p := backend.telemetry(i).process_pids)}
    if busy:
        return _refuse(EXIT_RELEASE_REFUSED, f"GPUs in use (gpu: compute pids): {busy}")
    actuator.capture_defaults()  # a GPU swapped since the first start: its own defaults
    failures = actuator.restore_defaults()
    if failures:
        return _refuse(1, "restore failed: " + "; ".join(str(f) for f in failures))
    log.info("handed back", gpus=len(actuator.gpu_indices))
    print(f"nodeagent: handed back: {len(actuator.gpu_indices)} GPUs at their defaults")
    return 0


def _refuse(code: int, message: str) -> int:
    print(f"nodeagent --release: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        print(f"nodeagent: {err}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_level)
    log = get_logger("nodeagent")
    clock = SystemClock()
    if build_arg_parser().parse_args(argv).release:
        try:
            return release(cfg, clock, log)
        except (JournalError, DomainError, OSError) as err:
            return _refuse(1, str(err))
    stop = install_signal_handlers()
    try:
        lock = hold_state_dir(cfg.state_dir)  # noqa: F841 - held until the process exits
        agent = build_agent(cfg, clock, log)
        start_agent(agent)
    except (StartupError, JournalError, DomainError, OSError, RuntimeError) as err:
        log.error("cannot start", error=str(err))
        print(f"nodeagent: cannot start: {err}", file=sys.stderr)
        return 1
    while not stop.wait(1.0):  # a bare wait() would delay signal handling in the main thread
        pass
    log.info("shutting down", signal=signal.Signals(stop.signum).name)  # type: ignore[attr-defined]
    return 0 if agent.shutdown() else 1


if __name__ == "__main__":
    sys.exit(main())
