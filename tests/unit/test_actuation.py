from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodeagent.actuation.actuator import Actuator
from nodeagent.actuation.journal import Journal
from nodeagent.actuation.plan import (
    ApplyMigLayout,
    InstanceAction,
    NodeAction,
    NodePlan,
    SetPowerLimit,
)
from nodeagent.actuation.power import check_failsafe_w, failsafe_ceilings_w
from nodeagent.device.sim import SimulatedBackend
from shapeshifter.common.clock import ManualClock
from shapeshifter.common.errors import (
    FailedPrecondition,
    InUse,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)


class RecordingLog:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.records.append((level, event, kw))


class Fixture:
    def __init__(self, state_dir: Path, n_gpus: int = 2) -> None:
        self.clock = ManualClock()
        self.backend = SimulatedBackend("h100-80gb", n_gpus, self.clock)
        self.state_dir = state_dir
        self.log = RecordingLog()
        self.actuator = self.new_actuator()

    def new_actuator(self, backend: Any = None) -> Actuator:
        journal = Journal.open(self.state_dir)
        actuator = Actuator(backend or self.backend, journal, self.clock, self.log)
        actuator.capture_defaults()
        return actuator

    def limit_w(self, index: int) -> float:
        return self.backend.telemetry(index).power_limit_w

    def journal_text(self) -> str:
        path = self.state_dir / "journal.json"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def fx(tmp_path: Path) -> Fixture:
    return Fixture(tmp_path)


def test_power_limit_validated_against_device_range(fx: Fixture) -> None:
    before = fx.journal_text()
    with pytest.raises(InvalidArgument) as info:
        fx.actuator.set_power_limit(0, 900)
    assert str(info.value) == "power_limit_w=900 W is outside the allowed range [200, 700] W"
    with pytest.raises(InvalidArgument):
        fx.actuator.set_power_limit(0, float("nan"))
    assert fx.limit_w(0) == 700 and fx.journal_text() == before


def test_unknown_gpu_names_index_and_range(fx: Fixture) -> None:
    with pytest.raises(NotFound, match=r"gpu_index=5 not found; valid range \[0, 1\]"):
        fx.actuator.set_power_limit(5, 300)


def test_read_before_write(fx: Fixture) -> None:
    assert fx.actuator.set_power_limit(0, 400)
    assert not fx.actuator.set_power_limit(0, 400)
    assert fx.limit_w(0) == 400


def test_ceiling_caps_applied_limit_and_lifts(fx: Fixture) -> None:
    fx.actuator.set_power_limit(0, 600)
    fx.actuator.set_power_ceilings_w({0: 420.0}, "failsafe")
    fx.actuator.set_power_ceilings_w({0: 500.0}, "thermal")
    assert fx.limit_w(0) == 420  # the lowest ceiling wins
    state = fx.actuator.power_state(0)
    assert (state.requested_w, state.ceiling_w, state.ceiling_source) == (600, 420, "failsafe")
    fx.actuator.set_power_limit(0, 300)  # below the ceiling: the request wins
    assert fx.limit_w(0) == 300
    fx.actuator.set_power_limit(0, 650)
    fx.actuator.set_power_ceilings_w({0: None}, "failsafe")
    assert fx.limit_w(0) == 500
    fx.actuator.set_power_ceilings_w({0: 50.0}, "thermal")
    assert fx.limit_w(0) == 200  # clamped to the device minimum
    fx.actuator.set_power_ceilings_w({0: None}, "thermal")
    assert fx.limit_w(0) == 650


def test_bad_ceiling_changes_nothing(fx: Fixture) -> None:
    with pytest.raises(NotFound):
        fx.actuator.set_power_ceilings_w({0: 300.0, 9: 300.0}, "lease")
    with pytest.raises(InvalidArgument, match="power_ceiling_w"):
        fx.actuator.set_power_ceilings_w({0: 300.0, 1: -1.0}, "lease")
    assert fx.limit_w(0) == 700 and fx.actuator.power_state(0).ceiling_w is None


def test_failsafe_ceilings() -> None:
    assert failsafe_ceilings_w(0.6, {1: 300.0}, {0: 700.0, 1: 700.0}) == {0: 420.0, 1: 300.0}


def test_clock_lock_validation(fx: Fixture) -> None:
    clocks = fx.backend.supported_clocks(0)
    with pytest.raises(InvalidArgument, match="max_mhz=5000 MHz is outside the allowed range"):
        fx.actuator.lock_clocks(0, 1000, 5000)
    with pytest.raises(InvalidArgument, match="must not exceed"):
        fx.actuator.lock_clocks(0, 1500, 1000)
    assert fx.actuator.clock_lock_mhz(0) is None
    assert fx.actuator.lock_clocks(0, clocks.sm_min_mhz, 1200)
    assert not fx.actuator.lock_clocks(0, clocks.sm_min_mhz, 1200)
    assert fx.actuator.reset_clocks(0)
    assert not fx.actuator.reset_clocks(0)


def test_mig_refused_while_processes_or_instances(fx: Fixture) -> None:
    fx.backend.set_processes(0, [4242])
    with pytest.raises(InUse, match=r"processes \[4242\]"):
        fx.actuator.set_mig_mode(0, True)
    fx.backend.set_processes(0, [])
    fx.actuator.busy_instances = lambda i: ["llama"] if i == 0 else []
    with pytest.raises(InUse, match="llama"):
        fx.actuator.set_mig_mode(0, True)
    assert not fx.backend.mig_state(0).enabled
    assert fx.actuator.set_mig_mode(1, True)  # other GPUs are free


def test_mig_layout_requires_mig_mode_and_valid_profiles(fx: Fixture) -> None:
    with pytest.raises(FailedPrecondition, match="MIG mode is disabled"):
        fx.actuator.apply_mig_layout(0, ["3g.40gb"])
    fx.actuator.set_mig_mode(0, True)
    with pytest.raises(InvalidArgument, match="profiles"):
        fx.actuator.apply_mig_layout(0, ["3g.40gb", "3g.40gb", "3g.40gb"])
    assert fx.backend.mig_state(0).instances == ()
    assert fx.actuator.apply_mig_layout(0, ["3g.40gb", "3g.40gb"])
    assert not fx.actuator.apply_mig_layout(0, ["3g.40gb", "3g.40gb"])


def test_mig_parted_validates_every_gpu_before_changing_any(fx: Fixture) -> None:
    text = (
        "version: v1\nmig-configs:\n  c:\n"
        "    - devices: [0]\n      mig-enabled: true\n      mig-devices: {3g.40gb: 2}\n"
        "    - devices: [1]\n      mig-enabled: true\n      mig-devices: {9g.1gb: 1}\n"
    )
    with pytest.raises(InvalidArgument, match=r"9g\.1gb"):
        fx.actuator.apply_mig_parted(text, "c")
    assert not fx.backend.mig_state(0).enabled
    fixed = text.replace("9g.1gb", "7g.80gb")
    assert fx.actuator.apply_mig_parted(fixed, "c")
    assert [i.profile for i in fx.backend.mig_state(1).instances] == ["7g.80gb"]
    assert not fx.actuator.apply_mig_parted(fixed, "c")


def test_restore_defaults_undoes_everything(fx: Fixture) -> None:
    fx.actuator.set_power_limit(0, 350)
    fx.actuator.lock_clocks(1, 1000, 1200)
    fx.actuator.set_mig_mode(1, True)
    fx.actuator.apply_mig_layout(1, ["1g.10gb"])
    fx.actuator.set_power_ceilings_w({1: 300.0}, "thermal")
    assert fx.actuator.restore_defaults() == []
    assert fx.limit_w(0) == 700 and fx.limit_w(1) == 700
    assert not fx.backend.mig_state(1).enabled and fx.backend.mig_state(1).instances == ()
    fx.backend.set_load(1, 1.0)
    fx.clock.advance(5)
    assert fx.backend.telemetry(1).sm_clock_mhz > 1200  # unlocked again
    assert '"requested": {}' in fx.journal_text()


def test_reapply_after_driver_forgot(fx: Fixture) -> None:
    fx.actuator.set_power_limit(0, 350)
    fx.actuator.lock_clocks(1, 1000, 1100)
    fx.actuator.set_mig_mode(1, True)
    fx.actuator.apply_mig_layout(1, ["4g.40gb"])
    fresh = SimulatedBackend("h100-80gb", 2, fx.clock)  # a reboot: the device is at defaults
    actuator = fx.new_actuator(fresh)
    assert actuator.reapply_journal() == []
    assert fresh.telemetry(0).power_limit_w == 350
    assert actuator.clock_lock_mhz(1) == (1000, 1100)
    assert [i.profile for i in fresh.mig_state(1).instances] == ["4g.40gb"]
    assert Journal.open(fx.state_dir).defaults(0).power_limit_w == 700  # first-start defaults


class FailingBackend:
    """The sim, except that the driver refuses power-limit writes."""

    def __init__(self, inner: SimulatedBackend) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def set_power_limit_w(self, index: int, power_limit_w: float) -> None:
        raise PermissionDenied("nvmlDeviceSetPowerManagementLimit: insufficient permissions")


def test_failed_write_surfaces_and_is_not_journaled(fx: Fixture) -> None:
    actuator = fx.new_actuator(FailingBackend(fx.backend))
    before = fx.journal_text()
    with pytest.raises(PermissionDenied, match="insufficient permissions"):
        actuator.set_power_limit(0, 300)
    assert fx.limit_w(0) == 700
    assert fx.journal_text() == before
    assert ("error", "device write failed") in [(lvl, ev) for lvl, ev, _ in fx.log.records]
    with pytest.raises(PermissionDenied):
        actuator.set_power_ceilings_w({0: 400.0}, "lease")


def test_plan_epochs_and_stop_at_first_failure(fx: Fixture) -> None:
    plan = NodePlan("p", 4, (
        NodeAction("a", SetPowerLimit(0, 300)),
        NodeAction("b", SetPowerLimit(0, 9000)),
        NodeAction("c", SetPowerLimit(1, 300)),
    ))  # fmt: skip
    outcome = fx.actuator.apply_plan(plan)
    assert not outcome.completed
    assert [(r.action_id, r.ok, r.code) for r in outcome.results] == [
        ("a", True, "OK"),
        ("b", False, "INVALID_ARGUMENT"),
    ]
    assert fx.limit_w(1) == 700
    with pytest.raises(
        FailedPrecondition, match="plan epoch 3 is older than the newest seen epoch 4"
    ):
        fx.actuator.apply_plan(NodePlan("old", 3, (NodeAction("x", SetPowerLimit(1, 300)),)))
    assert fx.limit_w(1) == 700
    assert fx.actuator.apply_plan(NodePlan("same", 4, ())).completed
    assert Journal.open(fx.state_dir).epoch_seen == 4


def test_instance_actions_delegate(fx: Fixture) -> None:
    action = InstanceAction("stop_instance", object())
    outcome = fx.actuator.apply_plan(NodePlan("p", 1, (NodeAction("s", action),)))
    assert outcome.results[0].message == "no engine manager configured"

    class Runner:
        def __init__(self) -> None:
            self.seen: list[InstanceAction] = []

        def run_instance_action(self, a: InstanceAction) -> bool:
            self.seen.append(a)
            return True

    fx.actuator.instance_runner = runner = Runner()
    outcome = fx.actuator.apply_plan(NodePlan("p", 1, (NodeAction("s", action),)))
    assert outcome.completed and outcome.results[0].changed and runner.seen == [action]


def test_mig_parted_action_in_plan(fx: Fixture) -> None:
    text = "version: v1\nmig-configs:\n  all7:\n    - devices: all\n      mig-enabled: false\n"
    fx.actuator.set_mig_mode(0, True)
    plan = NodePlan("p", 1, (NodeAction("m", ApplyMigLayout(0, (), text, "all7")),))
    assert fx.actuator.apply_plan(plan).completed
    assert not fx.backend.mig_state(0).enabled


def test_failsafe_watts_checked_against_device(fx: Fixture) -> None:
    constraints = {i: fx.backend.power_constraints(i) for i in (0, 1)}
    check_failsafe_w({0: 300.0}, constraints)
    with pytest.raises(InvalidArgument, match=r"failsafe.power_limit_w\[1\]=900 W is outside"):
        check_failsafe_w({1: 900.0}, constraints)
    with pytest.raises(NotFound, match=r"gpu_index=4 not found"):
        check_failsafe_w({4: 300.0}, constraints)
