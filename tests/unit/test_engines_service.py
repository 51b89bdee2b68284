"""gRPC translation of the instance RPCs and plan actions (the manager is the real one, driving
the fake engine; errors map through errors.grpc_code)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from nodeagent.actuation.plan import InstanceAction
from nodeagent.engines.service import InstanceService, spec_from_pb, spec_to_pb
from nodeagent.engines.spec import InstanceSpec
from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.common.errors import FailedPrecondition
from tests.fakes.engine_harness import fast_settings, make_model_dir, running_manager


class Aborted(Exception):
    pass


class FakeContext:
    """Records abort() like grpc.ServicerContext (which raises)."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted()


def test_spec_round_trip_and_defaults() -> None:
    spec = InstanceSpec("a", "tiny", "/m", ("MIG-1",), quantization="gptq", dtype="half",
                        max_num_seqs=3, max_model_len=64, gpu_memory_utilization=0.5,
                        port=9000, extra_args=("--enforce-eager",), env={"K": "v"},
                        priority_class="iaas", drain_timeout_s=5.0)
    assert spec_from_pb(spec_to_pb(spec)) == spec
    bare = spec_from_pb(pb.InstanceSpec(instance_id="b", devices=["0"]))
    assert (bare.quantization, bare.dtype, bare.priority_class, bare.drain_timeout_s) == (
        "none", "auto", "saas", 30.0)


def test_rpcs_and_errors(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model")
    with running_manager(fast_settings(tmp_path)) as manager:
        service = InstanceService(manager)
        ctx = FakeContext()
        with pytest.raises(Aborted):
            service.StartInstance(pb.StartInstanceRequest(), ctx)
        assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "spec" in ctx.details
        with pytest.raises(Aborted):
            service.StartInstance(pb.StartInstanceRequest(spec=pb.InstanceSpec(
                instance_id="a", endpoint="tiny", model_path=str(model), devices=["0"],
                tensor_parallel_size=1, max_num_seqs=0, quantization="int3")), ctx)
        assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "quantization" in ctx.details

        request = pb.StartInstanceRequest(spec=pb.InstanceSpec(
            instance_id="a", endpoint="tiny", model_path=str(model), devices=["0"],
            tensor_parallel_size=1, max_num_seqs=4))
        started = service.StartInstance(request, FakeContext())
        assert started.state == "STARTING" and started.pid > 0 and started.command[0]
        manager.wait_ready("a", 20)
        listed = service.ListInstances(pb.ListInstancesRequest(), FakeContext())
        assert [(i.spec.instance_id, i.state, i.routable) for i in listed.instances] == [
            ("a", "READY", True)]
        assert listed.instances[0].metrics.kv_cache_usage_frac == -1.0  # not scraped yet

        new_spec = pb.InstanceSpec(instance_id="a", endpoint="tiny", model_path=str(model),
                                   devices=["1"], tensor_parallel_size=1, max_num_seqs=8)
        reply = service.ReconfigureInstance(
            pb.ReconfigureInstanceRequest(instance_id="a", new_spec=new_spec), FakeContext())
        assert not reply.rolled_back
        assert [s.step for s in reply.steps] == ["drain", "stop", "start", "ready"]
        assert reply.instance.spec.devices == ["1"]

        with pytest.raises(Aborted):
            service.StopInstance(pb.StopInstanceRequest(instance_id="zz"), ctx)
        assert ctx.code == grpc.StatusCode.NOT_FOUND
        stopped = service.StopInstance(pb.StopInstanceRequest(instance_id="a"), FakeContext())
        assert stopped.state == "STOPPED" and not stopped.routable


def test_plan_actions(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model")
    with running_manager(fast_settings(tmp_path)) as manager:
        service = InstanceService(manager)
        spec = pb.InstanceSpec(instance_id="p", endpoint="tiny", model_path=str(model),
                               devices=["0"], tensor_parallel_size=1, max_num_seqs=4)
        assert service.run_instance_action(
            InstanceAction("start_instance", pb.StartInstanceRequest(spec=spec)))
        manager.wait_ready("p", 20)
        bad = pb.InstanceSpec()
        bad.CopyFrom(spec)
        bad.env["FAKE_VLLM_EXIT_AFTER_S"] = "0"
        with pytest.raises(FailedPrecondition, match="rolled back"):  # not achieved: a failure
            service.run_instance_action(InstanceAction(
                "reconfigure_instance",
                pb.ReconfigureInstanceRequest(instance_id="p", new_spec=bad)))
        stop = InstanceAction("stop_instance", pb.StopInstanceRequest(instance_id="p"))
        assert service.run_instance_action(stop) is True
        assert service.run_instance_action(stop) is False  # already stopped: nothing changed
