"""An agent killed (-9) in the middle of a reconfiguration or a MIG repartition: the restarted
agent (same state dir, same config) completes or rolls back the journaled sequence.

Real agent processes on the sim backend drive the fake engine (tests/fakes/fake_vllm.py); each
instance's spec env sets the fake's knobs (slow start, crash before READY, a pinned queue).
Engines run in their own sessions, so they outlive the killed agent: what the restarted agent
finds is exactly what a real crash leaves behind.

Outcomes, as the code decides them:
- reconfigure (InstanceManager.reconfigure, recover): the new engine is journaled with the old
  spec to fall back on. If it becomes READY the reconfigure is completed (the new engine is
  adopted, not restarted); if it dies before READY the old spec is started again (rolled back).
- MIG repartition (MigRepartitioner.resume): killed while stopping the instances -> rolled back
  (layout untouched, the stopped instances restarted on their old devices); killed once the
  layout is applied -> completed (the instances run on their new devices).
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
import yaml

from nodeagent.engines.mig_repartition import JOURNAL_FILE as MIG_JOURNAL
from shapeshifter.api.v1 import agent_pb2 as pb
from tests import conftest
from tests.conftest import AgentProcess, poll
from tests.fakes.engine_harness import (
    fake_engines,
    fake_launcher,
    kill_fake_engines,
    make_model_dir,
    post_json,
)

pytestmark = pytest.mark.slow

# H100 placements: old 2g@0 2g@2 3g@4, new 2g@0 1g@2 1g@3 3g@4. "x" keeps a 3g slice, "y" a
# 2g slice; both must move to a new device of their profile.
OLD_LAYOUT = ["3g.40gb", "2g.20gb", "2g.20gb"]
NEW_LAYOUT = ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]
NEW_PLACEMENTS = [(0, "2g.20gb"), (2, "1g.10gb"), (3, "1g.10gb"), (4, "3g.40gb")]


@dataclass
class Env:
    tmp: Path
    model: Path
    config: Path
    state: Path
    agents: list[AgentProcess] = field(default_factory=list)

    def agent(self, *, sim_gpus: int = 2) -> AgentProcess:
        """A real agent on the shared state dir."""
        agent = conftest.start_agent(self.state, "--config", str(self.config), sim_gpus=sim_gpus)
        self.agents.append(agent)
        return agent


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    config = {"version": 1, "engines": {
        "launcher": list(fake_launcher()), "health_interval_s": 0.1, "ready_timeout_s": 60,
        "shutdown_timeout_s": 5, "kill_grace_s": 2, "max_restarts": 2,
        "restart_backoff_s": 0.2, "restart_backoff_max_s": 1}}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    e = Env(tmp_path, make_model_dir(tmp_path / "model"), path, tmp_path / "state")
    yield e
    for agent in e.agents:  # agents first: a live one would restart the engines killed below
        if agent.proc.poll() is None:
            agent.stop(signal.SIGKILL)
    kill_fake_engines(e.model)  # never leave an engine behind, whatever failed


def _spec(model: Path, iid: str, devices: list[str], **kw: object) -> pb.InstanceSpec:
    fields = {"instance_id": iid, "endpoint": "tiny", "model_path": str(model),
              "devices": devices, "tensor_parallel_size": 1, "max_num_seqs": 4}
    return pb.InstanceSpec(**{**fields, **kw})


def _instances(agent: AgentProcess) -> dict[str, pb.Instance]:
    listed = agent.stub().ListInstances(pb.ListInstancesRequest(), timeout=5).instances
    return {i.spec.instance_id: i for i in listed}


def _all_ready(agent: AgentProcess, *iids: str) -> dict[str, pb.Instance] | None:
    found = _instances(agent)
    return found if all(i in found and found[i].state == "READY" for i in iids) else None


def _layout(agent: AgentProcess) -> list[tuple[int, str, str]]:
    """GPU 0's MIG devices: (placement start, profile, uuid)."""
    gpu = agent.stub().GetNode(pb.GetNodeRequest(), timeout=5).gpus[0]
    return sorted((m.placement_start, m.profile, m.uuid) for m in gpu.mig_instances)


def _flag(command: Sequence[str], name: str) -> str:
    args = list(command)
    return args[args.index(name) + 1]


def _placements(layout: list[tuple[int, str, str]]) -> list[tuple[int, str]]:
    return [(start, profile) for start, profile, _ in layout]


def _mig_journal(env: Env) -> dict | None:
    try:
        return json.loads((env.state / MIG_JOURNAL).read_text())
    except FileNotFoundError:
        return None


def _log_events(agent: AgentProcess, event: str) -> list[dict]:
    events = []
    for line in agent.log_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                events.append(record)
    return events


def _resumed(agent: AgentProcess) -> list[dict]:
    """The agent's log of a MIG repartition resumed at start (logged when it is over)."""
    return _log_events(agent, "mig_repartition_resumed")


def _kill_agent(agent: AgentProcess, pending: grpc.Future) -> None:
    """kill -9; the call in flight never gets its answer."""
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    assert pending.exception(timeout=10) is not None


# ---------------------------------------------------------------- reconfigure


def _reconfigure_and_kill(env: Env, new_env: dict[str, str]) -> tuple[int, int]:
    """Start "r1" (4 seqs), reconfigure it to 8 seqs with new_env, kill -9 the agent once the
    old engine is gone and the new one launched. Returns (old pid, new pid)."""
    first = env.agent()
    stub = first.stub()
    old_pid = stub.StartInstance(
        pb.StartInstanceRequest(spec=_spec(env.model, "r1", ["1"])), timeout=10).pid
    poll(lambda: _all_ready(first, "r1"))
    request = pb.ReconfigureInstanceRequest(
        instance_id="r1", new_spec=_spec(env.model, "r1", ["1"], max_num_seqs=8, env=new_env))
    pending = stub.ReconfigureInstance.future(request, timeout=120)

    def switched() -> pb.Instance | None:
        inst = _instances(first)["r1"]
        launched = inst.state == "STARTING" and inst.pid not in (0, old_pid)
        return inst if launched and inst.spec.max_num_seqs == 8 else None

    new_pid = poll(switched).pid
    assert not psutil.pid_exists(old_pid)  # drained and stopped before the new one started
    _kill_agent(first, pending)
    assert fake_engines(env.model).keys() == {new_pid}  # the new engine outlives the agent
    return old_pid, new_pid


def test_kill_9_while_the_new_engine_starts_completes_the_reconfigure(env: Env) -> None:
    _, new_pid = _reconfigure_and_kill(env, {"FAKE_VLLM_STARTUP_S": "10"})

    second = env.agent()
    assert _instances(second)["r1"].state == "STARTING"  # adopted while still starting
    ready = poll(lambda: _all_ready(second, "r1"), timeout_s=30)["r1"]
    assert ready.pid == new_pid  # the new engine, adopted: not restarted, not duplicated
    assert ready.spec.max_num_seqs == 8 and ready.restarts == 0
    assert _flag(ready.command, "--max-num-seqs") == "8"
    assert fake_engines(env.model).keys() == {new_pid}  # no orphan of the old spec either
    assert [e["instance_id"] for e in _log_events(second, "instance_adopted")] == ["r1"]
    assert not _log_events(second, "instance_relaunched")


def test_kill_9_then_the_new_engine_dies_rolls_the_reconfigure_back(env: Env) -> None:
    # The new spec's engine never answers /health and exits (code 3) after 6 s.
    new_env = {"FAKE_VLLM_STARTUP_S": "60", "FAKE_VLLM_EXIT_AFTER_S": "6"}
    old_pid, new_pid = _reconfigure_and_kill(env, new_env)

    second = env.agent()
    # The rollback is logged once its engine is READY: wait for both.
    ready = poll(lambda: _log_events(second, "reconfigure_rolled_back")
                 and (r := _all_ready(second, "r1")) and r["r1"], timeout_s=40)
    assert ready.spec.max_num_seqs == 4 and not ready.spec.env  # the old spec, again
    assert _flag(ready.command, "--max-num-seqs") == "4"
    assert ready.pid not in (old_pid, new_pid)
    assert fake_engines(env.model).keys() == {ready.pid}  # the failed new engine is gone


# ---------------------------------------------------------------- MIG repartition


def _mig_instances(env: Env, slow_start_s: float, **y_kw: object) -> tuple[AgentProcess, dict]:
    """An agent, GPU 0 in MIG mode with OLD_LAYOUT, "x" on its 3g slice and "y" on the
    first 2g slice, both READY. Returns (agent, {iid: old device})."""
    agent = env.agent(sim_gpus=1)
    stub = agent.stub()
    stub.SetMigMode(pb.SetMigModeRequest(gpu_index=0, enabled=True), timeout=5)
    stub.ApplyMigLayout(pb.ApplyMigLayoutRequest(gpu_index=0, profiles=OLD_LAYOUT), timeout=5)
    by_start = {start: uuid for start, _, uuid in _layout(agent)}
    old = {"x": by_start[4], "y": by_start[0]}
    knobs = {"FAKE_VLLM_STARTUP_S": str(slow_start_s)}
    for iid, kw in (("x", {}), ("y", y_kw)):
        spec = _spec(env.model, iid, [old[iid]], env=knobs, **kw)
        stub.StartInstance(pb.StartInstanceRequest(spec=spec), timeout=10)
    poll(lambda: _all_ready(agent, "x", "y"), timeout_s=30)
    return agent, old


def test_kill_9_while_stopping_the_instances_rolls_the_repartition_back(env: Env) -> None:
    """Killed while "y" drains ("x" already stopped): the layout was never touched, so resume()
    rolls back: "x" starts again on its old device, "y" (still running) is adopted.

    The sim GPU lives in the agent process: the restarted agent's sim starts with MIG off, and
    the actuator's journal re-applies the last applied mode and layout, here OLD_LAYOUT. As the
    first layout of a fresh sim it gets the same device UUIDs, so the old devices exist again,
    as they would on a real GPU (the driver keeps MIG devices when the agent dies)."""
    first, old = _mig_instances(env, 0, drain_timeout_s=120)
    layout_before = _layout(first)
    x_pid, y_pid = (_instances(first)[i].pid for i in ("x", "y"))
    y_port = _instances(first)["y"].spec.port
    post_json(y_port, "/fake/pin", {"running": 1, "waiting": 0})  # "y" drains until the kill
    pending = first.stub().ApplyMigLayout.future(
        pb.ApplyMigLayoutRequest(gpu_index=0, profiles=NEW_LAYOUT, restart_instances=True),
        timeout=120)

    def stopping() -> bool:
        journal, found = _mig_journal(env), _instances(first)
        return bool(journal and journal["phase"] == "stopping"
                    and found["x"].state == "STOPPED" and found["y"].state == "DRAINING")

    poll(stopping)
    _kill_agent(first, pending)
    assert fake_engines(env.model).keys() == {y_pid}

    second = env.agent(sim_gpus=1)
    found = poll(lambda: _resumed(second) and _all_ready(second, "x", "y"), timeout_s=30)
    assert _mig_journal(env) is None  # removed before the resume is logged
    assert _layout(second) == layout_before  # rolled back: the old layout, the same devices
    assert {iid: list(found[iid].spec.devices) for iid in ("x", "y")} == {
        iid: [device] for iid, device in old.items()}
    assert found["y"].pid == y_pid  # adopted, never stopped
    assert found["x"].pid != x_pid  # started again by the rollback
    assert fake_engines(env.model).keys() == {found["x"].pid, y_pid}
    assert [e["rolled_back"] for e in _resumed(second)] == [True]

    # Without restart_instances, a layout change under running instances is refused.
    with pytest.raises(grpc.RpcError) as err:
        second.stub().ApplyMigLayout(
            pb.ApplyMigLayoutRequest(gpu_index=0, profiles=NEW_LAYOUT), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "in use" in err.value.details()


def test_kill_9_while_restarting_on_new_devices_completes_the_repartition(env: Env) -> None:
    """Killed once the new layout is applied and both instances were launched on their new
    devices (still starting: 5 s startup): resume() completes; the restarted agent adopts both
    engines and the sequence ends with the instances READY on the new devices.

    The sim GPU lives in the agent process: the restarted agent's sim starts with MIG off and
    the actuator's journal re-applies the last applied layout, here NEW_LAYOUT, so the GPU
    reports the new profiles at the new placements. Its device UUIDs are those of a fresh sim's
    first layout, not the ones the first agent's sim handed out, so they are not compared with
    the instances' devices (a real GPU keeps its MIG devices, and their UUIDs, when the agent
    dies). For the same reason the kill waits until both engines are launched: on a fresh sim
    the journaled new devices would not exist yet, which says nothing about real GPUs."""
    first, old = _mig_instances(env, 5)
    old_pids = {iid: inst.pid for iid, inst in _instances(first).items()}
    pending = first.stub().ApplyMigLayout.future(
        pb.ApplyMigLayoutRequest(gpu_index=0, profiles=NEW_LAYOUT, restart_instances=True),
        timeout=120)

    def relaunched() -> dict | None:
        journal, found = _mig_journal(env), _instances(first)
        if not journal or journal["phase"] != "restarting":
            return None
        launched = all(found[i].state == "STARTING" and found[i].pid != old_pids[i]
                       and list(found[i].spec.devices) == journal["devices"][i]
                       for i in ("x", "y"))
        return journal if launched else None

    journal = poll(relaunched, timeout_s=30)
    # GetNode shows the sampler's snapshot, which catches up with the new layout within one
    # sampling interval (nothing marks it stale when the layout changes inside a repartition).
    new_layout = poll(lambda: (m := _layout(first)) and _placements(m) == NEW_PLACEMENTS and m)
    new_pids = {iid: inst.pid for iid, inst in _instances(first).items()}
    _kill_agent(first, pending)
    assert fake_engines(env.model).keys() == set(new_pids.values())

    second = env.agent(sim_gpus=1)
    found = poll(lambda: _resumed(second) and _all_ready(second, "x", "y"), timeout_s=30)
    assert _mig_journal(env) is None  # removed before the resume is logged
    for iid in ("x", "y"):
        assert list(found[iid].spec.devices) == journal["devices"][iid] != [old[iid]]
        assert found[iid].pid == new_pids[iid]  # adopted: not restarted, not duplicated
    assert fake_engines(env.model).keys() == set(new_pids.values())
    assert _placements(_layout(second)) == NEW_PLACEMENTS  # the journaled new layout
    by_uuid = {uuid: profile for _, profile, uuid in new_layout}
    assert by_uuid[journal["devices"]["x"][0]] == "3g.40gb"  # each kept its profile
    assert by_uuid[journal["devices"]["y"][0]] == "2g.20gb"
    assert [e["rolled_back"] for e in _resumed(second)] == [False]
