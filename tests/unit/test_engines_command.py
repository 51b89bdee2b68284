"""The exact engine command line and environment."""

from __future__ import annotations

from nodeagent.engines.command import VLLM_MODULE, build_command, build_env, default_launcher
from nodeagent.engines.spec import InstanceSpec

LAUNCHER = default_launcher("/venv/bin/python")


def _spec(**kw: object) -> InstanceSpec:
    base = {"instance_id": "llama", "endpoint": "llama-8b", "model_path": "/models/llama",
            "devices": ("0",)}
    return InstanceSpec(**{**base, **kw})  # type: ignore[arg-type]


def test_minimal_spec_gives_exact_command() -> None:
    argv = build_command(_spec(), launcher=LAUNCHER, port=8001, shutdown_timeout_s=30)
    assert argv == [
        "/venv/bin/python", "-m", VLLM_MODULE,
        "--model", "/models/llama", "--served-model-name", "llama-8b",
        "--host", "127.0.0.1", "--port", "8001", "--tensor-parallel-size", "1",
        "--dtype", "auto", "--shutdown-timeout", "30",
    ]  # fmt: skip


def test_tp_quantization_limits_and_extra_args() -> None:
    spec = _spec(devices=("2", "3"), tensor_parallel_size=2, quantization="awq", dtype="half",
                 max_num_seqs=64, max_model_len=4096, gpu_memory_utilization=0.85,
                 extra_args=("--enable-prefix-caching",))
    argv = build_command(spec, launcher=LAUNCHER, port=9000, shutdown_timeout_s=12.2)
    assert argv[3:] == [
        "--model", "/models/llama", "--served-model-name", "llama-8b",
        "--host", "127.0.0.1", "--port", "9000", "--tensor-parallel-size", "2",
        "--dtype", "half", "--shutdown-timeout", "13",
        "--quantization", "awq", "--max-num-seqs", "64", "--max-model-len", "4096",
        "--gpu-memory-utilization", "0.85", "--enable-prefix-caching",
    ]  # fmt: skip


def test_quantization_none_is_not_passed() -> None:
    argv = build_command(_spec(quantization="none"), launcher=LAUNCHER, port=1)
    assert "--quantization" not in argv


def test_launcher_is_configurable() -> None:
    argv = build_command(_spec(), launcher=("vllm", "serve"), port=8000)
    assert argv[:4] == ["vllm", "serve", "--model", "/models/llama"]


def test_env_sets_visible_devices_for_gpus_and_mig_uuids() -> None:
    base = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "7"}
    assert build_env(_spec(devices=("1", "0"), tensor_parallel_size=2), base) == {
        "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "1,0"}
    mig = "MIG-4f1c2a8e-1b2c-5d3e-8f90-0123456789ab"
    env = build_env(_spec(devices=(mig,), env={"VLLM_CPU_KVCACHE_SPACE": "1"}), base)
    assert env["CUDA_VISIBLE_DEVICES"] == mig
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
