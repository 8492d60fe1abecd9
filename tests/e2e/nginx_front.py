"""A real nginx in front of the bridge, configured the way APISIX configures its own nginx for client mTLS.

Three listeners on 127.0.0.1, ephemeral ports:

``https``  TLS for api.example.test. The certificate phase runs lua-resty-core's
           ``ngx.ssl.verify_client(ca, depth)`` exactly like APISIX's SSL object with a skip list
           (tolerant mode): a missing, invalid or expired certificate never fails the handshake, it
           reaches the request as ``$ssl_client_verify`` = ``NONE`` / ``FAILED:<reason>``.
``http``   Plain HTTP, same routes (APISIX's port 9080).
``front``  A *front proxy* in front of the plain listener: terminates TLS in the same tolerant
           mode (so it forwards whatever certificate it got, verified or not) and passes the leaf as
           ``X-Client-Cert: $ssl_client_escaped_cert`` and as an XFCC element, plus the
           ``X-SSL-Client-Verify`` header that the plugin must ignore.

The ``https`` and ``http`` listeners proxy everything to the bridge after a Lua step that deletes any
client-sent ``X-E2E-*`` header and exports the nginx variables as ``X-E2E-Var-<name>: =<escaped>``.
``proxy_pass`` has no URI part, so the bridge gets the client's request-target exactly as sent (what
APISIX's ``proxy_pass $upstream_scheme://apisix_backend$upstream_uri`` does with an empty
``$upstream_uri``), and the header lines with their original spelling.

All three servers run with ``underscores_in_headers on``: APISIX's default (apisix/cli/config.lua), so
``x_client_subject`` reaches the plugin and the upstream. The front proxy has it too, on purpose: a
front proxy that passes underscored headers through is the hostile case for header mode (the client's
``x_client_cert`` arrives next to the proxy's own ``X-Client-Cert``).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.nginx_env import NginxEnv, load_module_lines
from tests.e2e.pki import API_HOST, FRONT_HOST, Pki

__all__ = ["EXPORTED_VARS", "NginxFront", "Ports", "free_port"]

# What APISIX's ExtraInfo may be asked for, plus what the bridge itself needs ($uri, $remote_addr).
EXPORTED_VARS = (
    "ssl_client_verify",
    "ssl_client_escaped_cert",
    "ssl_client_s_dn",
    "ssl_server_name",
    "ssl_session_reused",
    "host",
    "scheme",
    "realip_remote_addr",
    "remote_addr",
    "uri",
    "request_uri",
)
VERIFY_DEPTH = 2

_CONF = """\
@MODULES@
master_process off;
worker_processes 1;
error_log @PREFIX@/error.log info;
pid @PREFIX@/nginx.pid;
events { worker_connections 1024; }

http {
    log_format e2e '$remote_addr:$server_port "$request" $status verify=$ssl_client_verify '
                   'sni=$ssl_server_name host=$host reused=$ssl_session_reused';
    access_log @PREFIX@/access.log e2e;
    client_body_temp_path @PREFIX@/tmp/body;
    proxy_temp_path @PREFIX@/tmp/proxy;
    fastcgi_temp_path @PREFIX@/tmp/fastcgi;
    uwsgi_temp_path @PREFIX@/tmp/uwsgi;
    scgi_temp_path @PREFIX@/tmp/scgi;
    server_tokens off;
    lua_package_path "@LUA@/?.lua;;";

    init_by_lua_block {
        local ssl = require "ngx.ssl"
        local f = assert(io.open("@CA@", "rb"))
        local pem = f:read("*a")
        f:close()
        -- APISIX: apisix/ssl/router/radixtree_sni.lua parses client.ca once and calls verify_client.
        E2E_CLIENT_CA = assert(ssl.parse_pem_cert(pem))
        local exported = { @VARS@ }
        function e2e_export_vars()
            for name, _ in pairs(ngx.req.get_headers(0, true)) do
                if string.lower(string.sub(name, 1, 6)) == "x-e2e-" then
                    ngx.req.clear_header(name)
                end
            end
            for _, name in ipairs(exported) do
                local value = ngx.var[name]
                if value ~= nil then
                    ngx.req.set_header("X-E2E-Var-" .. name, "=" .. ngx.escape_uri(value))
                end
            end
        end
    }

    upstream e2e_bridge {
        server 127.0.0.1:@BRIDGE_PORT@;
        keepalive 16;
    }

    # The front proxy forwards the certificate as an XFCC element only when there is one.
    map $ssl_client_escaped_cert $e2e_xfcc {
        ""      "";
        default "By=front.example.test;Cert=\\"$ssl_client_escaped_cert\\"";
    }

    server {
        listen 127.0.0.1:@HTTPS_PORT@ ssl;
        server_name @API_HOST@;
        underscores_in_headers on;
        ssl_certificate @SERVER_CERT@;
        ssl_certificate_key @SERVER_KEY@;
        # APISIX's defaults (apisix/cli/ngx_tpl.lua): a shared session cache, no stateless tickets.
        ssl_session_cache shared:e2e_ssl:1m;
        ssl_session_timeout 10m;
        ssl_session_tickets off;
        ssl_certificate_by_lua_block {
            local ssl = require "ngx.ssl"
            local ok, err = ssl.verify_client(E2E_CLIENT_CA, @DEPTH@)
            if not ok then
                ngx.log(ngx.ERR, "verify_client failed: ", err)
                return ngx.exit(ngx.ERROR)
            end
        }
        location / {
@PROXY@
        }
    }

    server {
        listen 127.0.0.1:@HTTP_PORT@;
        server_name @API_HOST@;
        underscores_in_headers on;
        location / {
@PROXY@
        }
    }

    server {
        listen 127.0.0.1:@FRONT_PORT@ ssl;
        server_name @FRONT_HOST@;
        # Passes the client's underscored headers on (x_client_cert next to its own X-Client-Cert).
        underscores_in_headers on;
        ssl_certificate @SERVER_CERT@;
        ssl_certificate_key @SERVER_KEY@;
        ssl_session_tickets off;
        # Tolerant like the main listener (ssl_verify_client optional_no_ca would still refuse an expired
        # certificate with 400): this proxy forwards every certificate it got, so the plugin must re-verify.
        ssl_certificate_by_lua_block {
            local ok, err = require("ngx.ssl").verify_client(E2E_CLIENT_CA, @DEPTH@)
            if not ok then
                ngx.log(ngx.ERR, "verify_client failed: ", err)
                return ngx.exit(ngx.ERROR)
            end
        }
        location / {
            proxy_pass http://127.0.0.1:@HTTP_PORT@;
            proxy_http_version 1.1;
            proxy_set_header Host @API_HOST@;
            proxy_set_header Connection "";
            proxy_set_header X-Client-Cert $ssl_client_escaped_cert;
            proxy_set_header X-Forwarded-Client-Cert $e2e_xfcc;
            proxy_set_header X-SSL-Client-Verify $ssl_client_verify;
        }
    }
}
"""

_PROXY = """\
            rewrite_by_lua_block { e2e_export_vars() }
            proxy_pass http://e2e_bridge;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Connection "";
            proxy_read_timeout 30s;
            proxy_next_upstream off;"""


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 that was free a moment ago (nginx cannot listen on port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Ports:
    https: int
    http: int
    front: int

    @classmethod
    def pick(cls) -> Ports:
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        https, http, front = sorted(ports)
        return cls(https, http, front)


class NginxFront:
    """One nginx process (``master_process off``, ``daemon off``) with everything inside ``prefix``."""

    def __init__(self, env: NginxEnv, pki: Pki, prefix: Path, bridge_port: int) -> None:
        self.env = env
        self.pki = pki
        self.prefix = prefix
        self.bridge_port = bridge_port
        self.ports = Ports.pick()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def render(self) -> str:
        values = {
            "@MODULES@": load_module_lines(self.env.modules),
            "@PREFIX@": str(self.prefix),
            "@LUA@": self.env.lua_path,
            "@CA@": str(self.pki.ca_file),
            "@VARS@": ", ".join(f'"{v}"' for v in EXPORTED_VARS),
            "@PROXY@": _PROXY,
            "@BRIDGE_PORT@": str(self.bridge_port),
            "@HTTPS_PORT@": str(self.ports.https),
            "@HTTP_PORT@": str(self.ports.http),
            "@FRONT_PORT@": str(self.ports.front),
            "@API_HOST@": API_HOST,
            "@FRONT_HOST@": FRONT_HOST,
            "@SERVER_CERT@": str(self.pki.server_cert),
            "@SERVER_KEY@": str(self.pki.server_key),
            "@DEPTH@": str(VERIFY_DEPTH),
        }
        text = _CONF
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        leftover = re.findall(r"@[A-Z_]+@", text)
        assert not leftover, f"unfilled placeholders {leftover}"
        return text

    def start(self, attempts: int = 3) -> NginxFront:
        """Start nginx and wait until every listener accepts; retries with new ports on a port race."""
        for tmp in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / "tmp" / tmp).mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            if attempt:
                self.ports = Ports.pick()
            conf = self.prefix / "nginx.conf"
            conf.write_text(self.render(), encoding="utf-8")
            argv = [self.env.nginx, "-p", f"{self.prefix}/", "-e", str(self.error_log), "-c", str(conf)]
            argv += ["-g", "daemon off;"]
            out = (self.prefix / "nginx.out").open("ab")
            try:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            finally:
                out.close()
            if self._wait_listening(10.0):
                return self
            self.stop()
            if "Address already in use" not in self.errors():
                break
        raise RuntimeError(f"nginx did not start:\n{self.errors()}")

    def _wait_listening(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        pending = {self.ports.https, self.ports.http, self.ports.front}
        while pending and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            pending -= {port for port in pending if _accepts(port)}
            if pending:
                time.sleep(0.02)
        return not pending

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # fast shutdown
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def errors(self, levels: str = "emerg|alert|crit|error") -> str:
        """error.log lines at the given levels (and nginx's own start-up output)."""
        lines = []
        for path in (self.error_log, self.prefix / "nginx.out"):
            if path.exists():
                lines += [
                    ln for ln in path.read_text(errors="replace").splitlines() if re.search(rf"\[({levels})\]", ln)
                ]
        return "\n".join(lines)

    def url(self, listener: str, path: str) -> str:
        port = getattr(self.ports, listener)
        scheme = "http" if listener == "http" else "https"
        return f"{scheme}://127.0.0.1:{port}{path}"

    def __enter__(self) -> NginxFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
