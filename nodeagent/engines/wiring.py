"""Build the engine manager from the agent config and hook it into the agent's parts."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import structlog

from nodeagent.engines.command import ENGINE_FLAGS, default_launcher
from nodeagent.engines.manager import EngineSettings, InstanceManager, MigSlice
from nodeagent.engines.mig_repartition import MigRepartitioner
from nodeagent.engines.runner import EngineUser, ProcessRunner
from nodeagent.engines.service import InstanceService
from nodeagent.engines.sim_bridge import apply_engine_loads
from nodeagent.engines.spec import inventory_from_backend
from nodeagent.engines.types import EngineLoad
from shapeshifter.common.errors import DomainError

# Lazy: takes the logging configuration in force at first use, not at import.
log = structlog.get_logger(component="engines")


def settings_from_config(cfg: Any) -> EngineSettings:
    """EngineSettings from an AgentConfig (cfg.engines, cfg.state_dir)."""
    e = cfg.engines
    return EngineSettings(
        launcher=tuple(e.launcher) or default_launcher(e.python),
        host=e.host,
        state_dir=cfg.state_dir,
        log_dir=e.log_dir or cfg.state_dir / "engine-logs",
        base_env={**os.environ, **e.env},
        allowed_extra_flags=frozenset(e.allowed_extra_args),
        health_interval_s=e.health_interval_s,
        ready_timeout_s=e.ready_timeout_s,
        shutdown_timeout_s=e.shutdown_timeout_s,
        kill_grace_s=e.kill_grace_s,
        max_restarts=e.max_restarts,
        restart_backoff_s=e.restart_backoff_s,
        restart_backoff_max_s=e.restart_backoff_max_s,
        stable_after_s=e.stable_after_s,
        log_max_bytes=e.log_max_bytes,
        log_backups=e.log_backups,
    )


def mig_slices_from_backend(backend: Any) -> dict[str, MigSlice]:
    """Each MIG device's GPU, profile and placement, by UUID (what a reboot keeps)."""
    return {
        m.uuid: MigSlice(d.index, m.profile, m.placement_start)
        for d in backend.devices() for m in backend.mig_state(d.index).instances
    }  # fmt: skip


class Engines:
    """The engine manager, its gRPC translation and the MIG repartitioner of one agent."""

    def __init__(
        self,
        cfg: Any,
        backend: Any,
        apply_layout: Callable[[int, list[str]], object] | None = None,
        on_loads: Callable[[], None] = lambda: None,
    ) -> None:
        """apply_layout: the actuator's journaled MIG layout change (default: the backend's).
        on_loads: called after each monitor pass (the sampler's next read then shows the new
        engine loads, so a node read agrees with the instances listed beside it)."""
        self._stop_on_exit = cfg.engines.stop_on_exit
        drive_sim = backend.kind == "sim" and cfg.sim.load == "idle"  # no synthetic load set
        totals_mib = {d.index: d.memory_total_mib for d in backend.devices()} if drive_sim else {}

        def on_tick(loads: dict[int, EngineLoad]) -> None:
            if drive_sim:
                apply_engine_loads(backend, loads, totals_mib.keys(), totals_mib)
            on_loads()

        settings = settings_from_config(cfg)
        user = EngineUser.resolve(cfg.engines.engine_user) if cfg.engines.engine_user else None
        self._launcher, self._base_env = settings.launcher, settings.base_env
        self.manager = InstanceManager(settings, ProcessRunner(engine_user=user),
                                       lambda: inventory_from_backend(backend), on_tick=on_tick,
                                       compute_pids=backend.compute_pids,
                                       mig_slices=lambda: mig_slices_from_backend(backend))
        self.service = InstanceService(self.manager)
        self.repartitioner = MigRepartitioner(self.manager, backend, settings.state_dir,
                                              apply_layout=apply_layout,
                                              ready_timeout_s=settings.ready_timeout_s)

    def start(self) -> None:
        """Re-adopt journaled engines, resume an interrupted MIG repartition (in the
        background: it may wait minutes for engines), start monitoring."""
        # The engine's --help (which flags this vLLM has) takes seconds: probed in the
        # background now, so the first start does not wait for it.
        threading.Thread(target=ENGINE_FLAGS.flags, args=(self._launcher, self._base_env),
                         name="engine-flags", daemon=True).start()
        adopted, relaunched = self.manager.recover()
        log.info("engines_recovered", adopted=adopted, relaunched=relaunched)
        self.manager.start_monitor()
        threading.Thread(target=self._resume_repartition, name="mig-resume", daemon=True).start()

    def close(self) -> None:
        self.manager.close(stop_instances=self._stop_on_exit)

    def _resume_repartition(self) -> None:
        try:
            result = self.repartitioner.resume()
        except DomainError as exc:
            log.error("mig_repartition_resume_failed", error=str(exc))
            return
        if result is not None:
            log.info("mig_repartition_resumed", rolled_back=result.rolled_back,
                     message=result.message)


def attach_engines(agent: Any) -> Engines:
    """Create the engines and hand their hooks to the servicer, the actuator and the sampler."""
    engines = Engines(agent.cfg, agent.backend, agent.actuator.apply_mig_layout,
                      on_loads=agent.sampler.mark_stale)
    agent.servicer.instance_service = engines.service
    agent.servicer.repartitioner = engines.repartitioner
    agent.actuator.instance_runner = engines.service
    agent.actuator.busy_instances = engines.manager.busy_instances
    agent.sampler.engine_loads = engines.manager.engine_loads
    engines.start()
    return engines
