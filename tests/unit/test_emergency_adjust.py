"""EmergencyController.adjust: an active power emergency's limit moved in place (a parent
coordinator's new row limit), never lifting the caps in between."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.emergency.controller import EmergencyController
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common import errors
from tests.unit.test_emergency_controller import Rig, rig, run, settle


async def last_caps(r: Rig, node_id: str) -> dict[int, float]:
    """The caps of the newest emergency directive on the node's stream (all acknowledged)."""
    await settle()  # the directives are queued by the controller's tasks
    q = r.recs[node_id].session.outbox  # type: ignore[union-attr]
    caps: dict[int, float] = {}
    while not q.empty():
        msg = q.get_nowait()
        q.task_done()
        if msg.HasField("emergency") and msg.emergency.has_caps:
            caps = dict(msg.emergency.gpu_power_ceiling_w)
        rid = msg.emergency.directive_id if msg.HasField("emergency") else msg.prearm.prearm_id
        r.recs[node_id].session.resolve(agent_pb2.ApplyPlanResponse(  # type: ignore[union-attr]
            plan_id=rid, completed=True))
    return caps


def declare(ctl: EmergencyController, capacity_w: float) -> str:
    return ctl.declare("row", "r1", "power", 0.0, capacity_w, 0.0, "parent", "", "t").rec \
        .emergency_id


def test_lowering_never_raises_a_cap_and_raising_counts_capped_gpus_at_their_max(
        tmp_path: Path) -> None:
    r = rig(tmp_path)

    async def scenario() -> None:
        r.report("n1", 2500.0)  # 2 GPUs at 625 W, 1250 W other
        eid = declare(r.ctl, 2000.0)  # target 1900 W: 600 W off the GPUs -> 325 W each
        assert await last_caps(r, "n1") == {0: pytest.approx(325), 1: pytest.approx(325)}
        r.report("n1", 1300.0)  # capped: 2 x 325 W GPUs, 650 W other
        view = r.ctl.adjust(eid, 1200.0, "lower", "t")  # target 1140: 80 W off each
        assert view.rec.emergency_id == eid and view.rec.state == "active"
        assert view.rec.power_limit_w == 1200.0 and view.rec.capacity_frac == pytest.approx(0.6)
        assert await last_caps(r, "n1") == {0: pytest.approx(245), 1: pytest.approx(245)}
        # Raise to 1800 W from 1140 W drawn (570 W other): the capped GPUs count at 700 W ->
        # 1970 W; target 1710 W: 130 W off each.
        r.report("n1", 1140.0)
        r.ctl.adjust(eid, 1800.0, "raise", "t")
        assert await last_caps(r, "n1") == {0: pytest.approx(570), 1: pytest.approx(570)}
        kinds = [e.kind for e in r.ctl.view(eid).timeline]
        assert kinds.count("adjusted") == 2 and "cleared" not in kinds
        assert r.ctl.view(eid).rec.note == "raise"

    run(scenario)


def test_a_lower_cap_is_kept_where_the_new_plan_would_cap_less(tmp_path: Path) -> None:
    r = rig(tmp_path)

    async def scenario() -> None:
        r.report("n1", 2500.0)
        eid = declare(r.ctl, 1500.0)  # deep cut: both GPUs at their 200 W minimum
        assert await last_caps(r, "n1") == {0: 200.0, 1: 200.0}
        r.report("n1", 800.0)  # 200 W GPUs, 400 W other: under a 1400 W limit already
        r.ctl.adjust(eid, 1400.0, "", "t")
        assert await last_caps(r, "n1") == {0: 200.0, 1: 200.0}  # nothing raised on a lowering
        assert r.ctl.view(eid).rec.note == ""  # "" keeps the note

    run(scenario)


def test_adjust_refusals_change_nothing(tmp_path: Path) -> None:
    r = rig(tmp_path, clear_step_s=60.0)

    async def scenario() -> None:
        r.report("n1", 2500.0)
        eid = declare(r.ctl, 1800.0)
        with pytest.raises(errors.InvalidArgument) as err:
            r.ctl.adjust(eid, 2500.0, "", "t")
        assert err.value.field == "power_limit_w" and "[0, 2000] W" in str(err.value)
        with pytest.raises(errors.NotFound):
            r.ctl.adjust("nope", 1000.0, "", "t")
        cooling = r.ctl.declare("aisle", "a2", "cooling", 0.9, 0.0, 0.0, "bms", "", "t")
        with pytest.raises(errors.InvalidArgument, match="only power"):
            r.ctl.adjust(cooling.rec.emergency_id, 1000.0, "", "t")
        assert r.ctl.view(eid).rec.power_limit_w == 1800.0
        r.ctl.clear(eid, "", "t")
        with pytest.raises(errors.FailedPrecondition, match="clearing"):
            r.ctl.adjust(eid, 1000.0, "", "t")
        assert [v.rec.emergency_id for v in r.ctl.in_force("row", "r1")] == [eid]
        assert not r.ctl.resuming(eid)

    run(scenario)
