"""Topology parsing: valid files place nodes; malformed ones name the field and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from shapeshifter.common.errors import InvalidArgument
from shapeshifter.topology import Placement, load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[2]

TOPOLOGY = """\
version: 1
liveness: {suspect_after_s: 1.0, lost_after_s: 3.0}
sites:
  - name: s1
    inlet: {base_c: 20.0, outside_temp_c: 35.0, reference_outside_c: 25.0,
            per_outside_c: 0.5, per_load_c: 2.0}
    aisles:
      - {name: a1, aisle_airflow_cfm: 5000}
    rows:
      - name: r1
        row_power_limit_w: 10000
        inlet_offset_c: 1.0
        racks:
          - {name: k1, aisle: a1, inlet_offset_c: 0.5, server_inlet_offsets_c: {n7: 0.25}}
"""


def test_example_file_is_valid() -> None:
    topo = load_topology(ROOT / "systemd" / "topology.example.yaml")
    assert [r.name for r in topo.sites[0].rows] == ["r1", "r2"]


def test_labels_place_a_node_or_not() -> None:
    topo = parse_topology(TOPOLOGY)
    labels = {"site": "s1", "row": "r1", "rack": "k1", "aisle": "a1"}
    assert topo.place(labels) == Placement("s1", "r1", "k1", "a1")
    assert topo.place({**labels, "aisle": "a2"}) is None  # rack k1 is in a1, not a2
    assert topo.place({**labels, "rack": "k9"}) is None
    assert topo.place({}) is None


def test_inlet_model_is_linear_in_outside_temperature_and_load() -> None:
    topo = parse_topology(TOPOLOGY)
    p = Placement("s1", "r1", "k1", "a1")
    # 20 + 0.5 * (35 - 25) + 2.0 * 0.5 + row 1.0 + rack 0.5 (+ server 0.25 for n7)
    assert topo.inlet_temp_c(p, "n1", 0.5) == pytest.approx(27.5)
    assert topo.inlet_temp_c(p, "n7", 0.5) == pytest.approx(27.75)
    assert topo.inlet_temp_c(p, "n1", 5.0) == pytest.approx(28.5)  # load fraction clamped to 1


@pytest.mark.parametrize(
    ("old", "new", "field", "line"),
    [
        ("row_power_limit_w: 10000", "row_power_limit_w: -1", "sites.0.rows.0.row_power_limit_w",
         11),
        ("aisle_airflow_cfm: 5000", "aisle_airflow_cfm: 5000, color: red", "sites.0.aisles.0.color",
         8),
        ("version: 1", "version: 2", "version", 1),
        ("lost_after_s: 3.0", "lost_after_s: 0.5", "liveness", 2),
        ("aisle: a1, inlet", "aisle: a9, inlet", "sites.0", 4),
    ],
)
def test_malformed_topology_names_field_and_line(old: str, new: str, field: str, line: int) -> None:
    text = TOPOLOGY.replace(old, new)
    assert text != TOPOLOGY
    with pytest.raises(InvalidArgument) as e:
        parse_topology(text, "topo.yaml")
    assert e.value.field == field
    assert str(e.value).startswith(f"topo.yaml (line {line}): {field}")


def test_duplicate_names_and_bad_yaml_are_refused() -> None:
    dup = TOPOLOGY.replace("racks:\n", "racks:\n          - {name: k1, aisle: a1}\n")
    with pytest.raises(InvalidArgument, match="duplicate names"):
        parse_topology(dup)
    with pytest.raises(InvalidArgument, match="not valid YAML"):
        parse_topology("version: [1\n")
    with pytest.raises(InvalidArgument, match="top level must be a mapping"):
        parse_topology("- 1\n")
