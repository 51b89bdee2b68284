"""EmergencyController in-process (manual clock, fake streams): automatic detection, Phase 1
timings, Phase 2 reconfiguration through a fake rebalancer, lowered limits for the rebalancer's
routes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from coordinator.core import CoordinatorCore
from coordinator.emergency.controller import EmergencyController, EmergencySettings
from coordinator.leases import LeasePolicy
from coordinator.rebalance.loop import Rebalancer, RebalanceSettings
from coordinator.rebalance.snapshot import ScopeCut, limits_of
from coordinator.registry import NodeRecord
from coordinator.session import AgentSession
from coordinator.store.emergency import EmergencyStore
from coordinator.store.plans import PlanStore
from coordinator.store.sqlite import Store
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.api.v1 import link_pb2 as lpb
from shapeshifter.common import errors
from shapeshifter.common.clock import ManualClock
from shapeshifter.topology import parse_topology

ROW_LIMIT_W = 2000.0
TOPOLOGY = f"""
version: 1
sites:
- name: s1
  aisles: [{{name: a1, aisle_airflow_cfm: 100000}}, {{name: a2, aisle_airflow_cfm: 100000}}]
  rows:
  - {{name: r1, row_power_limit_w: {ROW_LIMIT_W}, racks: [{{name: k1, aisle: a1}}]}}
  - {{name: r2, row_power_limit_w: 1e6, racks: [{{name: k2, aisle: a2}}, {{name: k3, aisle: a2}}]}}
"""
RACKS = {"n1": ("r1", "k1", "a1"), "n2": ("r2", "k2", "a2"), "n3": ("r2", "k3", "a2")}
# Detection is on by default; these tests declare by hand and switch it off unless they test it.
QUIET = {"prearm_interval_s": 3600.0, "phase2_after_s": 0.0, "reconfigure_after_s": 0.0,
         "detect_after_s": 0.0}


@dataclass
class Rig:
    core: CoordinatorCore
    clock: ManualClock
    ctl: EmergencyController
    recs: dict[str, NodeRecord]
    seq: dict[str, int] = field(default_factory=dict)

    def report(self, node_id: str, power_w: float, temp_c: float = 50.0, cap_w: float = 0.0,
               instances: tuple[agent_pb2.Instance, ...] = ()) -> None:
        gpus = [agent_pb2.Gpu(index=i, gpu_type="h100-80gb", power_draw_w=power_w / 4,
                              power_limit_w=cap_w or 700.0, power_limit_min_w=200.0,
                              power_limit_max_w=700.0, temperature_c=temp_c if i == 0 else 50.0,
                              power_ceiling_w=cap_w if i == 0 else 0.0,
                              power_ceiling_source="emergency" if cap_w and i == 0 else "")
                for i in range(2)]
        budget = agent_pb2.NodeBudget(node_power_w=power_w, gpu_power_w=power_w / 2)
        row, rack, aisle = RACKS[node_id]
        node = agent_pb2.Node(node_id=node_id, gpus=gpus, budget=budget, instances=instances,
                              labels={"site": "s1", "row": row, "rack": rack, "aisle": aisle},
                              sampled_at_unix_s=self.clock.time())
        self.seq[node_id] = self.seq.get(node_id, 0) + 1
        self.core.registry.ingest(self.recs[node_id], lpb.NodeReport(node=node,
                                                                     seq=self.seq[node_id]))

    def auto_declared(self, after_s: float) -> Any:
        """n1 500 W over the 2000 W row limit for after_s (the detection time): the one
        emergency there is then (the automatic one)."""
        self.report("n1", 2500.0)
        self.ctl.tick()
        self.clock.advance(after_s)
        self.ctl.tick()
        (view,) = self.ctl.list(active_only=False)
        return view

    def answer(self) -> None:
        """Every node acknowledges what its stream carried so far."""
        for rec in self.recs.values():
            q = rec.session.outbox  # type: ignore[union-attr]
            while not q.empty():
                msg = q.get_nowait()
                q.task_done()
                rid = (msg.emergency.directive_id if msg.HasField("emergency")
                       else msg.prearm.prearm_id if msg.HasField("prearm") else "")
                rec.session.resolve(agent_pb2.ApplyPlanResponse(  # type: ignore[union-attr]
                    plan_id=rid, completed=True))


def rig(tmp_path: Path, **settings: Any) -> Rig:
    clock = ManualClock()
    core = CoordinatorCore(parse_topology(TOPOLOGY), Store(tmp_path / "c.db"), clock, epoch=1,
                           lease_policy=LeasePolicy(5.0))
    recs = {}
    for node_id, (row, rack, aisle) in RACKS.items():
        msg = lpb.Register(node_id=node_id, labels={"site": "s1", "row": row, "rack": rack,
                                                    "aisle": aisle})
        recs[node_id], _ = core.register(msg, AgentSession(node_id))
    ctl = EmergencyController(core, EmergencyStore(tmp_path / "c.db"),
                              EmergencySettings(**{**QUIET, **settings}), random.Random(0))
    r = Rig(core, clock, ctl, recs)
    for node_id in RACKS:
        r.report(node_id, 1000.0)
    return r


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


async def settle() -> None:
    """Let the controller's tasks run up to their next real wait."""
    for _ in range(10):
        await asyncio.sleep(0)


# ---------------------------------------------------------------------- detection


def test_row_over_its_limit_for_the_configured_time_declares_an_auto_emergency(
        tmp_path: Path) -> None:
    r = rig(tmp_path, detect_after_s=5.0)

    async def scenario() -> None:
        r.report("n1", 2500.0)  # a spike over the 2000 W row limit ...
        r.ctl.tick()
        r.clock.advance(4.0)
        r.ctl.tick()
        r.report("n1", 1500.0)  # ... that ends before 5 s: nothing declared
        r.ctl.tick()
        assert r.ctl.list(active_only=False) == []
        r.report("n1", 2500.0)  # over again: its own timer starts now
        r.ctl.tick()
        r.clock.advance(4.9)
        r.ctl.tick()
        assert r.ctl.list(active_only=False) == []
        r.clock.advance(0.1)
        r.ctl.tick()
        r.clock.advance(1.0)
        r.ctl.tick()  # still over, but the row has its emergency: no second one
        (view,) = r.ctl.list(active_only=False)
        rec = view.rec
        assert (rec.scope, rec.name, rec.kind, rec.source) == ("row", "r1", "power", "auto")
        assert rec.capacity_frac == 1.0 and rec.power_limit_w == ROW_LIMIT_W
        assert "2500 W above the limit 2000 W for 5 s" in rec.note

    run(scenario)


def test_detection_is_on_by_default_and_zero_switches_it_off(tmp_path: Path) -> None:
    default_s = EmergencySettings().detect_after_s
    assert default_s > 0
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    on = rig(tmp_path / "on", detect_after_s=default_s)
    off = rig(tmp_path / "off")  # QUIET: detect_after_s=0

    async def scenario() -> None:
        for r in (on, off):
            r.report("n1", 5000.0)
            for _ in range(3):
                r.ctl.tick()
                r.clock.advance(default_s)
            r.ctl.tick()
        (view,) = on.ctl.list(active_only=False)
        assert view.rec.source == "auto"
        assert off.ctl.list(active_only=False) == []

    run(scenario)


def test_a_declaration_supersedes_the_automatic_emergency_in_place(tmp_path: Path) -> None:
    r = rig(tmp_path, detect_after_s=1.0)

    async def scenario() -> None:
        auto = r.auto_declared(1.0)
        view = r.ctl.declare("row", "r1", "power", 0.75, 0.0, 0.0, "ups", "UPS 2 down", "op")
        assert view.rec.emergency_id == auto.rec.emergency_id  # the same one, not cleared
        assert view.rec.source == "ups" and view.rec.power_limit_w == 0.75 * ROW_LIMIT_W
        assert len(r.ctl.list(active_only=False)) == 1

    run(scenario)


def test_many_hot_nodes_in_an_aisle_declare_a_cooling_emergency(tmp_path: Path) -> None:
    r = rig(tmp_path, detect_after_s=2.0, detect_hot_nodes_frac=1.0)

    async def scenario() -> None:
        r.report("n2", 1000.0, temp_c=87.0)  # H100 slowdown 89 C, headroom 3 C: hot
        r.ctl.tick()
        r.clock.advance(5.0)
        r.ctl.tick()
        assert r.ctl.list(active_only=False) == []  # one of a2's two nodes: its guard's job
        r.report("n3", 1000.0, temp_c=86.5)
        r.ctl.tick()
        r.clock.advance(2.0)
        r.ctl.tick()
        (view,) = r.ctl.list(active_only=False)
        assert (view.rec.scope, view.rec.name, view.rec.kind) == ("aisle", "a2", "cooling")
        assert "2 of 2 nodes have a GPU within 3 C of slowdown" in view.rec.note

    run(scenario)


def test_default_settings_cap_a_row_over_its_limit_until_it_is_under(tmp_path: Path) -> None:
    """EmergencySettings() as the daemon's defaults give it: a row over its limit for the
    default detection time gets an automatic emergency whose caps bring it under the limit."""
    r = rig(tmp_path, **{k: getattr(EmergencySettings(), k) for k in (
        "detect_after_s", "retighten_after_s")})

    async def scenario() -> None:
        view = r.auto_declared(EmergencySettings().detect_after_s)
        assert (view.rec.source, view.rec.state) == ("auto", "active")
        await settle()
        r.answer()
        await settle()
        eid = view.rec.emergency_id
        timeline = r.ctl.view(eid).timeline
        plan = next(e for e in timeline if e.kind == "plan").detail
        assert plan is not None and plan["expected_w"] <= ROW_LIMIT_W  # the caps fit the row
        caps = [e for e in timeline if e.kind == "caps_issued" and e.node_id == "n1"]
        cap_w = max(caps[0].detail["caps_w"].values())  # type: ignore[index]
        assert cap_w < 700.0
        r.clock.advance(1.0)
        r.report("n1", 1850.0, cap_w=cap_w)  # the agent holds the caps: the row is under
        r.ctl.tick()
        view = r.ctl.view(eid)
        assert view.nodes_acked == 1 and view.under_limit_s >= 0
        assert "under_limit" in [e.kind for e in view.timeline]

    run(scenario)


def test_an_active_emergency_over_its_limit_again_is_cut_further(tmp_path: Path) -> None:
    r = rig(tmp_path, detect_after_s=1.0, retighten_after_s=3.0)

    async def scenario() -> None:
        view = r.auto_declared(1.0)
        eid = view.rec.emergency_id
        await settle()
        r.answer()
        await settle()
        first = dict(r.ctl._live[eid].caps["n1"])
        r.clock.advance(1.0)
        r.report("n1", 2800.0, cap_w=max(first.values()))  # the load rose past the caps
        r.ctl.tick()
        r.clock.advance(2.9)
        r.ctl.tick()
        assert "caps_tightened" not in [e.kind for e in r.ctl.view(eid).timeline]
        r.clock.advance(0.1)
        r.ctl.tick()
        kinds = [e.kind for e in r.ctl.view(eid).timeline]
        assert kinds.count("caps_tightened") == 1
        tighter = r.ctl._live[eid].caps["n1"]
        assert all(tighter[i] < first[i] for i in first)  # only ever lower
        assert kinds[-1] == "caps_issued"
        r.clock.advance(3.0)
        r.ctl.tick()  # caps not acknowledged yet: no second cut on stale reports
        assert [e.kind for e in r.ctl.view(eid).timeline].count("caps_tightened") == 1

    run(scenario)


def test_detection_leaves_a_scope_sharing_nodes_with_an_emergency_alone(tmp_path: Path) -> None:
    """Row r2 and aisle a2 hold the same nodes: with r2's emergency in force, a2's hot nodes
    declare nothing (the two would overwrite each other's caps on the agents)."""
    r = rig(tmp_path, detect_after_s=1.0, detect_hot_nodes_frac=1.0)

    async def scenario() -> None:
        r.ctl.declare("row", "r2", "power", 0.9, 0.0, 0.0, "ups", "", "op")
        for node_id in ("n2", "n3"):
            r.report(node_id, 1000.0, temp_c=88.0)
        for _ in range(3):
            r.ctl.tick()
            r.clock.advance(1.0)
        assert [(v.rec.scope, v.rec.name) for v in r.ctl.list(active_only=False)] == [
            ("row", "r2")]

    run(scenario)


# ---------------------------------------------------------------------- Phase 1 timings


def test_issued_and_acked_describe_phase1_not_the_clearing_steps(tmp_path: Path) -> None:
    r = rig(tmp_path, clear_step_s=0.0, clear_jitter_frac=0.0)

    async def scenario() -> None:
        r.report("n1", 1900.0)
        eid = r.ctl.declare("row", "r1", "power", 0.75, 0, 0, "ups", "", "test").rec.emergency_id
        r.clock.advance(0.5)
        await settle()
        r.answer()
        await settle()
        view = r.ctl.view(eid)
        assert (view.issued_s, view.acked_s, view.nodes_acked) == (0.0, 0.5, 1)
        r.report("n1", 1000.0)  # under the restored limit with hysteresis headroom
        r.clock.advance(8.0)
        r.ctl.clear(eid, "", "test")
        for _ in range(5):  # relax steps (no waits), each answered
            await settle()
            r.answer()
        view = r.ctl.view(eid)
        kinds = [e.kind for e in view.timeline]
        assert view.rec.state == "cleared" and kinds.count("relax_step") == 2
        assert (view.issued_s, view.acked_s) == (0.0, 0.5)  # not 8.5 s

    run(scenario)


# ---------------------------------------------------------------------- Phase 2 reconfiguration


@dataclass
class FakeReplanner:
    mode: str
    stages: int = 1
    error: errors.DomainError | None = None
    proposed: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)

    def propose(self, trigger: str, actor: str, keep_empty: bool = True) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        self.proposed.append(trigger)
        stages = [{"actions": [{"kind": "start_instance"}]}] * self.stages
        return {"plan_id": f"p{len(self.proposed)}", "stages": stages}

    def apply(self, plan_id: str, actor: str) -> dict[str, Any]:
        self.applied.append(plan_id)
        return {"plan_id": plan_id}


@pytest.mark.parametrize(("mode", "stages", "error", "event", "applied"), [
    ("auto", 1, None, "reconfigure_applied", ["p1"]),
    ("propose", 1, None, "reconfigure_proposed", []),
    ("auto", 0, None, "reconfigure_none", []),
    ("off", 1, None, "reconfigure_skipped", []),
    ("auto", 1, errors.FailedPrecondition("a plan is being applied"), "reconfigure_failed", []),
])
def test_a_long_emergency_asks_the_rebalancer_once(
        tmp_path: Path, mode: str, stages: int, error: errors.DomainError | None, event: str,
        applied: list[str]) -> None:
    r = rig(tmp_path, reconfigure_after_s=300.0)
    planner = FakeReplanner(mode, stages, error)
    r.ctl.attach_replanner(planner)

    async def scenario() -> None:
        eid = r.ctl.declare("row", "r1", "power", 0.75, 0, 0, "ups", "", "test").rec.emergency_id
        r.clock.advance(299.0)
        r.ctl.tick()
        assert planner.proposed == []
        r.clock.advance(1.0)
        r.ctl.tick()
        r.clock.advance(300.0)
        r.ctl.tick()  # once per emergency
        kinds = [e.kind for e in r.ctl.view(eid).timeline]
        assert kinds.count(event) == 1 and not {k for k in kinds if k.startswith(
            "reconfigure")} - {event}
        assert planner.applied == applied
        if mode != "off" and error is None:
            assert len(planner.proposed) == 1 and f"emergency {eid}" in planner.proposed[0]
        audit = [a for a in r.core.audit(50, "") if a.action.startswith("reconfigure")]
        if stages and mode != "off":
            assert [(a.action, a.ok) for a in audit] == [(event, error is None)]
            assert audit[0].actor == f"emergency:{eid}"

    run(scenario)


# ---------------------------------------------------------------------- lowered limits, routes


def test_rebalancer_routes_under_the_emergency_limits(tmp_path: Path) -> None:
    r = rig(tmp_path)
    rebalancer = Rebalancer(r.core, PlanStore(tmp_path / "p.db"), [], RebalanceSettings(),
                            cuts=r.ctl.cuts)
    inst = [agent_pb2.Instance(spec=agent_pb2.InstanceSpec(instance_id=f"i{g}", endpoint="e",
                                                           devices=[str(g)]),
                               state="READY", routable=True) for g in range(2)]

    async def scenario() -> None:
        r.report("n1", 1400.0, cap_w=300.0, instances=tuple(inst))
        assert rebalancer.limits().row_power_limit_w["r1"] == ROW_LIMIT_W
        eid = r.ctl.declare("row", "r1", "power", 0.75, 0, 0, "ups", "", "test").rec.emergency_id
        assert r.ctl.cuts() == (ScopeCut("row", "r1", "power", 0.75),)
        assert rebalancer.limits().row_power_limit_w["r1"] == 0.75 * ROW_LIMIT_W
        capped, free = (w for w, _ in rebalancer.routes("e", ""))
        assert capped.weight == pytest.approx(free.weight / 2) and capped.weight > 0
        assert "emergency cap of 300 W" in capped.reason
        r.report("n1", 1600.0, cap_w=300.0, instances=tuple(inst))  # over 1500 W, under 2000 W
        assert all(w.weight == 0 and "power" in w.reason for w, _ in rebalancer.routes("e", ""))
        r.ctl.clear(eid, "", "test")
        assert r.ctl.cuts()  # clearing: still in force until cleared

    run(scenario)


def test_site_and_aisle_cuts_lower_every_member() -> None:
    topo = parse_topology(TOPOLOGY)
    limits = limits_of(topo, cuts=(ScopeCut("site", "s1", "power", 0.5),
                                   ScopeCut("aisle", "a2", "cooling", 0.9),
                                   ScopeCut("row", "r1", "power", 0.75)))
    assert limits.row_power_limit_w == {"r1": 0.5 * ROW_LIMIT_W, "r2": 0.5e6}
    assert limits.aisle_airflow_cfm == {"a1": 100000, "a2": pytest.approx(90000)}
    assert limits_of(topo).row_power_limit_w == {"r1": ROW_LIMIT_W, "r2": 1e6}
