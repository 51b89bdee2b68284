"""The agent's transport security and authorization, assembled from its config (daemon wiring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc

from nodeagent.config import AgentConfig
from shapeshifter.net.authz import AuthInterceptor, Authorizer, Denial, agent_table, load_tokens
from shapeshifter.net.transport import (
    TlsFiles,
    TlsMaterial,
    channel_credentials,
    is_loopback,
    read_tls,
)


@dataclass(frozen=True)
class AgentSecurity:
    tls: TlsMaterial | None = None  # server side: mTLS when set
    interceptors: tuple[grpc.ServerInterceptor, ...] = ()  # empty: auth off (dev mode)
    link_credentials: grpc.ChannelCredentials | None = field(default=None)  # coordinator link


def agent_security(cfg: AgentConfig, log: Any) -> AgentSecurity:
    """TLS material, the auth interceptor (when TLS or tokens are configured) and the link's
    credentials. Raises InvalidArgument naming the field for unreadable files. Logs the
    plaintext warning at every start when insecure: true allowed a non-loopback address."""
    t = cfg.tls
    tls = read_tls(TlsFiles(t.cert_file, t.key_file, t.ca_file)) if t is not None else None
    tokens = load_tokens(cfg.auth.tokens_file, "auth.tokens_file") if cfg.auth.tokens_file else None
    if tls is None:
        _warn_plaintext(cfg, log)
    interceptors: tuple[grpc.ServerInterceptor, ...] = ()
    if tls is not None or tokens is not None:
        authorizer = Authorizer(agent_table(), tokens)
        interceptors = (AuthInterceptor(authorizer, lambda d: _log_denial(log, d)),)
    creds = channel_credentials(tls) if tls is not None else None
    return AgentSecurity(tls, interceptors, creds)


def _warn_plaintext(cfg: AgentConfig, log: Any) -> None:
    for name, address in (("listen", cfg.listen), *cfg.coordinator.named_addresses()):
        if address and not is_loopback(address):
            log.warning("insecure: plaintext gRPC on a non-loopback address (insecure: true)",
                        field=name, address=address)


def _log_denial(log: Any, denial: Denial) -> None:
    log.warning("request denied", method=denial.method, caller=denial.caller,
                code=denial.code.name, reason=denial.message)
