"""Roles, the method tables, identities from certificates and tokens, and the plaintext rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nodeagent.config import ConfigError, load_config
from shapeshifter.api.v1 import agent_pb2, coordinator_pb2, link_pb2
from shapeshifter.common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from shapeshifter.net.authz import (
    ADMIN,
    OPERATE,
    PUBLIC,
    READ,
    Authorizer,
    agent_table,
    coordinator_table,
    load_tokens,
    token_sha256,
)
from shapeshifter.net.transport import check_plaintext, is_loopback

AGENT = "/shapeshifter.nodeagent.v1.NodeAgent/"
COORD = "/shapeshifter.coordinator.v1.Coordinator/"


def cert(name: str, role: str | None) -> dict[str, list[bytes]]:
    uris = [f"spiffe://shapeshifter/role/{role}".encode()] if role else []
    return {"x509_common_name": [name.encode()], "peer_uri": uris}


def test_every_rpc_is_in_a_table() -> None:
    for file, table in ((agent_pb2, agent_table()), (coordinator_pb2, coordinator_table()),
                        (link_pb2, coordinator_table())):
        for service in file.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                assert table.required(f"/{service.full_name}/{m.name}")


def test_role_table() -> None:
    c = coordinator_table()
    assert c.required(COORD + "GetCluster") == READ
    assert c.required(COORD + "SetPowerLimit") == OPERATE
    assert c.required(COORD + "StartInstance") == OPERATE
    assert c.required(COORD + "SetMigMode") == ADMIN
    assert c.required("/grpc.health.v1.Health/Check") is PUBLIC
    # Services of other issues, by service name: reads viewer, the rest the service's role.
    assert c.required("/shapeshifter.coordinator.v1.Emergency/Declare") == ADMIN
    assert c.required("/shapeshifter.coordinator.v1.Emergency/GetEmergency") == READ
    assert c.required("/shapeshifter.coordinator.v1.Planner/ApplyPlan") == OPERATE
    assert c.required("/shapeshifter.coordinator.v1.Planner/ListPlans") == READ
    with pytest.raises(PermissionDenied, match="not in the authorization table"):
        c.required("/shapeshifter.coordinator.v1.Unknown/Do")
    with pytest.raises(PermissionDenied):
        agent_table().required(COORD + "GetCluster")


def test_agent_obeys_coordinator_and_admin_only() -> None:
    a = Authorizer(agent_table())
    for role in ("coordinator", "admin"):
        assert a.authorize(AGENT + "SetPowerLimit", (), cert("x", role)).role == role
    for role in ("viewer", "operator", "agent", None):
        with pytest.raises(PermissionDenied):
            a.authorize(AGENT + "SetPowerLimit", (), cert("x", role))
    assert a.authorize(AGENT + "GetNode", (), cert("v", "viewer")).name == "v"
    with pytest.raises(Unauthenticated):
        a.authorize(AGENT + "GetNode", (), {})
    assert a.authorize("/grpc.health.v1.Health/Check", (), {}).source == "none"


def test_tokens(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "tokens": [
        {"name": "ops", "role": "operator", "sha256": token_sha256("tok")}]}))
    a = Authorizer(coordinator_table(), load_tokens(path))
    bearer = (("authorization", "Bearer tok"),)
    who = a.authorize(COORD + "SetPowerLimit", bearer, cert("viewer", "viewer"))
    assert (who.name, who.role, who.source) == ("ops", "operator", "token")  # token wins
    with pytest.raises(Unauthenticated, match="not valid"):
        a.authorize(COORD + "GetCluster", (("authorization", "Bearer nope"),), {})
    with pytest.raises(Unauthenticated):
        Authorizer(coordinator_table()).authorize(COORD + "GetCluster", bearer, {})


def test_ambiguous_or_unknown_role_has_none() -> None:
    a = Authorizer(coordinator_table())
    both = {"x509_common_name": [b"x"], "peer_uri": [b"spiffe://shapeshifter/role/viewer",
                                                      b"spiffe://shapeshifter/role/admin"]}
    for ctx in (both, cert("x", "root")):
        with pytest.raises(PermissionDenied, match="role none"):
            a.authorize(COORD + "GetCluster", (), ctx)


@pytest.mark.parametrize(("text", "message"), [
    ("version: 1\ntokens: [{name: a, role: root, sha256: " + "0" * 64 + "}]", "tokens.0.role"),
    ("version: 1\ntokens: [{name: a, role: admin, sha256: abc}]", "tokens.0.sha256"),
    ("version: 2\n", "version"),
    ("[", "not valid YAML"),
])
def test_bad_tokens_file_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=message):
        load_tokens(path)


def test_loopback() -> None:
    for address in ("127.0.0.1:1", "127.3.2.1:1", "[::1]:5", "localhost:9", "unix:/tmp/s"):
        assert is_loopback(address), address
    for address in ("0.0.0.0:1", "[::]:1", "10.0.0.1:1", "coordinator:50050"):
        assert not is_loopback(address), address
    assert check_plaintext("0.0.0.0:1", "listen", True, "insecure: true") is True
    assert check_plaintext("127.0.0.1:1", "listen", False, "insecure: true") is False


@pytest.mark.parametrize(("argv", "message"), [
    (["--listen", "0.0.0.0:1"], "listen='0.0.0.0:1' is not a loopback address"),
    (["--coordinator", "coord:50050"], "coordinator.address='coord:50050'"),
    (["--tls-cert", "c.pem"], "tls.key_file: Field required"),
])
def test_agent_config_refuses_plaintext_off_loopback(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(argv, environ={})
    assert message in str(info.value)


def test_agent_config_insecure_or_tls_allows_any_address() -> None:
    assert load_config(["--listen", "0.0.0.0:1", "--insecure"], environ={}).insecure
    tls = ["--tls-cert", "c", "--tls-key", "k", "--tls-ca", "ca", "--listen", "0.0.0.0:1"]
    assert load_config(tls, environ={}).tls is not None
