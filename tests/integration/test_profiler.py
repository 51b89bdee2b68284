"""`shapectl profile` end to end against the fake vLLM server (real HTTP) and a sim node agent.

The fake serves --max-num-seqs requests at a time, each taking max_tokens x token delay, so its
capacity is known: 2 slots x 50 tokens x 2 ms = 0.1 s per request -> at most 20 req/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.profiles.profiler import OpenAIEndpoint, SweepConfig, sweep
from coordinator.profiles.schema import COLUMNS, QueryClass, Source
from coordinator.profiles.store import load_csv
from shapeshifter.api.v1 import agent_pb2 as pb
from tests.conftest import free_port, poll, run_cli, start_agent

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "fake_vllm.py"
SLOTS, TOKEN_DELAY_S, OUT_TOKENS = 2, 0.002, 50
CAPACITY_RPS = SLOTS / (OUT_TOKENS * TOKEN_DELAY_S)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def engine_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake") / "fake.log"
    env = {**os.environ, "FAKE_VLLM_TOKEN_DELAY_S": str(TOKEN_DELAY_S)}
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, str(FAKE), "--model", "/nonexistent/tiny", "--served-model-name",
             "tiny", "--port", str(port), "--max-num-seqs", str(SLOTS)],
            stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        poll(lambda: _healthy(url) or proc.poll() is not None, timeout_s=20)
        assert proc.poll() is None, log.read_text()
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_cli_sweep_writes_rows_that_load_back(engine_url: str, tmp_path: Path) -> None:
    out = tmp_path / "profiles.csv"
    slo_s = 0.35
    res = run_cli("shapectl", "profile", "--url", engine_url, "--model", "tiny",
                  "--query-class", "LISO", "--slo-p95", str(slo_s), "--out", str(out),
                  "--min-requests", "8", "--max-concurrency", "16", "--json", timeout_s=120)
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    (row,) = load_csv(out)
    assert printed == [row.to_dict()]
    assert row.source is Source.MEASURED and row.query_class is QueryClass.LISO
    assert row.msrr_rps is not None and 0 < row.msrr_rps <= CAPACITY_RPS * 1.05
    assert row.p95_latency_s is not None and row.p95_latency_s <= slo_s
    assert row.max_concurrency is not None and row.max_concurrency >= SLOTS
    # The fake has no /tokenize and does not stream: both are said, not hidden.
    assert "approximate" in row.provenance and row.ttft_p95_s is None
    assert row.throughput_tok_s == pytest.approx(row.throughput_rps * OUT_TOKENS)  # type: ignore[operator]

    listed = run_cli("shapectl", "profiles", "list", "--json", "--file", str(out))
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert all(set(r) == set(COLUMNS) for r in rows)
    assert {r["source"] for r in rows} == {"measured", "published", "derived"}
    assert row.to_dict() in rows


def test_sweep_reads_power_from_an_agent(engine_url: str) -> None:
    class ConstantAgent:
        def gpu_type(self, gpu: int) -> str:
            return "a100-80gb"

        def is_simulated(self) -> bool:
            return False

        def power_w(self, gpu: int) -> float:
            return 123.0

        def memory_used_gb(self, gpu: int) -> float:
            return 7.25

        def lock_clocks(self, gpu: int, sm_clock_mhz: int) -> None:
            raise AssertionError("no clocks asked for")

        reset_clocks = lock_clocks  # type: ignore[assignment]

    cfg = SweepConfig(model="tiny", query_class=QueryClass.SISO, slo_p95_s=5.0,
                      prompt_tokens=20, output_tokens=OUT_TOKENS, max_concurrency=2,
                      min_requests_per_step=4, power_interval_s=0.02, url=engine_url)
    result = sweep(cfg, OpenAIEndpoint(engine_url, "tiny"), agent=ConstantAgent())
    (row,) = result.rows
    assert row.avg_power_w == 123.0
    assert row.memory_gb == 7.25
    assert row.energy_per_token_j == pytest.approx(123.0 / (row.throughput_tok_s or 1), rel=1e-4)


def test_clock_sweep_through_a_sim_agent(engine_url: str, tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "state", "--sim-load", "busy", "--interval-s", "0.2",
                        sim_gpus=1, gpu_type="a100-80gb")
    try:
        out = tmp_path / "clocks.csv"
        common = ["shapectl", "profile", "--url", engine_url, "--model", "tiny",
                  "--query-class", "SISO", "--slo-p95", "5", "--out", str(out),
                  "--agent", agent.address, "--gpu", "0", "--max-concurrency", "2",
                  "--min-requests", "4", "--output-tokens", "10"]
        refused = run_cli(*common, "--clocks", "1200")
        assert refused.returncode == 2 and "--allow-sim" in refused.stderr
        assert not out.exists()

        res = run_cli(*common, "--clocks", "1200,900", "--allow-sim", timeout_s=120)
        assert res.returncode == 0, res.stderr
        rows = load_csv(out)
        assert [r.sm_clock_mhz for r in rows] == [1200, 900]
        assert all(r.gpu_type == "a100-80gb" for r in rows)
        assert all(r.avg_power_w is not None and r.avg_power_w > 0 for r in rows)
        gpu = agent.stub().GetNode(pb.GetNodeRequest(), timeout=5).gpus[0]
        assert not gpu.HasField("clock_lock")  # reset after the sweep
    finally:
        agent.stop()
