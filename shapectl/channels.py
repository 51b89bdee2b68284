"""shapectl's gRPC channels: plaintext by default (loopback dev mode), mTLS with
--tls-cert/--tls-key/--tls-ca (or SHAPECTL_TLS_CERT/_KEY/_CA), and a bearer token with --token
(or SHAPECTL_TOKEN) sent as `authorization: Bearer ...` on every call.

Command modules open channels with ``client_channel(args, address)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shapeshifter.common.errors import InvalidArgument
from shapeshifter.net.transport import (
    TlsFiles,
    TlsMaterial,
    channel_credentials,
    leader_hint,
    read_tls,
)

ENV_FLAGS = (("tls_cert", "SHAPECTL_TLS_CERT"), ("tls_key", "SHAPECTL_TLS_KEY"),
             ("tls_ca", "SHAPECTL_TLS_CA"), ("token", "SHAPECTL_TOKEN"))


class ChannelError(Exception):
    """Unusable client credentials; the message names the flag."""


@dataclass(frozen=True)
class ClientSecurity:
    tls: TlsMaterial | None = None
    token: str = ""


def add_security_args(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    defaults = {dest: environ.get(env) or None for dest, env in ENV_FLAGS}
    parser.add_argument("--tls-cert", metavar="FILE", default=defaults["tls_cert"],
                        help="client certificate for mTLS (default: $SHAPECTL_TLS_CERT)")
    parser.add_argument("--tls-key", metavar="FILE", default=defaults["tls_key"],
                        help="its private key (default: $SHAPECTL_TLS_KEY)")
    parser.add_argument("--tls-ca", metavar="FILE", default=defaults["tls_ca"],
                        help="CA that signs the servers' certificates (default: $SHAPECTL_TLS_CA)")
    parser.add_argument("--token", metavar="TOKEN", default=defaults["token"],
                        help="bearer token (default: $SHAPECTL_TOKEN)")


def client_security(args: Any) -> ClientSecurity:
    """From the parsed global flags; ChannelError names a missing or unreadable one."""
    given = [getattr(args, "tls_cert", None), getattr(args, "tls_key", None),
             getattr(args, "tls_ca", None)]
    token = getattr(args, "token", None) or ""
    if not any(given):
        return ClientSecurity(None, token)
    if not all(given):
        names = ("--tls-cert", "--tls-key", "--tls-ca")
        missing = [n for n, v in zip(names, given, strict=True) if not v]
        raise ChannelError(f"TLS needs --tls-cert, --tls-key and --tls-ca; missing "
                           f"{', '.join(missing)}")
    try:
        tls = read_tls(TlsFiles(*(Path(p) for p in given)), "tls")
    except InvalidArgument as err:
        raise ChannelError(str(err)) from None
    return ClientSecurity(tls, token)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), self._metadata))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)


def open_channel(address: str, security: ClientSecurity | None) -> grpc.Channel:
    security = security or ClientSecurity()
    channel = (grpc.insecure_channel(address) if security.tls is None
               else grpc.secure_channel(address, channel_credentials(security.tls)))
    if security.token:
        channel = grpc.intercept_channel(channel, _BearerToken(security.token))
    return channel


def client_channel(args: Any, address: str) -> grpc.Channel:
    """A channel to address with the credentials of the command line (args.security when the
    CLI computed it, else from the flags)."""
    security = getattr(args, "security", None) or client_security(args)
    return open_channel(address, security)


def leader_of(addresses: list[str], security: ClientSecurity | None,
              timeout_s: float = 2.0) -> str:
    """The replica that serves; a follower's refusal names the leader (trailing metadata
    `shapeshifter-leader`, coordinator.ha.replica). When none answers, the first address (the
    command
    then fails with that replica's error)."""
    for address in addresses:
        with open_channel(address, security) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=timeout_s)
                return address
            except grpc.RpcError as err:
                hint = leader_hint(err)
                if hint in addresses:
                    return hint
    return addresses[0]
