"""MIG repartition under running instances, against the simulated backend, with crashes midway."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.device.sim import SimulatedBackend
from nodeagent.engines.manager import InstanceManager, State
from nodeagent.engines.mig_repartition import JOURNAL_FILE, MigRepartitioner
from nodeagent.engines.runner import ProcessRunner
from nodeagent.engines.spec import inventory_from_backend
from shapeshifter.common.clock import ManualClock
from shapeshifter.common.errors import InvalidArgument
from tests.fakes.engine_harness import fast_settings, make_model_dir, spec, stop_all


class AgentCrash(BaseException):
    """Stands for the agent dying at this point (not an error the code may catch)."""


@pytest.fixture
def backend() -> SimulatedBackend:
    b = SimulatedBackend("a100-40gb", 2, ManualClock())
    b.set_mig_mode(0, True)
    b.apply_mig_layout(0, ["3g.20gb", "3g.20gb"])
    return b


@pytest.fixture
def env(tmp_path: Path, backend: SimulatedBackend):
    """(settings, model dir, a manager running instances "x" and "y" on GPU 0's two slices)."""
    settings = fast_settings(tmp_path)
    model = make_model_dir(tmp_path / "model")
    managers: list[InstanceManager] = []

    def new_manager() -> InstanceManager:
        m = InstanceManager(settings, ProcessRunner(), lambda: inventory_from_backend(backend))
        managers.append(m)
        return m

    manager = new_manager()
    slices = [m.uuid for m in backend.mig_state(0).instances]
    for iid, device in zip(("x", "y"), slices, strict=True):
        manager.start(spec(model, iid, devices=(device,)))
    for iid in ("x", "y"):
        manager.wait_ready(iid, 20)
    yield settings, new_manager, manager, slices
    for m in reversed(managers):
        stop_all(m)


def _profiles(backend: SimulatedBackend) -> list[str]:
    return [m.profile for m in backend.mig_state(0).instances]


def test_repartition_restarts_instances_on_new_devices(backend, env) -> None:
    settings, _, manager, old = env
    pids = {iid: manager.get(iid).pid for iid in ("x", "y")}
    rep = MigRepartitioner(manager, backend, settings.state_dir)
    result = rep.repartition(0, ["3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"],
                             placement={"y": "2g.10gb"})
    assert not result.rolled_back
    new = {m.uuid: m.profile for m in backend.mig_state(0).instances}
    assert new[result.devices_by_instance["x"][0]] == "3g.20gb"  # kept its profile
    assert new[result.devices_by_instance["y"][0]] == "2g.10gb"  # moved as asked
    for iid in ("x", "y"):
        status = manager.get(iid)
        assert status.state == State.READY and status.pid != pids[iid]
        assert status.spec.devices == result.devices_by_instance[iid]
        assert not set(status.spec.devices) & set(old)
    assert not (settings.state_dir / JOURNAL_FILE).exists()


def test_invalid_request_changes_nothing(backend, env) -> None:
    settings, _, manager, old = env
    pids = {iid: manager.get(iid).pid for iid in ("x", "y")}
    rep = MigRepartitioner(manager, backend, settings.state_dir)
    with pytest.raises(InvalidArgument, match="lacks MIG devices") as err:
        rep.repartition(0, ["3g.20gb", "1g.5gb"])  # y needs a second 3g slice
    assert err.value.field == "placement"
    with pytest.raises(InvalidArgument, match=r"unknown MIG profile 9g\.99gb"):
        rep.repartition(0, ["9g.99gb"])
    assert {iid: manager.get(iid).pid for iid in ("x", "y")} == pids
    assert [m.uuid for m in backend.mig_state(0).instances] == old


def test_failed_apply_rolls_back(backend, env) -> None:
    settings, _, manager, old = env

    def refuse(index: int, profiles: list[str]) -> None:
        raise InvalidArgument("driver refused the layout", field="profiles")

    rep = MigRepartitioner(manager, backend, settings.state_dir, apply_layout=refuse)
    result = rep.repartition(0, ["3g.20gb", "3g.20gb"])
    assert result.rolled_back and "driver refused" in result.message
    assert {iid: manager.get(iid).spec.devices[0] for iid in ("x", "y")} == dict(
        zip(("x", "y"), old, strict=True))
    assert all(manager.get(iid).state == State.READY for iid in ("x", "y"))


def test_crash_after_layout_applied_resumes_forward(backend, env) -> None:
    settings, new_manager, manager, old = env

    def apply_then_crash(index: int, profiles: list[str]) -> None:
        backend.apply_mig_layout(index, profiles)
        raise AgentCrash()

    with pytest.raises(AgentCrash):
        MigRepartitioner(manager, backend, settings.state_dir,
                         apply_layout=apply_then_crash).repartition(0, ["3g.20gb", "3g.20gb"])
    manager.close()  # the agent is gone; a new one starts
    after = new_manager()
    assert after.recover() == ([], [])  # both were stopped before the crash
    result = MigRepartitioner(after, backend, settings.state_dir).resume()
    assert result is not None and not result.rolled_back
    new_uuids = [m.uuid for m in backend.mig_state(0).instances]
    assert not set(new_uuids) & set(old)
    assert sorted(after.get(i).spec.devices[0] for i in ("x", "y")) == sorted(new_uuids)
    assert all(after.get(i).state == State.READY for i in ("x", "y"))
    assert _profiles(backend) == ["3g.20gb", "3g.20gb"]  # applied once, not re-applied
    assert MigRepartitioner(after, backend, settings.state_dir).resume() is None


def test_crash_while_stopping_rolls_back(backend, env) -> None:
    settings, new_manager, manager, old = env
    y_pid = manager.get("y").pid

    class CrashOnSecondStop:
        def __init__(self) -> None:
            self.stops = 0

        def __getattr__(self, name: str):
            return getattr(manager, name)

        def stop(self, iid: str, **kw):
            self.stops += 1
            if self.stops == 2:
                raise AgentCrash()
            return manager.stop(iid, **kw)

    with pytest.raises(AgentCrash):
        rep = MigRepartitioner(CrashOnSecondStop(), backend, settings.state_dir)  # type: ignore[arg-type]
        rep.repartition(0, ["3g.20gb", "3g.20gb"])
    manager.close()
    after = new_manager()
    assert after.recover() == (["y"], [])  # y still ran: adopted, not restarted
    result = MigRepartitioner(after, backend, settings.state_dir).resume()
    assert result is not None and result.rolled_back
    assert [m.uuid for m in backend.mig_state(0).instances] == old  # layout untouched
    assert after.wait_ready("x", 20).spec.devices == (old[0],)
    assert after.wait_ready("y", 20).pid == y_pid
