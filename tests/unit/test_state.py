"""Rollups and liveness: pure functions of a snapshot."""

from __future__ import annotations

import pytest

from coordinator.state import NodeView, liveness, node_load, rollup, scope_sums, summarize
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.hw.models import GPU_MODELS
from shapeshifter.topology import Liveness, Placement, parse_topology

TOPOLOGY = """\
version: 1
liveness: {suspect_after_s: 2.0, lost_after_s: 5.0}
sites:
  - name: s1
    inlet: {base_c: 20.0, per_outside_c: 0.0, per_load_c: 4.0}
    aisles: [{name: a1, aisle_airflow_cfm: 3000}, {name: a2, aisle_airflow_cfm: 4000}]
    rows:
      - name: r1
        row_power_limit_w: 5000
        racks: [{name: k1, aisle: a1}, {name: k2, aisle: a2, inlet_offset_c: 2.0}]
      - name: r2
        row_power_limit_w: 3000
        inlet_offset_c: 1.0
        racks: [{name: k3, aisle: a2}]
"""


def node(node_id: str, power_w: float, temps_c: list[float], airflow_cfm: float = 100.0,
         busy: bool = True) -> agent_pb2.Node:
    gpus = [agent_pb2.Gpu(index=i, temperature_c=t, utilization_gpu_pct=50.0 if busy else 0.0)
            for i, t in enumerate(temps_c)]
    totals = agent_pb2.Budget(memory_used_mib=1000, memory_total_mib=8000, requests_in_flight=3,
                              requests_capacity=10)
    budget = agent_pb2.NodeBudget(node_power_w=power_w, airflow_cfm=airflow_cfm, totals=totals,
                                  gpu_power_limit_w=700.0 * len(gpus))
    return agent_pb2.Node(node_id=node_id, gpus=gpus, budget=budget, safety_state="leased")


def view(node_id: str, row: str, rack: str, aisle: str, report: agent_pb2.Node | None,
         age_s: float = 0.5, known: bool = True) -> NodeView:
    labels = {"site": "s1", "row": row, "rack": rack, "aisle": aisle}
    placement = Placement("s1", row, rack, aisle) if known else None
    return NodeView(node_id, labels, placement, report, age_s)


@pytest.mark.parametrize(("age_s", "state"), [(0.0, "up"), (1.99, "up"), (2.0, "suspect"),
                                              (4.9, "suspect"), (5.0, "lost"), (99.0, "lost")])
def test_liveness_by_missed_report_age(age_s: float, state: str) -> None:
    assert liveness(age_s, Liveness(suspect_after_s=2.0, lost_after_s=5.0)) == state


def test_rollups_sum_nodes_per_row_aisle_rack_site() -> None:
    topo = parse_topology(TOPOLOGY)
    views = [
        view("n1", "r1", "k1", "a1", node("n1", 1000.0, [40.0, 50.0], busy=True)),
        view("n2", "r1", "k2", "a2", node("n2", 1500.0, [60.0], busy=False), age_s=3.0),
        view("n3", "r2", "k3", "a2", node("n3", 2000.0, [70.0, 45.0]), age_s=10.0),
        view("n4", "r2", "k3", "a2", None, age_s=0.1),  # registered, no report yet
    ]
    c = rollup(topo, views)
    rows = {r.name: r for r in c.rows}
    assert rows["r1"].power_draw_w == 2500.0 and rows["r1"].power_limit_w == 5000.0
    assert rows["r1"].max_gpu_temp_c == 60.0
    assert (rows["r1"].nodes, rows["r1"].nodes_up, rows["r1"].nodes_suspect) == (2, 1, 1)
    assert (rows["r2"].nodes, rows["r2"].nodes_up, rows["r2"].nodes_lost) == (2, 1, 1)
    assert rows["r2"].power_draw_w == 2000.0  # a lost node's last draw still counts
    assert (rows["r1"].gpus, rows["r1"].gpus_in_use) == (3, 2)
    aisles = {a.name: a for a in c.aisles}
    assert aisles["a2"].airflow_cfm == 200.0 and aisles["a2"].airflow_limit_cfm == 4000.0
    assert aisles["a2"].power_draw_w == 3500.0
    racks = {r.name: r for r in c.racks}
    assert racks["r2/k3"].memory_used_mib == 1000.0 and racks["r2/k3"].requests_capacity == 10
    site = c.sites[0]
    assert site.power_draw_w == 4500.0 and site.power_limit_w == 8000.0
    assert site.airflow_limit_cfm == 7000.0 and site.nodes == 4


def test_inlet_estimates_follow_load_and_offsets() -> None:
    topo = parse_topology(TOPOLOGY)
    idle = rollup(topo, [])
    racks = {r.name: r.inlet_temp_c for r in idle.racks}
    assert racks == {"r1/k1": 20.0, "r1/k2": 22.0, "r2/k3": 21.0}
    assert {r.name: r.inlet_temp_c for r in idle.rows} == {"r1": 21.0, "r2": 21.0}
    loaded = rollup(topo, [view("n1", "r1", "k1", "a1", node("n1", 4000.0, [40.0]))])
    # site load 4000 / 8000 W = 0.5 -> +2 C everywhere
    assert {r.name: r.inlet_temp_c for r in loaded.racks}["r1/k1"] == pytest.approx(22.0)


def test_unknown_labels_listed_but_not_rolled_up() -> None:
    topo = parse_topology(TOPOLOGY)
    c = rollup(topo, [view("x", "r9", "k9", "a9", node("x", 999.0, [90.0]), known=False)])
    assert sum(r.power_draw_w for r in c.rows) == 0.0
    assert [(n.name, n.topology_known, n.row) for n in c.nodes] == [("x", False, "r9")]


def test_summary_of_a_node() -> None:
    s = summarize(view("n1", "r1", "k1", "a1", node("n1", 1234.0, [41.0, 55.5]), age_s=2.5),
                  Liveness(suspect_after_s=2.0, lost_after_s=5.0))
    assert (s.name, s.state, s.power_draw_w, s.max_gpu_temp_c, s.gpus) == (
        "n1", "suspect", 1234.0, 55.5, 2)
    assert (s.gpu_power_limit_w, s.safety_state, s.last_seen_age_s) == (1400.0, "leased", 2.5)


def test_scope_sums_match_the_rollup_and_keep_sites_apart() -> None:
    """What detection reads equals the full rollup's row draw and aisle airflow, a row name
    shared by two sites is not summed together, and a GPU within the headroom of its
    slowdown temperature (reported, else its model's) makes its node hot."""
    topo = parse_topology(TOPOLOGY)
    views = [view("n1", "r1", "k1", "a1", node("n1", 900.0, [60.0], 100.0)),
             view("n2", "r1", "k2", "a2", node("n2", 700.0, [70.0], 250.0)),
             view("n3", "r2", "k3", "a2", node("n3", 400.0, [50.0], 50.0))]
    full = rollup(topo, views)
    hot = agent_pb2.Gpu(index=0, gpu_type="h100-80gb", temperature_c=86.0)
    far = Placement("s2", "r1", "k9", "a1")
    loads = [(v.placement, node_load(v.report)) for v in views]
    loads.append((far, node_load(agent_pb2.Node(
        gpus=[hot], budget=agent_pb2.NodeBudget(node_power_w=5000.0)))))
    sums = scope_sums(loads, hot_headroom_c=3.0)
    assert {k[1]: w for k, w in sums.row_power_w.items() if k[0] == "s1"} == {
        r.name: r.power_draw_w for r in full.rows}
    assert {k[1]: f for k, f in sums.aisle_airflow_cfm.items() if k[0] == "s1"} == {
        a.name: a.airflow_cfm for a in full.aisles}
    assert sums.row_power_w[("s2", "r1")] == 5000.0
    assert sums.aisle_hot_nodes == {("s1", "a1"): 0, ("s1", "a2"): 0, ("s2", "a1"): 1}
    margin_c = GPU_MODELS["h100-80gb"].thermal.slowdown_c - 86.0
    assert node_load(agent_pb2.Node(gpus=[hot])).slowdown_margin_c == pytest.approx(margin_c)
