"""Routing weights as JSON over HTTP, for load balancers that poll (`--routes-listen ADDR`).

    GET /routes/ENDPOINT[?mode=latency|energy]
      200 {"endpoint": ..., "weights": [{"instance_id", "node_id", "weight", "reason", "url"}]}
      404 {"error": ...} unknown endpoint; 400 bad mode

A stdlib HTTP server in its own thread; each request is computed on the coordinator's event
loop (the registry is only touched there) and waited for with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from shapeshifter.common import errors

Routes = Callable[[str, str], dict[str, Any]]  # (endpoint, mode) -> JSON document
_STATUS = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400}


def start_routes_http(listen: str, routes: Routes, loop: asyncio.AbstractEventLoop,
                      timeout_s: float = 5.0) -> ThreadingHTTPServer:
    host, _, port = listen.rpartition(":")

    async def compute(endpoint: str, mode: str) -> dict[str, Any]:
        return routes(endpoint, mode)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if not url.path.startswith("/routes/") or url.path == "/routes/":
                self._reply(404, {"error": "use GET /routes/ENDPOINT"})
                return
            endpoint = unquote(url.path[len("/routes/"):])
            mode = parse_qs(url.query).get("mode", [""])[0]
            fut = asyncio.run_coroutine_threadsafe(compute(endpoint, mode), loop)
            try:
                self._reply(200, fut.result(timeout_s))
            except errors.DomainError as err:
                self._reply(_STATUS.get(errors.grpc_code(err).name, 500), {"error": str(err)})
            except TimeoutError:
                fut.cancel()
                self._reply(503, {"error": "coordinator busy; retry"})

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # polled often; errors are in the replies

    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="routes-http", daemon=True).start()
    return server
