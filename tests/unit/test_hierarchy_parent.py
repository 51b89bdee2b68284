"""ParentController in-process (manual clock, SQLite in tmp_path): leaves register and report,
a site limit is validated, split, pushed and acknowledged, cleared; a restarted parent re-sends
what is in force."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.hierarchy.parent import LeafSession, ParentController
from coordinator.store.hierarchy import SiteLimitStore
from coordinator.store.sqlite import Store
from shapeshifter.api.v1 import hierarchy_pb2 as hpb
from shapeshifter.common import errors
from shapeshifter.common.clock import ManualClock
from shapeshifter.net.authz import ADMIN, READ, coordinator_table
from shapeshifter.topology import parse_topology

TOPOLOGY = """
version: 1
sites:
- name: s1
  aisles: [{name: a1, aisle_airflow_cfm: 100000}]
  rows:
  - {name: r1, row_power_limit_w: 4000, racks: [{name: k1, aisle: a1}]}
  - {name: r2, row_power_limit_w: 4000, racks: [{name: k2, aisle: a1}]}
- name: s2
  aisles: [{name: a2, aisle_airflow_cfm: 100000}]
  rows:
  - {name: r3, row_power_limit_w: 4000, racks: [{name: k3, aisle: a2}]}
"""


@dataclass
class Rig:
    parent: ParentController
    clock: ManualClock
    path: Path

    def register(self, leaf_id: str, *rows: str, site: str = "s1") -> LeafSession:
        session = LeafSession(leaf_id)
        self.parent.register(hpb.LeafRegister(leaf_id=leaf_id, rows=[
            hpb.LeafRow(site=site, row=r, row_power_limit_w=4000) for r in rows]), session)
        return session

    def report(self, leaf_id: str, row: str, draw_w: float, floor_w: float) -> None:
        self.parent.report(leaf_id, hpb.LeafReport(rows=[hpb.RowRollup(
            site="s1", row=row, power_draw_w=draw_w, floor_w=floor_w, nodes=2, nodes_up=2)]))

    def ack(self, leaf_id: str, session_msgs: list[hpb.RowLimits], agents: bool = True) -> None:
        last = session_msgs[-1]
        self.parent.ack(leaf_id, hpb.LimitsAck(seq=last.seq, rows=[
            hpb.RowAck(site=r.site, row=r.row, power_limit_w=r.power_limit_w,
                       action="declared", agents_acked=agents) for r in last.rows]))


def make(tmp_path: Path, clock: ManualClock | None = None) -> Rig:
    clock = clock or ManualClock()
    db = tmp_path / "parent.db"
    return Rig(ParentController(parse_topology(TOPOLOGY), SiteLimitStore(db), Store(db), clock),
               clock, db)


def sent(session: LeafSession) -> list[hpb.RowLimits]:
    out = []
    while not session.outbox.empty():
        msg = session.outbox.get_nowait()
        if msg is not None and msg.HasField("limits"):
            out.append(msg.limits)
    return out


def limits_of(msg: hpb.RowLimits) -> dict[str, float]:
    return {r.row: r.power_limit_w for r in msg.rows}


@pytest.fixture
def two_leaves(tmp_path: Path) -> tuple[Rig, LeafSession, LeafSession]:
    r = make(tmp_path)
    a, b = r.register("leaf-a", "r1"), r.register("leaf-b", "r2")
    r.report("leaf-a", "r1", 3600, 1800)
    r.report("leaf-b", "r2", 2600, 1800)
    return r, a, b


def test_a_leaf_gets_its_rows_limits_at_once(two_leaves: tuple) -> None:
    r, a, _ = two_leaves
    (first,) = sent(a)
    assert limits_of(first) == {"r1": 4000} and first.seq == 0 and first.rows[0].limit_id == ""
    site = r.parent.site("s1")
    assert site.state == "normal" and site.power_limit_w == 8000
    assert {row.name: row.leaf_id for row in site.rows} == {"r1": "leaf-a", "r2": "leaf-b"}
    assert {row.name: row.report.power_draw_w for row in site.rows} == {"r1": 3600, "r2": 2600}


def test_site_limit_is_split_pushed_and_acknowledged(two_leaves: tuple) -> None:
    r, a, b = two_leaves
    sent(a), sent(b)
    view = r.parent.set_site_limit("s1", 0.6, 0.0, "utility", "feed A lost", "op")
    assert view.state == "limited" and view.power_limit_w == pytest.approx(4800)
    # Floors 3600 W, 1200 W left; demand above floors 1800 : 800.
    expected = {"r1": 1800 + 1200 * 18 / 26, "r2": 1800 + 1200 * 8 / 26}
    (to_a,), (to_b,) = sent(a), sent(b)
    assert limits_of(to_a) == {"r1": pytest.approx(expected["r1"])}
    assert limits_of(to_b) == {"r2": pytest.approx(expected["r2"])}
    assert to_a.seq == to_b.seq == view.seq == 1
    assert to_a.rows[0].limit_id == view.rec.limit_id and to_a.rows[0].source == "utility"
    assert sum(limits_of(to_a).values()) + sum(limits_of(to_b).values()) <= 4800 + 1e-6
    r.clock.advance(0.4)
    r.ack("leaf-a", [to_a])
    r.ack("leaf-b", [to_b], agents=False)  # acked, but its agents have not yet
    assert r.parent.site("s1").acked_s == -1
    r.clock.advance(0.3)
    r.ack("leaf-b", [to_b])
    site = r.parent.site("s1")
    assert site.acked_s == pytest.approx(0.7)
    assert all(row.acked for row in site.rows)


@pytest.mark.parametrize(("frac", "limit_w", "fld", "text"), [
    (1.5, 0.0, "capacity_frac", "(0, 1]"),
    (0.0, 0.0, "capacity_frac", "(0, 1]"),
    (-0.2, 0.0, "capacity_frac", "(0, 1]"),
    (math.nan, 0.0, "capacity_frac", "(0, 1]"),
    (0.5, 3000.0, "capacity", "exactly one"),
    (0.0, 9000.0, "power_limit_w", "(0, 8000] W"),
    (0.0, -5.0, "power_limit_w", "(0, 8000] W"),
])
def test_bad_limits_are_refused_and_change_nothing(two_leaves: tuple, frac: float,
                                                   limit_w: float, fld: str, text: str) -> None:
    r, a, b = two_leaves
    sent(a), sent(b)
    with pytest.raises(errors.InvalidArgument) as err:
        r.parent.set_site_limit("s1", frac, limit_w, "", "", "op")
    assert err.value.field == fld and text in str(err.value)
    assert r.parent.site("s1").state == "normal" and not sent(a) and not sent(b)


def test_bad_site_note_and_clear_are_refused(two_leaves: tuple) -> None:
    r, _, _ = two_leaves
    with pytest.raises(errors.NotFound, match=r"site='nope'.*known: s1, s2"):
        r.parent.set_site_limit("nope", 0.5, 0.0, "", "", "op")
    with pytest.raises(errors.InvalidArgument) as err:
        r.parent.set_site_limit("", 0.5, 0.0, "", "", "op")
    assert err.value.field == "site"
    with pytest.raises(errors.InvalidArgument) as err:
        r.parent.set_site_limit("s1", 0.5, 0.0, "", "x" * 2000, "op")
    assert err.value.field == "note"
    with pytest.raises(errors.FailedPrecondition, match="no site limit in force"):
        r.parent.clear_site_limit("s1", "", "op")
    assert r.parent.site("s1").state == "normal"


def test_registration_is_validated(two_leaves: tuple) -> None:
    r, _, _ = two_leaves
    with pytest.raises(errors.InvalidArgument) as err:
        r.register("bad id!", "r1")
    assert err.value.field == "leaf_id"
    with pytest.raises(errors.NotFound, match="rows\\[0\\]: row 'r9'"):
        r.register("leaf-c", "r9")
    with pytest.raises(errors.NotFound, match="row 'r3' of site 's1'"):
        r.register("leaf-c", "r3")  # r3 is in s2
    with pytest.raises(errors.FailedPrecondition, match="connected leaf 'leaf-a'"):
        r.register("leaf-c", "r1")
    with pytest.raises(errors.InvalidArgument):
        r.register("leaf-c")
    assert {row.name: row.leaf_id for row in r.parent.site("s1").rows} == {
        "r1": "leaf-a", "r2": "leaf-b"}


def test_a_redialling_leaf_replaces_its_old_stream(two_leaves: tuple) -> None:
    r, a, _ = two_leaves
    r.parent.set_site_limit("s1", 0.6, 0.0, "", "", "op")
    again = r.register("leaf-a", "r1")
    assert a.closed
    (first,) = sent(again)
    assert first.seq == 1 and first.rows[0].power_limit_w < 4000


def test_restarted_parent_resends_the_limits_in_force(tmp_path: Path) -> None:
    r = make(tmp_path)
    r.register("leaf-a", "r1")
    r.report("leaf-a", "r1", 3600, 1800)
    view = r.parent.set_site_limit("s1", 0.0, 5000.0, "ups", "", "op")
    limit_r1 = view.rows[0].limit_w
    restarted = make(tmp_path, r.clock)
    site = restarted.parent.site("s1")
    assert site.state == "limited" and site.rec.limit_id == view.rec.limit_id
    (first,) = sent(restarted.register("leaf-a", "r1"))
    assert first.seq == 1 and limits_of(first) == {"r1": pytest.approx(limit_r1)}
    # A later change gets a higher sequence number than any before the restart.
    assert restarted.parent.set_site_limit("s1", 0.5, 0.0, "", "", "op").seq == 2


def test_replace_then_clear(two_leaves: tuple) -> None:
    r, a, b = two_leaves
    first = r.parent.set_site_limit("s1", 0.6, 0.0, "", "", "op")
    second = r.parent.set_site_limit("s1", 0.5, 0.0, "", "", "op")
    assert second.rec.limit_id != first.rec.limit_id and second.power_limit_w == 4000
    sent(a), sent(b)
    cleared = r.parent.clear_site_limit("s1", "feed back", "op")
    assert cleared.state == "cleared" and cleared.seq == 3 and cleared.acked_s == -1
    (to_a,), (to_b,) = sent(a), sent(b)
    assert limits_of(to_a) == {"r1": 4000} and limits_of(to_b) == {"r2": 4000}
    r.clock.advance(1.0)
    r.ack("leaf-a", [to_a])
    r.ack("leaf-b", [to_b])
    assert r.parent.site("s1").acked_s == pytest.approx(1.0)
    audit = [a.action for a in Store(r.path).list_audit(10, "")]
    assert audit.count("SetSiteLimit") == 2 and "ClearSiteLimit" in audit


def test_hierarchy_rpcs_are_in_the_authorization_table() -> None:
    table = coordinator_table()
    for service in hpb.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            assert table.required(f"/{service.full_name}/{m.name}")
    pkg = "/shapeshifter.coordinator.v1."
    assert table.required(pkg + "ParentLink/Connect") == {"coordinator"}
    assert table.required(pkg + "Site/SetSiteLimit") == ADMIN
    assert table.required(pkg + "Site/ClearSiteLimit") == ADMIN
    assert table.required(pkg + "Site/GetSite") == READ
