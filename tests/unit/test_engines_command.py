"""The exact engine command line and environment, and the flags probe that gates them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from nodeagent.engines.command import (
    SHUTDOWN_TIMEOUT_FLAG,
    VLLM_MODULE,
    FlagProbe,
    build_command,
    build_env,
    default_launcher,
)
from nodeagent.engines.spec import InstanceSpec

LAUNCHER = default_launcher("/venv/bin/python")
FAKE_VLLM = Path(__file__).parents[1] / "fakes" / "fake_vllm.py"
CURRENT = frozenset({"--model", "--port", SHUTDOWN_TIMEOUT_FLAG})  # a vLLM with the flag


def _spec(**kw: object) -> InstanceSpec:
    base = {"instance_id": "llama", "endpoint": "llama-8b", "model_path": "/models/llama",
            "devices": ("0",)}
    return InstanceSpec(**{**base, **kw})  # type: ignore[arg-type]


def _fake_launcher(version: str) -> tuple[str, ...]:
    """The fake vLLM pinned to a version through the launcher (the probe's cache key)."""
    return ("/usr/bin/env", f"FAKE_VLLM_VERSION={version}", sys.executable, str(FAKE_VLLM))


def test_minimal_spec_gives_exact_command() -> None:
    argv = build_command(_spec(), launcher=LAUNCHER, port=8001, shutdown_timeout_s=30,
                         supported_flags=CURRENT)
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
    argv = build_command(spec, launcher=LAUNCHER, port=9000, shutdown_timeout_s=12.2,
                         host="10.0.0.5", supported_flags=CURRENT)
    assert argv[3:] == [
        "--model", "/models/llama", "--served-model-name", "llama-8b",
        "--host", "10.0.0.5", "--port", "9000", "--tensor-parallel-size", "2",
        "--dtype", "half", "--shutdown-timeout", "13",
        "--quantization", "awq", "--max-num-seqs", "64", "--max-model-len", "4096",
        "--gpu-memory-utilization", "0.85", "--enable-prefix-caching",
    ]  # fmt: skip


def test_shutdown_timeout_only_where_the_engine_accepts_it() -> None:
    older = frozenset({"--model", "--port"})
    assert SHUTDOWN_TIMEOUT_FLAG not in build_command(
        _spec(), launcher=LAUNCHER, port=1, supported_flags=older)
    # unknown (no probe): left out, the engine starts and drain-to-zero protects the requests
    assert SHUTDOWN_TIMEOUT_FLAG not in build_command(
        _spec(), launcher=LAUNCHER, port=1, probe=None)


def test_quantization_none_is_not_passed() -> None:
    argv = build_command(_spec(quantization="none"), launcher=LAUNCHER, port=1, probe=None)
    assert "--quantization" not in argv


def test_launcher_is_configurable() -> None:
    argv = build_command(_spec(), launcher=("vllm", "serve"), port=8000, probe=None)
    assert argv[:4] == ["vllm", "serve", "--model", "/models/llama"]


def test_probe_runs_once_per_launcher_and_reads_the_help() -> None:
    calls: list[list[str]] = []

    def run(argv: Sequence[str], env: Mapping[str, str] | None, timeout_s: float) -> str:
        calls.append(list(argv))
        if argv[0] == "old":
            return "usage: api_server [--model MODEL] [--port PORT] [--max-num-seqs N]"
        return "  --port PORT\n  --shutdown-timeout SHUTDOWN_TIMEOUT  seconds to drain"

    probe = FlagProbe(run)
    for _ in range(3):
        assert SHUTDOWN_TIMEOUT_FLAG in build_command(_spec(), launcher=("new",), port=1,
                                                      probe=probe)
        assert SHUTDOWN_TIMEOUT_FLAG not in build_command(_spec(), launcher=("old",), port=1,
                                                          probe=probe)
    assert calls == [["new", "--help"], ["old", "--help"]]


def test_failed_probe_is_unknown_and_says_why() -> None:
    def run(argv: Sequence[str], env: Mapping[str, str] | None, timeout_s: float) -> str:
        if argv[0] == "crashes":
            raise subprocess.CalledProcessError(1, list(argv))
        return "no flags listed here"

    probe = FlagProbe(run)
    assert probe.flags(("crashes",)) is None
    assert probe.flags(("other",)) is None  # help without --port: not an api_server
    assert "--help failed" in probe.errors[("crashes",)]
    assert "does not list --port" in probe.errors[("other",)]
    assert FlagProbe().flags(("/nonexistent/python", "-m", VLLM_MODULE)) is None


@pytest.mark.parametrize(("version", "has_flag"), [("0.10.1", False), ("0.18.0", True)])
def test_probe_follows_the_fake_engines_version(version: str, has_flag: bool) -> None:
    launcher = _fake_launcher(version)
    flags = FlagProbe().flags(launcher)
    assert flags is not None and "--port" in flags
    assert (SHUTDOWN_TIMEOUT_FLAG in flags) is has_flag


def test_old_engine_exits_2_on_the_flag_it_lacks(tmp_path: Path) -> None:
    """What the gate prevents: an older vLLM's argparse refuses an unknown flag."""
    argv = build_command(_spec(model_path=str(tmp_path)), launcher=_fake_launcher("0.10.1"),
                         port=1, supported_flags=CURRENT)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "unrecognized arguments: --shutdown-timeout" in done.stderr


def test_env_sets_device_order_and_visible_devices() -> None:
    base = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "7", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    assert build_env(_spec(devices=("1", "0"), tensor_parallel_size=2), base) == {
        "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "1,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_mig_engine_sees_only_its_slice() -> None:
    """The contract for MIG: exactly one device visible, named by its UUID (CUDA's device 0),
    whatever the agent's own environment lists; indices in PCI order."""
    mig = "MIG-4f1c2a8e-1b2c-5d3e-8f90-0123456789ab"
    base = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    env = build_env(_spec(devices=(mig,), env={"VLLM_CPU_KVCACHE_SPACE": "1"}), base)
    assert env["CUDA_VISIBLE_DEVICES"] == mig
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
