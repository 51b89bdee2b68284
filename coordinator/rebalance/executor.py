"""Executing a rebalance plan, one at a time, stage by stage:

- each stage: one agent Plan per node, sent over the nodes' streams in parallel (MIG mode and
  layout actions first, then, once the node reports its new slices, the instance actions);
- verification from reports: started instances READY, stopped ones gone, locked clocks shown
  on their GPUs (reset ones unlocked); a failed action, a FAILED instance or a verification
  timeout pauses the plan with the reason;
- every action is written to the audit log with the plan id in the actor;
- a plan a previous coordinator left applying is settled from the reports and resumed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import structlog

from coordinator.core import CoordinatorCore
from coordinator.policy.clocks import LOCK
from coordinator.rebalance.effects import (
    effect_shown,
    free_slice,
    lowest_clock_mhz,
    pending_effects,
    running_spec,
)
from coordinator.rebalance.journal import PlanJournal
from coordinator.rebalance.settings import RebalanceSettings
from coordinator.rebalance.snapshot import EndpointDecl
from coordinator.registry import NodeRecord
from coordinator.rpc import agent_codec
from coordinator.validation import validate_action
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common import errors

PREP_KINDS = ("set_mig_mode", "apply_mig_layout")


class StagedPlanRunner:
    """decl: an endpoint's declaration by name (NotFound when it is not declared)."""

    def __init__(self, core: CoordinatorCore, journal: PlanJournal, settings: RebalanceSettings,
                 decl: Callable[[str], EndpointDecl]) -> None:
        self._core = core
        self._journal = journal
        self._s = settings
        self._decl = decl
        self._applying: asyncio.Task[None] | None = None
        self._started_unix_s = core.clock.time()
        self._log = structlog.get_logger().bind(component="rebalancer")

    @property
    def busy(self) -> bool:
        """Whether a plan is being applied."""
        return self._applying is not None and not self._applying.done()

    def start(self, doc: dict[str, Any], actor: str) -> asyncio.Task[None]:
        """Execute the plan in the background (the caller checked `busy`)."""
        self._applying = asyncio.get_running_loop().create_task(self._execute(doc, actor))
        return self._applying

    # ---------------------------------------------------------------- recovery

    async def resume_interrupted(self) -> None:
        """Resume a plan that a previous coordinator left applying (it died mid-execution).

        Its nodes' reports settle each action journaled as running: an effect the reports
        show counts as done and is not sent again; one they do not show is sent again. Both are
        safe to repeat at the agent (a second start of an active id is refused, a second stop
        finds nothing), so no action takes effect twice. The plan then runs on in this
        coordinator's epoch. If a node does not report within the verify timeout, the plan is
        paused with the reason instead: an operator resumes it with `plan apply`."""
        for doc in self._journal.store.plans_in_state("applying"):
            nodes = sorted({a["node_id"] for s in doc["stages"] for a in s["actions"]})
            missing = await self._await_reports(nodes)
            old_epoch = doc["epoch"]
            doc["epoch"] = self._core.epoch
            if missing:
                self._journal.save(doc, state="paused", error=(
                    f"coordinator restarted mid-plan; {', '.join(missing)} did not report "
                    "within the verify timeout, so in-flight actions are unsettled"))
                self._log.error("plan_resume_paused", plan_id=doc["plan_id"], missing=missing)
                continue
            for stage in doc["stages"]:
                for a in stage["actions"]:
                    if a["state"] == "running":
                        self._settle(a)
            doc.setdefault("warnings", []).append(
                f"resumed after a coordinator restart (epoch {old_epoch} -> {doc['epoch']})")
            self._journal.save(doc, resumed_from_epoch=old_epoch)
            self._journal.audit("", "ResumePlan", json.dumps({"plan_id": doc["plan_id"],
                                                              "from_epoch": old_epoch}), True,
                                "coordinator restarted while the plan was applying",
                                "coordinator")
            self._log.warning("plan_resumed", plan_id=doc["plan_id"], from_epoch=old_epoch)
            await self.start(doc, "coordinator (resumed)")  # one plan at a time, as apply()

    async def _await_reports(self, nodes: list[str]) -> list[str]:
        """Wait for a report from each node received by this coordinator (the ones restored
        from the database predate the crash); those still missing."""
        deadline = self._core.clock.monotonic() + self._s.verify_timeout_s
        while True:
            missing = [n for n in nodes if not self._reported(n)]
            if not missing or self._core.clock.monotonic() >= deadline:
                return missing
            await asyncio.sleep(self._s.verify_poll_s)

    def _reported(self, node_id: str) -> bool:
        try:
            rec = self._core.registry.get(node_id)
        except errors.NotFound:
            return False
        return rec.report is not None and rec.report_received_unix_s >= self._started_unix_s

    def _settle(self, a: dict[str, Any]) -> None:
        """An action whose answer was lost with the old coordinator: done if the reports show
        its effect, otherwise pending (sent again)."""
        applied = effect_shown(self._core.registry.get(a["node_id"]), a)
        a["state"], a["error"] = ("done", "") if applied else ("pending", "")
        self._journal.audit(a["node_id"], "SettleAction", json.dumps(
            {k: v for k, v in a.items() if k != "exec"}), True,
            "effect shown by the report: not sent again" if applied
            else "effect not shown by the report: will be sent", "coordinator")

    # ---------------------------------------------------------------- execution

    async def _execute(self, doc: dict[str, Any], actor: str) -> None:
        who = f"rebalancer:{doc['plan_id']} ({actor})"
        try:
            for index, stage in enumerate(doc["stages"]):
                if stage["state"] == "done":
                    continue
                stage["state"] = "running"
                self._journal.save(doc)
                error = await self._run_stage(doc, stage, who)
                if not error:
                    error = await self._verify(stage)
                if error:
                    stage["state"] = "failed"
                    self._journal.save(doc, state="paused", error=f"stage {index + 1}: {error}")
                    self._log.error("plan_paused", plan_id=doc["plan_id"], stage=index + 1,
                                    error=error)
                    return
                stage["state"] = "done"
                self._journal.save(doc)
            self._journal.save(doc, state="applied")
            self._log.info("plan_applied", plan_id=doc["plan_id"])
        except Exception as err:  # surfaces in the plan, not only in the log
            self._log.exception("plan_execution_failed", plan_id=doc["plan_id"])
            self._journal.save(doc, state="failed", error=f"{type(err).__name__}: {err}")

    async def _run_stage(self, doc: dict[str, Any], stage: dict[str, Any], actor: str) -> str:
        by_node: dict[str, list[dict[str, Any]]] = {}
        for a in stage["actions"]:
            if a["state"] != "done":
                by_node.setdefault(a["node_id"], []).append(a)
        errs = await asyncio.gather(*(self._run_node(doc, n, acts, actor)
                                      for n, acts in sorted(by_node.items())))
        return "; ".join(e for e in errs if e)

    async def _run_node(self, doc: dict[str, Any], node_id: str, actions: list[dict[str, Any]],
                        actor: str) -> str:
        prep = [a for a in actions if a["kind"] in PREP_KINDS]
        rest = [a for a in actions if a["kind"] not in PREP_KINDS]
        if prep:
            since = self._core.clock.time()
            error = await self._send(doc, node_id, prep, actor)
            if error:
                return error
            await self._fresh_report(node_id, since)
        return await self._send(doc, node_id, rest, actor) if rest else ""

    async def _send(self, doc: dict[str, Any], node_id: str, actions: list[dict[str, Any]],
                    actor: str) -> str:
        """One agent Plan for these actions; each action's outcome is audited and recorded.
        The actions are journaled as running before the Plan leaves and as done or failed when
        it answers, so a coordinator that dies in between knows which outcomes to settle."""
        try:
            rec = self._core.registry.get(node_id)
            if rec.report is None or rec.session is None or rec.session.closed:
                raise errors.Unavailable(f"node {node_id} is not connected", field="node_id")
            built = [(a, self.agent_action(rec, a)) for a in actions]
            for _, pb in built:
                validate_action(rec.report, pb)
            plan = agent_codec.plan([pb for _, pb in built], self._core.epoch, actor)
            for a, _ in built:
                a["state"] = "running"
            self._journal.save(doc)
            resp = await rec.session.apply_plan(plan, self._core.instance_action_timeout_s)
        except errors.DomainError as err:
            for a in actions:
                self._journal.record(node_id, a, None, False, str(err), actor)
            self._journal.save(doc)
            return f"{node_id}: {err}"
        results = {r.action_id: r for r in resp.results}
        failed = ""
        for a, pb in built:
            r = results.get(pb.action_id)
            ok = r is not None and r.ok
            message = r.message if r is not None else "not run (an earlier action failed)"
            self._journal.record(node_id, a, pb, ok, message if not ok else "", actor)
            if not ok and not failed:
                failed = f"{node_id}: {a['kind']} {a['instance_id'] or a['gpu_indices']}: " + (
                    f"{r.code} {r.message}" if r is not None else message)
        self._journal.save(doc)
        return failed

    def agent_action(self, rec: NodeRecord, a: dict[str, Any]) -> agent_pb2.Action:
        """A stored plan action as the agent Action to send to its node (rec)."""
        kind = a["kind"]
        spec = self._start_spec(rec, a) if kind == "start_instance" else None
        min_mhz = (lowest_clock_mhz(rec, a["gpu_indices"][0], int(a["sm_clock_mhz"]))
                   if kind == LOCK else 0)
        return agent_codec.rebalance_action(a, spec, min_mhz)

    def _start_spec(self, rec: NodeRecord, a: dict[str, Any]) -> agent_pb2.InstanceSpec:
        """The new instance: the endpoint's engine settings (from a running instance) with the
        plan's placement and reshape knobs."""
        ex = a["exec"]
        decl = self._decl(a["endpoint"])
        template = running_spec(self._core.registry.records(), a["endpoint"])
        devices = ([ex["mig_uuid"] or free_slice(rec, a["gpu_indices"][0], a["mig_profiles"][0])]
                   if a["mig_profiles"] else [str(g) for g in a["gpu_indices"]])
        model_path = decl.path if ex["model"] == decl.spec.model else decl.spec.model_path(
            ex["model"])
        return agent_codec.instance_spec(template, a["instance_id"], a["endpoint"], model_path,
                                         devices, ex["tensor_parallel"], ex["quantization"],
                                         decl.spec.priority_class)

    async def _fresh_report(self, node_id: str, since_unix_s: float) -> None:
        deadline = self._core.clock.monotonic() + min(30.0, self._s.verify_timeout_s)
        while self._core.clock.monotonic() < deadline:
            rec = self._core.registry.get(node_id)  # receipt time: agent clocks may skew
            if rec.report is not None and rec.report_received_unix_s > since_unix_s:
                return
            await asyncio.sleep(self._s.verify_poll_s)

    async def _verify(self, stage: dict[str, Any]) -> str:
        """Wait until the reports show the stage's effect; the reason when they never do."""
        deadline = self._core.clock.monotonic() + self._s.verify_timeout_s
        while True:
            pending, error = pending_effects(stage["actions"], self._core.registry.get)
            if error:
                return error
            if not pending:
                return ""
            if self._core.clock.monotonic() >= deadline:
                return (f"not verified within {self._s.verify_timeout_s:g} s: "
                        f"{', '.join(pending)}")
            await asyncio.sleep(self._s.verify_poll_s)
