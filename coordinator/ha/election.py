"""Leader election and fencing on etcd.

The leader is whoever created the key `<prefix>/leader` (a create-if-absent transaction) with a
lease it keeps alive. The key's value names the replica and the address agents should dial.

Epoch = the etcd revision at which that key was created. Revisions only grow, so every new leader
has a higher epoch than all before it; agents refuse plans and leases of a lower epoch than the
highest they have seen (nodeagent.actuation.actuator), which fences a deposed leader's plans. Its
writes
to etcd are fenced too (FencedKV): each is a transaction that succeeds only while the leader key
is still the one created at its epoch.

A leader that cannot renew its lease before the TTL runs out has lost leadership: etcd deletes
the key and another replica can take it. The coordinator then stops (coordinator.ha.replica).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from coordinator.ha.etcd import (
    EtcdClient,
    compare_create_revision,
    delete_op,
    kvs_of,
    put_op,
    range_op,
)

TXN_MAX_OPS = 100  # etcd's default --max-txn-ops is 128


class NotLeader(Exception):
    """A fenced write was refused: this replica is no longer the leader."""


@dataclass(frozen=True)
class LeaderInfo:
    replica_id: str
    address: str
    epoch: int  # the leader key's create revision


@dataclass(frozen=True)
class Leadership:
    epoch: int
    lease_id: int
    ttl_s: int


class Election:
    def __init__(self, client: EtcdClient, prefix: str, replica_id: str, address: str,
                 ttl_s: int) -> None:
        self._client = client
        self.key = prefix.rstrip("/") + "/leader"
        self._value = json.dumps({"replica_id": replica_id, "address": address})
        self.ttl_s = ttl_s

    def try_acquire(self) -> Leadership | None:
        """Become the leader if there is none; None when another replica holds the key."""
        lease_id, ttl_s = self._client.grant(self.ttl_s)
        won, revision, _ = self._client.txn(
            [compare_create_revision(self.key, 0)], [put_op(self.key, self._value, lease_id)])
        if not won:
            self._client.revoke(lease_id)
            return None
        return Leadership(epoch=revision, lease_id=lease_id, ttl_s=ttl_s)

    def leader(self) -> LeaderInfo | None:
        kv = self._client.get(self.key)
        if kv is None:
            return None
        doc = json.loads(kv.value)
        return LeaderInfo(doc["replica_id"], doc["address"], kv.create_revision)

    def keep(self, lead: Leadership) -> bool:
        """Renew the lease once; False when it has expired (leadership lost)."""
        return self._client.keepalive(lead.lease_id) > 0

    def resign(self, lead: Leadership) -> None:
        """Give leadership up at once (revoking the lease deletes the key)."""
        self._client.revoke(lead.lease_id)


class FencedKV:
    """Writes under `prefix` that succeed only while `epoch`'s leader key still exists."""

    def __init__(self, client: EtcdClient, prefix: str, leader_key: str, epoch: int,
                 on_refused: Callable[[], None] = lambda: None) -> None:
        """on_refused: called when a write is refused (before NotLeader is raised)."""
        self.client = client
        self._on_refused = on_refused
        self.prefix = prefix.rstrip("/") + "/"
        self._leader_key = leader_key
        self._fence = compare_create_revision(leader_key, epoch)
        self.epoch = epoch

    def put(self, key: str, value: str) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Iterable[tuple[str, str]]) -> None:
        ops = [put_op(self.prefix + k, v) for k, v in items]
        for start in range(0, len(ops), TXN_MAX_OPS):
            self._fenced(ops[start:start + TXN_MAX_OPS])

    def delete(self, key: str) -> bool:
        responses = self._fenced([delete_op(self.prefix + key)])
        return int(responses[0].get("response_delete_range", {}).get("deleted", 0)) > 0

    def get(self, key: str) -> str | None:
        kv = self.client.get(self.prefix + key)
        return kv.value.decode() if kv else None

    def get_prefix(self, sub: str, limit: int = 0,
                   descending: bool = False) -> list[tuple[str, str]]:
        """(key relative to this store's prefix, value) under prefix+sub, sorted by key (the
        first `limit`; 0: all)."""
        n = len(self.prefix)
        return [(kv.key[n:], kv.value.decode())
                for kv in self.client.get_prefix(self.prefix + sub, limit, descending)]

    def _fenced(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ok, _, responses = self.client.txn([self._fence], ops, [range_op(self._leader_key)])
        if not ok:
            holder = kvs_of(responses[0].get("response_range", {})) if responses else []
            now = f"epoch {holder[0].create_revision}" if holder else "no leader"
            self._on_refused()
            raise NotLeader(f"write refused: this coordinator's epoch {self.epoch} is no longer "
                            f"the leader's ({now})")
        return responses
