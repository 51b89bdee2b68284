"""Where the rebalancer writes: its plan documents (the plan store) and the audit log."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format

from coordinator.core import CoordinatorCore
from coordinator.store.plans import PlanStoreLike
from shapeshifter.api.v1 import agent_pb2


class PlanJournal:
    def __init__(self, core: CoordinatorCore, store: PlanStoreLike) -> None:
        self._core = core
        self.store = store

    def save(self, doc: dict[str, Any], **changes: Any) -> None:
        """Apply the changes to the plan document (stamped now) and store it whole."""
        doc.update(changes, updated_at_unix_s=self._core.clock.time())
        self.store.save_plan(doc["plan_id"], doc["created_at_unix_s"], doc["state"], doc)

    def audit(self, node_id: str, action: str, request_json: str, ok: bool, message: str,
              actor: str) -> None:
        self._core.store.append_audit(self._core.clock.time(), self._core.epoch, node_id, action,
                                      request_json, ok, "OK" if ok else "FAILED", message, actor)

    def record(self, node_id: str, a: dict[str, Any], pb: agent_pb2.Action | None, ok: bool,
               error: str, actor: str) -> None:
        """A plan action's outcome: its state in the document and an audit entry (the agent
        Action sent, or the stored action when none was built)."""
        a["state"], a["error"] = ("done", "") if ok else ("failed", error)
        request = (json_format.MessageToJson(pb, indent=None, preserving_proto_field_name=True)
                   if pb is not None else json.dumps({k: v for k, v in a.items()
                                                      if k != "exec"}))
        self.audit(node_id, a["kind"], request, ok, error or a["reason"], actor)
