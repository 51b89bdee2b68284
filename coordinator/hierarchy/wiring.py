"""Hierarchical coordinators (issue 10): `--role parent`, and leaves (`--parent ADDR`).

- single (default): one coordinator for its topology, as before.
- parent: owns a site's feed. Its topology file is the site's full topology; it needs no agents.
  It serves ParentLink (leaves dial in) and Site (operators set, follow and clear site limits),
  plus health and reflection, and keeps the site limits in force in its SQLite file
  (coordinator.hierarchy.parent, coordinator.store.hierarchy).
- leaf: an ordinary coordinator for its rows (its topology lists only them) that also dials
  its parent, reports its rows' rollups and enforces the parent's row limits as row power
  emergencies (coordinator.hierarchy.leaf).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from coordinator.core import CoordinatorCore
from coordinator.emergency.controller import EmergencyController
from coordinator.hierarchy.leaf import LeafSettings, start_leaf
from coordinator.hierarchy.parent import LEAF_ID, ParentController
from coordinator.rpc.hierarchy import add_hierarchy_services
from coordinator.rpc.util import add_health_and_reflection
from coordinator.security import CoordinatorSecurity, caller, interceptors
from coordinator.store.hierarchy import SiteLimitStore
from coordinator.store.sqlite import Store
from shapeshifter.common.clock import Clock
from shapeshifter.common.errors import InvalidArgument, out_of_range
from shapeshifter.common.sdnotify import Notifier
from shapeshifter.net.transport import bind, channel_credentials, check_plaintext
from shapeshifter.topology import Topology

ROLES = ("single", "parent", "leaf")
_RANGES = (  # flag field, low, high (s)
    ("parent_report_interval_s", 0.1, 60.0),
    ("parent_reconnect_initial_s", 0.05, 60.0),
    ("parent_reconnect_max_s", 0.1, 600.0),
)


@dataclass(frozen=True)
class HierarchySettings:
    role: str = "single"
    leaf: LeafSettings | None = None  # role leaf


def add_hierarchy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", choices=ROLES, default="single",
                   help="single: one coordinator (default); parent: owns a site's feed and "
                        "splits site limits over its leaves (needs no agents); leaf: a "
                        "coordinator for some rows under a parent (implied by --parent)")
    p.add_argument("--parent", default="", metavar="ADDR",
                   help="the parent coordinator's address: this coordinator is its leaf")
    p.add_argument("--leaf-id", default="", metavar="NAME",
                   help="this leaf's name at the parent (required with --parent)")
    p.add_argument("--parent-report-interval-s", type=float, default=1.0, metavar="S",
                   help="how often the rows' rollups go to the parent [0.1, 60]")
    p.add_argument("--parent-reconnect-initial-s", type=float, default=0.5, metavar="S",
                   help="first redial wait after the parent link drops [0.05, 60]")
    p.add_argument("--parent-reconnect-max-s", type=float, default=10.0, metavar="S",
                   help="longest redial wait (exponential backoff with jitter) [0.1, 600]")


def hierarchy_settings_from_args(args: argparse.Namespace,
                                 security: CoordinatorSecurity) -> HierarchySettings:
    """Validate; InvalidArgument names the flag and what it needs."""
    for name, low, high in _RANGES:
        value = getattr(args, name)
        if not low <= value <= high:
            raise out_of_range(name, value, low, high, "s")
    role = "leaf" if args.parent and args.role == "single" else args.role
    if role == "parent":
        _check_parent(args)
        return HierarchySettings("parent")
    if role == "single":
        return HierarchySettings()
    if not args.parent:
        raise InvalidArgument("--role leaf needs --parent ADDR", field="parent")
    if not LEAF_ID.match(args.leaf_id):
        raise InvalidArgument(
            f"--leaf-id={args.leaf_id!r}: a leaf needs a name of 1-128 letters, digits and "
            "._:- (starting with a letter or digit)", field="leaf_id")
    if security.tls is None:  # the leaf dials with its own certificate when it has one
        check_plaintext(args.parent, "--parent", args.insecure, "--insecure")
    credentials = channel_credentials(security.tls) if security.tls is not None else None
    return HierarchySettings("leaf", LeafSettings(
        args.parent, args.leaf_id, args.parent_report_interval_s,
        args.parent_reconnect_initial_s, args.parent_reconnect_max_s, credentials=credentials))


def _check_parent(args: argparse.Namespace) -> None:
    if args.parent:
        raise InvalidArgument("--role parent with --parent: only two levels (parent and leaves) "
                              "are supported", field="parent")
    if getattr(args, "state", "sqlite") != "sqlite":
        raise InvalidArgument("--role parent keeps its site limits in --db: it needs "
                              "--state sqlite", field="state")


def leaf_tasks(args: argparse.Namespace, core: CoordinatorCore,
               emergencies: EmergencyController, clock: Clock) -> list[asyncio.Task[Any]]:
    """The leaf's background task when this coordinator has a parent (none otherwise)."""
    settings: HierarchySettings | None = getattr(args, "hierarchy", None)
    if settings is None or settings.leaf is None:
        return []
    return [start_leaf(settings.leaf, core, emergencies, clock)]


# ---------------------------------------------------------------- the parent process


@dataclass(frozen=True)
class _AuditTarget:
    """What the auth interceptor's denial audit needs of a core (the parent has none)."""

    store: Store
    clock: Clock
    epoch: int


async def serve_parent(args: argparse.Namespace, topology: Topology, clock: Clock,
                       security: CoordinatorSecurity | None = None,
                       stop: asyncio.Event | None = None) -> None:
    """Serve ParentLink + Site (+ health, reflection) until SIGTERM/SIGINT (or stop)."""
    log = structlog.get_logger().bind(component="coordinator", role="parent")
    security = security or CoordinatorSecurity()
    if security.plaintext_warning:
        log.warning("insecure_plaintext", listen=args.listen,
                    note="plaintext gRPC on a non-loopback address (--insecure)")
    store = Store(args.db)
    store.save_topology(str(args.topology), args.topology.read_text(), clock.time())
    epoch = store.bump_epoch()
    limits = SiteLimitStore(args.db)
    parent = ParentController(topology, limits, store, clock, epoch)
    authorizer = security.authorizer()
    audit: Any = _AuditTarget(store, clock, epoch)  # duck-typed for security.audit_denial
    server = grpc.aio.server(interceptors=interceptors(authorizer, audit))
    health_servicer = await add_health_and_reflection(server, add_hierarchy_services(
        server, parent, caller(authorizer)))
    port = bind(server, args.listen, security.tls)
    if port == 0:
        raise OSError(f"cannot listen on --listen={args.listen}")
    await server.start()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    notifier = Notifier()
    notifier.ready(f"parent, epoch {epoch}")
    log.info("coordinator_started", listen=args.listen, port=port, epoch=epoch,
             tls=security.tls is not None, db=str(args.db),
             sites=[s.name for s in topology.sites])
    await stop.wait()
    log.info("coordinator_stopping")
    notifier.stopping()
    await health_servicer.enter_graceful_shutdown()
    parent.close_sessions()  # ends the leaves' streams; they redial and keep their limits
    await server.stop(grace=2.0)
    limits.close()
    store.close()
    log.info("coordinator_stopped", epoch=epoch)

