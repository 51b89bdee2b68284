"""The nodeagent entry point: config -> logging -> backend -> journal/actuator (reapply) ->
sampler -> gRPC server -> metrics -> READY; on SIGTERM/SIGINT: STOPPING, stop serving, restore
the saved defaults, exit 0.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from nodeagent.actuation.actuator import Actuator
from nodeagent.actuation.journal import Journal, JournalError
from nodeagent.actuation.power import check_failsafe_w, failsafe_ceilings_w
from nodeagent.config import AgentConfig, ConfigError, load_config
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
        """Stop serving, restore defaults (unless configured not to). True when all went well."""
        self.notifier.stopping()
        if self.link is not None:
            self.link.stop()
        self.server.stop(grace_s=2.0)
        if self.engines is not None:  # engines keep running (re-adopted) unless stop_on_exit
            self.engines.close()
        self.sampler.stop()
        failures = self.actuator.restore_defaults() if self.cfg.restore_on_exit else []
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.backend.close()
        self.log.info("stopped", restored=self.cfg.restore_on_exit, restore_failures=len(failures))
        return not failures


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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        print(f"nodeagent: {err}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_level)
    log = get_logger("nodeagent")
    clock = SystemClock()
    stop = install_signal_handlers()
    try:
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
