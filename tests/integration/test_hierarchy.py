"""A parent coordinator and two leaves (one row each, two busy sim agents per row) over real
gRPC on localhost (issue 10: policy down, samples up).

Tests run in file order on one hierarchy: the parent sees both leaves' rollups; bad input
changes nothing; a site limit at 60% is split over the rows, the leaves declare row emergencies,
their agents acknowledge and the rows' measured power goes under the row limits; a restarted
parent re-sends the limits in force and lifts nothing; a leaf restarted after the limit changed
gets the new one and adjusts its emergency in place; clearing the site limit clears the leaves.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from shapectl.commands.demo import free_port
from shapeshifter.api.v1 import emergency_pb2 as epb
from shapeshifter.api.v1 import emergency_pb2_grpc as epb_grpc
from shapeshifter.api.v1 import hierarchy_pb2 as hpb
from shapeshifter.api.v1 import hierarchy_pb2_grpc as hpb_grpc
from tests.conftest import poll
from tests.integration.coordinator_proc import (
    Cluster,
    CoordinatorProcess,
    labelled_cluster,
    start_coordinator,
)
from tests.integration.test_emergency import (
    AGENT_CONFIG,
    COORDINATOR_ARGS,
    GPUS,
    PEAK_W,
    ROW_LIMIT_W,
    emergency_ceilings,
    node,
)

ROWS = {"r1": ("leaf-a", ("k1", "k2")), "r2": ("leaf-b", ("k3", "k4"))}
NODES = {"n1": ("r1", "k1"), "n2": ("r1", "k2"), "n3": ("r2", "k3"), "n4": ("r2", "k4")}
SITE_NORMAL_W = 2 * ROW_LIMIT_W
LEAF_LINK_ARGS = ("--parent-reconnect-initial-s", "0.1", "--parent-reconnect-max-s", "0.5")


def topology(*rows: str) -> dict:
    return {"version": 1, "sites": [{
        "name": "s1",
        "aisles": [{"name": "a1", "aisle_airflow_cfm": 100000}],
        "rows": [{"name": r, "row_power_limit_w": ROW_LIMIT_W,
                  "racks": [{"name": k, "aisle": "a1"} for k in ROWS[r][1]]} for r in rows],
    }]}


@dataclass
class Hierarchy:
    parent_dir: Path
    parent_port: int
    parent: CoordinatorProcess
    leaves: dict[str, Cluster]  # by row

    def site(self) -> hpb.SiteStatus:
        return self.site_stub().GetSite(hpb.GetSiteRequest(site="s1"), timeout=5)

    def site_stub(self) -> hpb_grpc.SiteStub:
        return hpb_grpc.SiteStub(self.parent.channel())

    def start_parent(self) -> None:
        self.parent = start_coordinator(self.parent_dir, self.parent_port, "--role", "parent")

    def leaf_args(self, row: str) -> tuple[str, ...]:
        return (*COORDINATOR_ARGS, "--parent", self.parent.address, "--leaf-id", ROWS[row][0],
                *LEAF_LINK_ARGS)


@pytest.fixture(scope="module")
def hierarchy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hierarchy]:
    root = tmp_path_factory.mktemp("hierarchy")
    parent_dir = root / "parent"
    parent_dir.mkdir()
    (parent_dir / "topology.yaml").write_text(yaml.safe_dump(topology("r1", "r2")))
    port = free_port()
    h = Hierarchy(parent_dir, port, start_coordinator(parent_dir, port, "--role", "parent"), {})
    try:
        with contextlib.ExitStack() as stack:
            for row in ROWS:
                (root / row).mkdir()
                nodes = {n: {"site": "s1", "row": r, "rack": k, "aisle": "a1"}
                         for n, (r, k) in NODES.items() if r == row}
                h.leaves[row] = stack.enter_context(labelled_cluster(
                    root / row, topology(row), AGENT_CONFIG, nodes, h.leaf_args(row),
                    ("--sim-load", "busy"), GPUS))
            yield h
    finally:
        h.parent.stop(signal.SIGKILL)


def emergencies(c: Cluster, active_only: bool = True) -> list[epb.EmergencyStatus]:
    stub = epb_grpc.EmergencyStub(c.coordinator.channel())
    return list(stub.ListEmergencies(epb.ListEmergenciesRequest(active_only=active_only),
                                     timeout=5).emergencies)


def row_power_w(c: Cluster) -> float:
    return sum(node(a).budget.node_power_w for a in c.agents.values())


def rows(site: hpb.SiteStatus) -> dict[str, hpb.SiteRowStatus]:
    return {r.row: r for r in site.rows}


def refused(call: Callable[[], object], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    return err.value.details()


def test_parent_sees_both_leaves_rollups(hierarchy: Hierarchy) -> None:
    for c in hierarchy.leaves.values():  # busy, and every node pre-armed by its leaf
        poll(lambda c=c: epb_grpc.EmergencyStub(c.coordinator.channel()).ListEmergencies(
            epb.ListEmergenciesRequest(), timeout=5).prearmed_nodes == 2, timeout_s=30)
        poll(lambda c=c: row_power_w(c) > 0.9 * 2 * PEAK_W * 0.8, timeout_s=30)

    def seen() -> dict[str, hpb.SiteRowStatus] | None:
        by_row = rows(hierarchy.site())
        ok = all(r.leaf_connected and r.nodes == 2 and r.nodes_up == 2 and r.gpus == 4
                 and r.power_draw_w > 0.9 * 2 * PEAK_W * 0.8 for r in by_row.values())
        return by_row if ok else None

    by_row = poll(seen, timeout_s=20)
    assert {r: s.leaf_id for r, s in by_row.items()} == {"r1": "leaf-a", "r2": "leaf-b"}
    for r in by_row.values():
        assert 0 < r.floor_w < r.power_draw_w  # 4 GPUs at 200 W + the hosts' non-GPU draw
        assert r.normal_limit_w == r.limit_w == ROW_LIMIT_W and 0 <= r.report_age_s < 3
    site = hierarchy.site()
    assert site.state == "normal" and site.power_limit_w == SITE_NORMAL_W
    assert {lf.leaf_id for lf in site.leaves if lf.connected} == {"leaf-a", "leaf-b"}


def test_bad_input_is_refused_and_changes_nothing(hierarchy: Hierarchy) -> None:
    stub = hierarchy.site_stub()
    for frac in (1.5, 0.0, -0.2):
        details = refused(lambda f=frac: stub.SetSiteLimit(hpb.SetSiteLimitRequest(
            site="s1", capacity_frac=f), timeout=5), grpc.StatusCode.INVALID_ARGUMENT)
        assert "capacity_frac=" in details and "(0, 1]" in details
    details = refused(lambda: stub.SetSiteLimit(hpb.SetSiteLimitRequest(
        site="s1", power_limit_w=3 * ROW_LIMIT_W), timeout=5), grpc.StatusCode.INVALID_ARGUMENT)
    assert "power_limit_w=" in details and f"(0, {SITE_NORMAL_W:g}] W" in details
    details = refused(lambda: stub.SetSiteLimit(hpb.SetSiteLimitRequest(
        site="s1", capacity_frac=0.5, power_limit_w=1000), timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert "exactly one of capacity_frac, power_limit_w" in details
    details = refused(lambda: stub.SetSiteLimit(hpb.SetSiteLimitRequest(
        site="nope", capacity_frac=0.5), timeout=5), grpc.StatusCode.NOT_FOUND)
    assert "site='nope'" in details
    refused(lambda: stub.ClearSiteLimit(hpb.ClearSiteLimitRequest(site="s1"), timeout=5),
            grpc.StatusCode.FAILED_PRECONDITION)
    site = hierarchy.site()
    assert site.state == "normal" and site.seq == 0 and site.limit_id == ""
    for c in hierarchy.leaves.values():
        assert emergencies(c, active_only=False) == []


def test_site_limit_is_split_and_enforced_by_the_leaves(hierarchy: Hierarchy) -> None:
    site_limit_w = 0.6 * SITE_NORMAL_W
    declared = hierarchy.site_stub().SetSiteLimit(hpb.SetSiteLimitRequest(
        site="s1", capacity_frac=0.6, source="utility", note="feed B lost"), timeout=5)
    assert declared.state == "limited" and declared.power_limit_w == pytest.approx(site_limit_w)
    limits = {r.row: r.limit_w for r in declared.rows}
    assert sum(limits.values()) <= site_limit_w + 1e-6 and not declared.infeasible
    assert all(0 < w < ROW_LIMIT_W for w in limits.values())

    site = poll(lambda: (s := hierarchy.site()).acked_s >= 0 and s, timeout_s=20)
    assert site.acked_s < 10, site.acked_s  # declared -> both leaves and their agents acked
    for row, c in hierarchy.leaves.items():
        r = rows(site)[row]
        assert r.acked and r.agents_acked and r.action == "declared"
        (em,) = emergencies(c)
        assert (em.scope, em.name, em.kind, em.source) == ("row", row, "power", "parent")
        assert em.power_limit_w == pytest.approx(limits[row], abs=0.5)
        assert declared.limit_id in em.note and em.emergency_id == r.emergency_id
        # Within the emergency test's deadline, the row measures under its new limit.
        poll(lambda c=c, row=row: row_power_w(c) <= limits[row], timeout_s=20)
        assert all(len(caps) == GPUS for caps in emergency_ceilings(c).values())
    hierarchy.limit_id = declared.limit_id  # type: ignore[attr-defined]
    hierarchy.emergency_ids = {row: emergencies(c)[0].emergency_id  # type: ignore[attr-defined]
                               for row, c in hierarchy.leaves.items()}


def test_restarted_parent_resends_the_limits_in_force(hierarchy: Hierarchy) -> None:
    hierarchy.parent.stop(signal.SIGKILL)
    hierarchy.start_parent()
    site = hierarchy.site()
    assert site.state == "limited" and site.limit_id == hierarchy.limit_id  # type: ignore

    def reacked() -> hpb.SiteStatus | None:
        s = hierarchy.site()
        ok = all(r.leaf_connected and r.acked and r.agents_acked for r in s.rows)
        return s if ok else None

    site = poll(reacked, timeout_s=20)
    for row, c in hierarchy.leaves.items():
        assert rows(site)[row].action == "kept"
        (em,) = emergencies(c)  # the same emergency, never lifted
        assert em.emergency_id == hierarchy.emergency_ids[row]  # type: ignore[attr-defined]
        assert row_power_w(c) <= rows(site)[row].limit_w


def test_restarted_leaf_gets_the_limit_changed_while_it_was_down(hierarchy: Hierarchy) -> None:
    leaf_b = hierarchy.leaves["r2"]
    leaf_b.coordinator.stop(signal.SIGKILL)
    replaced = hierarchy.site_stub().SetSiteLimit(hpb.SetSiteLimitRequest(
        site="s1", capacity_frac=0.5, source="utility", note="feed B still out"), timeout=5)
    limits = {r.row: r.limit_w for r in replaced.rows}
    assert replaced.limit_id != hierarchy.limit_id  # type: ignore[attr-defined]
    assert sum(limits.values()) <= 0.5 * SITE_NORMAL_W + 1e-6

    leaf_a = hierarchy.leaves["r1"]
    poll(lambda: rows(hierarchy.site())["r1"].action == "updated", timeout_s=10)
    (em,) = emergencies(leaf_a)  # adjusted in place: same id, new limit
    assert em.emergency_id == hierarchy.emergency_ids["r1"]  # type: ignore[attr-defined]
    assert em.power_limit_w == pytest.approx(limits["r1"], abs=0.5)

    leaf_b.coordinator = start_coordinator(leaf_b.workdir, leaf_b.port, *hierarchy.leaf_args("r2"))

    def enforced() -> hpb.SiteRowStatus | None:
        r = rows(hierarchy.site())["r2"]
        return r if r.leaf_connected and r.acked and r.agents_acked and \
            r.action == "updated" else None

    poll(enforced, timeout_s=30)  # the leaf waits for its agents' reports, then adjusts
    (em,) = emergencies(leaf_b)
    assert em.emergency_id == hierarchy.emergency_ids["r2"]  # type: ignore[attr-defined]
    assert em.power_limit_w == pytest.approx(limits["r2"], abs=0.5)
    for row, c in hierarchy.leaves.items():
        poll(lambda c=c, row=row: row_power_w(c) <= limits[row], timeout_s=20)
    assert poll(lambda: hierarchy.site().acked_s >= 0, timeout_s=20)


def test_clearing_the_site_limit_clears_the_leaves(hierarchy: Hierarchy) -> None:
    cleared = hierarchy.site_stub().ClearSiteLimit(hpb.ClearSiteLimitRequest(
        site="s1", note="feed back"), timeout=5)
    assert cleared.state == "cleared" and cleared.power_limit_w == SITE_NORMAL_W
    assert all(r.limit_w == ROW_LIMIT_W for r in cleared.rows)
    for c in hierarchy.leaves.values():
        poll(lambda c=c: not emergencies(c), timeout_s=30)  # cleared in steps
        poll(lambda c=c: all(not caps for caps in emergency_ceilings(c).values()), timeout_s=10)
        (em,) = emergencies(c, active_only=False)
        assert em.state == "cleared" and em.source == "parent"
    site = poll(lambda: (s := hierarchy.site()).acked_s >= 0 and s, timeout_s=10)
    assert {r.action for r in site.rows} == {"cleared"}
    refused(lambda: hierarchy.site_stub().ClearSiteLimit(hpb.ClearSiteLimitRequest(
        site="s1"), timeout=5), grpc.StatusCode.FAILED_PRECONDITION)
