"""`coordinator --state etcd`: one replica of a highly available coordinator.

Every replica runs this. While another replica leads, it serves a refusal on its --listen
address: every RPC (agents' AgentLink.Connect, shapectl's calls) gets UNAVAILABLE with the
leader's address in the message and in trailing metadata `shapeshifter-leader`, so agents (given
all replica addresses) and operators know where to go. Meanwhile it polls the leader key and
takes it when the leader's lease runs out (coordinator.ha.election).

The leader runs the ordinary coordinator (coordinator.daemon.serve) with its state in etcd
(coordinator.store.etcd) under the epoch the election gave it; a new leader resumes emergencies
and plans from etcd as a restarted coordinator resumes them from SQLite.

Leadership lost (the lease could not be renewed in time, or etcd refused a fenced write): the
replica stops serving at once and exits with EXIT_LEADERSHIP_LOST, for systemd to restart it as
a follower. Re-entering follower mode in-process would have to unwind every task and server the
leader started; a restart is the simplest way to be sure none of them still acts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import grpc
import structlog

from coordinator.ha.election import Election, FencedKV, LeaderInfo, Leadership, NotLeader
from coordinator.ha.etcd import EtcdClient, EtcdError
from coordinator.store.base import StateStores
from coordinator.store.etcd import EtcdEmergencyStore, EtcdPlanStore, EtcdStore
from shapeshifter.common.errors import InvalidArgument, out_of_range
from shapeshifter.common.sdnotify import Notifier
from shapeshifter.net.transport import LEADER_METADATA_KEY, bind, check_plaintext, split_addresses

EXIT_LEADERSHIP_LOST = 3
LEADER_TTL_RANGE_S = (2, 60)


def add_ha_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", choices=("sqlite", "etcd"), default="sqlite",
                   help="sqlite: one coordinator, state in --db (default); etcd: one replica of "
                        "a highly available coordinator, state in etcd")
    p.add_argument("--etcd-endpoints", default="", metavar="URLS",
                   help="etcd client URLs, comma-separated (http://HOST:PORT,...)")
    p.add_argument("--etcd-prefix", default="/shapeshifter/default", metavar="PREFIX",
                   help="key prefix of this coordinator's state (one per cluster)")
    p.add_argument("--replica-id", default="", metavar="ID",
                   help="this replica's name ('' = HOSTNAME:PORT of --advertise)")
    p.add_argument("--advertise", default="", metavar="ADDR",
                   help="the address agents dial to reach this replica ('' = --listen)")
    p.add_argument("--leader-ttl-s", type=int, default=3, metavar="S",
                   help="leader lease TTL: a dead leader is replaced after about this long")
    p.add_argument("--etcd-ca", default="", metavar="FILE",
                   help="CA of the etcd members' certificates (https endpoints)")
    p.add_argument("--etcd-cert", default="", metavar="FILE",
                   help="client certificate for etcd's --client-cert-auth (with --etcd-key)")
    p.add_argument("--etcd-key", default="", metavar="FILE", help="its private key")


def check_ha_args(args: argparse.Namespace) -> None:
    """Raises DomainError naming the bad flag; fills in the defaults that depend on others."""
    if args.state != "etcd":
        return
    low, high = LEADER_TTL_RANGE_S
    if not low <= args.leader_ttl_s <= high:
        raise out_of_range("leader_ttl_s", args.leader_ttl_s, low, high, "s")
    endpoints = split_addresses(args.etcd_endpoints)
    if not endpoints:
        raise InvalidArgument("etcd_endpoints: --state etcd needs at least one etcd client URL "
                              "(https://HOST:PORT)", field="etcd_endpoints")
    args.etcd_tls = _etcd_tls(args)
    try:
        EtcdClient(endpoints, tls=args.etcd_tls)
    except ValueError as err:
        raise InvalidArgument(f"etcd_endpoints: {err}", field="etcd_endpoints") from None
    for url in (urlsplit(e) for e in endpoints):
        if url.scheme == "http":  # the state of the cluster's power safety: no plaintext off-host
            check_plaintext(url.netloc, "etcd_endpoints", args.insecure, "--insecure")
    args.etcd_endpoints = endpoints
    args.advertise = args.advertise or args.listen
    host, _, port = args.advertise.rpartition(":")
    if host in ("", "0.0.0.0", "[::]"):
        raise InvalidArgument(f"advertise: {args.advertise!r} is not an address agents can dial; "
                              "give --advertise HOST:PORT", field="advertise")
    args.replica_id = args.replica_id or f"{socket.gethostname()}:{port}"


def _etcd_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client TLS context for https members (None: the system's CAs, no client cert)."""
    if bool(args.etcd_cert) != bool(args.etcd_key):
        raise InvalidArgument("etcd_cert, etcd_key: give both --etcd-cert and --etcd-key, or "
                              "neither", field="etcd_cert")
    if not (args.etcd_ca or args.etcd_cert):
        return None
    try:
        ctx = ssl.create_default_context(cafile=args.etcd_ca or None)
    except (OSError, ssl.SSLError) as err:
        raise InvalidArgument(f"etcd_ca: cannot load {args.etcd_ca}: {err}",
                              field="etcd_ca") from None
    try:
        if args.etcd_cert:
            ctx.load_cert_chain(args.etcd_cert, args.etcd_key)
    except (OSError, ssl.SSLError) as err:
        raise InvalidArgument(f"etcd_cert: cannot load {args.etcd_cert} with {args.etcd_key}: "
                              f"{err}", field="etcd_cert") from None
    return ctx


def _client(args: argparse.Namespace) -> EtcdClient:
    return EtcdClient(args.etcd_endpoints, tls=args.etcd_tls)


class _Follower:
    """Answers every RPC with UNAVAILABLE and where the leader is (a generic gRPC handler)."""

    def __init__(self) -> None:
        self.leader: LeaderInfo | None = None

    def handler(self) -> grpc.GenericRpcHandler:
        refuse = grpc.stream_stream_rpc_method_handler(self._refuse)

        class Handler(grpc.GenericRpcHandler):
            def service(self, _details: Any) -> Any:
                return refuse

        return Handler()

    async def _refuse(self, _requests: Any, context: grpc.aio.ServicerContext) -> None:
        leader = self.leader
        if leader is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not the leader: no leader elected "
                                "yet (an election takes up to the leader TTL)")
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"not the leader: the leader is at {leader.address} "
                            f"(replica {leader.replica_id}, epoch {leader.epoch})",
                            trailing_metadata=((LEADER_METADATA_KEY, leader.address),))


async def run_replica(args: argparse.Namespace, serve: Callable[..., Any], **serve_kw: Any) -> int:
    """Follow until elected, then lead until stopped (0) or deposed (EXIT_LEADERSHIP_LOST).
    serve: coordinator.daemon.serve, called with stores= and stop= added."""
    log = structlog.get_logger().bind(component="ha", replica=args.replica_id)
    election = Election(_client(args), args.etcd_prefix, args.replica_id, args.advertise,
                        args.leader_ttl_s)
    stop = asyncio.Event()  # SIGTERM/SIGINT, or leadership lost
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    lead = await _follow(args, election, stop, serve_kw.get("security"), log)
    if lead is None:
        return 0
    log.info("elected", epoch=lead.epoch, leader_ttl_s=lead.ttl_s, advertise=args.advertise)
    lost = asyncio.Event()

    def deposed() -> None:
        lost.set()
        stop.set()

    # The stores get a client of their own: the keeper's renewals never wait behind their writes.
    kv = FencedKV(_client(args), args.etcd_prefix, election.key, lead.epoch, on_refused=deposed)
    stores = StateStores(EtcdStore(args.db, kv), EtcdEmergencyStore(kv), EtcdPlanStore(kv))
    keeper = asyncio.create_task(_keep(election, lead, deposed, log))
    try:
        await serve(args, stores=stores, stop=stop, **serve_kw)
    except NotLeader as err:  # e.g. the final flush of a deposed leader: refused, as it must be
        log.warning("write_refused_on_stop", error=str(err))
        lost.set()
    finally:
        keeper.cancel()
    if lost.is_set():
        log.error("leadership_lost", epoch=lead.epoch,
                  note="stopped serving; exiting for systemd to restart this replica as a "
                       "follower")
        return EXIT_LEADERSHIP_LOST
    try:  # a clean stop hands leadership over at once instead of after the TTL
        await asyncio.to_thread(election.resign, lead)
    except EtcdError as err:
        log.warning("resign_failed", error=str(err), note="the lease runs out by itself")
    return 0


async def _follow(args: argparse.Namespace, election: Election, stop: asyncio.Event,
                  security: Any, log: Any) -> Leadership | None:
    """Serve refusals until this replica wins the election (None: stopped first)."""
    follower = _Follower()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((follower.handler(),))
    tls = security.tls if security is not None else None
    if bind(server, args.listen, tls) == 0:
        raise OSError(f"cannot listen on --listen={args.listen}")
    await server.start()
    notifier = Notifier()
    notifier.ready("follower: waiting for the leader key")
    log.info("following", listen=args.listen, etcd=args.etcd_endpoints)
    poll_s = args.leader_ttl_s / 6  # failover ~ TTL + one poll
    try:
        while not stop.is_set():
            lead = await _campaign_once(election, follower, log)
            if lead is not None:
                return lead
            notifier.watchdog_ping()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)
        return None
    finally:
        await server.stop(grace=0)


async def _campaign_once(election: Election, follower: _Follower, log: Any) -> Leadership | None:
    try:
        leader = await asyncio.to_thread(election.leader)
        if leader is None:
            return await asyncio.to_thread(election.try_acquire)
    except EtcdError as err:
        log.warning("etcd_unavailable", error=str(err))
        follower.leader = None
        return None
    if follower.leader != leader:
        log.info("leader_is", leader=leader.replica_id, address=leader.address,
                 epoch=leader.epoch)
    follower.leader = leader
    return None


async def _keep(election: Election, lead: Leadership, deposed: Callable[[], None],
                log: Any) -> None:
    """Renew every TTL/3. Deposed when etcd says the lease expired, or when renewals have failed
    for 2/3 of the TTL: the lease may then run out before we hear of it, and another replica be
    elected, so this one stops first."""
    loop = asyncio.get_running_loop()
    renewed_at_s = loop.time()
    while True:
        await asyncio.sleep(lead.ttl_s / 3)
        try:
            if not await asyncio.to_thread(election.keep, lead):
                log.error("leader_lease_expired", epoch=lead.epoch)
                deposed()
                return
            renewed_at_s = loop.time()
        except EtcdError as err:
            log.warning("leader_renewal_failed", error=str(err))
            if loop.time() - renewed_at_s >= lead.ttl_s * 2 / 3:
                deposed()
                return
