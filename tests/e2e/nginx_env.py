"""Find an nginx that can play APISIX's TLS front: nginx + ngx_http_lua + lua-resty-core's ``verify_client``.

``python -m tests.e2e.nginx_env --check`` exits 0 when the end-to-end tests can run, else 1 after
printing what is missing (``scripts/test`` then installs the Debian packages). The probe ends with a
real ``nginx -t`` of a configuration that loads the modules and resolves ``ngx.ssl.verify_client``,
so "installed but unusable" (ABI mismatch, old lua-resty-core) is caught here and not in a test.

Overrides, for unusual layouts: ``MTLS_GUARD_NGINX`` (binary), ``MTLS_GUARD_NGINX_MODULES`` (directory
of ``ndk_http_module.so`` and ``ngx_http_lua_module.so``), ``MTLS_GUARD_LUA_PATH`` (directory holding
``ngx/ssl.lua``), ``MTLS_GUARD_CURL`` (curl binary).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NginxEnv", "Probe", "load_module_lines", "main", "probe"]

MODULE_FILES = ("ndk_http_module.so", "ngx_http_lua_module.so")  # NDK must be loaded first
DEFAULT_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/usr/local/nginx/modules")
LUA_DIRS = ("/usr/share/lua/5.1", "/usr/local/share/lua/5.1", "/usr/local/openresty/lualib")
PACKAGES_HINT = "Debian packages: nginx libnginx-mod-http-lua lua-resty-core openssl curl"


@dataclass(frozen=True)
class NginxEnv:
    """Everything a test needs to start the nginx front."""

    nginx: str
    version: str
    modules: tuple[str, ...]  # absolute .so paths, in load order
    lua_path: str  # directory holding ngx/ssl.lua
    curl: str


@dataclass(frozen=True)
class Probe:
    env: NginxEnv | None
    problems: tuple[str, ...]

    @property
    def usable(self) -> bool:
        return self.env is not None and not self.problems

    def reason(self) -> str:
        return "; ".join(self.problems) + f" ({PACKAGES_HINT})"


def load_module_lines(modules: tuple[str, ...]) -> str:
    return "".join(f"load_module {m};\n" for m in modules)


def _run(argv: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _find_nginx(environ: Mapping[str, str]) -> str | None:
    override = environ.get("MTLS_GUARD_NGINX")
    if override:
        return override if os.access(override, os.X_OK) else None
    return shutil.which("nginx", path=environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin")


def _module_dirs(build_info: str, environ: Mapping[str, str]) -> list[str]:
    override = environ.get("MTLS_GUARD_NGINX_MODULES")
    if override:
        return [override]
    dirs = []
    match = re.search(r"--modules-path=(\S+)", build_info)
    if match:
        dirs.append(match.group(1))
    dirs.extend(d for d in DEFAULT_MODULE_DIRS if d not in dirs)
    return dirs


def _find_lua_core(environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(directory holding ngx/ssl.lua with verify_client, problem)."""
    override = environ.get("MTLS_GUARD_LUA_PATH")
    candidates = [override] if override else list(LUA_DIRS)
    for directory in candidates:
        ssl_lua = Path(directory, "ngx", "ssl.lua")
        try:
            text = ssl_lua.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if "verify_client" not in text:
            return None, f"{ssl_lua} has no verify_client (lua-resty-core too old, need >= 0.1.23)"
        return directory, None
    return None, f"lua-resty-core (ngx/ssl.lua) not found in {', '.join(candidates)}"


_SMOKE_CONF = """\
@MODULES@
master_process off;
error_log @PREFIX@/error.log warn;
pid @PREFIX@/nginx.pid;
events { worker_connections 16; }
http {
    access_log off;
    client_body_temp_path @PREFIX@/tmp;
    proxy_temp_path @PREFIX@/tmp;
    fastcgi_temp_path @PREFIX@/tmp;
    uwsgi_temp_path @PREFIX@/tmp;
    scgi_temp_path @PREFIX@/tmp;
    lua_package_path "@LUA@/?.lua;;";
    init_by_lua_block {
        local ssl = require "ngx.ssl"
        assert(type(ssl.verify_client) == "function", "ngx.ssl.verify_client is missing")
        assert(type(ssl.parse_pem_cert) == "function", "ngx.ssl.parse_pem_cert is missing")
    }
    server {
        listen unix:@PREFIX@/smoke.sock;
        location / { content_by_lua_block { ngx.print("verify_client=", type(require("ngx.ssl").verify_client)) } }
    }
}
"""


def _ask(sock_path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(sock_path)
        sock.sendall(b"GET / HTTP/1.0\r\nHost: smoke\r\n\r\n")
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode("latin-1")


def _smoke(nginx: str, modules: tuple[str, ...], lua_path: str) -> str | None:
    """Really start nginx (``nginx -t`` skips init_by_lua) and ask Lua whether verify_client exists."""
    with tempfile.TemporaryDirectory(prefix="mg-ngx-", dir="/tmp") as prefix:
        os.mkdir(os.path.join(prefix, "tmp"))
        conf = (
            _SMOKE_CONF.replace("@MODULES@", load_module_lines(modules))
            .replace("@PREFIX@", prefix)
            .replace("@LUA@", lua_path)
        )
        Path(prefix, "nginx.conf").write_text(conf, encoding="utf-8")
        log = Path(prefix, "error.log")
        argv = [nginx, "-p", prefix + "/", "-e", str(log), "-c", "nginx.conf", "-g", "daemon off;"]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:
            return f"nginx could not run: {exc}"
        answer, problem = "", None
        try:
            deadline = time.monotonic() + 5.0
            sock_path = os.path.join(prefix, "smoke.sock")
            while proc.poll() is None and time.monotonic() < deadline:
                if os.path.exists(sock_path):
                    try:
                        answer = _ask(sock_path)
                        break
                    except OSError:
                        pass
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                _, stderr = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stderr = proc.communicate()
        if "verify_client=function" not in answer:
            details = stderr.decode(errors="replace") + (log.read_text(errors="replace") if log.exists() else "")
            lines = [line for line in details.splitlines() if re.search(r"\[(emerg|alert|crit|error)\]", line)]
            lines = lines or details.splitlines()[-3:] or ["no answer from nginx"]
            problem = "nginx with the Lua module did not start or has no verify_client: " + " | ".join(lines[:3])
        return problem


@functools.cache
def _probe_cached(items: tuple[tuple[str, str], ...]) -> Probe:
    return _probe(dict(items))


def probe(environ: Mapping[str, str] | None = None) -> Probe:
    """Look for everything the end-to-end tests need (cached per environment)."""
    env = os.environ if environ is None else environ
    keys = ("PATH", "MTLS_GUARD_NGINX", "MTLS_GUARD_NGINX_MODULES", "MTLS_GUARD_LUA_PATH", "MTLS_GUARD_CURL")
    return _probe_cached(tuple((k, env[k]) for k in keys if k in env))


def _probe(environ: Mapping[str, str]) -> Probe:
    problems: list[str] = []
    nginx = _find_nginx(environ)
    if nginx is None:
        problems.append("nginx not found (or MTLS_GUARD_NGINX is not executable)")
        return Probe(None, tuple(problems))
    try:
        info = _run([nginx, "-V"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Probe(None, (f"{nginx} -V failed: {exc}",))
    build = info.stderr + info.stdout
    version_match = re.search(r"nginx/(\S+)", build)
    version = version_match.group(1) if version_match else "unknown"
    if "--with-http_ssl_module" not in build:
        problems.append(f"{nginx} was built without http_ssl_module")
    modules: list[str] = []
    dirs = _module_dirs(build, environ)
    for name in MODULE_FILES:
        path = next((str(Path(d, name)) for d in dirs if Path(d, name).is_file()), None)
        if path is None:
            problems.append(f"nginx module {name} not found in {', '.join(dirs)}")
        else:
            modules.append(path)
    lua_path, lua_problem = _find_lua_core(environ)
    if lua_problem:
        problems.append(lua_problem)
    curl = environ.get("MTLS_GUARD_CURL") or shutil.which("curl", path=environ.get("PATH", os.defpath))
    if not curl:
        problems.append("curl not found")
    if problems or lua_path is None:
        return Probe(None, tuple(problems))
    smoke = _smoke(nginx, tuple(modules), lua_path)
    if smoke:
        return Probe(None, (smoke,))
    assert curl is not None
    return Probe(NginxEnv(nginx, version, tuple(modules), lua_path, curl), ())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.nginx_env", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 0 if usable, else print what is missing, exit 1")
    args = parser.parse_args(argv)
    result = probe()
    if not result.usable:
        print("end-to-end tests unusable: " + result.reason(), file=sys.stderr if args.check else sys.stdout)
        return 1
    env = result.env
    assert env is not None
    modules = " ".join(env.modules)
    print(f"ok: nginx {env.version} at {env.nginx}; modules {modules}; lua {env.lua_path}; curl {env.curl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
