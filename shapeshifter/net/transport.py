"""Transport security shared by the agent, the coordinator and shapectl: TLS credentials from PEM
files, and the rule that plaintext gRPC is only for loopback unless explicitly allowed.

mTLS: servers require a client certificate signed by the configured CA; clients present theirs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from shapeshifter.common.errors import InvalidArgument

# Trailing metadata of a coordinator follower's UNAVAILABLE refusal: HOST:PORT of the leader
# (coordinator.ha.replica); agents (nodeagent.rpc.link) and shapectl follow it.
LEADER_METADATA_KEY = "shapeshifter-leader"


def leader_hint(err: BaseException) -> str | None:
    """HOST:PORT of the leader from a follower's UNAVAILABLE refusal (a sync or an aio call's
    error); None when not named."""
    if not isinstance(err, grpc.RpcError) or err.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    for key, value in err.trailing_metadata() or ():
        if key == LEADER_METADATA_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return text.strip() or None
    return None


def split_addresses(value: str) -> list[str]:
    """'a:1, b:2' -> ['a:1', 'b:2']; '' -> [] (blank items are dropped)."""
    return [part.strip() for part in value.split(",") if part.strip()]

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


@dataclass(frozen=True)
class TlsFiles:
    """PEM paths: this process's certificate and key, and the CA that signs the peers'."""

    cert_file: Path
    key_file: Path
    ca_file: Path


@dataclass(frozen=True)
class TlsMaterial:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


def read_tls(files: TlsFiles, field_prefix: str = "tls") -> TlsMaterial:
    """Read the three PEM files; a missing or unreadable one is an error naming its field."""

    def read(name: str, path: Path) -> bytes:
        field = f"{field_prefix}.{name}"
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InvalidArgument(
                f"{field}={str(path)!r}: cannot read: {exc.strerror}", field=field
            ) from None
        if b"-----BEGIN" not in data:
            raise InvalidArgument(f"{field}={str(path)!r}: not a PEM file", field=field)
        return data

    return TlsMaterial(
        read("cert_file", files.cert_file),
        read("key_file", files.key_file),
        read("ca_file", files.ca_file),
    )


def server_credentials(tls: TlsMaterial) -> grpc.ServerCredentials:
    """mTLS server side: clients must present a certificate signed by the CA."""
    return grpc.ssl_server_credentials(
        [(tls.key_pem, tls.cert_pem)], root_certificates=tls.ca_pem, require_client_auth=True
    )


def channel_credentials(tls: TlsMaterial) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(tls.ca_pem, tls.key_pem, tls.cert_pem)


def is_loopback(address: str) -> bool:
    """True for HOST:PORT on 127.0.0.0/8, ::1 or localhost; unix sockets count as local."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0].strip("[]") if ":" in address else address
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or 0.0.0.0 / [::]: reachable from the network


def check_plaintext(address: str, field: str, insecure: bool, insecure_field: str) -> bool:
    """Refuse plaintext on a non-loopback address unless insecure is set. Returns True when the
    caller must log the 'insecure' warning (non-loopback plaintext, explicitly allowed)."""
    if is_loopback(address):
        return False
    if not insecure:
        raise InvalidArgument(
            f"{field}={address!r} is not a loopback address and no TLS is configured: "
            f"configure TLS (cert, key and CA files) or set {insecure_field} to allow plaintext",
            field=field,
        )
    return True


def bind(server: Any, address: str, tls: TlsMaterial | None) -> int:
    """add_secure_port / add_insecure_port; works for grpc.server and grpc.aio.server."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))
