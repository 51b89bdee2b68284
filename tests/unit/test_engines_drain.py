"""Drain: the deadline, waiting for in-flight requests, SIGTERM then SIGKILL."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from nodeagent.engines.manager import State, wait_until_idle
from shapeshifter.common.clock import ManualClock
from tests.fakes.engine_harness import (
    fast_settings,
    make_model_dir,
    poll_until,
    post_json,
    running_manager,
    spec,
)


def _manual(clock: ManualClock):
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    return sleep, slept


def test_drain_stops_waiting_at_the_deadline() -> None:
    clock = ManualClock()
    sleep, slept = _manual(clock)
    idle = wait_until_idle(lambda: 3, timeout_s=10.0, clock=clock, sleep=sleep, poll_s=3.0)
    assert idle is False
    assert clock.monotonic() == 10.0
    assert slept == [3.0, 3.0, 3.0, 1.0]  # never sleeps past the deadline


def test_drain_returns_as_soon_as_queue_is_empty() -> None:
    clock = ManualClock()
    sleep, _ = _manual(clock)
    queue = iter([4, None, 1, 0, 7])  # None: a failed scrape is not "idle"
    idle = wait_until_idle(lambda: next(queue), timeout_s=60.0, clock=clock, sleep=sleep,
                           poll_s=1.0)
    assert idle is True
    assert clock.monotonic() == 3.0


def test_zero_deadline_checks_once() -> None:
    clock = ManualClock()
    sleep, slept = _manual(clock)
    assert wait_until_idle(lambda: 1, timeout_s=0.0, clock=clock, sleep=sleep, poll_s=1) is False
    assert slept == []


def test_stop_waits_for_in_flight_requests(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model")
    with running_manager(fast_settings(tmp_path)) as manager:
        port = manager.start(spec(model, env={"FAKE_VLLM_TOKEN_DELAY_S": "0.02"})).spec.port
        manager.wait_ready("a", 20)
        results: list[dict] = []
        threads = [
            threading.Thread(target=lambda: results.append(
                post_json(port, "/v1/completions", {"model": "tiny", "prompt": "hi",
                                                    "max_tokens": 40})))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        manager.tick()
        poll_until(lambda: (manager.tick(), manager.get("a").metrics.requests_running)[1] > 0)
        stopped = manager.stop("a")
        for t in threads:
            t.join(timeout=30)
        assert len(results) == 3 and all(r["choices"][0]["text"] for r in results)
        assert stopped.state == State.STOPPED
        assert stopped.exit_code == 0  # drained and exited on SIGTERM, not killed
        assert not stopped.routable


def test_drain_gives_up_at_the_deadline(tmp_path: Path) -> None:
    """A queue that never empties: the drain step ends at its deadline, then the engine is
    stopped and the new spec starts."""
    model = make_model_dir(tmp_path / "model")
    with running_manager(fast_settings(tmp_path)) as manager:
        port = manager.start(spec(model, drain_timeout_s=0.3)).spec.port
        manager.wait_ready("a", 20)
        post_json(port, "/fake/pin", {"running": 2, "waiting": 1})
        result = manager.reconfigure("a", spec(model, max_num_seqs=5, drain_timeout_s=0.3))
        steps = dict(result.steps)
        assert 0.3 <= steps["drain"] < 5.0  # waited for the deadline, not forever
        assert result.instance.command[-2:] == ("--max-num-seqs", "5")
        assert result.rolled_back is False


def test_sigkill_after_shutdown_timeout_and_grace(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model")
    settings = fast_settings(tmp_path, shutdown_timeout_s=0.2, kill_grace_s=0.3)
    with running_manager(settings) as manager:
        manager.start(spec(model, env={"FAKE_VLLM_IGNORE_SIGTERM": "1"}))
        manager.wait_ready("a", 20)
        t0 = time.monotonic()
        stopped = manager.stop("a", drain_timeout_s=0)
        assert time.monotonic() - t0 >= 0.5  # SIGTERM was given shutdown_timeout + grace
        assert stopped.state == State.STOPPED
        assert stopped.exit_code == -signal.SIGKILL


def test_force_stop_kills_without_draining(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model")
    with running_manager(fast_settings(tmp_path)) as manager:
        port = manager.start(spec(model, drain_timeout_s=60)).spec.port
        manager.wait_ready("a", 20)
        post_json(port, "/fake/pin", {"running": 5, "waiting": 0})
        t0 = time.monotonic()
        stopped = manager.stop("a", force=True)
        assert time.monotonic() - t0 < 5  # the 60 s drain was skipped
        assert stopped.exit_code == -signal.SIGKILL
