"""The leaf's enforcement in-process (the emergency controller's rig: manual clock, fake
streams), and the hierarchy flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.daemon import build_arg_parser
from coordinator.hierarchy.leaf import LeafEnforcer
from coordinator.hierarchy.wiring import hierarchy_settings_from_args
from coordinator.security import CoordinatorSecurity
from shapeshifter.api.v1 import hierarchy_pb2 as hpb
from shapeshifter.common import errors
from tests.unit.test_emergency_controller import ROW_LIMIT_W, Rig, rig, run, settle


def limits(seq: int, limit_w: float, limit_id: str = "L1") -> hpb.RowLimits:
    return hpb.RowLimits(seq=seq, rows=[hpb.RowLimit(
        site="s1", row="r1", power_limit_w=limit_w, normal_limit_w=ROW_LIMIT_W,
        limit_id=limit_id, source="utility", note="feed B")])


def row_ack(enforcer: LeafEnforcer) -> hpb.RowAck:
    (ack,) = enforcer.ack().rows
    return ack


def leaf(tmp_path: Path) -> tuple[Rig, LeafEnforcer]:
    r = rig(tmp_path, clear_step_s=60.0)
    r.report("n1", 2500.0)
    return r, LeafEnforcer(r.core, r.ctl, "parent test")


def test_limits_are_declared_adjusted_in_place_and_cleared(tmp_path: Path) -> None:
    r, enforcer = leaf(tmp_path)

    async def scenario() -> None:
        await enforcer.apply(limits(1, 1500.0))
        ack = row_ack(enforcer)
        (em,) = r.ctl.in_force("row", "r1")
        assert (em.rec.source, em.rec.power_limit_w) == ("parent", 1500.0)
        assert "L1" in em.rec.note and "utility" in em.rec.note
        assert (ack.action, ack.emergency_id, ack.in_force_limit_w) == (
            "declared", em.rec.emergency_id, 1500.0)
        assert not ack.agents_acked and ack.nodes == 1
        await settle()
        r.answer()  # the agent acknowledges its caps
        await settle()
        assert row_ack(enforcer).agents_acked and row_ack(enforcer).action == "declared"
        await enforcer.reconcile()  # nothing to do: the ack still says what was done
        assert row_ack(enforcer).action == "declared"

        await enforcer.apply(limits(2, 1200.0))
        (again,) = r.ctl.in_force("row", "r1")
        assert again.rec.emergency_id == em.rec.emergency_id and again.rec.power_limit_w == 1200
        assert enforcer.ack().seq == 2 and row_ack(enforcer).action == "updated"

        await enforcer.apply(limits(3, 1200.0))
        assert row_ack(enforcer).action == "kept"

        await enforcer.apply(limits(4, ROW_LIMIT_W, ""))
        assert row_ack(enforcer).action == "cleared" and row_ack(enforcer).agents_acked
        assert r.ctl.view(em.rec.emergency_id).rec.state == "clearing"
        await enforcer.reconcile()
        assert row_ack(enforcer).action == "cleared"

        (rollup, _) = enforcer.rollups()  # r1, then r2
        assert rollup.row == "r1" and rollup.floor_w == pytest.approx(2 * 200 + 1250)
        assert rollup.emergency.state == "clearing" and rollup.emergency.source == "parent"

    run(scenario)


def test_local_emergencies_are_never_touched(tmp_path: Path) -> None:
    r, enforcer = leaf(tmp_path)

    async def scenario() -> None:
        op = r.ctl.declare("row", "r1", "power", 0.0, 1000.0, 0.0, "ups", "", "operator")
        eid = op.rec.emergency_id
        await enforcer.apply(limits(1, 1500.0))  # the operator's is stricter: it enforces
        ack = row_ack(enforcer)
        assert (ack.action, ack.emergency_id, ack.emergency_source) == ("kept_local", eid, "ups")
        await enforcer.apply(limits(2, 800.0))  # the operator's is milder: reported, not changed
        ack = row_ack(enforcer)
        assert ack.action == "blocked_local" and "milder" in ack.message
        await enforcer.apply(limits(3, ROW_LIMIT_W, ""))
        assert row_ack(enforcer).action == "none"
        (still,) = r.ctl.in_force("row", "r1")
        assert (still.rec.emergency_id, still.rec.state, still.rec.power_limit_w) == (
            eid, "active", 1000.0)

    run(scenario)


def test_a_parent_limit_takes_over_the_rows_automatic_emergency(tmp_path: Path) -> None:
    """Detection (on by default) capped the row at its normal limit first: the parent's lower
    limit moves that emergency in place instead of being blocked by it."""
    r = rig(tmp_path, clear_step_s=60.0, detect_after_s=1.0)
    enforcer = LeafEnforcer(r.core, r.ctl, "parent test")

    async def scenario() -> None:
        r.report("n1", 2500.0)  # over the 2000 W row limit
        r.ctl.tick()
        r.clock.advance(1.0)
        r.ctl.tick()
        (auto,) = r.ctl.in_force("row", "r1")
        assert auto.rec.source == "auto"
        await enforcer.apply(limits(1, 1500.0))
        (em,) = r.ctl.in_force("row", "r1")
        assert (em.rec.emergency_id, em.rec.source, em.rec.power_limit_w) == (
            auto.rec.emergency_id, "parent", 1500.0)
        assert row_ack(enforcer).action == "declared"
        await enforcer.apply(limits(2, 1200.0))  # now the leaf's own: adjusted as usual
        assert row_ack(enforcer).action == "updated"

    run(scenario)


def test_an_emergency_cleared_by_hand_is_declared_again(tmp_path: Path) -> None:
    r = rig(tmp_path, clear_step_s=0.0)
    enforcer = LeafEnforcer(r.core, r.ctl, "parent test")

    async def scenario() -> None:
        await enforcer.apply(limits(1, 1500.0))
        (em,) = r.ctl.in_force("row", "r1")
        r.ctl.clear(em.rec.emergency_id, "", "operator")  # the parent's limit still holds
        await enforcer.reconcile()
        assert row_ack(enforcer).action == "pending"  # it waits for the clearing to end
        for _ in range(5):
            await settle()
        assert r.ctl.in_force("row", "r1") == []
        await enforcer.reconcile()
        (again,) = r.ctl.in_force("row", "r1")
        assert again.rec.emergency_id != em.rec.emergency_id and again.rec.source == "parent"
        assert row_ack(enforcer).action == "declared"

    run(scenario)


def args(*argv: str) -> object:
    return build_arg_parser().parse_args(["--listen", "127.0.0.1:1", "--topology", "t.yaml",
                                          "--db", "c.db", *argv])


@pytest.mark.parametrize(("argv", "fld"), [
    (("--parent", "127.0.0.1:2"), "leaf_id"),
    (("--parent", "127.0.0.1:2", "--leaf-id", "bad id"), "leaf_id"),
    (("--role", "leaf"), "parent"),
    (("--role", "parent", "--parent", "127.0.0.1:2"), "parent"),
    (("--parent", "10.0.0.1:2", "--leaf-id", "a"), "--parent"),  # plaintext off loopback
    (("--parent", "127.0.0.1:2", "--leaf-id", "a", "--parent-report-interval-s", "0"),
     "parent_report_interval_s"),
])
def test_bad_hierarchy_flags_are_refused(argv: tuple[str, ...], fld: str) -> None:
    with pytest.raises(errors.InvalidArgument) as err:
        hierarchy_settings_from_args(args(*argv), CoordinatorSecurity())  # type: ignore[arg-type]
    assert err.value.field == fld


def test_hierarchy_flags() -> None:
    s = hierarchy_settings_from_args(args(), CoordinatorSecurity())  # type: ignore[arg-type]
    assert s.role == "single" and s.leaf is None
    s = hierarchy_settings_from_args(args("--role", "parent"),  # type: ignore[arg-type]
                                     CoordinatorSecurity())
    assert s.role == "parent"
    s = hierarchy_settings_from_args(args("--parent", "127.0.0.1:2", "--leaf-id", "leaf-a"),
                                     CoordinatorSecurity())  # type: ignore[arg-type]
    assert s.role == "leaf" and s.leaf is not None
    assert (s.leaf.parent, s.leaf.leaf_id, s.leaf.report_interval_s) == ("127.0.0.1:2",
                                                                         "leaf-a", 1.0)
