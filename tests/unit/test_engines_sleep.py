"""Sleep mode: a pre-staged sleeping engine (vLLM --enable-sleep-mode, /sleep?level=1,
/wake_up) is woken by a reconfigure to its spec on the same shape, instead of a cold start."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import psutil
import pytest

from nodeagent.engines.manager import InstanceManager, State
from nodeagent.engines.runner import ProcessRunner
from shapeshifter.common.errors import InvalidArgument
from tests.fakes.engine_harness import (
    fast_settings,
    get_json,
    make_model_dir,
    plain_inventory,
    post_json,
    running_manager,
    spec,
    stop_all,
)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _complete(port: int, model: str = "tiny") -> dict:
    return post_json(port, "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2})


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    return make_model_dir(tmp_path / "model-a"), make_model_dir(tmp_path / "model-b")


def test_reconfigure_wakes_the_standby_instead_of_a_cold_start(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    model_a, model_b = models
    with running_manager(fast_settings(tmp_path)) as manager:
        old = manager.start(spec(model_a))
        manager.wait_ready("a", 20)
        with pytest.raises(urllib.error.HTTPError) as err:  # no sleep API without the flag
            post_json(old.spec.port, "/sleep?level=1", {})
        assert err.value.code == 404
        standby = manager.prestage(spec(model_b, max_num_seqs=6))
        assert "--enable-sleep-mode" in standby.command and not standby.routable
        assert get_json(standby.spec.port, "/is_sleeping") == {"is_sleeping": True}
        with pytest.raises(urllib.error.HTTPError):  # asleep: serves nothing
            _complete(standby.spec.port)
        assert manager.get("a").pid == old.pid  # the active engine is untouched

        result = manager.reconfigure("a", spec(model_b, max_num_seqs=6))
        assert [name for name, _ in result.steps] == ["drain", "stop", "wake", "ready"]
        inst = result.instance
        assert inst.state == State.READY and inst.routable and not result.rolled_back
        assert inst.pid == standby.pid and inst.spec.port == standby.spec.port
        assert inst.spec.model_path == str(model_b)
        assert get_json(inst.spec.port, "/is_sleeping") == {"is_sleeping": False}
        assert _complete(inst.spec.port)["usage"]["completion_tokens"] == 2
        assert manager.standby("a") is None and _gone(old.pid)


def test_a_spec_the_standby_does_not_run_starts_cold(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    model_a, model_b = models
    with running_manager(fast_settings(tmp_path)) as manager:
        manager.start(spec(model_a))
        manager.wait_ready("a", 20)
        standby = manager.prestage(spec(model_b, max_num_seqs=6))
        result = manager.reconfigure("a", spec(model_b, max_num_seqs=8))
        assert [name for name, _ in result.steps] == ["drain", "stop", "start", "ready"]
        assert result.instance.pid != standby.pid
        kept = manager.standby("a")  # still asleep, still on the instance's shape
        assert kept is not None and kept.pid == standby.pid


def test_standby_must_keep_the_shape(tmp_path: Path, models: tuple[Path, Path]) -> None:
    model_a, model_b = models
    with running_manager(fast_settings(tmp_path)) as manager:
        manager.start(spec(model_a))
        with pytest.raises(InvalidArgument, match="shape") as err:
            manager.prestage(spec(model_b, devices=("1",)))
        assert err.value.field == "spec"
        assert manager.standby("a") is None


def test_standby_survives_an_agent_restart_and_goes_with_its_instance(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    model_a, model_b = models
    settings = fast_settings(tmp_path)
    first = InstanceManager(settings, ProcessRunner(), plain_inventory)
    second = InstanceManager(settings, ProcessRunner(), plain_inventory)
    try:
        first.start(spec(model_a))
        first.wait_ready("a", 20)
        standby = first.prestage(spec(model_b))
        first.close()  # the agent restarts; engines and the standby keep running
        assert second.recover() == (["a"], [])
        adopted = second.standby("a")
        assert adopted is not None and adopted.pid == standby.pid
        second.stop("a")
        assert _gone(standby.pid) and second.standby("a") is None
    finally:
        stop_all(second)
        stop_all(first)
