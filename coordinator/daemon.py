"""`coordinator --listen ADDR --topology FILE --db FILE`: the coordinator in the foreground.

Start: load and validate the topology (a malformed file stops here, naming the field and line),
open SQLite, bump the epoch, serve AgentLink + Coordinator (+ reflection, health) and Prometheus.
SIGTERM/SIGINT: stop accepting, end the streams, flush the batched node state, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health
from prometheus_client import start_http_server

from coordinator import metrics
from coordinator.core import CoordinatorCore
from coordinator.emergency.controller import (
    EmergencyController,
    add_emergency_args,
    emergency_settings_from_args,
)
from coordinator.ha.etcd import EtcdError
from coordinator.ha.replica import add_ha_args, check_ha_args, run_replica
from coordinator.hierarchy.wiring import (
    add_hierarchy_args,
    hierarchy_settings_from_args,
    leaf_tasks,
    serve_parent,
)
from coordinator.leases import LeasePolicy
from coordinator.rebalance.loop import (
    Rebalancer,
    add_rebalance_args,
    load_profile_rows,
    rebalance_settings_from_args,
)
from coordinator.rpc.admin import CoordinatorServicer
from coordinator.rpc.emergency import add_emergency_service
from coordinator.rpc.link import AgentLinkServicer
from coordinator.rpc.rebalance import add_rebalance_services, routes_json
from coordinator.rpc.routes_http import start_routes_http
from coordinator.rpc.util import add_health_and_reflection
from coordinator.security import (
    CoordinatorSecurity,
    add_security_args,
    caller,
    interceptors,
    security_from_args,
)
from coordinator.store.base import StateStores, sqlite_stores
from shapeshifter.api.v1 import coordinator_pb2, coordinator_pb2_grpc, link_pb2, link_pb2_grpc
from shapeshifter.common.clock import Clock, SystemClock
from shapeshifter.common.errors import DomainError, out_of_range
from shapeshifter.common.logging import configure_logging
from shapeshifter.common.sdnotify import Notifier
from shapeshifter.net.authz import Authorizer
from shapeshifter.net.transport import bind
from shapeshifter.topology import Topology, load_topology

EXIT_CONFIG = 2
SLOW_FLUSH_S = 0.05


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coordinator", description="shapeshifter cluster coordinator")
    p.add_argument("--listen", required=True, metavar="ADDR",
                   help="gRPC address, e.g. 0.0.0.0:50100")
    p.add_argument("--topology", required=True, type=Path, metavar="FILE", help="topology YAML")
    p.add_argument("--db", required=True, type=Path, metavar="FILE", help="SQLite state file")
    p.add_argument("--metrics-listen", default="", metavar="ADDR",
                   help="Prometheus HOST:PORT ('' disables)")
    p.add_argument("--lease-ttl-s", type=float, default=10.0, metavar="S")
    p.add_argument("--action-timeout-s", type=float, default=30.0, metavar="S",
                   help="how long an operator action waits for the agent's answer")
    p.add_argument("--instance-action-timeout-s", type=float, default=600.0, metavar="S",
                   help="how long an instance start/stop/reconfigure waits (engines load slowly)")
    p.add_argument("--persist-interval-s", type=float, default=0.5, metavar="S",
                   help="how often changed node state is written to SQLite (one transaction)")
    p.add_argument("--persist-batch", type=int, default=100, metavar="N",
                   help="at most N nodes per write, oldest change first (bounds the pause)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_security_args(p)  # --tls-cert --tls-key --tls-ca --auth-tokens --insecure
    add_emergency_args(p)  # --emergency-*: margins, fallback, clearing steps, detection
    add_rebalance_args(p)  # --rebalance-*, --profiles, --routes-listen
    add_ha_args(p)  # --state, --etcd-*, --replica-id, --advertise, --leader-ttl-s
    add_hierarchy_args(p)  # --role, --parent, --leaf-id, --parent-*
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    configure_logging(args.log_level)
    log = structlog.get_logger().bind(component="coordinator")
    try:
        topology = load_topology(args.topology)
        lease_policy = LeasePolicy(ttl_s=args.lease_ttl_s)
        for name, value, low, high in (("persist_interval_s", args.persist_interval_s, 0.05, 600),
                                       ("action_timeout_s", args.action_timeout_s, 0.1, 3600),
                                       ("instance_action_timeout_s",
                                        args.instance_action_timeout_s, 0.1, 7200)):
            if not low <= value <= high:
                raise out_of_range(name, value, low, high, "s")
        if not 1 <= args.persist_batch <= 100_000:
            raise out_of_range("persist_batch", args.persist_batch, 1, 100_000)
        security = security_from_args(args)
        args.emergency = emergency_settings_from_args(args)
        args.rebalance = rebalance_settings_from_args(args)
        args.profile_rows = load_profile_rows(args.profiles)
        check_ha_args(args)
        args.hierarchy = hierarchy_settings_from_args(args, security)
    except DomainError as err:
        log.error("config_invalid", field=err.field, error=str(err))
        print(f"coordinator: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.hierarchy.role == "parent":  # site limits over leaves; no agents
            asyncio.run(serve_parent(args, topology, SystemClock(), security))
            return 0
        if args.state == "etcd":
            return asyncio.run(run_replica(args, serve, topology=topology,
                                           lease_policy=lease_policy, clock=SystemClock(),
                                           security=security))
        asyncio.run(serve(args, topology, lease_policy, SystemClock(), security))
    except (OSError, sqlite3.Error, EtcdError) as err:
        log.error("start_failed", error=str(err))
        print(f"coordinator: {err}", file=sys.stderr)
        return 1
    return 0


async def serve(args: argparse.Namespace, topology: Topology, lease_policy: LeasePolicy,
                clock: Clock, security: CoordinatorSecurity | None = None,
                stores: StateStores | None = None, stop: asyncio.Event | None = None) -> None:
    """stores: None = the SQLite file args.db. stop: ends the coordinator like SIGTERM does."""
    log = structlog.get_logger().bind(component="coordinator")
    security = security or CoordinatorSecurity()
    if security.plaintext_warning:
        log.warning("insecure_plaintext", listen=args.listen,
                    note="plaintext gRPC on a non-loopback address (--insecure)")
    stores = stores or sqlite_stores(args.db)
    store = stores.store
    store.save_topology(str(args.topology), args.topology.read_text(), clock.time())
    epoch = store.bump_epoch()  # every start: plans and leases of the previous run are older
    core = CoordinatorCore(topology, store, clock, epoch=epoch, lease_policy=lease_policy,
                           action_timeout_s=args.action_timeout_s,
                           instance_action_timeout_s=args.instance_action_timeout_s)
    emergencies = EmergencyController(core, stores.emergencies, args.emergency, random.Random())
    rebalancer = Rebalancer(core, stores.plans, args.profile_rows, args.rebalance,
                            cuts=emergencies.cuts)  # limits lowered by the emergencies in force
    emergencies.attach_replanner(rebalancer)  # long emergencies: a plan under those limits
    identify = caller(security.authorizer())
    server, health_servicer = await build_server(core, security.authorizer(), extra=(
        lambda s: add_emergency_service(s, emergencies, identify),
        lambda s: add_rebalance_services(s, rebalancer, identify)))
    port = bind(server, args.listen, security.tls)
    if port == 0:
        raise OSError(f"cannot listen on --listen={args.listen}")
    http = _start_metrics(args.metrics_listen, core)
    routes_http = (start_routes_http(args.routes_listen,
                                     lambda e, m: routes_json(rebalancer, e, m),
                                     asyncio.get_running_loop())
                   if args.routes_listen else None)
    await server.start()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    notifier = Notifier()
    notifier.ready(f"epoch {epoch}, {len(core.registry)} known nodes")
    log.info("coordinator_started", listen=args.listen, port=port, epoch=epoch,
             tls=security.tls is not None, auth=security.authorizer() is not None,
             nodes=len(core.registry), db=str(args.db))
    flush = _flush_loop(core, args.persist_interval_s, args.persist_batch)
    background = [asyncio.create_task(flush), asyncio.create_task(_watchdog_loop(notifier)),
                  asyncio.create_task(emergencies.run()), asyncio.create_task(rebalancer.run())]
    background += leaf_tasks(args, core, emergencies, clock)  # --parent: rollups up, limits down
    await stop.wait()

    log.info("coordinator_stopping")
    notifier.stopping()
    await health_servicer.enter_graceful_shutdown()
    for task in background:
        task.cancel()
    core.close_sessions()  # ends the agents' streams, so the server's grace is not waited out
    await server.stop(grace=2.0)
    core.flush()
    store.close()
    if http is not None:
        http.shutdown()
    if routes_http is not None:
        routes_http.shutdown()
    log.info("coordinator_stopped", epoch=epoch)


def _start_metrics(listen: str, core: CoordinatorCore) -> Any:
    """Prometheus on HOST:PORT (its own thread); None when listen is ''."""
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    registry = metrics.make_registry(core.cluster, lambda: core.epoch)
    http, _ = start_http_server(int(port), host or "0.0.0.0", registry=registry)
    return http


async def build_server(
    core: CoordinatorCore, authorizer: Authorizer | None = None,
    extra: Sequence[Callable[[grpc.aio.Server], list[str]]] = (),
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """AgentLink + Coordinator + health + reflection on one aio server (not yet bound).
    authorizer: None = no authorization (loopback dev mode); else one interceptor checks roles.
    extra: more services to register, each returning its full names (listed by reflection and
    reported SERVING by health like the built-in ones)."""
    server = grpc.aio.server(interceptors=interceptors(authorizer, core))
    identify = caller(authorizer)
    link = AgentLinkServicer(core, identify=identify)
    link_pb2_grpc.add_AgentLinkServicer_to_server(link, server)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(
        CoordinatorServicer(core, link, identify=identify), server)
    names = [link_pb2.DESCRIPTOR.services_by_name["AgentLink"].full_name,
             coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name]
    for add in extra:
        names.extend(add(server))
    return server, await add_health_and_reflection(server, names)


async def _watchdog_loop(notifier: Notifier) -> None:
    """WATCHDOG=1 from the event loop itself: a blocked loop stops the pings (systemd restarts)."""
    if notifier.watchdog_interval_s is None:
        return
    while True:
        notifier.watchdog_ping()
        await asyncio.sleep(notifier.watchdog_interval_s / 4)


async def _flush_loop(core: CoordinatorCore, interval_s: float, batch: int) -> None:
    log = structlog.get_logger().bind(component="store")
    while True:
        await asyncio.sleep(interval_s)
        start_s = time.perf_counter()
        try:
            written = core.flush(batch)
        except Exception:  # a failed write is logged loudly and retried at the next interval
            log.exception("flush_failed")
            continue
        took_s = time.perf_counter() - start_s
        if took_s > SLOW_FLUSH_S:  # the loop (report ingest) waited this long
            log.warning("flush_slow", nodes=written, took_ms=round(took_s * 1e3, 1))


if __name__ == "__main__":
    sys.exit(main())
