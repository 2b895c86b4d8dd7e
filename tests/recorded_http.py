"""A real HTTP server on 127.0.0.1 that answers GETs from a function: recorded /metrics and
/health answers for the console's tests and its start-up benchmark."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# answer(path, Authorization header or None) -> (status, body)
Answer = Callable[[str, str | None], tuple[int, bytes]]


@contextlib.contextmanager
def http_answers(answer: Answer) -> Iterator[str]:
    """Serve `answer` over HTTP/1.1 (kept alive) in a thread; yields the base URL."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            code, body = answer(self.path, self.headers.get("Authorization"))
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
