"""The validated description of one vLLM instance, and the checks run before anything starts.

Validation is pure except for reading the model's config.json (to check that TP divides the
attention heads) and is given what it needs about devices and ports by the caller, so that a
refused spec changes nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.device.backend import GpuBackend
from shapeshifter.common.errors import InvalidArgument, NotFound, out_of_range

PRIORITY_CLASSES = ("saas", "iaas", "best_effort")
QUANTIZATIONS = (
    "none", "fp8", "awq", "awq_marlin", "gptq", "gptq_marlin", "bitsandbytes",
    "compressed-tensors", "gguf", "modelopt", "experts_int8",
)  # fmt: skip
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# Flags the agent sets itself; an extra arg may never override them.
RESERVED_FLAGS = frozenset({
    "--model", "--served-model-name", "--host", "--port", "--tensor-parallel-size",
    "--quantization", "--dtype", "--max-num-seqs", "--max-model-len",
    "--gpu-memory-utilization", "--shutdown-timeout", "--enable-sleep-mode",
})  # fmt: skip
# Variables the agent sets for every engine (command.build_env); a spec may not override them.
AGENT_ENV = {
    "CUDA_VISIBLE_DEVICES": "set from devices",
    "CUDA_DEVICE_ORDER": "set by the agent (PCI_BUS_ID: CUDA indices match NVML's)",
}
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default when the spec leaves max_num_seqs at 0

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MIG_PREFIX = "MIG-"


@dataclass(frozen=True)
class InstanceSpec:
    """One engine instance. Zero for max_num_seqs/max_model_len/gpu_memory_utilization/port
    means "the engine's default" (port: pick a free one)."""

    instance_id: str
    endpoint: str
    model_path: str
    devices: tuple[str, ...]  # GPU indices ("0") or MIG device UUIDs ("MIG-...")
    tensor_parallel_size: int = 1
    quantization: str = "none"
    dtype: str = "auto"
    max_num_seqs: int = 0
    max_model_len: int = 0
    gpu_memory_utilization: float = 0.0
    port: int = 0
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    priority_class: str = "saas"
    drain_timeout_s: float = 30.0
    enable_sleep_mode: bool = False  # vLLM --enable-sleep-mode: a pre-staged standby engine

    @property
    def effective_max_num_seqs(self) -> int:
        return self.max_num_seqs or DEFAULT_MAX_NUM_SEQS

    @property
    def uses_mig(self) -> bool:
        return any(d.startswith(_MIG_PREFIX) for d in self.devices)


@dataclass(frozen=True)
class DeviceInventory:
    """What the GPU backend reports: each GPU's MIG mode and each MIG device's parent GPU."""

    mig_enabled_by_gpu: Mapping[int, bool]
    gpu_by_mig_uuid: Mapping[str, int]

    def gpu_of(self, device: str) -> int:
        """The GPU index a device lives on (NotFound when it does not exist)."""
        if device.startswith(_MIG_PREFIX):
            if device not in self.gpu_by_mig_uuid:
                raise NotFound(f"devices: MIG device {device} does not exist", field="devices")
            return self.gpu_by_mig_uuid[device]
        if not device.isdigit() or int(device) not in self.mig_enabled_by_gpu:
            known = sorted(self.mig_enabled_by_gpu)
            raise NotFound(
                f"devices: GPU {device!r} does not exist (GPUs: {known})", field="devices"
            )
        return int(device)


def inventory_from_backend(backend: GpuBackend) -> DeviceInventory:
    """Read a GpuBackend's devices and MIG instances into a DeviceInventory."""
    mig_enabled: dict[int, bool] = {}
    parents: dict[str, int] = {}
    for ident in backend.devices():
        state = backend.mig_state(ident.index)
        mig_enabled[ident.index] = state.enabled
        for mig in state.instances:
            parents[mig.uuid] = ident.index
    return DeviceInventory(mig_enabled_by_gpu=mig_enabled, gpu_by_mig_uuid=parents)


def validate_spec(
    spec: InstanceSpec,
    *,
    inventory: DeviceInventory,
    devices_in_use: Collection[str],
    ports_in_use: Collection[int],
    allowed_extra_flags: Collection[str],
) -> None:
    """Raise InvalidArgument/NotFound naming the first bad field; return None when valid.

    devices_in_use: devices held by other managed instances (the spec's own instance excluded).
    ports_in_use: ports other instances hold or the OS reports bound (only checked when set).
    """
    _check_identity(spec)
    _check_numbers(spec)
    _check_devices(spec, inventory, devices_in_use)
    _check_tp_divides_heads(spec)
    _check_extra_args(spec.extra_args, allowed_extra_flags)
    _check_env(spec.env)
    if spec.port and spec.port in ports_in_use:
        raise InvalidArgument(f"port={spec.port} is already in use", field="port")


def _is_local_dir(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except OSError:  # e.g. ENAMETOOLONG: a name longer than the filesystem allows
        return False


def _check_identity(spec: InstanceSpec) -> None:
    if not _ID_RE.match(spec.instance_id):
        raise InvalidArgument(
            f"instance_id={spec.instance_id!r} must match {_ID_RE.pattern}", field="instance_id"
        )
    if not spec.endpoint.strip():
        raise InvalidArgument("endpoint must not be empty", field="endpoint")
    if not spec.model_path or not _is_local_dir(spec.model_path):
        raise InvalidArgument(
            f"model_path={spec.model_path!r} is not a local model directory", field="model_path"
        )
    if spec.quantization not in QUANTIZATIONS:
        raise InvalidArgument(
            f"quantization={spec.quantization!r} is unknown; allowed: {', '.join(QUANTIZATIONS)}",
            field="quantization",
        )
    if spec.dtype not in DTYPES:
        raise InvalidArgument(
            f"dtype={spec.dtype!r} is unknown; allowed: {', '.join(DTYPES)}", field="dtype"
        )
    if spec.priority_class not in PRIORITY_CLASSES:
        raise InvalidArgument(
            f"priority_class={spec.priority_class!r} is unknown; allowed: "
            f"{', '.join(PRIORITY_CLASSES)}",
            field="priority_class",
        )


def _check_numbers(spec: InstanceSpec) -> None:
    if spec.max_num_seqs and not 1 <= spec.max_num_seqs <= 65536:
        raise out_of_range("max_num_seqs", spec.max_num_seqs, 1, 65536)
    if spec.max_model_len and not 16 <= spec.max_model_len <= 10_485_760:
        raise InvalidArgument(  # not out_of_range: its %g would print 1.04858e+07
            f"max_model_len={spec.max_model_len} tokens is outside the allowed range "
            "[16, 10485760] tokens",
            field="max_model_len",
        )
    if spec.gpu_memory_utilization and not 0.05 <= spec.gpu_memory_utilization <= 1.0:
        raise out_of_range("gpu_memory_utilization", spec.gpu_memory_utilization, 0.05, 1.0)
    if spec.port and not 1024 <= spec.port <= 65535:
        raise out_of_range("port", spec.port, 1024, 65535)
    if not 0 <= spec.drain_timeout_s <= 3600:
        raise out_of_range("drain_timeout_s", spec.drain_timeout_s, 0, 3600, "s")


def _check_devices(
    spec: InstanceSpec, inventory: DeviceInventory, devices_in_use: Collection[str]
) -> None:
    if not spec.devices:
        raise InvalidArgument(
            "devices must list at least one GPU index or MIG UUID", field="devices"
        )
    if len(set(spec.devices)) != len(spec.devices):
        raise InvalidArgument(f"devices={list(spec.devices)} lists a device twice", field="devices")
    if spec.tensor_parallel_size != len(spec.devices):
        raise InvalidArgument(
            f"tensor_parallel_size={spec.tensor_parallel_size} must equal the number of "
            f"devices ({len(spec.devices)})",
            field="tensor_parallel_size",
        )
    if len({d.startswith(_MIG_PREFIX) for d in spec.devices}) > 1:
        raise InvalidArgument("devices mixes whole GPUs and MIG devices", field="devices")
    if spec.uses_mig and len(spec.devices) > 1:
        # CUDA enumerates one MIG device per process: tensor parallelism across slices cannot
        # work, and the engine is run with its one slice as its only visible device.
        raise InvalidArgument(
            f"devices lists {len(spec.devices)} MIG devices; an instance may use at most one "
            "(CUDA enumerates a single MIG device per process, so no tensor parallelism across "
            "MIG slices)",
            field="devices",
        )
    for device in spec.devices:
        gpu = inventory.gpu_of(device)
        if not spec.uses_mig and inventory.mig_enabled_by_gpu[gpu]:
            raise InvalidArgument(
                f"devices: GPU {gpu} is in MIG mode; name one of its MIG device UUIDs",
                field="devices",
            )
        if device in devices_in_use:
            raise InvalidArgument(f"devices: {device} is used by another instance", field="devices")


def model_attention_heads(model_path: str) -> int | None:
    """num_attention_heads from the model's config.json, or None when unreadable."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
        heads = config.get("num_attention_heads") or config.get("text_config", {}).get(
            "num_attention_heads"
        )
    except (OSError, ValueError, AttributeError):
        return None
    return heads if isinstance(heads, int) and heads > 0 else None


def _check_tp_divides_heads(spec: InstanceSpec) -> None:
    heads = model_attention_heads(spec.model_path)
    if heads is not None and heads % spec.tensor_parallel_size:
        raise InvalidArgument(
            f"tensor_parallel_size={spec.tensor_parallel_size} must divide the model's "
            f"{heads} attention heads",
            field="tensor_parallel_size",
        )


def _check_extra_args(extra_args: tuple[str, ...], allowed: Collection[str]) -> None:
    for arg in extra_args:
        if not arg.startswith("-"):
            continue  # a value of the preceding flag
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_FLAGS or flag not in allowed:
            raise InvalidArgument(
                f"extra_args: {flag} is not allowed; allowed: {', '.join(sorted(allowed))}",
                field="extra_args",
            )


def _check_env(env: Mapping[str, str]) -> None:
    for key in env:
        if not _ENV_RE.match(key):
            raise InvalidArgument(f"env: {key!r} is not a valid variable name", field="env")
        if key in AGENT_ENV:
            raise InvalidArgument(f"env: {key} is {AGENT_ENV[key]}", field="env")
