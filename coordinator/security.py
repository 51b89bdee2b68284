"""The coordinator's transport security and authorization: flags, mTLS material, the auth
interceptor (denials audited), and the authenticated caller for the audit log."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf import json_format
from google.protobuf.message import Message

from coordinator.core import CoordinatorCore
from shapeshifter.common.errors import InvalidArgument, PermissionDenied
from shapeshifter.net.authz import (
    AioAuthInterceptor,
    Authorizer,
    Denial,
    Principal,
    TokenTable,
    coordinator_table,
    load_tokens,
)
from shapeshifter.net.transport import TlsFiles, TlsMaterial, check_plaintext, read_tls

TLS_FLAGS = ("--tls-cert", "--tls-key", "--tls-ca")


@dataclass(frozen=True)
class CoordinatorSecurity:
    tls: TlsMaterial | None = None
    tokens: TokenTable | None = None
    plaintext_warning: bool = False  # insecure non-loopback: warn at every start

    def authorizer(self) -> Authorizer | None:
        """None (everything allowed, as in dev mode) unless TLS or tokens are configured."""
        if self.tls is None and self.tokens is None:
            return None
        return Authorizer(coordinator_table(), self.tokens)


def add_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", type=Path, metavar="FILE",
                   help="this coordinator's certificate (PEM); with --tls-key and --tls-ca: mTLS "
                        "for agents and admin clients")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key (PEM)")
    p.add_argument("--tls-ca", type=Path, metavar="FILE",
                   help="the CA that signs agent and client certificates (PEM)")
    p.add_argument("--auth-tokens", type=Path, metavar="FILE",
                   help="bearer tokens -> roles (YAML; docs/SECURITY.md)")
    p.add_argument("--insecure", action="store_true",
                   help="allow plaintext gRPC on a non-loopback --listen address")


def security_from_args(args: argparse.Namespace) -> CoordinatorSecurity:
    """Validate and read; InvalidArgument names the flag and what it needs."""
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if any(given) and not all(given):
        missing = [flag for flag, value in zip(TLS_FLAGS, given, strict=True) if not value]
        raise InvalidArgument(f"TLS needs all of {', '.join(TLS_FLAGS)}; missing "
                              f"{', '.join(missing)}", field=missing[0].lstrip("-"))
    tls = read_tls(TlsFiles(*given), "--tls") if all(given) else None
    warn = tls is None and check_plaintext(args.listen, "--listen", args.insecure, "--insecure")
    tokens = load_tokens(args.auth_tokens, "--auth-tokens") if args.auth_tokens else None
    return CoordinatorSecurity(tls, tokens, warn)


def interceptors(authorizer: Authorizer | None,
                 core: CoordinatorCore) -> tuple[grpc.aio.ServerInterceptor, ...]:
    if authorizer is None:
        return ()
    return (AioAuthInterceptor(authorizer, lambda d: audit_denial(core, d)),)


def audit_denial(core: CoordinatorCore, denial: Denial) -> None:
    """A refused call goes to the audit log (ok = false) with who asked and what."""
    request = denial.request
    node_id = str(getattr(request, "node_id", "") or "")
    request_json = (json_format.MessageToJson(request, indent=None,
                                              preserving_proto_field_name=True)
                    if isinstance(request, Message) else "")
    core.store.append_audit(core.clock.time(), core.epoch, node_id, denial.method, request_json,
                            False, denial.code.name, denial.message, denial.caller)
    structlog.get_logger().bind(component="authz").warning(
        "request_denied", method=denial.method, caller=denial.caller, code=denial.code.name,
        node_id=node_id)


def caller(authorizer: Authorizer | None) -> Callable[[Any], Principal | None]:
    """The authenticated caller of a call (None when auth is off)."""

    def identify(context: Any) -> Principal | None:
        if authorizer is None:
            return None
        metadata = tuple(context.invocation_metadata() or ())
        return authorizer.identify(metadata, context.auth_context())

    return identify


def check_agent_node(who: Principal | None, node_id: str) -> None:
    """An agent identity may only register as its own node (its certificate CN / token name)."""
    if who is not None and who.role == "agent" and who.name != node_id:
        raise PermissionDenied(f"{who.describe()} may not register as node {node_id!r}",
                               field="node_id")
