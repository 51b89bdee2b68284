"""ParentLink and Site servicers of a parent coordinator: proto <-> domain translation only
(logic: coordinator.hierarchy.parent)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from coordinator.hierarchy.parent import (
    LeafSession,
    ParentController,
    RowView,
    SiteView,
)
from coordinator.rpc.util import actor_of, answer
from shapeshifter.api.v1 import hierarchy_pb2 as hpb
from shapeshifter.api.v1 import hierarchy_pb2_grpc
from shapeshifter.common import errors
from shapeshifter.net.authz import Principal

Identify = Callable[[Any], Principal | None]


def check_leaf(who: Principal | None, leaf_id: str) -> None:
    """A coordinator identity may only register as its own leaf (certificate CN / token name)."""
    if who is not None and who.role == "coordinator" and who.name != leaf_id:
        raise errors.PermissionDenied(f"{who.describe()} may not register as leaf {leaf_id!r}",
                                      field="leaf_id")


class ParentLinkServicer(hierarchy_pb2_grpc.ParentLinkServicer):
    def __init__(self, parent: ParentController, identify: Identify) -> None:
        self._parent = parent
        self._identify = identify
        self._log = structlog.get_logger().bind(component="hierarchy")

    async def Connect(self, request_iterator: AsyncIterator[hpb.LeafMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[hpb.ParentMessage]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "register":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first message on ParentLink.Connect must be a LeafRegister")
        leaf_id = first.register.leaf_id
        session = LeafSession(leaf_id)
        try:
            check_leaf(self._identify(context), leaf_id)
            registered = self._parent.register(first.register, session)
        except errors.DomainError as err:
            await context.abort(errors.grpc_code(err), str(err))
        reader = asyncio.create_task(self._read(leaf_id, session, request_iterator))
        try:
            yield hpb.ParentMessage(registered=registered)
            while (msg := await session.outbox.get()) is not None:
                yield msg
        finally:
            reader.cancel()
            self._parent.disconnect(leaf_id, session)

    async def _read(self, leaf_id: str, session: LeafSession,
                    requests: AsyncIterator[hpb.LeafMessage]) -> None:
        try:
            async for msg in requests:
                kind = msg.WhichOneof("kind")
                if kind == "report":
                    self._parent.report(leaf_id, msg.report)
                elif kind == "ack":
                    self._parent.ack(leaf_id, msg.ack)
                else:
                    self._log.warning("leaf_unexpected_message", leaf_id=leaf_id, kind=kind)
        except grpc.aio.AioRpcError as err:
            self._log.info("leaf_stream_ended", leaf_id=leaf_id, code=err.code().name)
        except Exception:
            self._log.exception("leaf_read_failed", leaf_id=leaf_id)
        finally:
            session.close()


class SiteServicer(hierarchy_pb2_grpc.SiteServicer):
    def __init__(self, parent: ParentController, identify: Identify) -> None:
        self._parent = parent
        self._identify = identify

    async def SetSiteLimit(self, request: hpb.SetSiteLimitRequest,
                           context: grpc.aio.ServicerContext) -> hpb.SiteStatus:
        actor = actor_of(context, self._identify)
        return await answer(context, lambda: site_pb(self._parent.set_site_limit(
            request.site, request.capacity_frac, request.power_limit_w, request.source,
            request.note, actor)))

    async def ClearSiteLimit(self, request: hpb.ClearSiteLimitRequest,
                             context: grpc.aio.ServicerContext) -> hpb.SiteStatus:
        actor = actor_of(context, self._identify)
        return await answer(context, lambda: site_pb(
            self._parent.clear_site_limit(request.site, request.note, actor)))

    async def GetSite(self, request: hpb.GetSiteRequest,
                      context: grpc.aio.ServicerContext) -> hpb.SiteStatus:
        return await answer(context, lambda: site_pb(self._parent.site(request.site)))


def site_pb(v: SiteView) -> hpb.SiteStatus:
    r = v.rec
    out = hpb.SiteStatus(
        site=v.site, state=v.state, normal_limit_w=v.normal_limit_w,
        power_limit_w=v.power_limit_w, capacity_frac=v.power_limit_w / v.normal_limit_w,
        seq=v.seq, acked_s=v.acked_s,
        power_draw_w=sum(row.report.power_draw_w for row in v.rows if row.report),
        floor_w=sum(row.report.floor_w for row in v.rows if row.report),
        rows=[_row_pb(row) for row in v.rows],
        leaves=[hpb.LeafStatus(leaf_id=lf.leaf_id, connected=lf.connected, rows=lf.rows,
                               acked_seq=lf.acked_seq, report_age_s=lf.report_age_s)
                for lf in v.leaves])
    if r is not None:
        out.limit_id, out.source, out.note = r.limit_id, r.source, r.note
        out.declared_at_unix_s, out.cleared_at_unix_s = r.declared_at_unix_s, r.cleared_at_unix_s
        out.infeasible = r.infeasible and v.state == "limited"
    return out


def _row_pb(v: RowView) -> hpb.SiteRowStatus:
    out = hpb.SiteRowStatus(row=v.name, leaf_id=v.leaf_id, leaf_connected=v.leaf_connected,
                            normal_limit_w=v.normal_limit_w, limit_w=v.limit_w,
                            report_age_s=v.report_age_s, acked=v.acked)
    if v.report is not None:
        rep = v.report
        out.floor_w, out.power_draw_w = rep.floor_w, rep.power_draw_w
        out.nodes, out.nodes_up, out.gpus = rep.nodes, rep.nodes_up, rep.gpus
        if rep.HasField("emergency"):
            out.emergency.CopyFrom(rep.emergency)
    if v.ack is not None:
        a = v.ack
        out.agents_acked, out.action, out.emergency_id = a.agents_acked, a.action, a.emergency_id
        out.in_force_limit_w, out.message = a.in_force_limit_w, a.message
    return out


def add_hierarchy_services(server: grpc.aio.Server, parent: ParentController,
                           identify: Identify) -> list[str]:
    """Register ParentLink and Site; returns their full names (for health and reflection)."""
    hierarchy_pb2_grpc.add_ParentLinkServicer_to_server(ParentLinkServicer(parent, identify),
                                                        server)
    hierarchy_pb2_grpc.add_SiteServicer_to_server(SiteServicer(parent, identify), server)
    return [hpb.DESCRIPTOR.services_by_name[s].full_name for s in ("ParentLink", "Site")]
