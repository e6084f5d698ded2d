"""A loopback HTTP server for download tests and benchmarks: real photos and every kind of bad row.

Images come from what scikit-learn ships (two sample photos and the 8x8 digits), so nothing is fetched
from the network. `bad_rows()` returns the URL/caption table a test feeds to `addpipe prep`, each row
with the outcome it must get.
"""

from __future__ import annotations

import base64
import io
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from addpipe.dataprep.loopback import ImageServer, Route, jpeg, png  # noqa: F401 (the tests use them from here)


def sample_photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(array) for array in load_sample_images().images]


def digit_photo(index: int, size: int) -> Image.Image:
    from sklearn.datasets import load_digits

    digits = load_digits()
    array = (digits.images[index] / 16.0 * 255).astype(np.uint8)
    rgb = np.stack([array, 255 - array, np.full_like(array, (index * 37) % 256)], axis=-1)
    return Image.fromarray(rgb).resize((size, size), Image.NEAREST)


def closed_port() -> int:
    """A port nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Row:
    name: str
    caption: Optional[str]
    expected: str          # the reason the curation must give ("kept" for survivors of the base filters)
    route: Optional[Route] = None
    url: Optional[str] = None
    pwatermark: float = 0.1
    punsafe: float = 0.1


DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def curation_rows(slow_seconds: float = 8.0) -> list[Row]:
    """Good rows and every kind of bad one, with the outcome each must get under the test settings
    (download.max_image_area=2e7, download.timeout < slow_seconds, filter.min_resolution=100,
    filter.max_aspect_ratio=3, filter.min_caption_words=2, filter.min_caption_chars=5, max watermark/unsafe 0.5)."""
    china, flower = sample_photos()
    rows = [
        Row("china.jpg", "a photo of a temple roof", "kept", Route(jpeg(china))),
        Row("flower.jpg", "a flower in a garden", "kept", Route(jpeg(flower))),
        Row("unicode.jpg", "un château près de la forêt, 東京タワー", "kept", Route(jpeg(digit_photo(11, 240)))),
        Row("cmyk.jpg", "a temple printed in cmyk", "kept", Route(jpeg(china.transpose(Image.FLIP_LEFT_RIGHT), mode="CMYK"))),
        Row("alpha.png", "a translucent flower picture", "kept",
            Route(png(_with_alpha(flower.rotate(90, expand=True))), "image/png")),
        Row("animated.gif", "an animated digit sequence", "kept", Route(_gif([digit_photo(20 + i, 200) for i in range(3)]), "image/gif")),
        Row("small.jpg", "a tiny digit picture", "too_small", Route(jpeg(digit_photo(30, 48)))),
        Row("wide.jpg", "a very wide banner image", "aspect_ratio", Route(jpeg(digit_photo(31, 200).resize((1000, 200))))),
        Row("empty-caption.jpg", "", "caption_empty", Route(jpeg(digit_photo(32, 200)))),
        Row("missing-caption.jpg", None, "caption_empty", Route(jpeg(digit_photo(33, 200)))),
        Row("short-caption.jpg", "a", "caption_too_short", Route(jpeg(digit_photo(34, 200)))),
        Row("watermarked.jpg", "a digit with a watermark", "watermark", Route(jpeg(digit_photo(35, 200))), pwatermark=0.9),
        Row("unsafe.jpg", "a digit marked unsafe", "unsafe", Route(jpeg(digit_photo(36, 200))), punsafe=0.9),
        Row("missing.jpg", "a picture that is gone", "failed_to_download: HTTP Error 404: Not Found"),
        Row("refused.jpg", "a server that is down", "failed_to_download: <urlopen error [Errno 111] Connection refused>"),
        Row("page.html", "a web page, not an image", "failed_to_resize: Image decoding error", Route(b"<html><body>hi</body></html>", "text/html")),
        Row("truncated.jpg", "half of a flower", "failed_to_resize: Image decoding error", Route(jpeg(flower)[:6000])),
        Row("zero.jpg", "nothing at all", "failed_to_resize: OpenCV(", Route(b"")),
        Row("huge.jpg", "an enormous green field", "failed_to_resize: image area too large", Route(jpeg(Image.new("RGB", (6000, 5000), (20, 160, 40))))),
        Row("slow.jpg", "a server that is too slow", "failed_to_download: timed out", Route(jpeg(china), delay=slow_seconds)),
        Row("noai.jpg", "an artist who opted out", "failed_to_download: Use of image disallowed by X-Robots-Tag directive",
            Route(jpeg(flower), headers=(("X-Robots-Tag", "noai"),))),
    ]
    rows += [Row(f"digit-{d}.jpg", f"a handwritten {word} in colour", "kept", Route(jpeg(digit_photo(d, 160 + 8 * d))))
             for d, word in enumerate(DIGIT_WORDS)]
    rows += [  # last, so the copies sit in a later shard than their originals: dedup must work across shards
        Row("china-copy.jpg", "the same temple again", "exact_duplicate", Route(jpeg(china))),
        Row("flower-near.jpg", "nearly the same flower", "near_duplicate", Route(jpeg(flower.resize((600, 400)), quality=60))),
    ]
    return rows


def _with_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    rgba.putalpha(128)
    return rgba


def _gif(frames: list[Image.Image]) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def hostile_scheme_rows(local_image: Path) -> list[Row]:
    """Rows whose URL is no http(s) address: each must fail with 'scheme not allowed' and nothing be read.
    `local_image` is a real image file on this machine, so a fetcher that honours file: would keep it."""
    absolute = local_image.resolve()
    dead = closed_port()
    data = "data:image/png;base64," + base64.b64encode(png(Image.new("RGB", (200, 200), (200, 30, 30)))).decode()
    refused = "failed_to_download: scheme not allowed: "
    cases = [
        ("scheme-file", absolute.as_uri(), "file"),
        ("scheme-file-upper-host", f"FILE://localhost{absolute}", "file"),
        ("scheme-file-padded", f"  \tfile://{absolute}", "file"),
        ("scheme-file-wrapped", f"<URL:file://{absolute}>", "file"),
        ("scheme-file-dotdot", f"file://{absolute.parent}/../{absolute.parent.name}/{absolute.name}", "file"),
        ("scheme-ftp", f"ftp://127.0.0.1:{dead}/image.jpg", "ftp"),
        ("scheme-data", data, "data"),
        ("scheme-javascript", "javascript:alert(document.cookie)", "javascript"),
        ("scheme-relative", local_image.name, "(none)"),
        ("scheme-dotdot", "../../../../../../etc/passwd", "(none)"),
        ("scheme-absolute-path", str(absolute), "(none)"),
        ("scheme-protocol-relative", f"//127.0.0.1:{dead}/image.jpg", "(none)"),
    ]
    return [Row(name, f"a picture behind a {name} url", refused + scheme, url=url) for name, url, scheme in cases]


def hostile_redirect_rows(local_image: Path) -> list[Row]:
    """Rows whose URL is an innocent http address on the test server that answers 302 to what may not be fetched: another
    scheme, or a loopback address the run did not opt into (the run opts into 127.0.0.1/32 only; 127.0.0.2 is outside
    it, and nothing listens there, so a followed redirect would fail differently). Private addresses are tested in
    process (tests/test_fetch.py): a test must never dial one."""
    dead = closed_port()
    refused = "failed_to_download: redirect refused: "
    cases = [
        ("redirect-ftp", f"ftp://127.0.0.1:{dead}/secret.png", "scheme not allowed: ftp"),
        ("redirect-file", local_image.resolve().as_uri(), "scheme not allowed: file"),
        ("redirect-file-relative", "file:secret.png", "scheme not allowed: file"),
        ("redirect-loopback", f"http://127.0.0.2:{dead}/china.jpg", "address not allowed: loopback"),
        ("redirect-mapped-loopback", f"http://[::ffff:127.0.0.2]:{dead}/china.jpg", "address not allowed: loopback"),
    ]
    return [Row(name, f"a picture behind a {name} url", refused + reason,
                Route(b"", "text/plain", status=302, headers=(("Location", location),)))
            for name, location, reason in cases]


def serve_rows(rows: list[Row]) -> ImageServer:
    """An unstarted server for `rows`; sets the url of each row that has none (refused rows point at a closed port)."""
    server = ImageServer({"/" + row.name: row.route for row in rows if row.route is not None})
    dead = closed_port()
    for row in rows:
        if row.url is None:
            row.url = f"http://127.0.0.1:{dead}/{row.name}" if row.name.startswith("refused") else server.url("/" + row.name)
    return server
