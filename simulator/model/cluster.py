"""The physical layout: rows (power feeds), racks, aisles (airflow), servers, GPUs.

The inlet model is the coordinator's (shapeshifter.topology, TAPAS eq. 1): the layout builds a
`Topology` and asks it for each server's inlet temperature; only the site-load term changes over
time, so it is kept as a base plus a slope.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shapeshifter.hw.models import GpuModel, gpu_model
from shapeshifter.hw.server_model import ServerModel, server_model_for
from shapeshifter.topology import Aisle, Rack, Row, Site, Topology
from simulator.inputs.scenario import ClusterSpec


@dataclass(frozen=True)
class Cluster:
    spec: ClusterSpec
    gpu: GpuModel
    server: ServerModel
    topology: Topology
    server_row: np.ndarray  # row index per server
    server_rack: np.ndarray  # global rack index per server
    server_aisle: np.ndarray  # aisle index per server
    inlet_base_c: np.ndarray  # inlet per server at zero site load
    inlet_per_load_c: float  # inlet rise from an idle to a fully loaded site
    row_limit_w: np.ndarray  # provisioned row power (before failures)
    aisle_limit_cfm: np.ndarray  # provisioned aisle airflow (before failures)
    provisioned_per_row: int  # servers per row the feed was sized for

    @property
    def n_servers(self) -> int:
        return len(self.server_row)

    @property
    def gpus_per_server(self) -> int:
        return self.spec.gpus_per_server

    @property
    def n_gpus(self) -> int:
        return self.n_servers * self.gpus_per_server

    @property
    def n_rows(self) -> int:
        return len(self.row_limit_w)

    @property
    def n_aisles(self) -> int:
        return len(self.aisle_limit_cfm)

    @property
    def gpu_server(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_servers), self.gpus_per_server)

    def nameplate_server_w(self) -> float:
        n = self.gpus_per_server
        return self.server.node_power_w(n * self.gpu.power.max_w, 1.0, n)


def build_cluster(spec: ClusterSpec, rng: np.random.Generator) -> Cluster:
    """Lay out servers row by row, racks of `servers_per_rack`, racks alternating aisles."""
    base_per_row = max(1, spec.servers // spec.rows)
    per_row = base_per_row + round(base_per_row * spec.oversubscription)
    n_servers = per_row * spec.rows
    server_row = np.repeat(np.arange(spec.rows), per_row)
    rack_in_row = np.tile(np.arange(per_row) // spec.servers_per_rack, spec.rows)
    racks_per_row = int(rack_in_row.max()) + 1
    server_rack = server_row * racks_per_row + rack_in_row
    server_aisle = server_rack % spec.aisles
    gpu = gpu_model(spec.gpu_type)
    server = server_model_for(spec.gpu_type)
    topology = _topology(spec, racks_per_row, rng)
    inlet_base_c = _inlet_base_c(topology, server_row, rack_in_row, n_servers)
    n = spec.gpus_per_server
    nameplate_w = server.node_power_w(n * gpu.power.max_w, 1.0, n)
    row_limit_w = np.full(spec.rows, base_per_row * nameplate_w * spec.row_provision_frac)
    # Aisles are sized for the servers they held before oversubscription, at full airflow.
    provisioned_frac = base_per_row / per_row
    max_cfm = server.airflow_cfm(1.0, n)
    aisle_servers = np.bincount(server_aisle, minlength=spec.aisles)
    aisle_limit_cfm = np.maximum(aisle_servers * provisioned_frac, 1.0) * max_cfm \
        * spec.aisle_provision_frac
    return Cluster(spec=spec, gpu=gpu, server=server, topology=topology, server_row=server_row,
                   server_rack=server_rack, server_aisle=server_aisle, inlet_base_c=inlet_base_c,
                   inlet_per_load_c=spec.inlet.per_load_c, row_limit_w=row_limit_w,
                   aisle_limit_cfm=aisle_limit_cfm, provisioned_per_row=base_per_row)


def _topology(spec: ClusterSpec, racks_per_row: int, rng: np.random.Generator) -> Topology:
    row_offsets = rng.uniform(0.0, spec.row_inlet_spread_c, spec.rows)
    rack_offsets = rng.uniform(0.0, spec.rack_inlet_spread_c, (spec.rows, racks_per_row))
    def rack(r: int, k: int) -> Rack:
        aisle = (r * racks_per_row + k) % spec.aisles
        return Rack(name=f"rack{r}-{k}", aisle=f"aisle{aisle}",
                    inlet_offset_c=float(rack_offsets[r, k]))

    # Limits here are placeholders: the simulator keeps its own arrays (Cluster.row_limit_w).
    rows = [Row(name=f"row{r}", row_power_limit_w=1.0, inlet_offset_c=float(row_offsets[r]),
                racks=[rack(r, k) for k in range(racks_per_row)])
            for r in range(spec.rows)]
    aisles = [Aisle(name=f"aisle{a}", aisle_airflow_cfm=1.0) for a in range(spec.aisles)]
    site = Site(name="sim", inlet=spec.inlet, aisles=aisles, rows=rows)
    return Topology(version=1, sites=[site])


def _inlet_base_c(topology: Topology, server_row: np.ndarray, rack_in_row: np.ndarray,
                  n_servers: int) -> np.ndarray:
    cache: dict[tuple[int, int], float] = {}
    out = np.empty(n_servers)
    for s in range(n_servers):
        key = (int(server_row[s]), int(rack_in_row[s]))
        if key not in cache:
            placement = topology.place({"site": "sim", "row": f"row{key[0]}",
                                        "rack": f"rack{key[0]}-{key[1]}",
                                        "aisle": _aisle_of(topology, key)})
            assert placement is not None
            cache[key] = topology.inlet_temp_c(placement, f"s{s}", 0.0)
        out[s] = cache[key]
    return out


def _aisle_of(topology: Topology, key: tuple[int, int]) -> str:
    row = topology.sites[0].rows[key[0]]
    return row.racks[key[1]].aisle
