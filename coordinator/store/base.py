"""Where a coordinator keeps its state: one SQLite file (the default), or etcd for replicas that
fail over to each other (coordinator.ha.replica, coordinator.store.etcd)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coordinator.store.emergency import EmergencyStore, EmergencyStoreLike
from coordinator.store.plans import PlanStore, PlanStoreLike
from coordinator.store.sqlite import Store


@dataclass(frozen=True)
class StateStores:
    store: Store  # nodes, audit (and epoch, topology, leases unless etcd holds them)
    emergencies: EmergencyStoreLike
    plans: PlanStoreLike


def sqlite_stores(db: Path) -> StateStores:
    return StateStores(Store(db), EmergencyStore(db), PlanStore(db))
