"""Small plugins that exist only to exercise the runner; each does one visible thing.

``make_registry()`` returns fresh instances, so per-plugin counters never leak between tests.
Conf values are plain strings (JSON where a plugin needs structure) so tests can read them inline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runner import BasePlugin, HTTPRequest, HTTPResponse, PluginRegistry, Stop

__all__ = [
    "BadStop",
    "BodyDigest",
    "Echo",
    "FileVerdict",
    "FixedOptions",
    "Hang",
    "Order",
    "Raise",
    "RespHeader",
    "SetHeader",
    "Sleep",
    "StopWith",
    "StrictJson",
    "Vars",
    "make_registry",
]


class StopWith(BasePlugin[Stop]):
    """Conf ``{"status": 403, "headers": [["x", "y"]], "body": "no"}`` -> that Stop."""

    name = "stop"

    def parse_conf(self, value: str) -> Stop:
        data = json.loads(value)
        return Stop(
            status=int(data.get("status", 200)),
            headers=tuple((n, v) for n, v in data.get("headers", ())),
            body=str(data.get("body", "")).encode(),
        )

    async def on_request(self, conf: Stop, request: HTTPRequest) -> Stop | None:
        return conf


class SetHeader(BasePlugin[tuple[str, str]]):
    """Conf ``name: value`` -> rewrite that upstream header."""

    name = "set-header"

    def parse_conf(self, value: str) -> tuple[str, str]:
        name, sep, header_value = value.partition(":")
        if not sep:
            raise ValueError("expected 'name: value'")
        return name.strip(), header_value.strip()

    async def on_request(self, conf: tuple[str, str], request: HTTPRequest) -> Stop | None:
        request.set_header(*conf)
        return None


class Order(BasePlugin[str]):
    """Appends its conf to ``request.state["order"]``; a conf ending in ``!`` stops with that order."""

    name = "order"

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        order = request.state.setdefault("order", [])
        order.append(conf.rstrip("!"))
        if conf.endswith("!"):
            return Stop(status=299, body=",".join(order).encode())
        if conf.startswith("/"):
            request.set_path(conf)
        return None


class Echo(BasePlugin[str]):
    """Stops with a JSON body describing exactly what the plugin saw."""

    name = "echo"

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        seen = {
            "id": request.id,
            "method": request.method,
            "path": request.path,
            "src_ip": request.src_ip,
            "headers": [list(p) for p in request.headers.pairs],
            "args": [list(p) for p in request.args.pairs],
            "x_req": list(request.headers.get_all("X-Req")),
            "conf": conf,
        }
        return Stop(status=200, body=json.dumps(seen).encode())


class Vars(BasePlugin[tuple[str, ...]]):
    """Conf ``a,b,c``: fetches those vars in one ``vars()`` call and stops with them as JSON."""

    name = "vars"

    def parse_conf(self, value: str) -> tuple[str, ...]:
        return tuple(n for n in value.split(",") if n)

    async def on_request(self, conf: tuple[str, ...], request: HTTPRequest) -> Stop | None:
        values = await request.vars(*conf)
        return Stop(status=200, body=json.dumps(values).encode())


class BodyDigest(BasePlugin[str]):
    """Reads the request body and stops with its length and SHA-256 in headers."""

    name = "body-digest"

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        body = await request.body()
        if body is None:
            return Stop(status=204, headers=(("x-body", "none"),))
        return Stop(
            status=200,
            headers=(("x-body-length", str(len(body))), ("x-body-sha256", hashlib.sha256(body).hexdigest())),
        )


class Raise(BasePlugin[str]):
    """Raises from the filter (a plugin bug)."""

    name = "raise"

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        raise RuntimeError(f"boom: {conf}")


class BadStop(BasePlugin[int]):
    """Returns a Stop with the status given as conf (for out-of-range statuses)."""

    name = "bad-stop"

    def parse_conf(self, value: str) -> int:
        return int(value)

    async def on_request(self, conf: int, request: HTTPRequest) -> Stop | None:
        return Stop(status=conf)


class Hang(BasePlugin[str]):
    """Awaits an event nobody sets; records being started and being closed."""

    name = "hang"

    def __init__(self) -> None:
        self.started = 0
        self.closed = 0

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        self.started += 1
        try:
            if conf:
                await request.vars(*conf.split(","))
            await asyncio.Event().wait()
        finally:
            self.closed += 1
        return None


class Sleep(BasePlugin[float]):
    """Sleeps (a real asyncio timer) for ``conf`` seconds, then stops with 200."""

    name = "sleep"

    def parse_conf(self, value: str) -> float:
        return float(value)

    async def on_request(self, conf: float, request: HTTPRequest) -> Stop | None:
        await asyncio.sleep(conf)
        return Stop(status=200, body=b"slept")


class StrictJson(BasePlugin[dict[str, Any]]):
    """Accepts only a JSON object; counts how often a value is compiled."""

    name = "strict-json"

    def __init__(self) -> None:
        self.parsed: list[str] = []

    def parse_conf(self, value: str) -> dict[str, Any]:
        self.parsed.append(value)
        data = json.loads(value)
        if not isinstance(data, dict):
            raise ValueError("conf must be a JSON object")
        return data


class RespHeader(BasePlugin[tuple[str, str]]):
    """ext-plugin-post-resp: conf ``name: value`` sets that response header."""

    name = "resp-header"

    def parse_conf(self, value: str) -> tuple[str, str]:
        name, _, header_value = value.partition(":")
        return name.strip(), header_value.strip()

    async def on_response(self, conf: tuple[str, str], response: HTTPResponse) -> None:
        response.set_header(*conf)


class FileVerdict(BasePlugin[tuple[bool, str]]):
    """Option ``verdict_file``: a file holding ``allow`` (routes pass) or ``deny`` (403); live reload
    (``reconfigure``) reads it again and refuses anything else. The verdict is compiled into each conf,
    so a reload reaches calls through recompilation. Conf ``var:<name>`` asks APISIX for that variable
    before deciding (a call in flight across a reload); conf ``only-while-allowing`` stops compiling
    once the file says ``deny``."""

    name = "file-verdict"

    def __init__(self) -> None:
        self.allow = True
        self.commits = 0

    def setup(self, options: Mapping[str, Any]) -> None:
        self.reconfigure(options)()

    def reconfigure(self, options: Mapping[str, Any]) -> Callable[[], None]:
        path = options.get("verdict_file")
        allow = True
        if path is not None:
            text = Path(path).read_text().strip()
            if text not in ("allow", "deny"):
                raise ValueError(f"verdict file {path}: {text[:20]!r} is neither allow nor deny")
            allow = text == "allow"

        def commit() -> None:
            self.allow = allow
            self.commits += 1

        return commit

    def parse_conf(self, value: str) -> tuple[bool, str]:
        if value == "only-while-allowing" and not self.allow:
            raise ValueError("only valid while the verdict file says allow")
        return self.allow, value

    async def on_request(self, conf: tuple[bool, str], request: HTTPRequest) -> Stop | None:
        allow, value = conf
        if value.startswith("var:"):
            await request.var(value.removeprefix("var:"))
        return None if allow else Stop(status=403, body=b"denied by file")


class FixedOptions(BasePlugin[str]):
    """Takes options at start-up only (no ``reconfigure``): a reload that changes them needs a restart."""

    name = "fixed-options"

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}

    def setup(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)


def make_registry() -> PluginRegistry:
    return PluginRegistry(
        [
            StopWith(),
            SetHeader(),
            Order(),
            Echo(),
            Vars(),
            BodyDigest(),
            Raise(),
            BadStop(),
            Hang(),
            Sleep(),
            StrictJson(),
            RespHeader(),
        ]
    )
