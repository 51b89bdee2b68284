"""Rebalance loop: proposals, approval and the mode; placement and routing over the live registry.

Runs on the coordinator's event loop. The decisions are the pure policies of coordinator.policy
(rebalance, place, routing_weights); the Rebalancer gathers their snapshot from the latest
reports (cluster, over coordinator.rebalance.snapshot), keeps endpoints (endpoints) and plans
(journal) in SQLite (coordinator.store.plans), and hands an approved plan to the executor, which
runs it stage by stage, verifies it from the reports and resumes one a dead coordinator left
applying (executor).

The last stage of a plan locks the clocks of the endpoints the plan leaves as they are at the
lowest clock that covers their demand x (1 + headroom) (policy.clocks, policy.configure.
clock_plan), skipping GPUs under an emergency cap (the emergency's Phase 2 owns their clocks); a
plan with only clock actions is a plan like any other (kept for approval in propose mode).

Modes: off (nothing runs), propose (every interval a plan with actions is stored for approval),
auto (such a plan is also applied at once). A newer proposal supersedes older proposed plans.
Plans, placement and routes use the effective limits: the topology's, lowered by the emergencies
in force (`cuts`, from the emergency controller).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from coordinator.core import CoordinatorCore
from coordinator.policy import model as pm
from coordinator.policy.clocks import with_clock_stage
from coordinator.policy.placement import RankedNode
from coordinator.policy.rebalance import rebalance
from coordinator.policy.routing import RouteWeight
from coordinator.profiles.schema import ProfileRow
from coordinator.rebalance.cluster import ClusterView
from coordinator.rebalance.endpoints import Endpoints
from coordinator.rebalance.executor import StagedPlanRunner
from coordinator.rebalance.journal import PlanJournal
from coordinator.rebalance.plandoc import diff_lines, plan_doc
from coordinator.rebalance.settings import (
    MODES,
    RebalanceSettings,
    add_rebalance_args,
    load_profile_rows,
    rebalance_settings_from_args,
)
from coordinator.rebalance.snapshot import EndpointDecl, ScopeCut
from coordinator.rpc import agent_codec
from coordinator.store.plans import PlanStoreLike
from shapeshifter.common import errors
from shapeshifter.hw.models import GPU_MODELS

__all__ = ["MODES", "RebalanceSettings", "Rebalancer", "add_rebalance_args", "diff_lines",
           "load_profile_rows", "plan_doc", "rebalance_settings_from_args"]

OPEN_STATES = ("proposed", "paused")


class Rebalancer:
    """The rebalance API and loop. It delegates to Endpoints (declarations and demand),
    ClusterView (snapshot, limits, placement, routes) and StagedPlanRunner (`executor`: running
    and resuming plans)."""

    def __init__(self, core: CoordinatorCore, store: PlanStoreLike, profiles: list[ProfileRow],
                 settings: RebalanceSettings,
                 cuts: Callable[[], Sequence[ScopeCut]] | None = None) -> None:
        self._core = core
        self._store = store
        self._profiles = profiles
        self._s = settings
        self.mode = settings.mode
        self._journal = PlanJournal(core, store)
        self._endpoints = Endpoints(store, self._journal, core.clock, settings.demand_smoothing_s)
        self._cluster = ClusterView(core, self._endpoints, cuts or tuple)
        self.executor = StagedPlanRunner(core, self._journal, settings, self._endpoints.get)
        self._last_run_unix_s = 0.0
        self._last_plan_id = ""
        self._log = structlog.get_logger().bind(component="rebalancer")

    # ---------------------------------------------------------------- endpoints

    def set_endpoint(self, decl: EndpointDecl, actor: str) -> EndpointDecl:
        return self._endpoints.set(decl, actor)

    def delete_endpoint(self, name: str, actor: str) -> None:
        self._endpoints.delete(name, actor)

    def endpoints(self) -> list[tuple[EndpointDecl, float]]:
        """Each declaration with the demand (req/s) the loop uses for it now."""
        return self._endpoints.listed()

    # ---------------------------------------------------------------- plans

    def propose(self, trigger: str, actor: str, keep_empty: bool = True) -> dict[str, Any]:
        """Run the policy on the current snapshot; store and return the plan document (a plan
        without actions is only stored when keep_empty)."""
        if self.executor.busy:
            raise errors.FailedPrecondition("a plan is being applied; propose after it ends",
                                            field="plan_id")
        snapshot = self._cluster.snapshot()
        plan = rebalance(snapshot, self._profiles, self.limits(), self._s.policy)
        plan = with_clock_stage(plan, snapshot, self._profiles, GPU_MODELS,
                                self._s.policy.headroom_frac, self._s.configure)
        now = self._core.clock.time()
        doc = plan_doc(plan, agent_codec.new_id()[:12], self._core.epoch, now, trigger)
        self._last_run_unix_s = now
        if not plan.stages and not keep_empty:
            return doc
        for old in self._store.latest_plans(50):
            if old["state"] == "proposed":
                self._journal.save(old, state="superseded",
                                   error=f"superseded by {doc['plan_id']}")
        self._journal.save(doc)
        self._last_plan_id = doc["plan_id"]
        self._log.info("plan_proposed", plan_id=doc["plan_id"], trigger=trigger, actor=actor,
                       actions=len(plan.actions), gpus_before=plan.gpus_used_before,
                       gpus_after=plan.gpus_used_after)
        return doc

    def plan(self, plan_id: str) -> dict[str, Any]:
        if not plan_id:
            latest = self._store.latest_plans(1)
            if not latest:
                raise errors.NotFound("no plan has been proposed yet", field="plan_id")
            return latest[0]
        doc = self._store.load_plan(plan_id)
        if doc is None:
            raise errors.NotFound(f"plan_id={plan_id!r} is not a known plan", field="plan_id")
        return doc

    def plans(self, limit: int) -> list[dict[str, Any]]:
        if not 0 <= limit <= 1000:
            raise errors.out_of_range("limit", limit, 0, 1000)
        return self._store.latest_plans(limit or 20)

    def diff(self, plan_id: str) -> tuple[str, list[str]]:
        doc = self.plan(plan_id)
        return doc["plan_id"], diff_lines(doc)

    def apply(self, plan_id: str, actor: str) -> dict[str, Any]:
        """Start executing a proposed (or resume a paused) plan; returns at once."""
        doc = self.plan(plan_id)
        if doc["state"] not in OPEN_STATES:
            raise errors.FailedPrecondition(
                f"plan {doc['plan_id']} is {doc['state']}; only a proposed or paused plan can be "
                "applied", field="plan_id")
        if doc["epoch"] != self._core.epoch:
            raise errors.FailedPrecondition(
                f"plan {doc['plan_id']} was made in epoch {doc['epoch']}, the coordinator is in "
                f"epoch {self._core.epoch}; propose a new one", field="plan_id")
        if self.executor.busy:
            raise errors.FailedPrecondition("another plan is being applied", field="plan_id")
        self._journal.save(doc, state="applying", error="")
        self._journal.audit("", "ApplyPlan", json.dumps({"plan_id": doc["plan_id"]}), True,
                            doc["reason"], actor)
        self.executor.start(doc, actor)
        return doc

    # ---------------------------------------------------------------- mode and loop

    def set_mode(self, mode: str, actor: str) -> None:
        if mode not in MODES:
            raise errors.InvalidArgument(f"mode={mode!r} is unknown; allowed: {', '.join(MODES)}",
                                         field="mode")
        self.mode = mode
        self._journal.audit("", "SetMode", json.dumps({"mode": mode}), True, "", actor)

    def mode_status(self) -> tuple[str, float, float, str]:
        return self.mode, self._s.interval_s, self._last_run_unix_s, self._last_plan_id

    async def run(self) -> None:
        await self.resume_interrupted()
        next_run_mono_s = self._core.clock.monotonic() + self._s.interval_s
        while True:
            await asyncio.sleep(self._s.demand_sample_s)
            try:
                self.sample()
                now = self._core.clock.monotonic()
                if now >= next_run_mono_s:
                    next_run_mono_s = now + self._s.interval_s
                    self.tick()
            except Exception:  # logged loudly; the next round retries
                self._log.exception("rebalance_round_failed")

    async def resume_interrupted(self) -> None:
        """Resume a plan that a previous coordinator left applying (StagedPlanRunner)."""
        await self.executor.resume_interrupted()

    def sample(self) -> None:
        self._endpoints.sample(self._core.registry.records())

    def tick(self) -> None:
        if self.mode == "off" or self.executor.busy:
            return
        doc = self.propose("loop", "coordinator", keep_empty=False)
        if self.mode == "auto" and doc["stages"]:
            self.apply(doc["plan_id"], "coordinator")

    # ---------------------------------------------------------------- placement and routing

    def place(self, gpus: int, priority_class: str, power_w: float, gpu_type: str
              ) -> tuple[str, list[RankedNode]]:
        return self._cluster.place(gpus, priority_class, power_w, gpu_type)

    def routes(self, endpoint: str, mode: str) -> list[tuple[RouteWeight, str]]:
        """Weights of the endpoint's instances, each with its URL ("" when not known)."""
        return self._cluster.routes(endpoint, mode)

    def limits(self) -> pm.Limits:
        """The topology's limits, lowered by the emergencies in force."""
        return self._cluster.limits()
