"""`shapectl profile` against the real vLLM CPU build serving the tiny model.

Needs SHAPESHIFTER_VLLM_PYTHON (the vLLM environment's python) and SHAPESHIFTER_TINY_MODEL (the
model folder); skipped, with the reason, when either is unset. τ is lowered to 50 tokens so that
a LISO request (100 prompt tokens, 5 output tokens) is quick on a CPU.
"""

from __future__ import annotations

import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.profiles.profiler import OpenAIEndpoint, build_prompt
from coordinator.profiles.schema import QueryClass, Source
from coordinator.profiles.store import load_csv
from tests.conftest import free_port, poll, run_cli

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

STARTUP_TIMEOUT_S = 600.0
SLO_P95_S = 30.0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    python = os.environ.get("SHAPESHIFTER_VLLM_PYTHON")
    model = os.environ.get("SHAPESHIFTER_TINY_MODEL")
    if not python or not model:
        reason = "set SHAPESHIFTER_VLLM_PYTHON and SHAPESHIFTER_TINY_MODEL to run against vLLM"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--served-model-name", "tiny", "--port", str(port), "--host", "127.0.0.1",
             "--max-model-len", "512", "--max-num-seqs", "8"],
            stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        poll(lambda: _healthy(url) or proc.poll() is not None, timeout_s=STARTUP_TIMEOUT_S,
             interval_s=1.0)
        assert proc.poll() is None, Path(log).read_text()[-5000:]
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_short_sweep_gives_a_measured_row_within_slo(vllm_url: str, tmp_path: Path) -> None:
    out = tmp_path / "tiny.csv"
    res = run_cli("shapectl", "profile", "--url", vllm_url, "--model", "tiny",
                  "--query-class", "LISO", "--slo-p95", str(SLO_P95_S), "--out", str(out),
                  "--tau", "50", "--max-concurrency", "4", "--min-requests", "4",
                  timeout_s=600)
    assert res.returncode == 0, res.stderr
    (row,) = load_csv(out)
    assert row.source is Source.MEASURED and row.query_class is QueryClass.LISO
    assert row.msrr_rps is not None and row.msrr_rps > 0
    assert row.p95_latency_s is not None and row.p95_latency_s <= SLO_P95_S
    # vLLM has /tokenize (exact prompt), streams (TTFT) and honours ignore_eos (exact output).
    assert "exact token ids" in row.provenance
    assert row.ttft_p95_s is not None and row.ttft_p95_s <= row.p95_latency_s
    assert row.throughput_tok_s == pytest.approx((row.throughput_rps or 0) * 5, rel=1e-6)


def test_prompt_and_output_lengths_are_exact(vllm_url: str) -> None:
    endpoint = OpenAIEndpoint(vllm_url, "tiny", timeout_s=120)
    prompt, exact = build_prompt(endpoint, 100)
    assert exact
    result = endpoint.complete(prompt, 7)
    assert result.ok, result.error
    assert (result.prompt_tokens, result.output_tokens) == (100, 7)
    assert result.ttft_s is not None and 0 < result.ttft_s <= result.latency_s
