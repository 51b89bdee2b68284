"""A small but real stand-in for vLLM's OpenAI api_server, for fast tests.

Run as `python tests/fakes/fake_vllm.py --model DIR --port N ...` with the flags the command
builder emits. It serves /health, /metrics (vLLM's metric names), /v1/models, /v1/completions
(each request takes max_tokens * token delay; at most --max-num-seqs run, the rest wait), and
on SIGTERM stops admitting and finishes in-flight requests for up to --shutdown-timeout.

Knobs (environment): FAKE_VLLM_STARTUP_S (delay before /health is 200), FAKE_VLLM_TOKEN_DELAY_S
(per generated token), FAKE_VLLM_DEPRECATED_NAMES=1 (gpu_cache_usage_perc instead of
kv_cache_usage_perc), FAKE_VLLM_EXIT_AFTER_S (crash with exit code 3 after that long),
FAKE_VLLM_IGNORE_SIGTERM=1 (a hung engine), FAKE_VLLM_WORKER=1 (a child process in the
engine's process group, as vLLM's engine core), FAKE_VLLM_VERSION (default 0.18.0; the version
GET /version and --help report: before 0.18 there is no --shutdown-timeout, and an unknown flag
exits with status 2, as vLLM's argparse does).
POST /fake/pin {"running": N, "waiting": M} pins the reported queue (drain-deadline tests).
Sleep mode as vLLM has it: with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 (else 404),
POST /sleep?level=1|2, POST /wake_up, GET /is_sleeping -> {"is_sleeping": bool}; a sleeping
engine refuses completions.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, float("inf"))
DEFAULT_VERSION = "0.18.0"
SHUTDOWN_TIMEOUT_SINCE = (0, 18)  # the release the fake models --shutdown-timeout arriving in


def version() -> str:
    return os.environ.get("FAKE_VLLM_VERSION", DEFAULT_VERSION)


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


class Engine:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lock = threading.Condition()
        self.running = 0
        self.waiting = 0
        self.pinned: tuple[int, int] | None = None
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.e2e_counts = [0] * len(BUCKETS_S)
        self.e2e_sum_s = 0.0
        self.draining = False
        self.sleep_level = 0  # 0 = awake
        self.ready_at = time.monotonic() + float(os.environ.get("FAKE_VLLM_STARTUP_S", "0"))
        self.token_delay_s = float(os.environ.get("FAKE_VLLM_TOKEN_DELAY_S", "0.01"))

    def complete(self, prompt: str, max_tokens: int) -> dict:
        start = time.monotonic()
        with self.lock:
            self.waiting += 1
            while self.running >= self.args.max_num_seqs:
                self.lock.wait()
            self.waiting -= 1
            self.running += 1
        try:
            time.sleep(self.token_delay_s * max_tokens)
        finally:
            with self.lock:
                self.running -= 1
                self.prompt_tokens += len(prompt.split())
                self.generation_tokens += max_tokens
                elapsed_s = time.monotonic() - start
                self.e2e_sum_s += elapsed_s
                for i, le in enumerate(BUCKETS_S):
                    if elapsed_s <= le:
                        self.e2e_counts[i] += 1
                self.lock.notify_all()
        return {
            "object": "text_completion",
            "model": self.args.served_model_name,
            "choices": [{"index": 0, "text": " tok" * max_tokens, "finish_reason": "length"}],
            "usage": {"completion_tokens": max_tokens},
        }

    def metrics_text(self) -> str:
        with self.lock:
            running, waiting = self.pinned or (self.running, self.waiting)
            kv = min(1.0, running / max(self.args.max_num_seqs, 1))
            kv_name = (
                "vllm:gpu_cache_usage_perc"
                if os.environ.get("FAKE_VLLM_DEPRECATED_NAMES") == "1"
                else "vllm:kv_cache_usage_perc"
            )
            labels = f'engine="0",model_name="{self.args.served_model_name}"'
            lines = [
                f"# TYPE {kv_name} gauge",
                f"{kv_name}{{{labels}}} {kv}",
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running{{{labels}}} {running}",
                "# TYPE vllm:num_requests_waiting gauge",
                f"vllm:num_requests_waiting{{{labels}}} {waiting}",
                "# TYPE vllm:prompt_tokens counter",
                f"vllm:prompt_tokens_total{{{labels}}} {self.prompt_tokens}",
                "# TYPE vllm:generation_tokens counter",
                f"vllm:generation_tokens_total{{{labels}}} {self.generation_tokens}",
                "# TYPE vllm:engine_sleep_state gauge",
                f'vllm:engine_sleep_state{{{labels},sleep_state="awake"}} '
                f'{0.0 if self.sleep_level else 1.0}',
                "# TYPE vllm:e2e_request_latency_seconds histogram",
            ]
            for le, n in zip(BUCKETS_S, self.e2e_counts, strict=True):
                le_text = "+Inf" if le == float("inf") else str(le)
                lines.append(
                    f'vllm:e2e_request_latency_seconds_bucket{{{labels},le="{le_text}"}} {n}'
                )
            count = self.e2e_counts[-1]
            lines.append(f"vllm:e2e_request_latency_seconds_count{{{labels}}} {count}")
            lines.append(f"vllm:e2e_request_latency_seconds_sum{{{labels}}} {self.e2e_sum_s}")
        return "\n".join(lines) + "\n"

    def sleep_api(self) -> bool:
        """vLLM serves /sleep, /wake_up, /is_sleeping only in dev mode with sleep mode on."""
        return self.args.enable_sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1"

    def drain_and_exit(self) -> None:
        """SIGTERM: refuse new work, let in-flight requests finish (bounded), then exit 0."""
        self.draining = True
        deadline = time.monotonic() + self.args.shutdown_timeout
        with self.lock:
            while self.running + self.waiting > 0 and time.monotonic() < deadline:
                self.lock.wait(timeout=0.05)
        print("fake-vllm: drained, exiting", flush=True)
        os._exit(0)


def make_handler(engine: Engine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: object) -> None:
            print(f"fake-vllm: {self.command} {self.path}", flush=True)

        def _send(self, code: int, body: str, ctype: str = "application/json") -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            sleep_api = engine.sleep_api()
            if self.path == "/health":
                ok = time.monotonic() >= engine.ready_at
                self._send(200 if ok else 503, "" if ok else '{"error": "starting"}')
            elif self.path == "/is_sleeping" and sleep_api:
                self._send(200, json.dumps({"is_sleeping": engine.sleep_level > 0}))
            elif self.path == "/metrics":
                self._send(200, engine.metrics_text(), "text/plain; version=0.0.4")
            elif self.path == "/version":
                self._send(200, json.dumps({"version": version()}))
            elif self.path == "/v1/models":
                model = {"id": engine.args.served_model_name, "object": "model",
                         "root": engine.args.model, "max_model_len": engine.args.max_model_len}
                self._send(200, json.dumps({"object": "list", "data": [model]}))
            else:
                self._send(404, '{"error": "not found"}')

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            url = urlsplit(self.path)
            if url.path in ("/sleep", "/wake_up") and engine.sleep_api():
                level = parse_qs(url.query).get("level", ["1"])[0]
                if url.path == "/sleep" and level not in ("1", "2"):
                    self._send(400, '{"error": "level must be 1 or 2"}')
                    return
                with engine.lock:
                    engine.sleep_level = int(level) if url.path == "/sleep" else 0
                self._send(200, "")
            elif self.path == "/fake/pin":
                with engine.lock:
                    engine.pinned = (int(body["running"]), int(body["waiting"]))
                self._send(200, "{}")
            elif self.path == "/v1/completions":
                if engine.draining or engine.sleep_level:
                    self._send(503, '{"error": "shutting down or sleeping"}')
                elif body.get("model") != engine.args.served_model_name:
                    self._send(404, '{"error": "unknown model"}')
                else:
                    result = engine.complete(str(body.get("prompt", "")),
                                             int(body.get("max_tokens", 16)))
                    self._send(200, json.dumps(result))
            else:
                self._send(404, '{"error": "not found"}')

    return Handler


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fake-vllm", description=f"fake vLLM {version()}")
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    if version_tuple(version()) >= SHUTDOWN_TIMEOUT_SINCE:
        p.add_argument("--shutdown-timeout", type=float, default=0.0)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--enable-sleep-mode", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.shutdown_timeout = getattr(args, "shutdown_timeout", 0.0)  # older: abort in-flight
    engine = Engine(args)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(engine))
    server.daemon_threads = True
    if os.environ.get("FAKE_VLLM_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a hung engine, for SIGKILL tests
    else:
        signal.signal(signal.SIGTERM,
                      lambda *_: threading.Thread(target=engine.drain_and_exit).start())
    if os.environ.get("FAKE_VLLM_WORKER") == "1":  # like vLLM's engine-core process
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"fake-vllm: worker pid {worker.pid}", flush=True)
    exit_after = os.environ.get("FAKE_VLLM_EXIT_AFTER_S")
    if exit_after:
        threading.Timer(float(exit_after), lambda: os._exit(3)).start()
    print(f"fake-vllm: serving {args.served_model_name} on {args.host}:{args.port} "
          f"max_num_seqs={args.max_num_seqs} version={version()} CUDA_VISIBLE_DEVICES="
          f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')} CUDA_DEVICE_ORDER="
          f"{os.environ.get('CUDA_DEVICE_ORDER', '')}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
