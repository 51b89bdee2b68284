"""Rebalance loop and plan execution; placement and routing over the live registry.

Runs on the coordinator's event loop. The decisions are the pure policies of coordinator.policy
(rebalance, place, routing_weights); this module gathers their snapshot from the latest reports
(coordinator.rebalance.snapshot), keeps endpoints and plans in SQLite (coordinator.store.plans),
and executes a plan stage by stage:

- each stage: one agent Plan per node, sent over the nodes' streams in parallel (MIG mode and
  layout actions first, then, once the node reports its new slices, the instance actions);
- verification from reports: started instances READY, stopped ones gone, locked clocks shown
  on their GPUs (reset ones unlocked); a failed action, a FAILED instance or a verification
  timeout pauses the plan with the reason;
- the last stage locks the clocks of the endpoints the plan leaves as they are at the lowest
  clock that covers their demand x (1 + headroom) (policy.clocks, policy.configure.clock_plan),
  skipping GPUs under an emergency cap (the emergency's Phase 2 owns their clocks); a plan with
  only clock actions is a plan like any other (kept for approval in propose mode);
- every action is written to the audit log with the plan id in the actor.

Modes: off (nothing runs), propose (every interval a plan with actions is stored for approval),
auto (such a plan is also applied at once). A newer proposal supersedes older proposed plans.
Plans, placement and routes use the effective limits: the topology's, lowered by the emergencies
in force (`cuts`, from the emergency controller).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from google.protobuf import json_format

from coordinator.core import CoordinatorCore
from coordinator.policy import model as pm
from coordinator.policy.clocks import CLOCK_KINDS, LOCK, RESET, with_clock_stage
from coordinator.policy.configure import ConfigureConfig
from coordinator.policy.placement import PlaceRequest, RankedNode, place
from coordinator.policy.rebalance import rebalance
from coordinator.policy.routing import RouteWeight, RoutingConfig, routing_weights
from coordinator.profiles.schema import ProfileRow
from coordinator.profiles.store import load_profiles
from coordinator.rebalance.snapshot import (
    DemandEstimator,
    EndpointDecl,
    ScopeCut,
    build_snapshot,
    demand_of,
    limits_of,
    locked_clock_mhz,
    sample_demand,
    validate_decl,
    with_phase2_demand,
)
from coordinator.registry import NodeRecord
from coordinator.rpc import agent_codec
from coordinator.store.plans import PlanStoreLike
from coordinator.validation import validate_action
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common import errors
from shapeshifter.hw.models import GPU_MODELS

MODES = ("off", "propose", "auto")
OPEN_STATES = ("proposed", "paused")
PREP_KINDS = ("set_mig_mode", "apply_mig_layout")
CLASS_WORKLOAD = {"iaas": "opaque", "saas": "flexible", "best_effort": "flexible"}


@dataclass(frozen=True)
class RebalanceSettings:
    mode: str = "propose"
    interval_s: float = 60.0
    demand_sample_s: float = 5.0
    demand_smoothing_s: float = 300.0
    verify_timeout_s: float = 600.0
    verify_poll_s: float = 0.25
    policy: pm.RebalanceConfig = field(default_factory=pm.RebalanceConfig)
    configure: ConfigureConfig = field(default_factory=ConfigureConfig)  # the clock stage


class Rebalancer:
    def __init__(self, core: CoordinatorCore, store: PlanStoreLike, profiles: list[ProfileRow],
                 settings: RebalanceSettings,
                 cuts: Callable[[], Sequence[ScopeCut]] | None = None) -> None:
        self._core = core
        self._cuts = cuts or tuple
        self._store = store
        self._profiles = profiles
        self._s = settings
        self.mode = settings.mode
        self._demand = DemandEstimator(settings.demand_smoothing_s)
        self._decls = {d["spec"]["name"]: EndpointDecl.from_doc(d)
                       for d in store.load_endpoints()}
        self._last_run_unix_s = 0.0
        self._last_plan_id = ""
        self._applying: asyncio.Task[None] | None = None
        self._started_unix_s = core.clock.time()
        self._log = structlog.get_logger().bind(component="rebalancer")

    # ---------------------------------------------------------------- endpoints

    def set_endpoint(self, decl: EndpointDecl, actor: str) -> EndpointDecl:
        decl = validate_decl(replace(decl, updated_at_unix_s=self._core.clock.time()))
        self._store.save_endpoint(decl.spec.name, decl.to_doc(), decl.updated_at_unix_s)
        self._decls[decl.spec.name] = decl
        self._audit("", "SetEndpoint", json.dumps(decl.to_doc(), sort_keys=True), True, "",
                    actor)
        return decl

    def delete_endpoint(self, name: str, actor: str) -> None:
        self._decl(name)
        self._store.delete_endpoint(name)
        del self._decls[name]
        self._audit("", "DeleteEndpoint", json.dumps({"name": name}), True, "", actor)

    def endpoints(self) -> list[tuple[EndpointDecl, float]]:
        """Each declaration with the demand (req/s) the loop uses for it now."""
        return [(d, sum(demand_of(d, self._demand).values()))
                for _, d in sorted(self._decls.items())]

    def _decl(self, name: str) -> EndpointDecl:
        if name not in self._decls:
            known = ", ".join(sorted(self._decls)) or "none"
            raise errors.NotFound(f"endpoint={name!r} is not declared (known: {known})",
                                  field="endpoint")
        return self._decls[name]

    # ---------------------------------------------------------------- plans

    def propose(self, trigger: str, actor: str, keep_empty: bool = True) -> dict[str, Any]:
        """Run the policy on the current snapshot; store and return the plan document (a plan
        without actions is only stored when keep_empty)."""
        if self._applying is not None and not self._applying.done():
            raise errors.FailedPrecondition("a plan is being applied; propose after it ends",
                                            field="plan_id")
        snapshot = self._snapshot()
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
                self._save(old, state="superseded", error=f"superseded by {doc['plan_id']}")
        self._save(doc)
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
        if self._applying is not None and not self._applying.done():
            raise errors.FailedPrecondition("another plan is being applied", field="plan_id")
        self._save(doc, state="applying", error="")
        self._audit("", "ApplyPlan", json.dumps({"plan_id": doc["plan_id"]}), True, doc["reason"],
                    actor)
        self._applying = asyncio.get_running_loop().create_task(self._execute(doc, actor))
        return doc

    # ---------------------------------------------------------------- mode and loop

    def set_mode(self, mode: str, actor: str) -> None:
        if mode not in MODES:
            raise errors.InvalidArgument(f"mode={mode!r} is unknown; allowed: {', '.join(MODES)}",
                                         field="mode")
        self.mode = mode
        self._audit("", "SetMode", json.dumps({"mode": mode}), True, "", actor)

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

    # ---------------------------------------------------------------- recovery

    async def resume_interrupted(self) -> None:
        """Resume a plan that a previous coordinator left applying (it died mid-execution).

        Its nodes' reports settle each action journaled as running: an effect the reports
        show counts as done and is not sent again; one they do not show is sent again. Both are
        safe to repeat at the agent (a second start of an active id is refused, a second stop
        finds nothing), so no action takes effect twice. The plan then runs on in this
        coordinator's epoch. If a node does not report within the verify timeout, the plan is
        paused with the reason instead: an operator resumes it with `plan apply`."""
        for doc in self._store.plans_in_state("applying"):
            nodes = sorted({a["node_id"] for s in doc["stages"] for a in s["actions"]})
            missing = await self._await_reports(nodes)
            old_epoch = doc["epoch"]
            doc["epoch"] = self._core.epoch
            if missing:
                self._save(doc, state="paused", error=(
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
            self._save(doc, resumed_from_epoch=old_epoch)
            self._audit("", "ResumePlan", json.dumps({"plan_id": doc["plan_id"],
                                                      "from_epoch": old_epoch}), True,
                        "coordinator restarted while the plan was applying", "coordinator")
            self._log.warning("plan_resumed", plan_id=doc["plan_id"], from_epoch=old_epoch)
            self._applying = asyncio.get_running_loop().create_task(
                self._execute(doc, "coordinator (resumed)"))
            await self._applying  # one plan at a time, as apply() enforces

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
        applied = _effect_shown(self._core.registry.get(a["node_id"]), a)
        a["state"], a["error"] = ("done", "") if applied else ("pending", "")
        self._audit(a["node_id"], "SettleAction", json.dumps(
            {k: v for k, v in a.items() if k != "exec"}), True,
            "effect shown by the report: not sent again" if applied
            else "effect not shown by the report: will be sent", "coordinator")

    def sample(self) -> None:
        now = self._core.clock.time()
        for name, sample in sample_demand(self._core.registry.records(), self._decls).items():
            self._demand.observe(name, sample, now)

    def tick(self) -> None:
        busy = self._applying is not None and not self._applying.done()
        if self.mode == "off" or busy:
            return
        doc = self.propose("loop", "coordinator", keep_empty=False)
        if self.mode == "auto" and doc["stages"]:
            self.apply(doc["plan_id"], "coordinator")

    # ---------------------------------------------------------------- placement and routing

    def place(self, gpus: int, priority_class: str, power_w: float, gpu_type: str
              ) -> tuple[str, list[RankedNode]]:
        if priority_class not in CLASS_WORKLOAD:
            raise errors.InvalidArgument(f"priority_class={priority_class!r} is unknown; "
                                         f"allowed: {', '.join(CLASS_WORKLOAD)}",
                                         field="priority_class")
        if gpu_type and gpu_type not in GPU_MODELS:
            raise errors.InvalidArgument(f"gpu_type={gpu_type!r} is unknown; allowed: "
                                         f"{', '.join(sorted(GPU_MODELS))}", field="gpu_type")
        if power_w == 0:  # not predicted: the GPUs' TDP
            types = [gpu_type] if gpu_type else list(GPU_MODELS)
            power_w = gpus * max(GPU_MODELS[t].idle_power_w + GPU_MODELS[t].dynamic_power_max_w
                                 for t in types)
        workload = CLASS_WORKLOAD[priority_class]
        request = PlaceRequest(gpus, power_w, workload, gpu_type)
        return workload, place(request, self._snapshot(), self.limits())

    def routes(self, endpoint: str, mode: str) -> list[tuple[RouteWeight, str]]:
        """Weights of the endpoint's instances, each with its URL ("" when not known)."""
        config = RoutingConfig(mode=mode or "latency")
        weights = routing_weights(endpoint, self._snapshot(), self.limits(), config)
        return [(w, self._url(w.node_id, w.instance_id)) for w in weights]

    def limits(self) -> pm.Limits:
        """The topology's limits, lowered by the emergencies in force."""
        return limits_of(self._core.topology, cuts=self._cuts())

    def _url(self, node_id: str, instance_id: str) -> str:
        rec = self._core.registry.get(node_id)
        for inst in rec.report.instances if rec.report is not None else ():
            if inst.spec.instance_id == instance_id and inst.spec.port:
                return f"http://{rec.hostname or node_id}:{inst.spec.port}"
        return ""

    def _snapshot(self) -> pm.ClusterSnapshot:
        demand = {name: demand_of(d, self._demand) for name, d in self._decls.items()}
        records = self._core.registry.records()
        # Phase 2: capacity that emergency caps took is planned elsewhere (as the simulator).
        return build_snapshot(records, self._core.topology, self._decls,
                              with_phase2_demand(records, demand), self._core.clock.time())

    # ---------------------------------------------------------------- execution

    async def _execute(self, doc: dict[str, Any], actor: str) -> None:
        who = f"rebalancer:{doc['plan_id']} ({actor})"
        try:
            for index, stage in enumerate(doc["stages"]):
                if stage["state"] == "done":
                    continue
                stage["state"] = "running"
                self._save(doc)
                error = await self._run_stage(doc, stage, who)
                if not error:
                    error = await self._verify(stage)
                if error:
                    stage["state"] = "failed"
                    self._save(doc, state="paused", error=f"stage {index + 1}: {error}")
                    self._log.error("plan_paused", plan_id=doc["plan_id"], stage=index + 1,
                                    error=error)
                    return
                stage["state"] = "done"
                self._save(doc)
            self._save(doc, state="applied")
            self._log.info("plan_applied", plan_id=doc["plan_id"])
        except Exception as err:  # surfaces in the plan, not only in the log
            self._log.exception("plan_execution_failed", plan_id=doc["plan_id"])
            self._save(doc, state="failed", error=f"{type(err).__name__}: {err}")

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
            built = [(a, self._agent_action(rec, a)) for a in actions]
            for _, pb in built:
                validate_action(rec.report, pb)
            plan = agent_codec.plan([pb for _, pb in built], self._core.epoch, actor)
            for a, _ in built:
                a["state"] = "running"
            self._save(doc)
            resp = await rec.session.apply_plan(plan, self._core.instance_action_timeout_s)
        except errors.DomainError as err:
            for a in actions:
                self._record(node_id, a, None, False, str(err), actor)
            self._save(doc)
            return f"{node_id}: {err}"
        results = {r.action_id: r for r in resp.results}
        failed = ""
        for a, pb in built:
            r = results.get(pb.action_id)
            ok = r is not None and r.ok
            message = r.message if r is not None else "not run (an earlier action failed)"
            self._record(node_id, a, pb, ok, message if not ok else "", actor)
            if not ok and not failed:
                failed = f"{node_id}: {a['kind']} {a['instance_id'] or a['gpu_indices']}: " + (
                    f"{r.code} {r.message}" if r is not None else message)
        self._save(doc)
        return failed

    def _agent_action(self, rec: NodeRecord, a: dict[str, Any]) -> agent_pb2.Action:
        ex = a["exec"]
        action = agent_pb2.Action(action_id=agent_codec.new_id(), reason=a["reason"][:500])
        kind = a["kind"]
        if kind == "set_mig_mode":
            action.set_mig_mode.CopyFrom(agent_pb2.SetMigModeRequest(
                gpu_index=a["gpu_indices"][0], enabled=ex["mig_enabled"]))
        elif kind == "apply_mig_layout":
            action.apply_mig_layout.CopyFrom(agent_pb2.ApplyMigLayoutRequest(
                gpu_index=a["gpu_indices"][0], profiles=a["mig_profiles"]))
        elif kind == "stop_instance":
            action.stop_instance.CopyFrom(agent_pb2.StopInstanceRequest(
                instance_id=a["instance_id"]))
        elif kind == "start_instance":
            action.start_instance.CopyFrom(agent_pb2.StartInstanceRequest(
                spec=self._start_spec(rec, a)))
        elif kind == LOCK:
            index, max_mhz = a["gpu_indices"][0], int(a["sm_clock_mhz"])
            action.lock_clocks.CopyFrom(agent_pb2.LockClocksRequest(
                gpu_index=index, min_mhz=_lowest_clock_mhz(rec, index, max_mhz),
                max_mhz=max_mhz))
        elif kind == RESET:
            action.reset_clocks.CopyFrom(agent_pb2.ResetClocksRequest(
                gpu_index=a["gpu_indices"][0]))
        else:
            raise errors.InvalidArgument(f"action kind {kind!r} is not executable", field="kind")
        return action

    def _start_spec(self, rec: NodeRecord, a: dict[str, Any]) -> agent_pb2.InstanceSpec:
        """The new instance: the endpoint's engine settings (from a running instance) with the
        plan's placement and reshape knobs."""
        ex = a["exec"]
        decl = self._decl(a["endpoint"])
        spec = agent_pb2.InstanceSpec()
        template = _template(self._core.registry.records(), a["endpoint"])
        if template is not None:
            spec.CopyFrom(template)
        devices = ([ex["mig_uuid"] or _free_slice(rec, a["gpu_indices"][0], a["mig_profiles"][0])]
                   if a["mig_profiles"] else [str(g) for g in a["gpu_indices"]])
        spec.instance_id, spec.endpoint = a["instance_id"], a["endpoint"]
        spec.model_path = decl.path if ex["model"] == decl.spec.model else decl.spec.model_path(
            ex["model"])
        del spec.devices[:]
        spec.devices.extend(devices)
        spec.tensor_parallel_size = ex["tensor_parallel"]
        spec.quantization = ex["quantization"]
        spec.priority_class = decl.spec.priority_class
        spec.port = 0
        return spec

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
            pending, error = self._check(stage["actions"])
            if error:
                return error
            if not pending:
                return ""
            if self._core.clock.monotonic() >= deadline:
                return (f"not verified within {self._s.verify_timeout_s:g} s: "
                        f"{', '.join(pending)}")
            await asyncio.sleep(self._s.verify_poll_s)

    def _check(self, actions: Iterable[dict[str, Any]]) -> tuple[list[str], str]:
        pending = []
        for a in actions:
            if a["kind"] in CLOCK_KINDS:
                if not _effect_shown(self._core.registry.get(a["node_id"]), a):
                    pending.append(f"{a['node_id']} GPU {a['gpu_indices'][0]} "
                                   f"({_clock_text(a)} not reported yet)")
                continue
            if a["kind"] not in ("start_instance", "stop_instance"):
                continue
            state = _instance_state(self._core.registry.get(a["node_id"]), a["instance_id"])
            where = f"{a['node_id']}/{a['instance_id']}"
            if a["kind"] == "start_instance":
                if state in ("FAILED", "STOPPED"):
                    a["state"], a["error"] = "failed", f"instance is {state}"
                    return pending, f"{where} is {state} after its start"
                if state != "READY":
                    pending.append(f"{where} {state or 'absent'} (want READY)")
            elif state in ("STARTING", "READY", "DRAINING"):
                pending.append(f"{where} {state} (want stopped)")
        return pending, ""

    # ---------------------------------------------------------------- records

    def _record(self, node_id: str, a: dict[str, Any], pb: agent_pb2.Action | None, ok: bool,
                error: str, actor: str) -> None:
        a["state"], a["error"] = ("done", "") if ok else ("failed", error)
        request = (json_format.MessageToJson(pb, indent=None, preserving_proto_field_name=True)
                   if pb is not None else json.dumps({k: v for k, v in a.items()
                                                      if k != "exec"}))
        self._audit(node_id, a["kind"], request, ok, error or a["reason"], actor)

    def _audit(self, node_id: str, action: str, request_json: str, ok: bool, message: str,
               actor: str) -> None:
        self._core.store.append_audit(self._core.clock.time(), self._core.epoch, node_id, action,
                                      request_json, ok, "OK" if ok else "FAILED", message, actor)

    def _save(self, doc: dict[str, Any], **changes: Any) -> None:
        doc.update(changes, updated_at_unix_s=self._core.clock.time())
        self._store.save_plan(doc["plan_id"], doc["created_at_unix_s"], doc["state"], doc)


# ---------------------------------------------------------------------- helpers


def _template(records: Iterable[NodeRecord], endpoint: str) -> agent_pb2.InstanceSpec | None:
    for rec in records:
        for inst in rec.report.instances if rec.report is not None else ():
            if inst.spec.endpoint == endpoint and inst.state in ("READY", "STARTING"):
                return inst.spec
    return None


def _free_slice(rec: NodeRecord, gpu_index: int, profile: str) -> str:
    """A MIG device of that profile on the GPU that no instance uses (after a fresh layout)."""
    node = rec.report
    assert node is not None
    used = {d for i in node.instances if i.state != "STOPPED" for d in i.spec.devices}
    for g in node.gpus:
        if g.index == gpu_index:
            for m in g.mig_instances:
                if m.profile == profile and m.uuid and m.uuid not in used:
                    return m.uuid
    raise errors.FailedPrecondition(
        f"{rec.node_id} GPU {gpu_index} reports no free {profile} MIG device after its layout",
        field="mig_profile")


def _effect_shown(rec: NodeRecord, a: dict[str, Any]) -> bool:
    """Whether a node's report shows the effect of a plan action."""
    kind, report = a["kind"], rec.report
    if kind == "start_instance":
        return _instance_state(rec, a["instance_id"]) in ("STARTING", "READY")
    if kind == "stop_instance":
        return _instance_state(rec, a["instance_id"]) in ("", "STOPPED", "FAILED")
    gpu = next((g for g in report.gpus if g.index == a["gpu_indices"][0]), None) if report else None
    if gpu is None:
        return False
    if kind in CLOCK_KINDS:  # the agent reports the lock it holds (its journal) per GPU
        return locked_clock_mhz(gpu) == (a.get("sm_clock_mhz") or None)
    if kind == "set_mig_mode":
        return gpu.mig_pending_enabled == a["exec"]["mig_enabled"]  # pending: what was set
    return sorted(m.profile for m in gpu.mig_instances) == sorted(a["mig_profiles"])


def _lowest_clock_mhz(rec: NodeRecord, gpu_index: int, max_mhz: int) -> int:
    """The lower end of a clock lock: the GPU's lowest clock (reported, else its model's), so
    it still clocks down when idle; max_mhz when neither is known."""
    report = rec.report
    gpu = next((g for g in report.gpus if g.index == gpu_index), None) if report else None
    if gpu is None:
        return max_mhz
    model = GPU_MODELS.get(gpu.gpu_type)
    clocks = list(gpu.supported_sm_clocks_mhz) or (list(model.sm_clocks_mhz) if model else [])
    return min([c for c in clocks if c <= max_mhz], default=max_mhz)


def _clock_text(a: Mapping[str, Any]) -> str:
    mhz = a.get("sm_clock_mhz") or 0
    return f"SM clock locked at <= {mhz} MHz" if mhz else "SM clock unlocked"


def _instance_state(rec: NodeRecord, instance_id: str) -> str:
    for inst in rec.report.instances if rec.report is not None else ():
        if inst.spec.instance_id == instance_id:
            return inst.state
    return ""


def plan_doc(plan: pm.Plan, plan_id: str, epoch: int, now_unix_s: float, trigger: str
             ) -> dict[str, Any]:
    """The stored form of a plan: PlanStatus's JSON fields plus each action's `exec` knobs."""
    return {
        "plan_id": plan_id, "epoch": epoch, "created_at_unix_s": now_unix_s,
        "updated_at_unix_s": now_unix_s, "state": "proposed", "reason": plan.reason,
        "error": "", "trigger": trigger, "gpus_before": plan.gpus_used_before,
        "gpus_after": plan.gpus_used_after, "power_before_w": round(plan.power_before_w, 1),
        "power_after_w": round(plan.power_after_w, 1), "warnings": list(plan.warnings),
        "outcomes": [vars(o).copy() for o in plan.outcomes],
        "stages": [{"reason": s.reason, "state": "pending",
                    "row_power_after_w": {k: round(v, 1) for k, v in s.row_power_after_w.items()},
                    "actions": [_action_doc(a) for a in s.actions]} for s in plan.stages],
    }


def _action_doc(a: pm.PlanAction) -> dict[str, Any]:
    c = a.config
    clock = {"sm_clock_mhz": a.sm_clock_mhz or 0}
    # A clock action's "config" says what it sets (plan show, plan diff).
    clock_text = _clock_text(clock) if a.kind in CLOCK_KINDS else ""
    config = c.describe() if c is not None else clock_text
    return {
        "kind": a.kind, "node_id": a.node_id, "reason": a.reason, "endpoint": a.endpoint,
        "instance_id": a.instance_id, "config": config,
        "gpu_indices": list(a.gpu_indices), "mig_profiles": list(a.mig_profiles),
        "capacity_rps": round(a.capacity_rps, 3), "state": "pending", "error": "", **clock,
        "exec": {"model": c.model if c else "", "tensor_parallel": c.tensor_parallel if c else 0,
                 "quantization": c.quantization if c else "", "gpu_type": c.gpu_type if c else "",
                 "mig_uuid": a.mig_uuid, "mig_enabled": a.mig_enabled},
    }


def diff_lines(doc: Mapping[str, Any]) -> list[str]:
    """One line per action: + start, - stop, ~ MIG or clock change; with where, what and
    why (a clock action's what: "SM clock locked at <= N MHz" or "SM clock unlocked")."""
    sign = {"start_instance": "+", "stop_instance": "-"}
    out = []
    for i, stage in enumerate(doc["stages"], 1):
        for a in stage["actions"]:
            gpus = ",".join(map(str, a["gpu_indices"]))
            what = a["config"] or " ".join(a["mig_profiles"]) or a["kind"]
            out.append(f"{sign.get(a['kind'], '~')} [stage {i}] {a['node_id']}/"
                       f"{a['instance_id'] or a['kind']} {what} (GPUs {gpus}): {a['reason']}")
    return out


# ---------------------------------------------------------------------- daemon options

_FLOAT_OPTIONS = (  # flag, settings field, low, high
    ("--rebalance-interval-s", "interval_s", 1.0, 86400.0),
    ("--rebalance-verify-timeout-s", "verify_timeout_s", 1.0, 7200.0),
    ("--demand-sample-s", "demand_sample_s", 0.1, 3600.0),
    ("--demand-smoothing-s", "demand_smoothing_s", 0.0, 86400.0),
)


def add_rebalance_args(p: Any) -> None:
    d, c = RebalanceSettings(), pm.RebalanceConfig()
    p.add_argument("--rebalance-mode", choices=MODES, default=d.mode,
                   help="off | propose (plans kept for approval) | auto (applied at once)")
    for flag, name, low, high in _FLOAT_OPTIONS:
        p.add_argument(flag, dest=f"rebalance_{name}", type=float, default=getattr(d, name),
                       metavar="S", help=f"[{low:g}, {high:g}]")
    p.add_argument("--rebalance-headroom-frac", type=float, default=c.headroom_frac,
                   metavar="F", help="provision demand x (1 + F)")
    p.add_argument("--rebalance-hysteresis-s", type=float, default=c.hysteresis_s, metavar="S",
                   help="don't reshape an endpoint changed this recently")
    p.add_argument("--rebalance-max-restarts", type=int, default=c.max_restarts_per_round,
                   metavar="N", help="instance starts + stops per plan")
    p.add_argument("--profiles", action="append", default=[], metavar="CSV",
                   help="profile rows merged over the shipped defaults (repeatable)")
    p.add_argument("--routes-listen", default="", metavar="ADDR",
                   help="HTTP HOST:PORT serving GET /routes/ENDPOINT as JSON ('' disables)")


def rebalance_settings_from_args(args: Any) -> RebalanceSettings:
    """Validated settings; DomainError names the flag's field and its allowed range."""
    values: dict[str, Any] = {"mode": args.rebalance_mode}
    for _, name, low, high in _FLOAT_OPTIONS:
        v = getattr(args, f"rebalance_{name}")
        if not low <= v <= high:
            raise errors.out_of_range(f"rebalance_{name}", v, low, high, "s")
        values[name] = v
    policy = pm.RebalanceConfig(headroom_frac=args.rebalance_headroom_frac,
                                hysteresis_s=args.rebalance_hysteresis_s,
                                max_restarts_per_round=args.rebalance_max_restarts).validate()
    return RebalanceSettings(**values, policy=policy)


def load_profile_rows(paths: list[str]) -> list[ProfileRow]:
    """Shipped defaults merged with --profiles files; InvalidArgument names an unreadable one."""
    try:
        return load_profiles(paths)
    except OSError as err:
        raise errors.InvalidArgument(f"profiles: cannot read {err.filename}: {err.strerror}",
                                     field="profiles") from None
