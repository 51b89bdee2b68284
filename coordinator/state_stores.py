"""Where a coordinator keeps its state: one SQLite file (the default), or etcd for replicas that
fail over to each other (coordinator.ha, coordinator.etcd_stores)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coordinator.emergency_store import EmergencyStore, EmergencyStoreLike
from coordinator.plan_store import PlanStore, PlanStoreLike
from coordinator.store import Store


@dataclass(frozen=True)
class StateStores:
    store: Store  # nodes, audit (and epoch, topology, leases unless etcd holds them)
    emergencies: EmergencyStoreLike
    plans: PlanStoreLike


def sqlite_stores(db: Path) -> StateStores:
    return StateStores(Store(db), EmergencyStore(db), PlanStore(db))
