"""The endpoints the rebalancer manages: their declarations (kept in the plan store, each change
audited) and the demand it plans for each (declared, else measured and smoothed)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace

from coordinator.profiles.schema import QueryClass
from coordinator.rebalance.journal import PlanJournal
from coordinator.rebalance.snapshot import (
    DemandEstimator,
    EndpointDecl,
    demand_of,
    sample_demand,
    validate_decl,
)
from coordinator.registry import NodeRecord
from coordinator.store.plans import PlanStoreLike
from shapeshifter.common import errors
from shapeshifter.common.clock import Clock


class Endpoints:
    def __init__(self, store: PlanStoreLike, journal: PlanJournal, clock: Clock,
                 demand_smoothing_s: float) -> None:
        self._store = store
        self._journal = journal
        self._clock = clock
        self._demand = DemandEstimator(demand_smoothing_s)
        self._decls = {d["spec"]["name"]: EndpointDecl.from_doc(d)
                       for d in store.load_endpoints()}

    @property
    def decls(self) -> Mapping[str, EndpointDecl]:
        return self._decls

    def set(self, decl: EndpointDecl, actor: str) -> EndpointDecl:
        decl = validate_decl(replace(decl, updated_at_unix_s=self._clock.time()))
        self._store.save_endpoint(decl.spec.name, decl.to_doc(), decl.updated_at_unix_s)
        self._decls[decl.spec.name] = decl
        self._journal.audit("", "SetEndpoint", json.dumps(decl.to_doc(), sort_keys=True), True,
                            "", actor)
        return decl

    def delete(self, name: str, actor: str) -> None:
        self.get(name)
        self._store.delete_endpoint(name)
        del self._decls[name]
        self._journal.audit("", "DeleteEndpoint", json.dumps({"name": name}), True, "", actor)

    def get(self, name: str) -> EndpointDecl:
        if name not in self._decls:
            known = ", ".join(sorted(self._decls)) or "none"
            raise errors.NotFound(f"endpoint={name!r} is not declared (known: {known})",
                                  field="endpoint")
        return self._decls[name]

    def listed(self) -> list[tuple[EndpointDecl, float]]:
        """Each declaration with the demand (req/s) the loop uses for it now."""
        return [(d, sum(demand_of(d, self._demand).values()))
                for _, d in sorted(self._decls.items())]

    def demand(self) -> dict[str, dict[QueryClass, float]]:
        """The demand (req/s per class) the loop plans for, per endpoint."""
        return {name: demand_of(d, self._demand) for name, d in self._decls.items()}

    def sample(self, records: Iterable[NodeRecord]) -> None:
        """Feed the estimator the request rates the live instances report now."""
        now = self._clock.time()
        for name, sample in sample_demand(records, self._decls).items():
            self._demand.observe(name, sample, now)
