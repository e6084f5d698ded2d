"""Guarded fetching for the download stage: every hop of a redirect chain obeys `download.allowed_schemes`, and no
connection goes to a loopback, private, link-local, multicast or reserved address unless `download.allowed_networks`
names its network.

Why here and not in the input table: a table's URL can be an innocent `http://host/x` that answers 302 to
`ftp://internal-host/secret.png` or to `http://169.254.169.254/` (a cloud's metadata service), and urllib follows
both. A crawler on a cluster sits inside someone's network, so the address that is actually connected to is
checked, after DNS resolution (a public-looking name can resolve to 10.0.0.1), and the socket is connected to the
very address that was checked (no second lookup for a rebinding DNS server to answer differently).

img2dataset fetches with `urllib.request.urlopen`, i.e. through the process's installed opener. Its workers are
spawned (or are Spark executors), so the opener is installed in each of them by `GuardedDownloader`, the
img2dataset `Downloader` that `guarded_img2dataset()` makes its `download()` build and that is pickled into every
worker. A refusal is an exception whose text becomes the row's `error_message` (img2dataset counts it in the
shard's `_stats.json` too): `redirect refused: scheme not allowed: ftp`, `address not allowed: private` ...
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib
import ipaddress
import os
import socket
import urllib.request
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union
from urllib.parse import urljoin, urlsplit

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones home
from img2dataset.downloader import Downloader  # noqa: E402

from addpipe.dataprep.table import refusal as scheme_refusal  # noqa: E402

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class Refused(Exception):
    """A fetch the guard does not allow. Deliberately not an OSError: urllib would wrap an OSError into
    `<urlopen error ...>`, and the row's reason should read plainly."""


def embedded_ipv4(address: Address) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 address stands for, where it is a form that reaches one: IPv4-mapped (::ffff:a.b.c.d),
    6to4 (2002::/16), Teredo's client, NAT64 (64:ff9b::/96)."""
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_class(address: Address) -> Optional[str]:
    """None for a global unicast address; else what kind of address it is (the reason a fetch is refused)."""
    # An address standing for an IPv4 one is judged by it (Python < 3.13 calls every IPv4-mapped address "private")
    candidate = embedded_ipv4(address) or address
    # Order matters only for the name given: the ipaddress module calls 127.0.0.1 and 240.0.0.1 "private" too
    for name in ("unspecified", "loopback", "link-local", "multicast", "reserved", "private"):
        if getattr(candidate, "is_" + name.replace("-", "_")):
            return name
    if candidate.version == 6 and candidate.is_site_local:
        return "site-local"
    if not candidate.is_global:  # 100.64.0.0/10 (carrier-grade NAT) and other special-purpose blocks
        return "not global"
    return None


@dataclass(frozen=True)
class Guard:
    """What may be fetched: URL schemes (every redirect hop included) and, beyond the global internet, which networks."""

    allowed_schemes: tuple[str, ...] = ("http", "https")
    allowed_networks: tuple[str, ...] = ()
    allowed_file_roots: tuple[str, ...] = ()
    networks: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "networks", tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks))

    def address_refusal(self, text: str) -> Optional[str]:
        """Why a connection to the IP address `text` is refused, or None."""
        address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) names no other address
        kind = address_class(address)
        if kind is None:
            return None
        candidates = [a for a in (address, embedded_ipv4(address)) if a is not None]
        if any(a.version == n.version and a in n for a in candidates for n in self.networks):
            return None
        return f"address not allowed: {kind}"

    def resolve(self, host: str, port: int) -> list[tuple]:
        """getaddrinfo for a TCP connection, refused whole if any answer is an address not allowed: a name that
        resolves to both a public and a private address must not get a second chance at the private one."""
        answers = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        for *_, sockaddr in answers:
            reason = self.address_refusal(sockaddr[0])
            if reason is not None:
                raise Refused(reason)
        return answers

    def check_host(self, host: Optional[str], port: int = 0, must_resolve: bool = True) -> None:
        if not host:
            raise Refused("no host")
        try:
            self.resolve(host, port)
        except socket.gaierror:
            if must_resolve:
                raise

    def create_connection(self, address: tuple, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None) -> socket.socket:
        """socket.create_connection, connecting only to the addresses it checked."""
        host, port = address
        error: Optional[OSError] = None
        for family, kind, proto, _, sockaddr in self.resolve(host, port):
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as failure:
                error = failure
                sock.close()
        raise error if error is not None else OSError(f"getaddrinfo returned no address for {host}")

    def connection_factory(self, connection_class: type, request: urllib.request.Request):
        """A factory for urllib's do_open: `connection_class` whose socket comes from this guard. Through a proxy
        (http_proxy/https_proxy) the proxy connects and resolves, so the target host is checked where it resolves
        here, and the operator's proxy address is trusted."""
        proxied = request.has_proxy() or getattr(request, "_tunnel_host", None)

        def build(host, **kwargs):
            connection = connection_class(host, **kwargs)
            if proxied:
                self.check_host(urlsplit(request.full_url).hostname, must_resolve=False)
            else:
                # http.client's documented seam for tests, stable since Python 3.4: the socket factory of connect()
                connection._create_connection = self.create_connection
            return connection

        return build


class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    def __init__(self, guard: Guard):
        self.guard = guard

    def http_error_302(self, req, fp, code, msg, headers):
        # Checked before urllib's own check, whose refusal of file: is an HTTPError that reads like a server error
        location = headers.get("location") or headers.get("uri")
        if location:
            self.check(urljoin(req.full_url, location))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.check(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)

    def check(self, newurl: str) -> None:
        reason = scheme_refusal(newurl, list(self.guard.allowed_schemes))
        if reason is None and urlsplit(newurl).scheme.lower() in ("http", "https", "ftp"):
            try:  # refused here already, so the reason names the redirect (the connection is checked again anyway)
                parts = urlsplit(newurl)
                self.guard.check_host(parts.hostname, parts.port or 0, must_resolve=False)
            except Refused as refusal:
                reason = str(refusal)
            except ValueError as bad:  # a port that is no number
                reason = f"bad redirect url: {bad}"
        if reason is not None:
            raise Refused(f"redirect refused: {reason}")


class GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: Guard):
        super().__init__()
        self.guard = guard

    def http_open(self, req):
        return self.do_open(self.guard.connection_factory(http.client.HTTPConnection, req), req)


class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: Guard):
        super().__init__()
        self.guard = guard

    def https_open(self, req):
        settings = {"context": self._context}
        if hasattr(self, "_check_hostname"):  # Python < 3.12
            settings["check_hostname"] = self._check_hostname
        return self.do_open(self.guard.connection_factory(http.client.HTTPSConnection, req), req, **settings)


class GuardedFTPHandler(urllib.request.FTPHandler):
    """Only where ftp is allowed. ftplib resolves the host again itself: the check is before, not at, the connection."""

    def __init__(self, guard: Guard):
        self.guard = guard

    def ftp_open(self, req):
        self.guard.check_host(req.host.split(":")[0].strip("[]"))
        return super().ftp_open(req)


class GuardedFileHandler(urllib.request.FileHandler):
    """file: URLs, only for files inside the guard's allowed roots (the path as the OS resolves it, symbolic links
    and `..` included), and only on this host."""

    def __init__(self, guard: Guard):
        super().__init__()
        self.guard = guard

    def file_open(self, req):
        path = os.path.realpath(urllib.request.url2pathname(req.selector))
        if req.host and req.host not in ("localhost", "127.0.0.1"):
            raise Refused(f"file on another host: {req.host}")
        if not any(os.path.commonpath([path, root]) == root for root in self.guard.allowed_file_roots):
            raise Refused("file outside the allowed roots")
        return super().file_open(req)


def build_opener(guard: Guard) -> urllib.request.OpenerDirector:
    """urllib's default opener with every network handler guarded, and handlers only for the allowed schemes."""
    handlers = [urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPDefaultErrorHandler(),
                GuardedRedirectHandler(guard), urllib.request.HTTPErrorProcessor()]
    schemes = set(guard.allowed_schemes)
    if "http" in schemes:
        handlers.append(GuardedHTTPHandler(guard))
    if "https" in schemes:
        handlers.append(GuardedHTTPSHandler(guard))
    if "ftp" in schemes:
        handlers.append(GuardedFTPHandler(guard))
    if "file" in schemes:
        handlers.append(GuardedFileHandler(guard))
    if "data" in schemes:
        handlers.append(urllib.request.DataHandler())
    opener = urllib.request.OpenerDirector()
    for handler in handlers:
        opener.add_handler(handler)
    return opener


class GuardedDownloader(Downloader):
    """img2dataset's Downloader that installs the guarded opener in the worker before each shard."""

    def __init__(self, *args, guard: Guard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard

    def __call__(self, row):
        urllib.request.install_opener(build_opener(self.guard))
        return super().__call__(row)


@contextlib.contextmanager
def guarded_img2dataset(guard: Guard) -> Iterator[None]:
    """While open, img2dataset's download() builds a GuardedDownloader (and every worker fetches through the guard)."""
    # by name: the package's own `main` attribute is the function main(), which shadows the module
    main = importlib.import_module("img2dataset.main")

    if getattr(main, "Downloader", None) is not Downloader:
        raise RuntimeError("img2dataset.main.Downloader is not img2dataset's Downloader: this img2dataset version cannot "
                           "be guarded against redirects to other schemes and private addresses")
    main.Downloader = functools.partial(GuardedDownloader, guard=guard)
    try:
        yield
    finally:
        main.Downloader = Downloader
