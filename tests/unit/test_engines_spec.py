"""Spec validation: every bad field is refused with its name, and nothing starts."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from nodeagent.engines.manager import EngineSettings, InstanceManager
from nodeagent.engines.spec import DeviceInventory, InstanceSpec, validate_spec
from shapeshifter.common.errors import InvalidArgument, NotFound

MIG_A = "MIG-aaaaaaaa-0000-0000-0000-000000000001"
MIG_B = "MIG-aaaaaaaa-0000-0000-0000-000000000002"
INVENTORY = DeviceInventory(mig_enabled_by_gpu={0: False, 1: False, 2: True},
                            gpu_by_mig_uuid={MIG_A: 2, MIG_B: 2})


@pytest.fixture
def model(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 6}))
    return tmp_path


def _validate(spec: InstanceSpec, *, devices_in_use: set[str] | None = None,
              ports_in_use: set[int] | None = None) -> None:
    validate_spec(spec, inventory=INVENTORY, devices_in_use=devices_in_use or set(),
                  ports_in_use=ports_in_use or set(),
                  allowed_extra_flags={"--enforce-eager", "--enable-prefix-caching"})


def _spec(model: Path, **kw: object) -> InstanceSpec:
    base = {"instance_id": "a", "endpoint": "tiny", "model_path": str(model), "devices": ("0",)}
    return InstanceSpec(**{**base, **kw})  # type: ignore[arg-type]


def test_valid_specs_pass(model: Path) -> None:
    _validate(_spec(model))
    _validate(_spec(model, devices=("0", "1"), tensor_parallel_size=2, quantization="fp8",
                    extra_args=("--enforce-eager",), port=8123, max_num_seqs=8))
    _validate(_spec(model, devices=(MIG_A,)))


@pytest.mark.parametrize(("kw", "field", "text"), [
    ({"instance_id": "Bad/Id"}, "instance_id", "must match"),
    ({"endpoint": " "}, "endpoint", "must not be empty"),
    ({"model_path": "/nonexistent/model"}, "model_path", "not a local model directory"),
    ({"quantization": "int3"}, "quantization", "unknown; allowed: none, fp8, awq"),
    ({"dtype": "fp4"}, "dtype", "unknown"),
    ({"priority_class": "gold"}, "priority_class", "saas, iaas, best_effort"),
    ({"max_num_seqs": 70000}, "max_num_seqs", "outside the allowed range [1, 65536]"),
    ({"max_model_len": 8}, "max_model_len", "[16, 10485760] tokens"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization", "[0.05, 1]"),
    ({"port": 80}, "port", "[1024, 65535]"),
    ({"drain_timeout_s": -1.0}, "drain_timeout_s", "[0, 3600] s"),
    ({"devices": ()}, "devices", "at least one"),
    ({"devices": ("0", "0"), "tensor_parallel_size": 2}, "devices", "twice"),
    ({"devices": ("0", "1")}, "tensor_parallel_size", "must equal the number of devices (2)"),
    ({"devices": ("0", "1", "2"), "tensor_parallel_size": 4}, "tensor_parallel_size", "(3)"),
    ({"devices": ("0", MIG_A), "tensor_parallel_size": 2}, "devices", "mixes"),
    ({"devices": ("2",)}, "devices", "GPU 2 is in MIG mode"),
    ({"devices": (MIG_A, MIG_B), "tensor_parallel_size": 2}, "devices",
     "2 MIG devices; an instance may use at most one"),
    ({"extra_args": ("--port", "9")}, "extra_args", "--port is not allowed"),
    ({"extra_args": ("--trust-remote-code",)}, "extra_args", "not allowed; allowed:"),
    ({"env": {"CUDA_VISIBLE_DEVICES": "3"}}, "env", "set from devices"),
    ({"env": {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}}, "env", "PCI_BUS_ID"),
    ({"env": {"BAD-NAME": "1"}}, "env", "not a valid variable name"),
])  # fmt: skip
def test_bad_field_is_named(model: Path, kw: dict, field: str, text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _validate(_spec(model, **kw))
    assert err.value.field == field
    assert text in str(err.value)


def test_tp_must_divide_attention_heads(model: Path) -> None:
    spec = _spec(model, devices=("0", "1", "2"), tensor_parallel_size=3)
    inventory = DeviceInventory({0: False, 1: False, 2: False, 3: False}, {})
    validate_spec(spec, inventory=inventory, devices_in_use=(), ports_in_use=(),
                  allowed_extra_flags=())  # 6 heads / 3: fine
    four = _spec(model, devices=("0", "1", "2", "3"), tensor_parallel_size=4)
    with pytest.raises(InvalidArgument, match="must divide the model's 6 attention heads") as err:
        validate_spec(four, inventory=inventory, devices_in_use=(), ports_in_use=(),
                      allowed_extra_flags=())
    assert err.value.field == "tensor_parallel_size"


def test_unknown_devices_are_not_found(model: Path) -> None:
    with pytest.raises(NotFound, match="GPU '7' does not exist") as err:
        _validate(_spec(model, devices=("7",)))
    assert err.value.field == "devices"
    with pytest.raises(NotFound, match="MIG device MIG-nope does not exist"):
        _validate(_spec(model, devices=("MIG-nope",)))


def test_busy_devices_and_ports_refused(model: Path) -> None:
    with pytest.raises(InvalidArgument, match="0 is used by another instance"):
        _validate(_spec(model), devices_in_use={"0"})
    with pytest.raises(InvalidArgument, match="port=9000 is already in use") as err:
        _validate(_spec(model, port=9000), ports_in_use={9000})
    assert err.value.field == "port"


class _NoLaunchRunner:
    """Fails the test if the manager tries to start anything."""

    def launch(self, *args: object) -> None:
        raise AssertionError("nothing may start for an invalid spec")

    def adopt(self, *args: object) -> None:
        return None

    def health_ok(self, host: str, port: int) -> bool:
        return False

    def fetch_metrics(self, host: str, port: int) -> str:
        raise OSError("no engine")


def test_manager_refuses_bad_spec_and_starts_nothing(model: Path, tmp_path: Path) -> None:
    settings = EngineSettings(launcher=("python",), state_dir=tmp_path / "s", log_dir=tmp_path)
    manager = InstanceManager(settings, _NoLaunchRunner(), lambda: INVENTORY)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as err:
        manager.start(_spec(model, devices=("0", "1")))
    assert err.value.field == "tensor_parallel_size"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InvalidArgument, match=f"port={port} is already in use"):
            manager.start(_spec(model, port=port))
    assert manager.list() == []
    assert not (tmp_path / "s" / "engines.json").exists()
