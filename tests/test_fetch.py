"""The download guard, in process: redirect hops obey the scheme allow-list, and non-global addresses (after
resolution, IPv6 and IPv4-mapped forms included) are refused before any connection unless a network is opted in.

Traffic goes to 127.0.0.1 only. An audit hook blocks (and records) any socket connection to another address made
while a test runs, so even a broken guard cannot send a packet to 10.0.0.1: the test then fails on the record.
"""

from __future__ import annotations

import ipaddress
import pickle
import sys
import urllib.error

import pytest

from addpipe.dataprep.config import DownloadConfig
from addpipe.dataprep.fetch import Guard, Refused, address_class, build_opener
from image_server import ImageServer, Route, closed_port, jpeg, sample_photos

ATTEMPTS: list = []  # connections attempted while a test watches: (address, allowed)
WATCHING = [False]


def _audit(event: str, args: tuple) -> None:
    if event != "socket.connect" or not WATCHING[0]:
        return
    address = args[1]
    host = address[0] if isinstance(address, tuple) else str(address)
    local = host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")
    ATTEMPTS.append((host, local))
    if not local:
        raise PermissionError(f"test guard: connection to {host} blocked")


sys.addaudithook(_audit)  # hooks cannot be removed; this one acts only while WATCHING


@pytest.fixture
def connections():
    ATTEMPTS.clear()
    WATCHING[0] = True
    try:
        yield ATTEMPTS
    finally:
        WATCHING[0] = False


@pytest.fixture(scope="module")
def web():
    body = jpeg(sample_photos()[1])
    server = ImageServer({"/ok.jpg": Route(body)})
    dead = closed_port()

    def redirect(location: str) -> Route:
        return Route(b"", "text/plain", status=302, headers=(("Location", location),))

    with server:
        server.routes.update({
            "/to-ok": redirect("/ok.jpg"),
            "/to-ftp": redirect(f"ftp://127.0.0.1:{dead}/secret.png"),
            "/to-file": redirect("file:///etc/hostname"),
            "/to-data": redirect("data:text/plain;base64,aGVsbG8="),
            "/to-private": redirect("http://10.0.0.1/secret.png"),
            "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-mapped": redirect("http://[::ffff:10.0.0.1]/secret.png"),
            "/to-ipv6-private": redirect("http://[fc00::1]/secret.png"),
            "/to-other-loopback": redirect(f"http://127.0.0.2:{server.port}/ok.jpg"),
            "/to-localhost": redirect(f"http://localhost:{server.port}/ok.jpg"),
            "/to-to-private": redirect("/to-private"),
        })
        yield server, body


def fetch(guard: Guard, url: str) -> bytes:
    with build_opener(guard).open(url, timeout=5) as response:
        return response.read()


LOCAL = Guard(("http", "https"), ("127.0.0.1/32",))


def test_redirects_to_other_schemes_and_private_addresses_are_refused_before_any_connection(web, connections):
    server, body = web
    assert fetch(LOCAL, server.url("/to-ok")) == body  # an allowed redirect is still followed
    assert fetch(LOCAL, server.url("/to-localhost")) == body  # a name is judged by what it resolves to (127.0.0.1 here)
    expected = {
        "/to-ftp": "redirect refused: scheme not allowed: ftp",
        "/to-file": "redirect refused: scheme not allowed: file",
        "/to-data": "redirect refused: scheme not allowed: data",
        "/to-private": "redirect refused: address not allowed: private",
        "/to-metadata": "redirect refused: address not allowed: link-local",
        "/to-mapped": "redirect refused: address not allowed: private",
        "/to-ipv6-private": "redirect refused: address not allowed: private",
        "/to-other-loopback": "redirect refused: address not allowed: loopback",  # 127.0.0.1/32 opted in, not /8
        "/to-to-private": "redirect refused: address not allowed: private",  # every hop, not just the first
    }
    for path, reason in expected.items():
        with pytest.raises(Refused) as refused:
            print(path, fetch(LOCAL, server.url(path))[:40])  # what a broken guard fetched
        assert str(refused.value) == reason, path
    assert all(local for _, local in connections), connections  # nothing but 127.0.0.1 was ever dialled
    assert {host for host, _ in connections} == {"127.0.0.1"}


def test_without_an_opt_in_even_the_first_hop_to_loopback_is_refused_without_connecting(web, connections):
    server, _ = web
    public_only = Guard(("http", "https"), ())
    for url in (server.url("/ok.jpg"), f"http://localhost:{server.port}/ok.jpg", f"http://[::1]:{server.port}/ok.jpg",
                f"http://[::ffff:127.0.0.1]:{server.port}/ok.jpg", "http://10.0.0.1/x.jpg", "http://0.0.0.0/x.jpg"):
        with pytest.raises(Refused, match="address not allowed"):
            fetch(public_only, url)
    assert connections == []


def test_an_opted_in_network_is_fetched_and_the_connection_goes_to_the_checked_address(web, connections):
    server, body = web
    loopback = Guard(("http", "https"), ("127.0.0.0/8",))
    with pytest.raises(urllib.error.URLError, match="Connection refused"):  # the server listens on 127.0.0.1 only
        fetch(loopback, server.url("/to-other-loopback"))
    assert ("127.0.0.2", True) in connections  # the redirect was followed to the opted-in address
    assert fetch(Guard(("http",), ("127.0.0.1/32",)), server.url("/ok.jpg")) == body


def test_address_classes_cover_ipv6_and_embedded_ipv4_forms():
    cases = {
        "8.8.8.8": None, "2001:4860:4860::8888": None, "93.184.216.34": None, "::ffff:8.8.8.8": None,
        "127.0.0.1": "loopback", "127.8.9.10": "loopback", "::1": "loopback", "::ffff:127.0.0.1": "loopback",
        "10.0.0.1": "private", "172.16.5.4": "private", "192.168.1.1": "private", "fc00::1": "private",
        "::ffff:10.0.0.1": "private", "::ffff:a00:1": "private", "2002:a00:1::": "private", "64:ff9b::a00:1": "private",
        "169.254.169.254": "link-local", "fe80::1": "link-local", "::ffff:169.254.169.254": "link-local",
        "0.0.0.0": "unspecified", "::": "unspecified", "224.0.0.1": "multicast", "ff02::1": "multicast",
        "240.0.0.1": "reserved", "100.64.0.1": "not global",
    }
    for text, kind in cases.items():
        assert address_class(ipaddress.ip_address(text)) == kind, text
    assert LOCAL.address_refusal("127.0.0.1") is None and LOCAL.address_refusal("::ffff:127.0.0.1") is None
    assert LOCAL.address_refusal("127.0.0.2") == "address not allowed: loopback"
    assert Guard(("http",), ("fe80::/10",)).address_refusal("fe80::1%eth0") is None
    assert pickle.loads(pickle.dumps(LOCAL)).address_refusal("127.0.0.2") == "address not allowed: loopback"  # into workers


def test_allowed_networks_config_is_checked():
    assert DownloadConfig(allowed_networks=[" 127.0.0.1 ", "10.1.2.3/16"]).allowed_networks == ["127.0.0.1/32", "10.1.0.0/16"]
    with pytest.raises(ValueError, match="allowed_networks must list networks in CIDR form"):
        DownloadConfig(allowed_networks=["localhost"])
