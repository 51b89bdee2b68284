"""The etcd client, the election and the fenced state stores against a real 3-member etcd."""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.ha.election import Election, FencedKV, NotLeader
from coordinator.ha.etcd import EtcdClient, EtcdError, EtcdUnavailable
from coordinator.store.emergency import EmergencyRecord, EmergencyStore, Event
from coordinator.store.etcd import EtcdEmergencyStore, EtcdPlanStore, EtcdStore
from coordinator.store.plans import PlanStore
from shapeshifter.api.v1 import agent_pb2
from tests.etcd_cluster import EtcdCluster, etcd_binary

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    etcd_binary() is None,
    reason="etcd is not installed (Debian: apt-get install etcd-server); etcd tests skipped")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd")).start(3)
    try:
        yield cluster
    finally:
        cluster.stop()


def election(client: EtcdClient, prefix: str, name: str, ttl_s: int = 2) -> Election:
    return Election(client, prefix, name, f"127.0.0.1:{name}", ttl_s)


def test_client_reads_writes_and_transactions(etcd: EtcdCluster) -> None:
    c = EtcdClient(etcd.endpoints)
    rev = c.put("/t1/a/1", "one")
    c.put("/t1/a/2", b"two")
    c.put("/t1/b", "other")
    assert c.get("/t1/a/1").value == b"one" and c.get("/t1/a/1").mod_revision == rev
    assert [kv.key for kv in c.get_prefix("/t1/a/")] == ["/t1/a/1", "/t1/a/2"]
    assert c.get("/t1/missing") is None
    c.delete_prefix("/t1/a/")
    assert c.get_prefix("/t1/a/") == [] and c.get("/t1/b") is not None
    with pytest.raises(EtcdError, match="lease"):
        c.keepalive(123456789) or c.revoke(123456789)  # an unknown lease: etcd's error


def test_client_fails_over_to_the_next_member(etcd: EtcdCluster) -> None:
    dead = EtcdClient(["http://127.0.0.1:1", *etcd.endpoints], timeout_s=1.0)
    dead.put("/t2/k", "v")  # the first URL refuses; the next member answers
    assert dead.get("/t2/k").value == b"v"
    with pytest.raises(EtcdUnavailable, match="no etcd member answered"):
        EtcdClient(["http://127.0.0.1:1"], timeout_s=0.5).get("/t2/k")
    with pytest.raises(ValueError, match="expected http://HOST:PORT"):
        EtcdClient(["https://x"])


def test_one_leader_at_a_time_and_epochs_grow(etcd: EtcdCluster) -> None:
    a = election(EtcdClient(etcd.endpoints), "/t3", "a")
    b = election(EtcdClient(etcd.endpoints), "/t3", "b")
    lead_a = a.try_acquire()
    assert lead_a is not None and b.try_acquire() is None
    assert b.leader().replica_id == "a" and b.leader().epoch == lead_a.epoch
    assert a.keep(lead_a)
    a.resign(lead_a)
    assert not a.keep(lead_a)  # revoked: the lease is gone
    lead_b = b.try_acquire()
    assert lead_b is not None and lead_b.epoch > lead_a.epoch
    assert a.leader().address == "127.0.0.1:b"


def test_an_unrenewed_lease_lets_another_replica_lead(etcd: EtcdCluster) -> None:
    a = election(EtcdClient(etcd.endpoints), "/t4", "a", ttl_s=2)
    b = election(EtcdClient(etcd.endpoints), "/t4", "b", ttl_s=2)
    lead_a = a.try_acquire()
    assert lead_a is not None
    start = time.monotonic()
    lead_b = None
    while lead_b is None and time.monotonic() - start < 10:
        lead_b = b.try_acquire()  # a never renews
        time.sleep(0.2)
    assert lead_b is not None and lead_b.epoch > lead_a.epoch
    assert 1.5 <= time.monotonic() - start <= 6  # about the TTL, not at once
    assert not a.keep(lead_a)


def test_a_deposed_leaders_writes_are_refused(etcd: EtcdCluster) -> None:
    client = EtcdClient(etcd.endpoints)
    a, b = election(client, "/t5", "a"), election(client, "/t5", "b")
    lead_a = a.try_acquire()
    refused: list[bool] = []
    kv_a = FencedKV(client, "/t5", a.key, lead_a.epoch, on_refused=lambda: refused.append(True))
    kv_a.put("x", "from a")
    a.resign(lead_a)
    lead_b = b.try_acquire()
    with pytest.raises(NotLeader, match=f"epoch {lead_a.epoch} is no longer the leader's "
                                        f"\\(epoch {lead_b.epoch}\\)"):
        kv_a.put_many([("x", "late write from a"), ("y", "also")])
    assert refused == [True]
    assert kv_a.get("x") == "from a" and kv_a.get("y") is None  # nothing of it landed
    kv_b = FencedKV(client, "/t5", b.key, lead_b.epoch)
    kv_b.put_many((f"many/{i:03d}", str(i)) for i in range(250))  # more than one txn's worth
    assert len(kv_b.get_prefix("many/")) == 250
    assert kv_b.delete("x") and not kv_b.delete("x")


def _kv(etcd: EtcdCluster, prefix: str) -> FencedKV:
    client = EtcdClient(etcd.endpoints)
    lead = election(client, prefix, "solo").try_acquire()
    assert lead is not None
    return FencedKV(client, prefix, prefix + "/leader", lead.epoch)


def test_emergency_store_matches_the_sqlite_one(etcd: EtcdCluster, tmp_path: Path) -> None:
    rec = EmergencyRecord("e1", "row", "r1", "power", "active", 0.75, 1000.0, 750.0, 750.0,
                          "ups", "feed A", 10.0)
    cleared = EmergencyRecord("e0", "row", "r2", "power", "cleared", 0.5, 1000.0, 500.0, 500.0,
                              "ops", "", 5.0, 20.0, 3.0)
    events = [Event(10.0, "declared"), Event(10.1, "caps_issued", "n1", {"caps_w": {"0": 350}})]
    stores = (EmergencyStore(tmp_path / "c.db"), EtcdEmergencyStore(_kv(etcd, "/t6")))
    for store in stores:
        store.save(rec)
        store.save(cleared)
        store.append("e1", events[:1])
        store.append("e1", events[1:])
    sqlite, etcd_store = stores
    assert etcd_store.load() == sqlite.load()
    assert etcd_store.load(active_only=True) == sqlite.load(active_only=True) == [rec]
    assert etcd_store.timeline("e1") == sqlite.timeline("e1")
    assert [(e.kind, e.detail) for e in etcd_store.timeline("e1")] == [
        ("declared", {}), ("caps_issued", {"caps_w": {"0": 350}})]
    assert etcd_store.timeline("e0") == []


def test_plan_store_matches_the_sqlite_one(etcd: EtcdCluster, tmp_path: Path) -> None:
    stores = (PlanStore(tmp_path / "c.db"), EtcdPlanStore(_kv(etcd, "/t7")))
    for store in stores:
        store.save_endpoint("chat", {"name": "chat", "rps": 3}, 1.0)
        store.save_endpoint("code", {"name": "code"}, 1.0)
        assert store.delete_endpoint("code") and not store.delete_endpoint("code")
        store.save_plan("p1", 1.0, "applied", {"plan_id": "p1"})
        store.save_plan("p2", 2.0, "applying", {"plan_id": "p2", "actions": [1]})
        store.save_plan("p3", 3.0, "proposed", {"plan_id": "p3"})
        store.set_setting("mode", "auto")
    sqlite, etcd_store = stores
    assert etcd_store.load_endpoints() == sqlite.load_endpoints() == [{"name": "chat", "rps": 3}]
    assert etcd_store.latest_plans(2) == sqlite.latest_plans(2)
    assert [p["plan_id"] for p in etcd_store.latest_plans(2)] == ["p3", "p2"]
    assert etcd_store.plans_in_state("applying") == sqlite.plans_in_state("applying")
    assert etcd_store.load_plan("p2") == sqlite.load_plan("p2") and not etcd_store.load_plan("x")
    assert etcd_store.get_setting("mode") == "auto" and etcd_store.get_setting("x") is None


def test_store_keeps_epoch_topology_and_leases_in_etcd(etcd: EtcdCluster, tmp_path: Path) -> None:
    kv = _kv(etcd, "/t8")
    store = EtcdStore(tmp_path / "c.db", kv)
    assert store.bump_epoch() == store.epoch() == kv.epoch
    store.save_topology("t.yaml", "version: 1\n", 1.0)
    lease = agent_pb2.Lease(lease_id="n1/e1/g1", epoch=kv.epoch, ttl_s=10,
                            gpu_power_limit_w={0: 700.0})
    store.save_lease("n1", lease, 1.0)
    assert store.load_leases() == {}  # staged: written with the next batch of node state
    store.save_nodes([])
    # Another replica (a new store on the same prefix) sees them.
    other = EtcdStore(tmp_path / "other.db", kv)
    assert other.latest_topology_text() == "version: 1\n"
    assert other.load_leases() == {"n1": lease}


def test_tls_members_need_our_client_certificate(tmp_path: Path) -> None:
    ca = tmp_path / "tls"
    subprocess.run(["bash", str(REPO / "scripts" / "dev-ca.sh"), str(ca)], check=True,
                   capture_output=True, timeout=120)
    cluster = EtcdCluster(tmp_path / "etcd", tls_dir=ca).start(1)
    try:
        (url,) = cluster.endpoints
        assert url.startswith("https://")
        client = EtcdClient([url], tls=cluster.client_tls())
        client.put("/tls/k", "v")
        assert client.get("/tls/k").value == b"v"
        no_cert = ssl.create_default_context(cafile=str(ca / "ca.pem"))
        with pytest.raises(EtcdUnavailable):  # --client-cert-auth: the handshake is refused
            EtcdClient([url], timeout_s=2.0, tls=no_cert).get("/tls/k")
        with pytest.raises(EtcdUnavailable):  # a CA we do not trust
            EtcdClient([url], timeout_s=2.0).get("/tls/k")
    finally:
        cluster.stop()
