from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.config import AgentConfig, ConfigError, env_overrides, load_config


def test_defaults_are_safe() -> None:
    cfg = load_config([], environ={})
    assert cfg.backend == "nvml"  # sim only when configured
    assert cfg.sampling.interval_s == 1.0
    assert cfg.restore_on_exit is True
    assert cfg.failsafe.power_limit_frac == 0.6
    assert cfg.coordinator.address == ""
    assert cfg.node.id  # the hostname


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(
        "version: 1\nbackend: sim\nsampling: {interval_s: 5}\nsim: {gpus: 2, seed: 7}\n"
    )
    env = {
        "SHAPESHIFTER_NODEAGENT_SAMPLING__INTERVAL_S": "2",
        "SHAPESHIFTER_NODEAGENT_SIM__GPUS": "3",
    }
    cfg = load_config(["--config", str(path), "--sim-gpus", "4"], environ=env)
    assert cfg.sim.gpus == 4  # CLI
    assert cfg.sampling.interval_s == 2.0  # env over file
    assert cfg.sim.seed == 7  # file over default
    assert cfg.backend == "sim"


def test_toml_file_and_labels_flag(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('version = 1\nbackend = "sim"\n[node]\nid = "n1"\n')
    cfg = load_config(["--config", str(path), "--labels", "site=s1, row=r2,rack=k3"], environ={})
    assert cfg.node.id == "n1"
    assert cfg.node.labels == {"site": "s1", "row": "r2", "rack": "k3"}


def test_all_cli_flags_map_to_fields() -> None:
    argv = [
        "--backend", "sim", "--sim-gpus", "2", "--sim-gpu-type", "a100-40gb",
        "--listen", "0.0.0.0:1", "--state-dir", "/tmp/x", "--metrics-listen", "",
        "--node-id", "n", "--labels", "aisle=a", "--coordinator", "c:50050",
        "--sim-load", "demo", "--interval-s", "0.5", "--log-level", "debug",
        "--insecure",  # plaintext on 0.0.0.0 and to c:50050 must be allowed explicitly
    ]  # fmt: skip
    cfg = load_config(argv, environ={})
    assert (cfg.sim.gpus, cfg.sim.gpu_type, cfg.sim.load) == (2, "a100-40gb", "demo")
    assert (cfg.listen, cfg.metrics_listen, str(cfg.state_dir)) == ("0.0.0.0:1", "", "/tmp/x")
    assert (cfg.node.id, cfg.node.labels, cfg.coordinator.address) == (
        "n",
        {"aisle": "a"},
        "c:50050",
    )
    assert (cfg.sampling.interval_s, cfg.log_level) == (0.5, "debug")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SHAPESHIFTER_NODEAGENT_SIM__GPUS": "0"},
            "sim.gpus='0' is outside the allowed range [1, 64]",
        ),
        ({"SHAPESHIFTER_NODEAGENT_BACKEND": "cuda"}, "backend='cuda'"),
        ({"SHAPESHIFTER_NODEAGENT_LISTEN": "nohost"}, "listen='nohost': expected HOST:PORT"),
        ({"SHAPESHIFTER_NODEAGENT_LISTEN": ""}, "listen='': must not be empty"),
        ({"SHAPESHIFTER_NODEAGENT_FAILSAFE__POWER_LIMIT_FRAC": "2"}, "[0.1, 1]"),
        ({"SHAPESHIFTER_NODEAGENT_TYPO": "1"}, "typo: Extra inputs are not permitted"),
        ({"SHAPESHIFTER_NODEAGENT_NODE__LABELS": "site"}, "label 'site' is not KEY=VALUE"),
    ],
)
def test_bad_values_name_field_and_range(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config([], environ=env)
    assert message in str(info.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=f"cannot read config file {missing}"):
        load_config(["--config", str(missing)], environ={})
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(["--config", str(listy)], environ={})


def test_env_overrides_parse_nested_names() -> None:
    env = {"SHAPESHIFTER_NODEAGENT_SIM__GPU_TYPE": "a100-80gb", "OTHER": "x"}
    assert env_overrides(env) == {("sim", "gpu_type"): "a100-80gb"}


def test_failsafe_per_gpu_watts() -> None:
    cfg = AgentConfig.model_validate({"failsafe": {"power_limit_w": {"0": 300}}})
    assert cfg.failsafe.power_limit_w == {0: 300.0}


def test_coordinator_replicas_from_flag_env_and_file(tmp_path: Path) -> None:
    cfg = load_config(["--coordinator", "127.0.0.1:1, 127.0.0.1:2"], environ={})
    assert cfg.coordinator.addresses == ["127.0.0.1:1", "127.0.0.1:2"]
    assert cfg.coordinator.effective_addresses == ("127.0.0.1:1", "127.0.0.1:2")
    env = {"SHAPESHIFTER_NODEAGENT_COORDINATOR__ADDRESSES": "127.0.0.1:3,127.0.0.1:4"}
    assert load_config([], environ=env).coordinator.effective_addresses == (
        "127.0.0.1:3", "127.0.0.1:4")
    path = tmp_path / "a.yaml"
    path.write_text("version: 1\ncoordinator: {addresses: ['127.0.0.1:5', 'localhost:6']}\n")
    assert load_config(["--config", str(path)], environ={}).coordinator.effective_addresses == (
        "127.0.0.1:5", "localhost:6")
    single = load_config(["--coordinator", "127.0.0.1:1"], environ={}).coordinator
    assert (single.address, single.effective_addresses) == ("127.0.0.1:1", ("127.0.0.1:1",))
    for standalone in ([], ["--coordinator", ""]):
        assert load_config(standalone, environ={}).coordinator.effective_addresses == ()


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            ["--coordinator", "127.0.0.1:1"],
            {"SHAPESHIFTER_NODEAGENT_COORDINATOR__ADDRESSES": "127.0.0.1:1,127.0.0.1:2"},
            "coordinator.address='127.0.0.1:1' and coordinator.addresses=",
        ),
        (
            ["--coordinator", "127.0.0.1:1,coord:2"],
            {},
            "coordinator.addresses[1]='coord:2' is not a loopback address",
        ),
        (
            [],
            {"SHAPESHIFTER_NODEAGENT_COORDINATOR__ADDRESSES": "coord:1,127.0.0.1:2"},
            "coordinator.addresses[0]='coord:1' is not a loopback address",
        ),
    ],
)
def test_bad_coordinator_replicas_name_the_field(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(argv, environ=env)
    assert message in str(info.value)


def test_same_address_in_both_fields_is_accepted() -> None:
    tree = {"coordinator": {"address": "127.0.0.1:1", "addresses": ["127.0.0.1:1"]}}
    assert AgentConfig.model_validate(tree).coordinator.effective_addresses == ("127.0.0.1:1",)


def test_engine_host_and_user_defaults_and_overrides() -> None:
    cfg = load_config([], environ={})
    assert (cfg.engines.host, cfg.engines.engine_user) == ("127.0.0.1", None)
    for host in ("0.0.0.0", "10.2.3.4", "::", "fd00::1", "gpu-node-7.example.org"):
        env = {"SHAPESHIFTER_NODEAGENT_ENGINES__HOST": host,
               "SHAPESHIFTER_NODEAGENT_ENGINES__ENGINE_USER": "vllm"}
        cfg = load_config([], environ=env)
        assert (cfg.engines.host, cfg.engines.engine_user) == (host, "vllm")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("HOST", "10.0.0.1:8000", "engines.host='10.0.0.1:8000': expected an IP address"),
    ("HOST", "", "engines.host='': expected an IP address"),
    ("HOST", "bad_host!", "engines.host='bad_host!'"),
    ("ENGINE_USER", "Root User", "engines.engine_user='Root User': expected a user name"),
    ("ENGINE_USER", "root", "engines.engine_user='root': must be an unprivileged user"),
])  # fmt: skip
def test_bad_engine_host_or_user_names_the_field(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config([], environ={f"SHAPESHIFTER_NODEAGENT_ENGINES__{key}": value})
    assert message in str(info.value)
