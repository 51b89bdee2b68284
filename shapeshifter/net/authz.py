"""Authorization for both daemons: who is calling (client certificate or bearer token), which
roles each full method name needs, and one server interceptor (sync for the agent, asyncio for
the coordinator) that refuses before the servicer runs.

Identity: a client certificate's subject CN is the name; its role is the SAN URI
spiffe://shapeshifter/role/<role>. A bearer token (metadata ``authorization: Bearer TOKEN``)
is looked up by SHA-256 in the tokens file and, when present, takes precedence over the
certificate. Roles: viewer < operator < admin for people, plus the service roles agent (may only
hold the AgentLink stream) and coordinator (may control agents).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shapeshifter.common.errors import (
    DomainError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from shapeshifter.common.errors import grpc_code as _grpc_code

ROLE_URI_PREFIX = "spiffe://shapeshifter/role/"
ROLES = ("viewer", "operator", "admin", "agent", "coordinator")
Role = Literal["viewer", "operator", "admin", "agent", "coordinator"]

PUBLIC = frozenset({"*"})  # no credentials needed
READ = frozenset({"viewer", "operator", "admin"})
OPERATE = frozenset({"operator", "admin"})
ADMIN = frozenset({"admin"})
AGENT_LINK = frozenset({"agent"})
AGENT_READ = READ | {"coordinator"}
AGENT_CONTROL = frozenset({"coordinator", "admin"})  # the agent obeys only these

_AGENT = "/shapeshifter.nodeagent.v1.NodeAgent/"
_COORD = "/shapeshifter.coordinator.v1.Coordinator/"

# Health and reflection: load balancers and grpcurl probe without credentials; they reveal only
# serving status and the (public) schema.
COMMON_METHODS: Mapping[str, frozenset[str]] = {
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": PUBLIC,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": PUBLIC,
}

AGENT_METHODS: Mapping[str, frozenset[str]] = {
    **COMMON_METHODS,
    **{_AGENT + m: AGENT_READ for m in ("GetNode", "WatchTelemetry", "ListInstances")},
    **{
        _AGENT + m: AGENT_CONTROL
        for m in (
            "SetPowerLimit", "LockClocks", "ResetClocks", "SetMigMode", "ApplyMigLayout",
            "ApplyPlan", "StartInstance", "StopInstance", "ReconfigureInstance",
        )
    },
}  # fmt: skip

COORDINATOR_METHODS: Mapping[str, frozenset[str]] = {
    **COMMON_METHODS,
    "/shapeshifter.coordinator.v1.AgentLink/Connect": AGENT_LINK,
    # A leaf coordinator's stream to its parent (coordinator.hierarchy.wiring).
    "/shapeshifter.coordinator.v1.ParentLink/Connect": frozenset({"coordinator"}),
    **{
        _COORD + m: READ
        for m in (
            "ListNodes", "GetNode", "GetCluster", "ListInstances", "ListAudit", "GetIngestStats",
        )
    },
    **{
        _COORD + m: OPERATE
        for m in (
            "SetPowerLimit", "LockClocks", "ResetClocks", "StartInstance", "StopInstance",
            "ReconfigureInstance",
        )
    },
    **{_COORD + m: ADMIN for m in ("SetMigMode", "ApplyMigLayout")},
}  # fmt: skip

# Services without an explicit table entry, by the last part of the service name: reads (method
# names starting with one of READ_PREFIXES) need viewer, everything else the service's role.
# A service not listed here, and a method of an unlisted service, is denied.
READ_PREFIXES = ("Get", "List", "Watch", "Describe", "Preview", "Explain")
SERVICE_DEFAULTS: Mapping[str, frozenset[str]] = {
    "Emergency": ADMIN,
    "Site": ADMIN,  # a parent coordinator's site limits (GetSite: viewer)
    "Topology": ADMIN,
    "Planner": OPERATE,
    "Placement": OPERATE,
    "Routing": OPERATE,
}


@dataclass(frozen=True)
class MethodTable:
    exact: Mapping[str, frozenset[str]]
    service_defaults: Mapping[str, frozenset[str]]

    def required(self, method: str) -> frozenset[str]:
        """The roles allowed to call a full method name ("/pkg.Service/Method")."""
        if method in self.exact:
            return self.exact[method]
        service, _, name = method.lstrip("/").partition("/")
        default = self.service_defaults.get(service.rpartition(".")[2])
        if default is None:
            raise PermissionDenied(f"{method} is not in the authorization table (denied)")
        return READ if name.startswith(READ_PREFIXES) else default


def agent_table() -> MethodTable:
    return MethodTable(AGENT_METHODS, {})


def coordinator_table() -> MethodTable:
    return MethodTable(COORDINATOR_METHODS, SERVICE_DEFAULTS)


# ---------------------------------------------------------------- tokens


class _TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    role: Role
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # hex SHA-256 of the token; never the token


class _TokenFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal[1]
    tokens: list[_TokenEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class TokenTable:
    entries: tuple[tuple[str, str, str], ...]  # (sha256 hex, name, role)

    def lookup(self, token: str) -> tuple[str, str] | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        for known, name, role in self.entries:
            if hmac.compare_digest(known, digest):
                return name, role
        return None


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path, field: str = "tokens_file") -> TokenTable:
    """Read the tokens file (YAML: version: 1, tokens: [{name, role, sha256}]).
    InvalidArgument names the field and what is allowed."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise InvalidArgument(
            f"{field}={str(path)!r}: cannot read: {exc.strerror}", field=field
        ) from None
    except yaml.YAMLError as exc:
        raise InvalidArgument(
            f"{field}={str(path)!r}: not valid YAML: {exc}", field=field
        ) from None
    try:
        parsed = _TokenFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "top level"
        raise InvalidArgument(
            f"{field}={str(path)!r}: {loc}: {err['msg']} (roles: {', '.join(ROLES)}; sha256: "
            "64 lower-case hex digits)",
            field=field,
        ) from None
    return TokenTable(tuple((t.sha256, t.name, t.role) for t in parsed.tokens))


# ---------------------------------------------------------------- principals


@dataclass(frozen=True)
class Principal:
    name: str
    role: str | None
    source: Literal["certificate", "token", "none"]

    def describe(self) -> str:
        if self.source == "none":
            return "anonymous"
        return f"{self.name} (role {self.role or 'none'}, {self.source})"


ANONYMOUS = Principal("", None, "none")


def _first(values: Sequence[bytes] | None) -> str:
    return values[0].decode(errors="replace") if values else ""


def cert_principal(auth_context: Mapping[str, Sequence[bytes]]) -> Principal | None:
    """The verified client certificate's identity; None without one."""
    name = _first(auth_context.get("x509_common_name"))
    uris = [u.decode(errors="replace") for u in auth_context.get("peer_uri", ())]
    if not name and not uris:
        return None
    roles = {u.removeprefix(ROLE_URI_PREFIX) for u in uris if u.startswith(ROLE_URI_PREFIX)}
    role = roles.pop() if len(roles) == 1 else None  # none or ambiguous: no role
    return Principal(name, role if role in ROLES else None, "certificate")


def bearer_token(metadata: Sequence[tuple[str, Any]]) -> str | None:
    for key, value in metadata:
        if key.lower() == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


@dataclass(frozen=True)
class Authorizer:
    table: MethodTable
    tokens: TokenTable | None = None

    def identify(
        self, metadata: Sequence[tuple[str, Any]], auth_context: Mapping[str, Sequence[bytes]]
    ) -> Principal:
        token = bearer_token(metadata)
        if token is not None:
            found = self.tokens.lookup(token) if self.tokens is not None and token else None
            if found is None:
                raise Unauthenticated("the bearer token is not valid")
            return Principal(found[0], found[1], "token")
        return cert_principal(auth_context) or ANONYMOUS

    def authorize(
        self,
        method: str,
        metadata: Sequence[tuple[str, Any]],
        auth_context: Mapping[str, Sequence[bytes]],
    ) -> Principal:
        """The caller, if it may call method; else Unauthenticated / PermissionDenied."""
        allowed = self.table.required(method)
        if allowed is PUBLIC:
            return ANONYMOUS
        who = self.identify(metadata, auth_context)
        if who.source == "none":
            raise Unauthenticated(f"{method} needs a client certificate or a bearer token")
        if who.role not in allowed:
            roles = ", ".join(sorted(allowed))
            raise PermissionDenied(f"{who.describe()} may not call {method} (allowed: {roles})")
        return who


# ---------------------------------------------------------------- interceptors


@dataclass(frozen=True)
class Denial:
    method: str
    caller: str  # Principal.describe() or what is known (peer) when identification failed
    code: grpc.StatusCode
    message: str
    request: Any  # the request message for unary requests, else None


OnDenied = Callable[[Denial], None]


def _decide(
    authorizer: Authorizer, method: str, context: Any, request: Any
) -> Denial | None:
    metadata = tuple(context.invocation_metadata() or ())
    try:
        authorizer.authorize(method, metadata, context.auth_context())
    except DomainError as err:
        try:
            caller = authorizer.identify(metadata, context.auth_context()).describe()
        except DomainError:
            caller = "invalid bearer token"
        return Denial(method, f"{caller} from {context.peer()}", _grpc_code(err), str(err), request)
    return None


_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def _kind(handler: grpc.RpcMethodHandler) -> tuple[str, Callable[..., Any]]:
    index = 2 * int(handler.request_streaming) + int(handler.response_streaming)
    return _KINDS[index]


class AuthInterceptor(grpc.ServerInterceptor):
    """Sync servers (the agent): checks every call before its servicer method runs."""

    def __init__(self, authorizer: Authorizer, on_denied: OnDenied) -> None:
        self._authorizer = authorizer
        self._on_denied = on_denied

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        kind, make = _kind(handler)
        behavior, method = getattr(handler, kind), details.method

        def check(request: Any, context: Any) -> None:
            denial = _decide(self._authorizer, method, context, request)
            if denial is not None:
                self._on_denied(denial)
                context.abort(denial.code, denial.message)

        if handler.response_streaming:

            def wrapped(request: Any, context: Any) -> Any:
                check(None if handler.request_streaming else request, context)
                yield from behavior(request, context)
        else:

            def wrapped(request: Any, context: Any) -> Any:
                check(None if handler.request_streaming else request, context)
                return behavior(request, context)

        return make(wrapped, handler.request_deserializer, handler.response_serializer)


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """asyncio servers (the coordinator): the same check, awaiting the abort."""

    def __init__(self, authorizer: Authorizer, on_denied: OnDenied) -> None:
        self._authorizer = authorizer
        self._on_denied = on_denied

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        kind, make = _kind(handler)
        behavior, method = getattr(handler, kind), details.method

        async def check(request: Any, context: Any) -> None:
            denial = _decide(self._authorizer, method, context, request)
            if denial is not None:
                self._on_denied(denial)
                await context.abort(denial.code, denial.message)

        if handler.response_streaming:

            async def wrapped(request: Any, context: Any) -> Any:
                await check(None if handler.request_streaming else request, context)
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write()
                    await result
        else:

            async def wrapped(request: Any, context: Any) -> Any:
                await check(None if handler.request_streaming else request, context)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result

        return make(wrapped, handler.request_deserializer, handler.response_serializer)
