"""A loopback HTTP server for download tests and benchmarks: real photos and every kind of bad row.

Images come from what scikit-learn ships (two sample photos and the 8x8 digits), so nothing is fetched
from the network. `bad_rows()` returns the URL/caption table a test feeds to `addpipe prep`, each row
with the outcome it must get.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import numpy as np
from PIL import Image


def sample_photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(array) for array in load_sample_images().images]


def digit_photo(index: int, size: int) -> Image.Image:
    from sklearn.datasets import load_digits

    digits = load_digits()
    array = (digits.images[index] / 16.0 * 255).astype(np.uint8)
    rgb = np.stack([array, 255 - array, np.full_like(array, (index * 37) % 256)], axis=-1)
    return Image.fromarray(rgb).resize((size, size), Image.NEAREST)


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
    """Serves `routes` (path -> Route) on 127.0.0.1 from a background thread."""

    def __init__(self, routes: Optional[dict[str, Route]] = None):
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port() -> int:
    """A port nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
