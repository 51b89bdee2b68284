"""Helpers for engine tests: the fake vLLM launcher, manager settings, HTTP and polling."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import psutil

from nodeagent.engines.manager import EngineSettings, InstanceManager, State
from nodeagent.engines.runner import EngineRunner, ProcessRunner
from nodeagent.engines.spec import DeviceInventory, InstanceSpec

FAKE_VLLM = Path(__file__).with_name("fake_vllm.py")
T = TypeVar("T")


def fake_launcher() -> tuple[str, ...]:
    return (sys.executable, str(FAKE_VLLM))


def fast_agent_config() -> dict[str, Any]:
    """A nodeagent config (YAML document) for integration tests: fake engines, quick sampling,
    reports and restarts."""
    return {
        "version": 1,
        "sampling": {"interval_s": 0.25},
        "coordinator": {"report_interval_s": 0.25, "reconnect_initial_s": 0.1},
        "engines": {"launcher": list(fake_launcher()), "health_interval_s": 0.1,
                    "shutdown_timeout_s": 5, "kill_grace_s": 2},
    }


def make_model_dir(path: Path, heads: int = 2) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"num_attention_heads": heads}))
    return path


def fast_settings(tmp_path: Path, **overrides: Any) -> EngineSettings:
    base = EngineSettings(
        launcher=fake_launcher(), state_dir=tmp_path / "state", log_dir=tmp_path / "logs",
        health_interval_s=0.05, ready_timeout_s=20.0, shutdown_timeout_s=5.0, kill_grace_s=2.0,
        max_restarts=3, restart_backoff_s=0.05, restart_backoff_max_s=0.2,
        allowed_extra_flags=frozenset({"--enforce-eager"}),
    )  # fmt: skip
    return replace(base, **overrides)


def plain_inventory(n_gpus: int = 2) -> DeviceInventory:
    return DeviceInventory(mig_enabled_by_gpu={i: False for i in range(n_gpus)}, gpu_by_mig_uuid={})


def spec(model_dir: Path, instance_id: str = "a", **kw: Any) -> InstanceSpec:
    return InstanceSpec(instance_id=instance_id, endpoint="tiny", model_path=str(model_dir),
                        devices=kw.pop("devices", ("0",)), max_num_seqs=kw.pop("max_num_seqs", 4),
                        **kw)


@contextmanager
def running_manager(
    settings: EngineSettings,
    inventory: Callable[[], DeviceInventory] | None = None,
    runner: EngineRunner | None = None,
) -> Iterator[InstanceManager]:
    """A manager whose engines are all force-stopped on exit (no test leaves a process)."""
    manager = InstanceManager(settings, runner or ProcessRunner(), inventory or plain_inventory)
    try:
        yield manager
    finally:
        stop_all(manager)


def stop_all(manager: InstanceManager) -> None:
    manager.close()
    for status in manager.list():
        if status.state in (State.STARTING, State.READY, State.DRAINING):
            manager.stop(status.spec.instance_id, force=True)


def post_json(port: int, path: str, body: dict[str, Any], timeout_s: float = 30.0) -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read() or b"null")


def get_json(port: int, path: str, timeout_s: float = 30.0) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as resp:
        return json.loads(resp.read())


def poll_until(fn: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.05) -> T:
    """fn()'s first truthy result; AssertionError with the last value after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last: {value!r})")
        time.sleep(interval_s)


def fake_engines(model: Path) -> dict[int, list[str]]:
    """The live fake engines serving this model dir: pid -> command line."""
    found = {}
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if cmd[1:2] == [str(fake_launcher()[1])] and str(model) in cmd \
                and p.info["status"] != psutil.STATUS_ZOMBIE:
            found[p.pid] = cmd
    return found


def kill_fake_engines(model: Path) -> None:
    """Engines outlive their agent by design; a test's teardown must not leave any behind."""
    for pid in fake_engines(model):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
