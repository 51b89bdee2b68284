"""Instance RPCs through a real nodeagent process (sim backend) driving the fake engine:
start -> READY -> listed in GetNode, bad input refused, drain-stop, and re-adoption across an
agent restart (same pid, no duplicate)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import psutil
import pytest
import yaml

from nodeagent.engines.runner import UNKNOWN_EXIT_CODE
from shapeshifter.api.v1 import agent_pb2 as pb
from tests.conftest import AgentProcess, poll
from tests.fakes.engine_harness import fake_launcher, make_model_dir, post_json


def _write_config(tmp_path: Path) -> Path:
    config = {"version": 1, "engines": {"launcher": list(fake_launcher()), "health_interval_s": 0.1,
                          "shutdown_timeout_s": 5, "kill_grace_s": 2}}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _spec(model: Path, **kw: object) -> pb.InstanceSpec:
    fields = {"instance_id": "e1", "endpoint": "tiny", "model_path": str(model),
              "devices": ["1"], "tensor_parallel_size": 1, "max_num_seqs": 4}
    return pb.InstanceSpec(**{**fields, **kw})


def _instance(agent: AgentProcess, iid: str = "e1") -> pb.Instance | None:
    listed = agent.stub().ListInstances(pb.ListInstancesRequest(), timeout=5)
    return next((i for i in listed.instances if i.spec.instance_id == iid), None)


def _kill_group(pid: int) -> None:
    if pid and psutil.pid_exists(pid):
        os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "model")


@pytest.mark.slow
def test_instance_lifecycle_over_grpc(agent_factory, tmp_path: Path, model: Path) -> None:
    config = _write_config(tmp_path)
    agent = agent_factory("--config", str(config), sim_gpus=2)
    stub = agent.stub()
    pid = 0
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.StartInstance(pb.StartInstanceRequest(spec=_spec(model, devices=["1", "0"])),
                               timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tensor_parallel_size" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.StartInstance(pb.StartInstanceRequest(spec=_spec(model, devices=["5"])),
                               timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.ListInstances(pb.ListInstancesRequest(), timeout=5).instances == []

        started = stub.StartInstance(pb.StartInstanceRequest(spec=_spec(model)), timeout=10)
        pid = started.pid
        assert started.state == "STARTING" and started.spec.port > 0
        assert "--max-num-seqs" in started.command
        ready = poll(lambda: (i := _instance(agent)) is not None and i.state == "READY" and i)
        assert ready.routable
        reply = post_json(ready.spec.port, "/v1/completions",
                          {"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert reply["choices"][0]["text"]
        poll(lambda: _instance(agent).metrics.generation_tokens_total == 3)
        node = stub.GetNode(pb.GetNodeRequest(), timeout=5)
        assert [i.spec.instance_id for i in node.instances] == ["e1"]
        budget = poll(lambda: (b := stub.GetNode(pb.GetNodeRequest(), timeout=5).gpus[1].budget)
                      .requests_capacity == 4 and b)
        assert budget.kv_cache_usage_frac == 0.0  # reported by the engine (-1 = none)

        # The sim GPU's power follows the engine's load (sim.load idle: engines drive it).
        def gpu(index: int) -> pb.Gpu:
            return stub.GetNode(pb.GetNodeRequest(), timeout=5).gpus[index]

        idle_w = gpu(1).power_draw_w
        post_json(ready.spec.port, "/fake/pin", {"running": 4, "waiting": 0})
        poll(lambda: gpu(1).power_draw_w > max(idle_w, gpu(0).power_draw_w) + 50)
        post_json(ready.spec.port, "/fake/pin", {"running": 0, "waiting": 0})

        agent.stop()  # SIGTERM: the agent exits, the engine keeps running
        assert psutil.pid_exists(pid)
        second = agent_factory("--config", str(config), sim_gpus=2, state_dir=agent.state_dir)
        adopted = poll(lambda: (i := _instance(second)) is not None and i.state == "READY" and i)
        assert adopted.pid == pid  # adopted, not restarted

        stopped = second.stub().StopInstance(pb.StopInstanceRequest(instance_id="e1"), timeout=30)
        assert stopped.state == "STOPPED"
        assert stopped.exit_code == UNKNOWN_EXIT_CODE  # not our child: its status is init's
        assert not psutil.pid_exists(pid)
        with pytest.raises(grpc.RpcError) as err:
            second.stub().StopInstance(pb.StopInstanceRequest(instance_id="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        _kill_group(pid)
