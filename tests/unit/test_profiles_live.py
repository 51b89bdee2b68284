"""Query classes of live traffic from two /metrics scrapes: exact at a bucket bound, interpolated
otherwise, clear errors; and `shapectl classify --url` against a real HTTP server."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from coordinator.profiles.live import classify_window, fraction_at_most, observe
from coordinator.profiles.schema import QueryClass
from shapectl.cli import main as shapectl_main
from shapeshifter.common.errors import FailedPrecondition, InvalidArgument
from shapeshifter.vllm.metrics import PROMPT_LENGTH, Histogram, parse_metrics

BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


def metrics_text(prompts: Sequence[int], outputs: Sequence[int]) -> str:
    """vLLM-style histograms of the given per-request token counts."""
    lines: list[str] = []
    for name, values in (("vllm:request_prompt_tokens", prompts),
                         ("vllm:request_generation_tokens", outputs)):
        lines.append(f"# TYPE {name} histogram")
        for le in (*BOUNDS, math.inf):
            le_text = "+Inf" if math.isinf(le) else f"{float(le)}"
            n = sum(v <= le for v in values)
            lines.append(f'{name}_bucket{{engine="0",le="{le_text}"}} {n}')
        lines.append(f'{name}_count{{engine="0"}} {len(values)}')
        lines.append(f'{name}_sum{{engine="0"}} {sum(values)}')
    return "\n".join(lines) + "\n"


def test_shares_are_exact_at_tau_500_and_demand_is_per_second() -> None:
    before = parse_metrics(metrics_text([100], [10]))
    # The window adds 4 requests: short/short, long/short, long/short, short/long.
    after = parse_metrics(metrics_text([100, 80, 900, 501, 300], [10, 20, 30, 40, 700]))
    live = classify_window(before, after, window_s=2.0)
    assert live.requests == 4 and live.tau_exact
    assert live.short_prompt_frac == pytest.approx(0.5)
    assert live.short_output_frac == pytest.approx(0.75)
    assert live.shares[QueryClass.LISO] == pytest.approx(0.5 * 0.75)
    assert live.shares[QueryClass.SILO] == pytest.approx(0.5 * 0.25)
    assert sum(live.shares.values()) == pytest.approx(1.0)
    assert sum(live.demand_rps.values()) == pytest.approx(2.0)  # 4 requests in 2 s
    assert "independent" in live.assumption


def test_fraction_interpolates_inside_a_bucket() -> None:
    hist = parse_metrics(metrics_text([150, 150, 150, 150], [1])).histograms[PROMPT_LENGTH]
    share, exact = fraction_at_most(hist, 150)  # all four lie in (100, 200]: half of it
    assert share == pytest.approx(0.5) and not exact
    assert fraction_at_most(hist, 200) == (1.0, True)
    assert fraction_at_most(hist, 100) == (0.0, True)
    beyond = parse_metrics(metrics_text([5000, 10], [1])).histograms[PROMPT_LENGTH]
    assert fraction_at_most(beyond, 3000) == (0.5, False)


def test_errors_name_the_problem() -> None:
    same = parse_metrics(metrics_text([100], [10]))
    with pytest.raises(FailedPrecondition, match="no requests"):
        classify_window(same, same, window_s=1.0)
    restarted = parse_metrics(metrics_text([], []))
    with pytest.raises(FailedPrecondition, match="restarted"):
        classify_window(same, restarted, window_s=1.0)
    with pytest.raises(InvalidArgument, match="window_s"):
        classify_window(same, same, window_s=0.0)
    with pytest.raises(FailedPrecondition, match="vllm:request_prompt_tokens"):
        classify_window(parse_metrics(""), parse_metrics(""), window_s=1.0)
    empty = Histogram(())
    with pytest.raises(FailedPrecondition):
        fraction_at_most(empty, 10)


class _Server:
    """Serves /metrics; each scrape sees the next text of the list (the last one repeats)."""

    def __init__(self, texts: list[str]) -> None:
        texts_left = list(texts)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                body = (texts_left.pop(0) if len(texts_left) > 1 else texts_left[0]).encode()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server([metrics_text([10], [10]), metrics_text([10, 900, 900, 20], [10, 5, 5, 800])])
    yield s
    s.httpd.shutdown()


def test_observe_scrapes_twice_over_http(server: _Server) -> None:
    ticks = iter([0.0, 4.0])
    live = observe(server.url, 4.0, 500, monotonic=lambda: next(ticks), sleep=lambda s: None)
    assert live.requests == 3 and live.window_s == 4.0
    assert live.short_prompt_frac == pytest.approx(1 / 3)
    assert live.demand_rps[QueryClass.LISO] == pytest.approx(0.75 * (2 / 3) * (2 / 3))


def test_shapectl_classify_url_json(server: _Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert shapectl_main(["classify", "--url", server.url, "--window-s", "0.1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["requests"] == 3
    assert set(data["shares"]) == {"SISO", "SILO", "LISO", "LILO"}
    assert sum(data["shares"].values()) == pytest.approx(1.0)


def test_shapectl_classify_bad_window(capsys: pytest.CaptureFixture[str]) -> None:
    assert shapectl_main(["classify", "--url", "http://127.0.0.1:9", "--window-s", "0"]) == 2
    err = capsys.readouterr().err
    assert "window_s" in err and "0.1" in err


def test_shapectl_classify_trace(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:15:46.6805900,374,44\n"
                     "2023-11-16 18:15:48.6805900,2000,600\n"
                     "2023-11-16 18:15:50.6805900,1000,20\n"
                     "2023-11-16 18:15:56.6805900,10,10\n")
    assert shapectl_main(["classify", "--trace", str(trace), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["shares"] == {"SISO": 0.5, "SILO": 0.0, "LISO": 0.25, "LILO": 0.25}
    assert data["demand_rps"]["SISO"] == pytest.approx(2 / 10.0)
