"""A loopback HTTP server for in-memory files: the offline "web" that img2dataset downloads from in the
demo, the tests and the benchmarks (nothing outside 127.0.0.1 is reachable on the project's machines).

Each route can answer with any status, headers (e.g. `X-Robots-Tag: noai`) and delay, so the same
server plays well-behaved image hosts and broken ones.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from PIL import Image


def jpeg(image: Image.Image, quality: int = 92, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Route:
    body: bytes
    content_type: str = "image/jpeg"
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0


class ImageServer:
    """Serves `routes` (path -> Route) on 127.0.0.1:`port` (0: a free one) from a background thread."""

    def __init__(self, routes: Optional[dict[str, Route]] = None, port: int = 0):
        self.routes: dict[str, Route] = dict(routes or {})
        self.hits: dict[str, int] = {}
        routes_ref, hits = self.routes, self.hits
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                with lock:
                    hits[self.path] = hits.get(self.path, 0) + 1
                route = routes_ref.get(self.path)
                if route is None:
                    self.send_error(404, "Not Found")
                    return
                if route.delay:
                    time.sleep(route.delay)
                try:
                    self.send_response(route.status)
                    self.send_header("Content-Type", route.content_type)
                    self.send_header("Content-Length", str(len(route.body)))
                    for name, value in route.headers:
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(route.body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): fine
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
