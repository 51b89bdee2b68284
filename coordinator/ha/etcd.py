"""A small client for etcd v3 through its JSON gateway (`/v3/...`, served by every etcd member
on its client URL), with failover between members.

Why not a library: python-etcd3 is unmaintained and its generated code does not load with
protobuf 4+; etcd3gw (OpenStack) talks to one endpoint and pulls in requests + futurist. The
handful of calls the coordinator needs (lease grant/keepalive/revoke, range, put, delete, txn) are
plain JSON POSTs, so this module is stdlib only: one keep-alive HTTP connection per member,
keys and values base64-encoded as the gateway wants, int64 fields sent and read as strings.

Failover: a call goes to the member that answered last; on a connection error or timeout the
next member is tried, once each. An error etcd itself returns (bad request, lease not found) is
not retried and raises EtcdError with etcd's message.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class EtcdError(Exception):
    """etcd answered with an error (the message is etcd's)."""


class EtcdUnavailable(EtcdError):
    """No member answered."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease_id: int


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> str:
    """The range_end that selects every key starting with prefix (etcd's convention)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # prefixes here end in '/', never in 0xff
    return raw.decode()


def put_op(key: str, value: str | bytes, lease_id: int = 0) -> dict[str, Any]:
    op: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease_id:
        op["lease"] = str(lease_id)
    return {"request_put": op}


def delete_op(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


def range_op(key: str) -> dict[str, Any]:
    return {"request_range": {"key": _b64(key)}}


def compare_create_revision(key: str, revision: int) -> dict[str, Any]:
    """True while `key` was created at `revision` (0: while it does not exist)."""
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": str(revision)}


def kvs_of(response: dict[str, Any]) -> list[KeyValue]:
    """The key-values of a range response (or of a txn's response_range)."""
    return [KeyValue(_unb64(kv["key"]).decode(), _unb64(kv.get("value", "")),
                     int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0)),
                     int(kv.get("lease", 0)))
            for kv in response.get("kvs", [])]


class EtcdClient:
    def __init__(self, endpoints: Sequence[str], timeout_s: float = 2.0,
                 tls: ssl.SSLContext | None = None) -> None:
        """endpoints: client URLs, e.g. ["https://10.0.0.1:2379", "https://10.0.0.2:2379"].
        tls: for https members (the CA to trust and, for client-cert-auth, our certificate);
        None: the system's CAs."""
        if not endpoints:
            raise ValueError("etcd endpoints: at least one URL is required")
        self._members = [urlsplit(e if "://" in e else f"http://{e}") for e in endpoints]
        for url in self._members:
            if url.scheme not in ("http", "https") or not url.hostname or not url.port:
                raise ValueError(f"etcd endpoint {url.geturl()!r}: expected http://HOST:PORT "
                                 "or https://HOST:PORT")
        self._tls = tls or ssl.create_default_context()
        self._timeout_s = timeout_s
        self._current = 0
        self._conns: dict[int, http.client.HTTPConnection] = {}
        self._lock = threading.Lock()  # one request at a time per client (shared connections)

    @property
    def endpoints(self) -> list[str]:
        return [u.geturl() for u in self._members]

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()

    # ---------------------------------------------------------------- calls

    def grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease; returns (lease id, granted TTL in s)."""
        out = self.call("/v3/lease/grant", {"TTL": str(ttl_s)})
        return int(out["ID"]), int(out["TTL"])

    def keepalive(self, lease_id: int) -> int:
        """Renew a lease once; returns its TTL in s, 0 when it has expired (or never existed)."""
        out = self.call("/v3/lease/keepalive", {"ID": str(lease_id)})
        return int(out.get("result", {}).get("TTL", 0))

    def revoke(self, lease_id: int) -> None:
        self.call("/v3/lease/revoke", {"ID": str(lease_id)})

    def get(self, key: str) -> KeyValue | None:
        kvs = kvs_of(self.call("/v3/kv/range", {"key": _b64(key)}))
        return kvs[0] if kvs else None

    def get_prefix(self, prefix: str, limit: int = 0, descending: bool = False) -> list[KeyValue]:
        """The keys under prefix, sorted by key (the first `limit` of them; 0: all)."""
        body = {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                "sort_order": "DESCEND" if descending else "ASCEND", "sort_target": "KEY",
                "limit": str(limit)}
        return kvs_of(self.call("/v3/kv/range", body))

    def put(self, key: str, value: str | bytes, lease_id: int = 0) -> int:
        """Returns the revision of the write."""
        out = self.call("/v3/kv/put", put_op(key, value, lease_id)["request_put"])
        return int(out["header"]["revision"])

    def delete_prefix(self, prefix: str) -> None:
        self.call("/v3/kv/deleterange", {"key": _b64(prefix),
                                         "range_end": _b64(prefix_end(prefix))})

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
            failure: list[dict[str, Any]] | None = None) -> tuple[bool, int, list[dict[str, Any]]]:
        """One transaction; returns (succeeded, revision, responses)."""
        out = self.call("/v3/kv/txn", {"compare": compare, "success": success,
                                       "failure": failure or []})
        return bool(out.get("succeeded")), int(out["header"]["revision"]), out.get("responses", [])

    # ---------------------------------------------------------------- transport

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        payload = json.dumps(body).encode()
        with self._lock:
            errors: list[str] = []
            for step in range(len(self._members)):
                index = (self._current + step) % len(self._members)
                try:
                    status, text = self._post(index, path, payload)
                except (OSError, http.client.HTTPException) as exc:
                    self._drop(index)
                    errors.append(f"{self._members[index].netloc}: {exc or type(exc).__name__}")
                    continue
                self._current = index
                return _decode(path, status, text)
            raise EtcdUnavailable("no etcd member answered " + path + ": " + "; ".join(errors))

    def _post(self, index: int, path: str, payload: bytes) -> tuple[int, bytes]:
        conn = self._conns.get(index)
        if conn is None:
            url = self._members[index]
            conn = (http.client.HTTPSConnection(url.hostname or "", url.port,
                                                timeout=self._timeout_s, context=self._tls)
                    if url.scheme == "https" else
                    http.client.HTTPConnection(url.hostname or "", url.port,
                                               timeout=self._timeout_s))
            self._conns[index] = conn
        conn.request("POST", path, payload, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()

    def _drop(self, index: int) -> None:
        conn = self._conns.pop(index, None)
        if conn is not None:
            conn.close()


def _decode(path: str, status: int, text: bytes) -> dict[str, Any]:
    try:
        out = json.loads(text or b"{}")
    except ValueError:
        raise EtcdError(f"etcd {path}: HTTP {status}, not JSON: {text[:200]!r}") from None
    if status != 200 or "error" in out:
        raise EtcdError(f"etcd {path}: {out.get('message') or out.get('error') or status}")
    return out
