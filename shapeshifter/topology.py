"""The cluster topology: sites -> rows (power feeds) -> racks, each rack in a cooling aisle.

Loaded from a YAML file (``version: 1``), validated with pydantic (unknown keys rejected), so a
malformed file is refused with an error naming the field and the line. Nodes are matched to the
topology by the labels they report (site, row, rack, aisle).

The inlet model is TAPAS eq. 1, linear: the inlet temperature of a server rises with the outside
temperature and the datacenter load, plus per-row, per-rack and per-server offsets (rows differ by
~1 C, racks within a row by up to 2 C).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shapeshifter.common.errors import InvalidArgument
from shapeshifter.common.yamlfile import parse_yaml_model

LABEL_KEYS = ("site", "row", "rack", "aisle")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Liveness(_Strict):
    """A node is suspect after suspect_after_s without a report, lost after lost_after_s."""

    suspect_after_s: float = Field(3.0, gt=0, le=3600)
    lost_after_s: float = Field(10.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _ordered(self) -> Liveness:
        if self.lost_after_s <= self.suspect_after_s:
            raise ValueError(
                f"lost_after_s={self.lost_after_s:g} must be greater than "
                f"suspect_after_s={self.suspect_after_s:g}"
            )
        return self


class InletModel(_Strict):
    """TAPAS eq. 1: T_inlet = base + per_outside*(T_out - ref_out) + per_load*load + offsets."""

    base_c: float = Field(22.0, ge=-10, le=60)
    outside_temp_c: float = Field(25.0, ge=-50, le=60)  # the current outside temperature
    reference_outside_c: float = Field(25.0, ge=-50, le=60)
    per_outside_c: float = Field(0.3, ge=0, le=2)  # inlet degrees per outside degree
    per_load_c: float = Field(2.0, ge=0, le=20)  # inlet rise from an idle to a fully loaded site


class Rack(_Strict):
    name: str = Field(min_length=1)
    aisle: str = Field(min_length=1)
    inlet_offset_c: float = Field(0.0, ge=-10, le=10)
    server_inlet_offsets_c: dict[str, float] = Field(default_factory=dict)  # node id -> offset


class Row(_Strict):
    name: str = Field(min_length=1)
    row_power_limit_w: float = Field(gt=0, le=1e9)
    inlet_offset_c: float = Field(0.0, ge=-10, le=10)
    racks: list[Rack] = Field(min_length=1)


class Aisle(_Strict):
    name: str = Field(min_length=1)
    aisle_airflow_cfm: float = Field(gt=0, le=1e9)


class Site(_Strict):
    name: str = Field(min_length=1)
    inlet: InletModel = Field(default_factory=InletModel)
    aisles: list[Aisle] = Field(min_length=1)
    rows: list[Row] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Site:
        _unique("aisles", [a.name for a in self.aisles])
        _unique("rows", [r.name for r in self.rows])
        aisles = {a.name for a in self.aisles}
        for r in self.rows:
            _unique(f"rows[{r.name}].racks", [k.name for k in r.racks])
            for k in r.racks:
                if k.aisle not in aisles:
                    raise ValueError(
                        f"rack {r.name}/{k.name}: aisle {k.aisle!r} is not one of the site's "
                        f"aisles {sorted(aisles)}"
                    )
        return self


class Topology(_Strict):
    version: Literal[1]
    liveness: Liveness = Field(default_factory=Liveness)
    sites: list[Site] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_sites(self) -> Topology:
        # Rows and aisles are named cluster-wide (status views and metrics label them by name).
        _unique("sites", [s.name for s in self.sites])
        _unique("rows (across sites)", [r.name for s in self.sites for r in s.rows])
        _unique("aisles (across sites)", [a.name for s in self.sites for a in s.aisles])
        return self

    def place(self, labels: dict[str, str]) -> Placement | None:
        """Where labels put a node, or None when they do not match this topology."""
        site = next((s for s in self.sites if s.name == labels.get("site")), None)
        row = site and next((r for r in site.rows if r.name == labels.get("row")), None)
        rack = row and next((k for k in row.racks if k.name == labels.get("rack")), None)
        if site is None or row is None or rack is None or rack.aisle != labels.get("aisle"):
            return None
        return Placement(site=site.name, row=row.name, rack=rack.name, aisle=rack.aisle)

    def site(self, name: str) -> Site:
        return next(s for s in self.sites if s.name == name)

    def inlet_temp_c(self, placement: Placement, node_id: str, site_load_frac: float) -> float:
        """TAPAS eq. 1 for one server given its site's load (drawn power / provisioned power)."""
        site = self.site(placement.site)
        row = next(r for r in site.rows if r.name == placement.row)
        rack = next(k for k in row.racks if k.name == placement.rack)
        m = site.inlet
        load = min(max(site_load_frac, 0.0), 1.0)
        return (
            m.base_c
            + m.per_outside_c * (m.outside_temp_c - m.reference_outside_c)
            + m.per_load_c * load
            + row.inlet_offset_c
            + rack.inlet_offset_c
            + rack.server_inlet_offsets_c.get(node_id, 0.0)
        )


@dataclass(frozen=True)
class Placement:
    site: str
    row: str
    rack: str
    aisle: str


def _unique(what: str, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what}: duplicate names {dupes}")


def parse_topology(text: str, source: str = "<topology>") -> Topology:
    """Parse and validate; InvalidArgument names the file, the field path and its line."""
    return parse_yaml_model(text, Topology, source, "topology")


def load_topology(path: Path) -> Topology:
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidArgument(f"{path}: cannot read topology: {e}", field="topology") from e
    return parse_topology(text, str(path))
