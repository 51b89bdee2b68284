"""Stop versus hand-back (issue 19): a stop leaves the GPUs' settings in force; only a
hand-back of an idle node restores the defaults; one process at a time owns the state dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nodeagent.actuation.actuator import Actuator
from nodeagent.actuation.journal import Journal
from nodeagent.daemon import (
    EXIT_RELEASE_REFUSED,
    Agent,
    StateDirBusy,
    _restore_idle_gpus,
    hold_state_dir,
)
from nodeagent.device.sim import SimulatedBackend
from shapeshifter.common.clock import ManualClock


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, _level: str) -> Any:
        return lambda event, **_kw: self.events.append(event)


class Calls:
    """Any method call is recorded by name; restore_defaults must never be among them."""

    def __init__(self, calls: list[str], name: str) -> None:
        self._calls, self._name = calls, name

    def __getattr__(self, method: str) -> Any:
        def call(*_a: Any, **_kw: Any) -> Any:
            if method == "restore_defaults":
                raise AssertionError("a stop must not restore the GPUs' defaults")
            self._calls.append(f"{self._name}.{method}")

        return call


def test_shutdown_keeps_gpu_settings_and_engines() -> None:
    calls: list[str] = []
    parts = {n: Calls(calls, n) for n in ("backend", "actuator", "sampler", "servicer", "server",
                                          "notifier", "engines")}  # fmt: skip
    agent = Agent(
        cfg=None, log=RecordingLog(), link=None, metrics_server=None,  # type: ignore[arg-type]
        **{k: v for k, v in parts.items() if k != "engines"},  # type: ignore[arg-type]
    )
    agent.engines = parts["engines"]
    assert agent.shutdown() is True
    assert "engines.close" in calls and "backend.close" in calls
    assert not any(c.startswith("actuator.") for c in calls)


def _node(state_dir: Path) -> tuple[SimulatedBackend, Actuator]:
    clock = ManualClock()
    backend = SimulatedBackend("h100-80gb", 2, clock)
    actuator = Actuator(backend, Journal.open(state_dir), clock, RecordingLog())
    actuator.capture_defaults()
    return backend, actuator


def _requested(state_dir: Path) -> dict[str, Any]:
    return json.loads((state_dir / "journal.json").read_text())["requested"]


def test_release_refuses_a_gpu_in_use_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend, actuator = _node(tmp_path)
    actuator.set_power_limit(0, 350)
    actuator.lock_clocks(1, 900, 1200)
    backend.set_processes(1, [4242])
    before = _requested(tmp_path)

    code = _restore_idle_gpus(backend, Journal.open(tmp_path), ManualClock(), RecordingLog())
    assert code == EXIT_RELEASE_REFUSED
    assert "{1: [4242]}" in capsys.readouterr().err
    assert _requested(tmp_path) == before
    assert backend.telemetry(0).power_limit_w == 350  # not even the idle GPU was touched
    assert backend._gpu(1).locked_mhz == (900, 1200)

    backend.set_processes(1, [])
    code = _restore_idle_gpus(backend, Journal.open(tmp_path), ManualClock(), RecordingLog())
    assert code == 0
    assert _requested(tmp_path) == {}
    assert backend.telemetry(0).power_limit_w == 700
    assert backend._gpu(1).locked_mhz is None  # the clock lock was reset on the device


def test_state_dir_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = hold_state_dir(state)
    with pytest.raises(StateDirBusy, match=rf"state dir {state} is in use .*pid \d+"):
        hold_state_dir(state)
    first.close()  # what the kernel does when the holder dies
    hold_state_dir(state).close()
