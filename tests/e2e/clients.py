"""Real HTTP(S) clients for the end-to-end tests: httpx (with a client certificate through an SSLContext), curl,
and a raw socket client.

Names never resolve through DNS: httpx connects to 127.0.0.1 and sends the SNI via httpcore's
``sni_hostname`` extension (so SNI and Host can differ), curl uses ``--resolve``. A client can bind
its source address (``source="127.0.0.2"``) to play an untrusted peer on the loopback network.

httpx (and curl without ``--path-as-is``) normalise the request-target before sending it: dot
segments are resolved, and httpx re-encodes some characters. ``Clients.raw`` writes the request line
and the header lines byte for byte over a plain or TLS socket (Python's ``ssl``, loopback only), which
is what the hostile corpus needs.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.nginx_front import NginxFront
from tests.e2e.pki import API_HOST, FRONT_HOST, Pki

__all__ = ["Clients", "Reply"]

REASON_HEADER = "x-mtls-guard-reason"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Reply:
    """One HTTP response as the client saw it."""

    status: int
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    via: str = "httpx"
    all_headers: tuple[tuple[str, str], ...] = field(default=())

    @property
    def reason(self) -> str | None:
        """The plugin's reason (``expose_reason``), None when the plugin did not answer."""
        return self.headers.get(REASON_HEADER)

    @property
    def outcome(self) -> str | None:
        """What the bridge saw from the runner: stop / rewrite / pass / error."""
        return self.headers.get("x-e2e-outcome")

    def upstream(self) -> dict[str, Any]:
        """The fake upstream's JSON echo; fails the test when the request never reached the upstream."""
        assert self.status == 200, f"expected the upstream's 200, got {self.status}: {self.describe()}"
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data

    def upstream_headers(self, name: str) -> list[str]:
        """Every value of request header ``name`` as the upstream received it (names compare
        case-insensitively, like HTTP; a different spelling such as ``x_client_subject`` is another name)."""
        return [v for n, v in self.upstream()["headers"] if n.lower() == name.lower()]

    def describe(self) -> str:
        head = {k: v for k, v in self.headers.items() if k.startswith(("x-e2e", REASON_HEADER))}
        return f"{self.via} {self.status} {head} {self.body[:200]!r}"


class Clients:
    """Builds requests against one NginxFront."""

    def __init__(self, front: NginxFront, pki: Pki) -> None:
        self.front = front
        self.pki = pki
        self._contexts: dict[str | None, ssl.SSLContext] = {}

    def context(self, cert: str | None) -> ssl.SSLContext:
        """A TLS client context trusting the test CA, presenting client certificate ``cert`` (a Pki name)."""
        if cert not in self._contexts:
            ctx = ssl.create_default_context(cafile=str(self.pki.ca_file))
            client = self.pki.client(cert)
            if client is not None:
                ctx.load_cert_chain(str(client.cert), str(client.key))
            self._contexts[cert] = ctx
        return self._contexts[cert]

    def client(self, cert: str | None = None, *, source: str = LOOPBACK, timeout: float = 15.0) -> httpx.Client:
        """A persistent httpx client (keep-alive: one TLS handshake for many requests)."""
        ctx = self.context(cert)
        transport = httpx.HTTPTransport(verify=ctx, local_address=source, retries=0)
        return httpx.Client(transport=transport, verify=ctx, timeout=timeout, trust_env=False)

    def request(
        self,
        path: str,
        *,
        cert: str | None = None,
        method: str = "GET",
        listener: str = "https",
        host: str | None = None,
        sni: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        source: str = LOOPBACK,
        client: httpx.Client | None = None,
        content: bytes | None = None,
    ) -> Reply:
        """One request through nginx; ``listener`` is https, http or front; ``host`` the Host header."""
        default_host = _default_host(listener)
        host = host or default_host
        extensions = {} if listener == "http" else {"sni_hostname": sni or default_host}
        request_headers = [("Host", host), *headers]
        owned = client is None
        http = client or self.client(cert, source=source)
        try:
            response = http.request(
                method,
                self.front.url(listener, path),
                headers=request_headers,
                extensions=extensions,
                content=content,
            )
        finally:
            if owned:
                http.close()
        return Reply(
            response.status_code,
            {k.lower(): v for k, v in response.headers.items()},
            response.content,
            "httpx",
            tuple((k.lower(), v) for k, v in response.headers.multi_items()),
        )

    def resumable_request(
        self, path: str, *, cert: str | None, session: ssl.SSLSession | None = None
    ) -> tuple[Reply, ssl.SSLSession | None, bool]:
        """GET over a fresh TLS connection offering ``session`` for resumption (httpx cannot resume).

        Returns the reply, the session to resume next time, and whether this connection resumed one.
        """
        port = self.front.ports.https
        context = self.context(cert)
        with (
            socket.create_connection((LOOPBACK, port), timeout=15) as raw,
            context.wrap_socket(raw, server_hostname=API_HOST, session=session) as tls,
        ):
            request = f"GET {path} HTTP/1.1\r\nHost: {API_HOST}\r\nConnection: close\r\n\r\n"
            tls.sendall(request.encode("ascii"))
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            reused, next_session = tls.session_reused, tls.session
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        pairs = tuple(
            (name.strip().lower(), value.strip()) for name, sep, value in (ln.partition(":") for ln in lines[1:]) if sep
        )
        reply = Reply(int(lines[0].split(" ")[1]), dict(pairs), body, "ssl", pairs)
        return reply, next_session, bool(reused)

    def raw(
        self,
        target: str,
        *,
        cert: str | None = None,
        method: str = "GET",
        listener: str = "https",
        host: str | None = None,
        sni: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        source: str = LOOPBACK,
        body: bytes = b"",
    ) -> Reply:
        """One request whose request line and header lines go out exactly as given (``target`` is written
        as UTF-8, lone surrogates as the bytes they stand for), over TLS (``https``/``front``) or plain HTTP."""
        default_host = _default_host(listener)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host or default_host}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: close")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
        port = getattr(self.front.ports, listener)
        with socket.create_connection((LOOPBACK, port), timeout=15, source_address=(source, 0)) as sock:
            if listener == "http":
                data = _exchange(sock, request)
            else:
                with self.context(cert).wrap_socket(sock, server_hostname=sni or default_host) as tls:
                    data = _exchange(tls, request)
        return _parse_response(data, "raw")

    def curl(
        self,
        path: str,
        *,
        cert: str | None = None,
        method: str = "GET",
        listener: str = "https",
        host: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        source: str | None = None,
    ) -> Reply:
        """The same request with the curl command line an operator would type."""
        name = host or _default_host(listener)
        port = getattr(self.front.ports, listener)
        scheme = "http" if listener == "http" else "https"
        with tempfile.TemporaryDirectory(prefix="mg-curl-") as tmp:
            head, body = Path(tmp, "head"), Path(tmp, "body")
            argv = [self.front.env.curl, "-q", "-sS", "--noproxy", "*", "--max-time", "15"]
            argv += ["--resolve", f"{name}:{port}:127.0.0.1", "-X", method, "-D", str(head), "-o", str(body)]
            argv += ["-w", "%{http_code}"]
            if scheme == "https":
                argv += ["--cacert", str(self.pki.ca_file)]
            client = self.pki.client(cert)
            if client is not None:
                argv += ["--cert", str(client.cert), "--key", str(client.key)]
            if source is not None:
                argv += ["--interface", source]
            for header_name, value in headers:
                argv += ["-H", f"{header_name}: {value}"]
            argv.append(f"{scheme}://{name}:{port}{path}")
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            assert done.returncode == 0, f"curl failed ({done.returncode}): {done.stderr.strip()}"
            pairs = []
            for line in head.read_text(encoding="latin-1").splitlines()[1:]:
                header_name, sep, value = line.partition(":")
                if sep:
                    pairs.append((header_name.strip().lower(), value.strip()))
            return Reply(int(done.stdout), dict(pairs), body.read_bytes(), "curl", tuple(pairs))


def _default_host(listener: str) -> str:
    """The Host (and SNI) a listener's requests carry unless a test names another."""
    return FRONT_HOST if listener == "front" else API_HOST


def _exchange(sock: socket.socket, request: bytes) -> bytes:
    sock.sendall(request)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


def _parse_response(data: bytes, via: str) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    pairs = tuple(
        (name.strip().lower(), value.strip()) for name, sep, value in (ln.partition(":") for ln in lines[1:]) if sep
    )
    headers: dict[str, str] = {}
    for name, value in pairs:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return Reply(int(lines[0].split(" ")[1]), headers, body, via, pairs)
