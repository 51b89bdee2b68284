"""Engines start with the flags their own version accepts, in the environment the agent
promises them (through the manager and the fake vLLM, which exits 2 on an unknown flag)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nodeagent.engines.command import SHUTDOWN_TIMEOUT_FLAG
from nodeagent.engines.manager import State
from nodeagent.engines.runner import tail_lines
from tests.fakes.engine_harness import (
    FAKE_VLLM,
    fast_settings,
    get_json,
    make_model_dir,
    running_manager,
    spec,
)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "model")


def _launcher(version: str) -> tuple[str, ...]:
    return ("/usr/bin/env", f"FAKE_VLLM_VERSION={version}", sys.executable, str(FAKE_VLLM))


@pytest.mark.parametrize(("version", "has_flag"), [("0.10.1", False), ("0.18.0", True)])
def test_engine_starts_with_the_flags_of_its_version(
    tmp_path: Path, model: Path, version: str, has_flag: bool
) -> None:
    settings = fast_settings(tmp_path, launcher=_launcher(version))
    with running_manager(settings) as manager:
        started = manager.start(spec(model))
        assert (SHUTDOWN_TIMEOUT_FLAG in started.command) is has_flag
        ready = manager.wait_ready("a", timeout_s=20)
        assert ready.state == State.READY  # an old engine is not handed a flag it lacks
        assert get_json(ready.spec.port, "/version") == {"version": version}
        log = tail_lines(tmp_path / "logs" / "a.log")
        assert "CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_ORDER=PCI_BUS_ID" in log
