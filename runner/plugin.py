"""The plugin contract: what a plugin implements and the request/response objects it works on.

A plugin parses its route config once per PrepareConf (``parse_conf``) into an immutable object;
the runner then hands that object to ``on_request`` (ext-plugin-pre-req / post-req) or
``on_response`` (ext-plugin-post-resp) for every call. Raising in ``parse_conf`` rejects the route
config (APISIX answers 503 for that route); raising in a filter fails the call closed (503).

Options come once through ``setup``; a plugin that also defines ``reconfigure`` (see Reconfigurable)
takes new options on a live reload without a restart.

Each call runs in an asyncio Task of its own, so filters can use ordinary asyncio; a plugin whose
filters await nothing but ExtraInfo may declare ``needs_task = False`` to skip the Task (see Plugin).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from .headers import Headers, header_name, text
from .protocol.codec import HTTPReqCall, HTTPRespCall
from .protocol.messages import (
    METHOD_NAMES,
    ExtraInfoQuery,
    ReqBodyQuery,
    RespBodyQuery,
    Rewrite,
    Stop,
    VarQuery,
)

__all__ = [
    "BasePlugin",
    "ExtraInfoChannel",
    "HTTPRequest",
    "HTTPResponse",
    "Headers",
    "Plugin",
    "Reconfigurable",
]

ConfT = TypeVar("ConfT")
ConfT_co = TypeVar("ConfT_co", covariant=True)


class ExtraInfoChannel(Protocol):
    """Sends ExtraInfo queries to APISIX (pipelined) and resolves with their results, in order."""

    def query(self, queries: Sequence[ExtraInfoQuery]) -> Any: ...


@runtime_checkable
class Plugin(Protocol[ConfT]):
    """What the runner needs from a plugin. See BasePlugin for defaults, and Reconfigurable for the
    optional ``reconfigure`` that lets a live reload (SIGHUP) give it new options.

    Optional class attribute ``needs_task`` (absent means True). By default each call runs in an
    ``asyncio.Task`` of its own, created with the loop's task factory, so filters may use ordinary
    asyncio: ``asyncio.timeout``, ``gather``, ``sleep``, ``current_task()``, any future, anyio-based
    libraries such as httpx. A plugin whose filters await only the runner's ExtraInfo (``var``,
    ``vars``, ``body`` of the request or response) may set ``needs_task = False``: its calls are then
    driven without a Task, which saves the Task's creation and a loop turn to start and per ExtraInfo
    answer (README "Writing other plugins" has the figures). Such a filter awaiting anything else fails
    its call closed (503, ``TaskRequired`` in the log) instead of half working, since
    ``asyncio.timeout`` and anyio cannot work outside a Task. A chain runs without a Task only when
    every plugin in it declares so. Either way a call is cut off after ``call_timeout`` and when
    APISIX closes the connection: in a Task the filter sees ``CancelledError`` at its next await
    (one that swallows it runs on, unanswered), driven directly it is closed (``GeneratorExit``);
    its finally blocks run in both cases.
    """

    name: str

    def setup(self, options: Mapping[str, Any]) -> None:
        """Called once at start-up with the plugin's section of the runner settings.

        Paths: an option whose key ends in ``_file`` or ``_dir`` (a string), or in ``_files`` or
        ``_dirs`` (a list of strings), arrives with relative values already resolved against the
        directory of the runner's config file, so ``policy_file: policies.yaml`` means the file next
        to the config wherever the runner was started. Name path options that way; any other option
        arrives exactly as written."""

    def parse_conf(self, value: str) -> ConfT:
        """Validate and compile one route config; raise (any exception) to reject it."""

    async def on_request(self, conf: ConfT, request: HTTPRequest) -> Stop | None:
        """Return a Stop to answer the client now; change ``request`` to rewrite it."""

    async def on_response(self, conf: ConfT, response: HTTPResponse) -> None:
        """Inspect or change the upstream response (ext-plugin-post-resp)."""


@runtime_checkable
class Reconfigurable(Protocol):
    """The optional live-reload half of the contract; a plugin without it keeps its start-up options
    (a reload that changes them logs them as needing a restart)."""

    def reconfigure(self, options: Mapping[str, Any]) -> Callable[[], None]:
        """Validate ``options`` (the plugin's section of the reloaded settings, paths resolved as for
        ``setup``) and build everything from them, without changing the current state; raise (any
        exception; its message is logged) if they are invalid. Return ``commit``, which installs the
        new state and cannot fail.

        Called on every reload (SIGHUP, or a watched file changed), even with unchanged options:
        the files they name may have changed. It runs in a helper thread while calls are served
        from the current state, so it must only read that state. The runner commits only when every
        plugin's ``reconfigure`` succeeded (in every worker process); otherwise nothing changes
        anywhere. ``commit`` runs on the event loop between two calls; after it every conf token
        is compiled again through ``parse_conf`` on its next use, while calls already running finish
        with the conf they started with. State a decision depends on should therefore reach
        ``on_request`` through the compiled conf. A conf that no longer compiles fails closed (503)
        until APISIX prepares a changed one or a later reload makes it compile again."""


class BasePlugin(Generic[ConfT]):
    """Convenience base class: no-op filters and a raw-string config. It has no ``reconfigure``, so
    a subclass that does not define one needs a restart to take new options (see Reconfigurable)."""

    name = ""
    needs_task: bool = True
    """False: the filters await only ExtraInfo and run without an asyncio Task (see Plugin)."""

    def setup(self, options: Mapping[str, Any]) -> None:
        return None

    def parse_conf(self, value: str) -> ConfT:
        return value  # type: ignore[return-value]

    async def on_request(self, conf: ConfT, request: HTTPRequest) -> Stop | None:
        return None

    async def on_response(self, conf: ConfT, response: HTTPResponse) -> None:
        return None


_VAR_QUERY_CACHE_SIZE = 1024
_var_queries: dict[str, VarQuery] = {}


def _var_query(name: str) -> VarQuery:
    """The (immutable, so shareable) VarQuery for ``name``: building a frozen dataclass per variable
    per request costs more than the rest of asking for it. Names come from plugin code, so the set is
    small; the bound only guards misuse."""
    query = _var_queries.get(name)
    if query is None:
        query = VarQuery(name)
        if len(_var_queries) < _VAR_QUERY_CACHE_SIZE:
            _var_queries[name] = query
    return query


class _ExtraInfoMixin:
    """What requests and responses share: the call's id and token, and ExtraInfo variables."""

    __slots__ = ()
    _call: HTTPReqCall | HTTPRespCall
    _channel: ExtraInfoChannel
    _vars: dict[str, str | None]

    @property
    def id(self) -> int:
        return self._call.id

    @property
    def conf_token(self) -> int:
        return self._call.conf_token

    async def vars(self, *names: str) -> dict[str, str | None]:
        """Variables (nginx/APISIX ``ctx.var``) in one pipelined round trip; absent ones are None."""
        known = self._vars
        missing = [n for n in names if n not in known]
        if missing:
            if len(missing) > 1:
                missing = list(dict.fromkeys(missing))  # each name asked once
            results = await self._channel.query([_var_query(n) for n in missing])
            for name, raw in zip(missing, results, strict=True):
                known[name] = None if raw is None else raw.decode("utf-8", "surrogateescape")
        return {n: known[n] for n in names}

    async def var(self, name: str) -> str | None:
        # Same as ``(await self.vars(name))[name]``, without the batching machinery (hot path).
        if name in self._vars:
            return self._vars[name]
        (raw,) = await self._channel.query([_var_query(name)])
        value = self._vars[name] = text(raw)
        return value


class HTTPRequest(_ExtraInfoMixin):
    """One HTTPReqCall as a plugin sees it; changes are collected into a single Rewrite."""

    _call: HTTPReqCall

    __slots__ = (
        "_arg_changes",
        "_args",
        "_body",
        "_body_loaded",
        "_call",
        "_channel",
        "_header_changes",
        "_headers",
        "_new_body",
        "_path",
        "_resp_headers",
        "_vars",
        "state",
    )

    def __init__(self, call: HTTPReqCall, channel: ExtraInfoChannel) -> None:
        self._call = call
        self._channel = channel
        self._vars: dict[str, str | None] = {}
        self._headers: Headers | None = None
        self._args: Headers | None = None
        self._path: str | None = None
        self._header_changes: dict[str, str | None] = {}
        self._arg_changes: dict[str, list[str | None]] = {}
        self._resp_headers: list[tuple[str, str]] = []
        self._new_body: bytes | None = None
        self._body: bytes | None = None
        self._body_loaded = False
        self.state: dict[str, Any] = {}
        """Scratch space shared by the plugins of one call (e.g. an identity for later plugins)."""

    # -- what APISIX sent ---------------------------------------------------------------------
    @property
    def method(self) -> str:
        m = self._call.method
        return METHOD_NAMES[m] if 0 <= m < len(METHOD_NAMES) else str(m)

    @property
    def path(self) -> str | None:
        """The path as APISIX sent it (``$uri``, or ``$upstream_uri`` if a plugin changed it)."""
        return self._call.path if self._path is None else self._path

    @property
    def src_ip(self) -> str | None:
        raw = self._call.src_ip
        if raw is None or len(raw) not in (4, 16):
            return None
        return str(ipaddress.ip_address(raw))

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            self._headers = Headers(self._call.headers)
        return self._headers

    @property
    def args(self) -> Headers:
        if self._args is None:
            self._args = Headers(self._call.args)
        return self._args

    @property
    def call(self) -> HTTPReqCall:
        """The raw decoded call (lazy view), for plugins that need the pairs as sent."""
        return self._call

    async def body(self) -> bytes | None:
        """The request body (one ExtraInfo round trip, cached); None if there is none."""
        if not self._body_loaded:
            (self._body,) = await self._channel.query([ReqBodyQuery()])
            self._body_loaded = True
        return self._body

    # -- changes ------------------------------------------------------------------------------
    def set_path(self, path: str, *, literal_question_mark: bool = False) -> None:
        """Proxy ``path`` instead of the client's request-target; the query is kept as sent.

        ``path`` is decoded text: APISIX percent-encodes space, ``#``, ``%``, ``?``, controls and
        non-ASCII bytes before proxying it (``core.utils.uri_safe_encode``). A ``?`` is therefore
        delivered as ``%3F``, never as a query; it is refused unless ``literal_question_mark`` says
        the caller means a literal one (a ``$uri`` decoded from ``%3F``), so that a plugin cannot
        believe it added query arguments (use ``set_arg`` for that).
        """
        if not path.startswith("/") or ("?" in path and not literal_question_mark):
            raise ValueError("path must start with '/' and carry no query (use set_arg)")
        self._path = path

    def set_header(self, name: str, value: str) -> None:
        self._header_changes[header_name(name)] = value

    def delete_header(self, name: str) -> None:
        self._header_changes[header_name(name)] = None

    def set_arg(self, name: str, *values: str) -> None:
        """Replace every value of query arg ``name`` (several values make it repeated)."""
        if not values:
            raise ValueError("set_arg needs at least one value (use delete_arg)")
        self._arg_changes[name] = list(values)

    def delete_arg(self, name: str) -> None:
        self._arg_changes[name] = [None]

    def add_response_header(self, name: str, value: str) -> None:
        self._resp_headers.append((header_name(name), value))

    def set_body(self, body: bytes) -> None:
        if not body:
            raise ValueError("APISIX ignores an empty body rewrite")
        self._new_body = body

    def rewrite(self) -> Rewrite | None:
        """The Rewrite carrying only what plugins changed, or None when nothing changed."""
        if not (
            self._path is not None
            or self._header_changes
            or self._arg_changes
            or self._resp_headers
            or self._new_body is not None
        ):
            return None
        return Rewrite(
            self._path,
            tuple(self._header_changes.items()),
            tuple((n, v) for n, vs in self._arg_changes.items() for v in vs) if self._arg_changes else (),
            tuple(self._resp_headers),
            self._new_body,
        )


class HTTPResponse(_ExtraInfoMixin):
    """One HTTPRespCall (ext-plugin-post-resp) as a plugin sees it."""

    __slots__ = ("_body", "_body_loaded", "_call", "_channel", "_headers", "_new_body", "_status", "_vars")
    _call: HTTPRespCall

    def __init__(self, call: HTTPRespCall, channel: ExtraInfoChannel) -> None:
        self._call = call
        self._channel = channel
        self._vars = {}
        self._headers: list[tuple[str, str]] | None = None
        self._status = 0
        self._new_body: bytes | None = None
        self._body: bytes | None = None
        self._body_loaded = False

    @property
    def status(self) -> int:
        return self._status or self._call.status

    @property
    def headers(self) -> Headers:
        pairs = self._call.headers if self._headers is None else tuple(self._headers)
        return Headers(pairs)

    async def body(self) -> bytes | None:
        """The upstream body (ExtraInfo RespBody, cached); None if APISIX has none."""
        if not self._body_loaded:
            (self._body,) = await self._channel.query([RespBodyQuery()])
            self._body_loaded = True
        return self._body

    def set_status(self, status: int) -> None:
        if not 100 <= status <= 599:
            raise ValueError(f"status {status} outside 100..599")
        self._status = status

    def _editable_headers(self) -> list[tuple[str, str]]:
        if self._headers is None:
            self._headers = [(n, v) for n, v in self._call.headers if v is not None]
        return self._headers

    def set_header(self, name: str, value: str) -> None:
        self.delete_header(name)
        self._editable_headers().append((name, value))

    def add_header(self, name: str, value: str) -> None:
        self._editable_headers().append((name, value))

    def delete_header(self, name: str) -> None:
        key = name.lower()
        self._headers = [(n, v) for n, v in self._editable_headers() if n.lower() != key]

    def set_body(self, body: bytes) -> None:
        self._new_body = body

    def changes(self) -> tuple[int, tuple[tuple[str, str], ...], bytes | None]:
        """(status, headers, body) for the reply. Headers, once touched, are sent in full because
        APISIX replaces the upstream's whole header set with a non-empty list."""
        headers = () if self._headers is None else tuple(self._headers)
        return self._status, headers, self._new_body
