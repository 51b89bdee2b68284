"""InstanceManager with the fake engine: lifecycle, metrics, crash restart, reconfigure,
rollback and re-adoption after an agent restart."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from nodeagent.engines.manager import JOURNAL_FILE, EngineSettings, InstanceManager, State
from nodeagent.engines.runner import ProcessRunner, rotate_log, tail_lines
from nodeagent.engines.spec import DeviceInventory
from nodeagent.engines.types import EngineLoad
from shapeshifter.common.errors import FailedPrecondition, NotFound
from tests.fakes.engine_harness import (
    fast_settings,
    make_model_dir,
    plain_inventory,
    poll_until,
    post_json,
    running_manager,
    spec,
    stop_all,
)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "model")


def test_start_ready_complete_and_metrics(tmp_path: Path, model: Path) -> None:
    with running_manager(fast_settings(tmp_path)) as manager:
        started = manager.start(spec(model, env={"FAKE_VLLM_TOKEN_DELAY_S": "0.05"}))
        assert started.state == State.STARTING and not started.routable
        assert started.spec.port > 0  # port 0 = picked
        ready = manager.wait_ready("a", 20)
        assert ready.state == State.READY and ready.routable and ready.ready_at_unix_s > 0
        port = ready.spec.port
        threads = [threading.Thread(target=post_json, args=(port, "/v1/completions",
                                    {"model": "tiny", "prompt": "a b", "max_tokens": 20}))
                   for _ in range(6)]
        for t in threads:
            t.start()

        def queued() -> EngineLoad | None:
            manager.tick()
            load = manager.engine_loads().get(0)
            return load if load and load.requests_waiting == 2 else None

        busy = poll_until(queued)
        assert busy.max_num_seqs == 4
        assert busy.requests_running == 4  # the batch limit; the other 2 wait
        assert busy.kv_cache_usage_frac == 1.0
        for t in threads:
            t.join(timeout=30)
        manager.tick()
        metrics = manager.get("a").metrics
        assert metrics.generation_tokens_total == 120
        assert metrics.e2e_latency_p95_s > 0
        assert "fake-vllm: serving tiny" in tail_lines(tmp_path / "logs" / "a.log")
        assert manager.busy_instances(0) == ["a"] and manager.busy_instances(1) == []


def test_duplicate_and_unknown_ids(tmp_path: Path, model: Path) -> None:
    with running_manager(fast_settings(tmp_path)) as manager:
        manager.start(spec(model))
        with pytest.raises(FailedPrecondition, match=r"already (STARTING|READY)"):
            manager.start(spec(model, devices=("1",)))
        with pytest.raises(NotFound) as err:
            manager.stop("nope")
        assert err.value.field == "instance_id"


def test_crashed_engine_is_restarted(tmp_path: Path, model: Path) -> None:
    with running_manager(fast_settings(tmp_path)) as manager:
        manager.start_monitor()
        old_pid = manager.start(spec(model)).pid
        manager.wait_ready("a", 20)
        os.kill(old_pid, signal.SIGKILL)
        restarted = poll_until(lambda: (s := manager.get("a")).state == State.READY
                               and s.pid != old_pid and s, timeout_s=20)
        assert restarted.restarts == 1
        assert _gone(old_pid)


def _worker_pids(log: Path) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in log.read_text().splitlines()
            if line.startswith("fake-vllm: worker pid")]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_no_worker_outlives_its_engine(tmp_path: Path, model: Path) -> None:
    log = tmp_path / "logs" / "a.log"
    with running_manager(fast_settings(tmp_path)) as manager:
        manager.start_monitor()
        leader = manager.start(spec(model, env={"FAKE_VLLM_WORKER": "1"})).pid
        manager.wait_ready("a", 20)
        (first,) = poll_until(lambda: _worker_pids(log))
        os.kill(leader, signal.SIGKILL)  # the engine crashes; its worker would be orphaned
        poll_until(lambda: (s := manager.get("a")).state == State.READY and s.pid != leader)
        poll_until(lambda: _gone(first))
        second = poll_until(lambda: [p for p in _worker_pids(log) if p != first])[0]
        manager.stop("a")
        assert _gone(second)


def test_restart_limit_then_failed_with_exit_code_and_log(tmp_path: Path, model: Path) -> None:
    settings = fast_settings(tmp_path, max_restarts=2)
    with running_manager(settings) as manager:
        manager.start_monitor()
        manager.start(spec(model, env={"FAKE_VLLM_EXIT_AFTER_S": "0.3"}))
        failed = poll_until(lambda: (s := manager.get("a")).state == State.FAILED and s,
                            timeout_s=30)
        assert failed.restarts == 2
        assert failed.exit_code == 3
        assert "gave up after 2 restarts" in failed.last_log
        assert "fake-vllm: serving tiny" in failed.last_log  # the log's last lines
        assert not failed.routable


def test_engine_that_never_gets_ready_fails_after_the_limit(tmp_path: Path, model: Path) -> None:
    with running_manager(fast_settings(tmp_path, max_restarts=3)) as manager:
        manager.start_monitor()
        manager.start(spec(model, env={"FAKE_VLLM_EXIT_AFTER_S": "0", "FAKE_VLLM_STARTUP_S": "9"}))
        failed = poll_until(lambda: (s := manager.get("a")).state == State.FAILED and s,
                            timeout_s=30)
        assert failed.restarts == 3 and failed.exit_code == 3
        assert "exited with code 3 before READY" in failed.last_log


def test_reconfigure_during_restart_backoff_voids_the_restart(tmp_path: Path, model: Path) -> None:
    settings = fast_settings(tmp_path, restart_backoff_s=0.5, restart_backoff_max_s=0.5)
    with running_manager(settings) as manager:
        manager.start_monitor()
        old_pid = manager.start(spec(model)).pid
        manager.wait_ready("a", 20)
        os.kill(old_pid, signal.SIGKILL)
        poll_until(lambda: manager.get("a").routable is False)  # crash seen, backoff running
        result = manager.reconfigure("a", spec(model, max_num_seqs=6))
        assert result.instance.state == State.READY and not result.rolled_back
        time.sleep(1.0)  # past the backoff: the voided restart must not launch anything
        after = manager.get("a")
        assert after.pid == result.instance.pid and after.restarts == 0
        assert after.command[-1] == "6"


def test_reconfigure_changes_command_and_keeps_port(tmp_path: Path, model: Path) -> None:
    with running_manager(fast_settings(tmp_path)) as manager:
        first = manager.start(spec(model))
        manager.wait_ready("a", 20)
        result = manager.reconfigure("a", spec(model, max_num_seqs=16, max_model_len=512,
                                               devices=("1",)))
        assert not result.rolled_back
        assert [name for name, _ in result.steps] == ["drain", "stop", "start", "ready"]
        inst = result.instance
        assert inst.state == State.READY and inst.pid != first.pid
        assert inst.spec.port == first.spec.port
        assert inst.command[-4:] == ("--max-num-seqs", "16", "--max-model-len", "512")
        assert psutil.Process(inst.pid).environ()["CUDA_VISIBLE_DEVICES"] == "1"
        assert manager.busy_instances(0) == [] and manager.busy_instances(1) == ["a"]


def test_failed_reconfigure_rolls_back(tmp_path: Path, model: Path) -> None:
    with running_manager(fast_settings(tmp_path)) as manager:
        manager.start(spec(model))
        manager.wait_ready("a", 20)
        bad = spec(model, max_num_seqs=8, env={"FAKE_VLLM_EXIT_AFTER_S": "0"})
        result = manager.reconfigure("a", bad)
        assert result.rolled_back
        assert "exited with code 3 before READY" in result.message
        assert "rolled back" in result.message
        assert result.instance.state == State.READY
        assert result.instance.spec.max_num_seqs == 4
        assert [n for n, _ in result.steps] == ["drain", "stop", "start", "start", "ready"]


def test_agent_restart_adopts_running_engine(tmp_path: Path, model: Path) -> None:
    settings = fast_settings(tmp_path)
    first = InstanceManager(settings, ProcessRunner(), plain_inventory)
    try:
        pid = first.start(spec(model)).pid
        first.wait_ready("a", 20)
        first.close()  # the agent exits; the engine keeps running
        second = InstanceManager(settings, ProcessRunner(), plain_inventory)
        adopted, relaunched = second.recover()
        assert (adopted, relaunched) == (["a"], [])
        status = second.wait_ready("a", 10)
        assert status.pid == pid and status.routable
        assert [p.pid for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] and "fake_vllm.py" in " ".join(p.info["cmdline"])
                and str(tmp_path) in " ".join(p.info["cmdline"])] == [pid]  # no duplicate
        stopped = second.stop("a")
        assert stopped.state == State.STOPPED and _gone(pid)
    finally:
        stop_all(first)


def test_agent_restart_relaunches_engine_that_died(tmp_path: Path, model: Path) -> None:
    settings = fast_settings(tmp_path)
    first = InstanceManager(settings, ProcessRunner(), plain_inventory)
    second = InstanceManager(settings, ProcessRunner(), plain_inventory)
    try:
        pid = first.start(spec(model)).pid
        first.wait_ready("a", 20)
        first.close()
        os.kill(pid, signal.SIGKILL)
        poll_until(lambda: _gone(pid))
        os.waitpid(pid, 0)  # our test process is the parent here; reap it
        assert second.recover() == ([], ["a"])
        assert second.wait_ready("a", 20).pid != pid
    finally:
        stop_all(second)


def _crash_mid_reconfigure(first: InstanceManager, model: Path, new_env: dict) -> int:
    """Start "a" (4 seqs), reconfigure it to 8 seqs in the background and let the agent go away
    once the new engine is launched (close(): the journal is left as a kill -9 leaves it).
    Returns the new engine's pid."""
    first.start(spec(model))
    first.wait_ready("a", 20)
    errors: list[Exception] = []

    def reconfigure() -> None:
        try:
            first.reconfigure("a", spec(model, max_num_seqs=8, env=new_env))
        except FailedPrecondition as exc:  # interrupted by close()
            errors.append(exc)

    thread = threading.Thread(target=reconfigure)
    thread.start()
    launched = poll_until(lambda: (s := first.get("a")).spec.max_num_seqs == 8
                          and s.state == State.STARTING and s)
    first.close()
    thread.join(20)
    assert errors and not thread.is_alive()
    return launched.pid


@pytest.fixture
def two_agents(tmp_path: Path) -> Iterator[tuple[EngineSettings, InstanceManager,
                                                 InstanceManager]]:
    """Two managers on one state dir: the agent that crashes and the one that recovers."""
    settings = fast_settings(tmp_path)
    first = InstanceManager(settings, ProcessRunner(), plain_inventory)
    second = InstanceManager(settings, ProcessRunner(), plain_inventory)
    yield settings, first, second
    stop_all(second)
    stop_all(first)


def test_agent_crash_mid_reconfigure_completes_with_the_new_engine(
    two_agents: tuple[EngineSettings, InstanceManager, InstanceManager], model: Path
) -> None:
    settings, first, second = two_agents
    new_pid = _crash_mid_reconfigure(first, model, {"FAKE_VLLM_STARTUP_S": "1"})
    assert second.recover() == (["a"], [])
    ready = second.wait_ready("a", 20)
    assert ready.pid == new_pid and ready.spec.max_num_seqs == 8 and ready.restarts == 0
    journal = poll_until(lambda: (j := json.loads(
        (settings.state_dir / JOURNAL_FILE).read_text()))["a"]["rollback_spec"] is None
        and j)  # completed: nothing left to roll back to
    assert journal["a"]["pid"] == new_pid


def test_agent_crash_mid_reconfigure_rolls_back_when_the_new_engine_dies(
    two_agents: tuple[EngineSettings, InstanceManager, InstanceManager], model: Path
) -> None:
    settings, first, second = two_agents
    bad_env = {"FAKE_VLLM_STARTUP_S": "60", "FAKE_VLLM_EXIT_AFTER_S": "2"}
    new_pid = _crash_mid_reconfigure(first, model, bad_env)
    journal = json.loads((settings.state_dir / JOURNAL_FILE).read_text())
    assert journal["a"]["rollback_spec"]["max_num_seqs"] == 4  # the old spec, journaled
    assert second.recover() == (["a"], [])
    second.start_monitor()  # must not restart the dying new engine meanwhile
    back = poll_until(lambda: (s := second.get("a")).state == State.READY and s)
    assert back.spec.max_num_seqs == 4 and back.spec.env == {}
    assert back.pid != new_pid and back.command[-1] == "4" and back.restarts == 0
    assert _gone(new_pid)
    journal = json.loads((settings.state_dir / JOURNAL_FILE).read_text())
    assert journal["a"]["pid"] == back.pid and journal["a"]["rollback_spec"] is None


def test_adopt_checks_create_time_and_cmdline(tmp_path: Path, model: Path) -> None:
    runner = ProcessRunner()
    with running_manager(fast_settings(tmp_path)) as manager:
        st = manager.start(spec(model))
        proc = psutil.Process(st.pid)
        assert runner.adopt(st.pid, proc.create_time(), st.command) is not None
        assert runner.adopt(st.pid, proc.create_time() + 5, st.command) is None  # reused pid
        assert runner.adopt(st.pid, proc.create_time(), [*st.command, "--x"]) is None


def test_engine_loads_for_tp_and_mig(tmp_path: Path, model: Path) -> None:
    mig_a, mig_b = "MIG-a-1", "MIG-a-2"
    inventory = DeviceInventory({0: False, 1: False, 2: True}, {mig_a: 2, mig_b: 2})
    with running_manager(fast_settings(tmp_path), inventory=lambda: inventory) as manager:
        manager.start(spec(model, "tp", devices=("0", "1"), tensor_parallel_size=2))
        manager.start(spec(model, "m1", devices=(mig_a,)))
        manager.start(spec(model, "m2", devices=(mig_b,), max_num_seqs=6))
        for iid in ("tp", "m1", "m2"):
            manager.wait_ready(iid, 20)
        manager.tick()
        loads = manager.engine_loads()
        assert loads[0].max_num_seqs == 4 and loads[1].max_num_seqs == 4
        assert loads[2].max_num_seqs == 10  # two MIG instances add up
        assert manager.busy_instances(2) == ["m1", "m2"]


def test_rotate_log_copy_truncate(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    with open(log, "ab") as writer:  # an engine keeps it open in append mode
        writer.write(b"a" * 100)
        writer.flush()
        assert rotate_log(log, max_bytes=50, backups=2)
        writer.write(b"next\n")
        writer.flush()
    assert (tmp_path / "x.log.1").read_bytes() == b"a" * 100
    assert log.read_bytes() == b"next\n"  # appended at the new end, no hole
    assert not rotate_log(log, max_bytes=50, backups=2)
