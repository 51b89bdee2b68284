"""GPU memory release after a stop (compute contexts gone before anything starts again), the
whole process tree killed, and recovery on MIG devices renamed by a reboot."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from nodeagent.device.sim import SimulatedBackend
from nodeagent.engines.manager import JOURNAL_FILE, InstanceManager, State
from nodeagent.engines.mig_repartition import MigRepartitioner
from nodeagent.engines.runner import ProcessRunner
from nodeagent.engines.spec import inventory_from_backend
from nodeagent.engines.wiring import mig_slices_from_backend
from shapeshifter.common.clock import ManualClock
from shapeshifter.common.errors import DeviceTimeout
from tests.fakes.engine_harness import (
    FAKE_VLLM,
    fast_settings,
    make_model_dir,
    plain_inventory,
    poll_until,
    spec,
    stop_all,
)


class FakeGpuProcesses:
    """compute_pids as NVML reports it: `held` pids keep a context on GPU 0 for `lag` more
    queries (the driver frees memory after the process is gone), or forever when lag < 0."""

    def __init__(self) -> None:
        self.held: frozenset[int] = frozenset()
        self.lag = 0
        self.queries = 0  # of GPU 0

    def __call__(self, index: int) -> frozenset[int]:
        if index != 0:
            return frozenset()
        self.queries += 1
        if self.lag == 0:
            return frozenset()
        self.lag -= 1
        return self.held


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _worker_pid(log: Path) -> int:
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("fake-vllm: worker pid")]
    return int(lines[0].rsplit(" ", 1)[1]) if lines else 0


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "model")


def test_stop_waits_until_no_gpu_lists_a_process_of_the_engine_tree(
    tmp_path: Path, model: Path
) -> None:
    gpu = FakeGpuProcesses()
    manager = InstanceManager(fast_settings(tmp_path), ProcessRunner(), plain_inventory,
                              compute_pids=gpu)
    try:
        manager.start(spec(model, env={"FAKE_VLLM_WORKER": "1"}))
        manager.wait_ready("a", 20)
        worker = poll_until(lambda: _worker_pid(tmp_path / "logs" / "a.log"))
        gpu.held, gpu.lag = frozenset({worker}), 3  # only the worker (a child) holds memory
        stopped = manager.stop("a")
        assert stopped.state == State.STOPPED
        assert gpu.queries == 4  # three answers listing the worker, then the one without
        assert _gone(worker)
    finally:
        stop_all(manager)


def test_release_timeout_is_an_error_and_nothing_starts_on_held_memory(
    tmp_path: Path, model: Path
) -> None:
    gpu = FakeGpuProcesses()
    settings = fast_settings(tmp_path, release_timeout_s=0.3)
    manager = InstanceManager(settings, ProcessRunner(), plain_inventory, compute_pids=gpu)
    try:
        pid = manager.start(spec(model)).pid
        manager.wait_ready("a", 20)
        gpu.held, gpu.lag = frozenset({pid}), -1  # a context the driver never frees
        with pytest.raises(DeviceTimeout, match=rf"not released .*\{{0: \[{pid}\]\}}"):
            manager.stop("a")
        failed = manager.get("a")
        assert failed.state == State.FAILED and "not released" in failed.last_log
        with pytest.raises(DeviceTimeout):
            manager.start(spec(model))  # the old context still holds GPU 0
        assert manager.get("a").state == State.FAILED
        gpu.lag = 0  # the driver lets go
        assert manager.start(spec(model)).state == State.STARTING
    finally:
        stop_all(manager)


ESCAPING_LAUNCHER = """
import os, subprocess, sys
if "--help" not in sys.argv:  # a worker that left the engine's session and process group
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=True)
    open(os.environ["ESCAPEE_FILE"], "w").write(str(child.pid))
os.execv(sys.executable, [sys.executable, {fake!r}, *sys.argv[1:]])
"""


def test_forced_stop_kills_the_whole_process_tree(tmp_path: Path, model: Path) -> None:
    script = tmp_path / "launcher.py"
    script.write_text(ESCAPING_LAUNCHER.format(fake=str(FAKE_VLLM)))
    pid_file = tmp_path / "escapee.pid"
    settings = fast_settings(tmp_path, launcher=(sys.executable, str(script)))
    manager = InstanceManager(settings, ProcessRunner(), plain_inventory)
    escapee = 0
    try:
        manager.start(spec(model, env={"ESCAPEE_FILE": str(pid_file)}))
        manager.wait_ready("a", 20)
        escapee = int(poll_until(lambda: pid_file.exists() and pid_file.read_text()))
        assert os.getpgid(escapee) != manager.get("a").pid  # out of reach of killpg
        manager.stop("a", force=True)
        poll_until(lambda: _gone(escapee), timeout_s=5)
    finally:
        stop_all(manager)
        if escapee:
            with contextlib.suppress(ProcessLookupError):
                os.kill(escapee, signal.SIGKILL)


@pytest.fixture
def mig_backend() -> SimulatedBackend:
    b = SimulatedBackend("a100-40gb", 2, ManualClock())
    b.set_mig_mode(0, True)
    b.apply_mig_layout(0, ["3g.20gb", "2g.10gb", "1g.5gb"])
    return b


def _crashed_agent_on_slice(tmp_path: Path, model: Path, backend: SimulatedBackend,
                            profile: str) -> tuple[InstanceManager, str]:
    """An agent ran instance "a" on the GPU 0 slice of this profile, then the node rebooted:
    the agent and the engine are gone. Returns (the next agent's manager, the old UUID)."""
    settings = fast_settings(tmp_path)

    def new_manager() -> InstanceManager:
        return InstanceManager(settings, ProcessRunner(), lambda: inventory_from_backend(backend),
                               mig_slices=lambda: mig_slices_from_backend(backend))

    first = new_manager()
    old = next(m.uuid for m in backend.mig_state(0).instances if m.profile == profile)
    pid = first.start(spec(model, devices=(old,))).pid
    first.wait_ready("a", 20)
    first.close()
    os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)  # our test process is the parent here; reap it
    return new_manager(), old


def test_recovery_relaunches_on_the_slice_at_the_same_placement(
    tmp_path: Path, model: Path, mig_backend: SimulatedBackend
) -> None:
    before = {m.uuid: (m.profile, m.placement_start) for m in mig_backend.mig_state(0).instances}
    second, old = _crashed_agent_on_slice(tmp_path, model, mig_backend, "2g.10gb")
    try:
        mig_backend.apply_mig_layout(0, ["3g.20gb", "2g.10gb", "1g.5gb"])  # after the reboot
        new = {m.uuid: (m.profile, m.placement_start) for m in mig_backend.mig_state(0).instances}
        assert old not in new
        assert second.recover() == ([], ["a"])
        ready = second.wait_ready("a", 20)
        (device,) = ready.spec.devices
        assert new[device] == before[old]
        assert psutil.Process(ready.pid).environ()["CUDA_VISIBLE_DEVICES"] == device
    finally:
        stop_all(second)


def test_recovery_refuses_a_slice_that_no_longer_exists(
    tmp_path: Path, model: Path, mig_backend: SimulatedBackend
) -> None:
    second, old = _crashed_agent_on_slice(tmp_path, model, mig_backend, "2g.10gb")
    try:
        mig_backend.apply_mig_layout(0, ["3g.20gb", "3g.20gb"])  # no 2g slice any more
        assert second.recover() == ([], [])
        failed = second.get("a")
        assert failed.state == State.FAILED and failed.pid == 0  # nothing was launched
        assert f"MIG device {old} (GPU 0, 2g.10gb at placement" in failed.last_log
        assert "not relaunched" in failed.last_log
    finally:
        stop_all(second)


def test_recovery_from_an_old_journal_without_slices_refuses_a_renamed_device(
    tmp_path: Path, model: Path, mig_backend: SimulatedBackend
) -> None:
    second, old = _crashed_agent_on_slice(tmp_path, model, mig_backend, "1g.5gb")
    try:
        path = tmp_path / "state" / JOURNAL_FILE
        journal = json.loads(path.read_text())
        assert journal["a"].pop("mig_slices") != {}  # as an older agent wrote it
        path.write_text(json.dumps(journal))
        mig_backend.apply_mig_layout(0, ["3g.20gb", "2g.10gb", "1g.5gb"])
        assert second.recover() == ([], [])
        assert f"MIG device {old} no longer exists and the journal does not record its GPU, " \
            "profile and placement" in second.get("a").last_log
    finally:
        stop_all(second)


def test_mig_layout_is_not_applied_while_a_stopped_engine_holds_memory(
    tmp_path: Path, model: Path, mig_backend: SimulatedBackend
) -> None:
    gpu = FakeGpuProcesses()
    settings = fast_settings(tmp_path, release_timeout_s=0.3)
    manager = InstanceManager(settings, ProcessRunner(),
                              lambda: inventory_from_backend(mig_backend), compute_pids=gpu)
    try:
        before = [m.uuid for m in mig_backend.mig_state(0).instances]
        pid = manager.start(spec(model, devices=(before[0],))).pid
        manager.wait_ready("a", 20)
        gpu.held, gpu.lag = frozenset({pid}), -1
        rep = MigRepartitioner(manager, mig_backend, settings.state_dir)
        with pytest.raises(DeviceTimeout, match="not released"):
            rep.repartition(0, ["3g.20gb", "3g.20gb"])
        assert [m.uuid for m in mig_backend.mig_state(0).instances] == before  # untouched
    finally:
        stop_all(manager)
