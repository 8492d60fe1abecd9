"""One call of a plugin chain (HTTPReqCall or HTTPRespCall): run in an asyncio Task, or driven directly.

A call runs in an asyncio Task of its own, created with the running loop's task factory, so ordinary
asyncio works in the filter: ``asyncio.current_task()``, ``asyncio.timeout``, ``gather``, anyio-based
libraries such as httpx. A chain whose plugins all declare ``needs_task = False`` (runner.plugin.Plugin)
is driven directly instead (runner.driver): cheaper, but such a filter can await only the runner's
ExtraInfo. Without a running event loop (a sans-IO Session in tests or the fuzz harness) no Task can
exist: such calls are driven directly as well, bare yields resumed through the session's ``schedule``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from types import CoroutineType
from typing import Any, Protocol, TypeAlias, cast

from .confcache import Chain
from .driver import CoroutineDriver
from .errors import PluginFailure
from .plugin import ExtraInfoChannel, HTTPRequest, HTTPResponse
from .protocol import codec
from .protocol.messages import HTTPRespCallReply, Stop

__all__ = ["Call", "CallOwner", "View", "needs_task"]

View: TypeAlias = codec.HTTPReqCall | codec.HTTPRespCall

# Public since Python 3.7 (in asyncio.__all__) though undocumented: None when no loop runs, which is
# the sans-IO case and no error, where get_running_loop() would raise.
_running_loop = asyncio._get_running_loop


class CallOwner(ExtraInfoChannel, Protocol):
    """The session a call belongs to: it answers the call's ExtraInfo queries and takes its outcome."""

    def call_done(self, call: Call, result: Any, error: BaseException | None) -> None: ...

    def call_ended(self) -> None:
        """After ``call_done`` of a call in a Task: it ran on later loop turns, so frames may be waiting."""


class Call(CoroutineDriver):
    """A plugin chain in progress on a connection: its asyncio Task, or the driver of its coroutine.

    One object per call that reports its outcome to its owner itself (``_finish``) rather than
    through an ``on_done`` closure: fewer allocations per request, and no reference cycle, so a
    finished call is freed at once instead of waiting for the cyclic garbage collector.
    """

    __slots__ = ("id", "owner", "plugin", "request", "rpc_type", "started", "task", "view")

    def __init__(self, owner: CallOwner, rpc_type: int, view: View, started: float) -> None:
        self.owner = owner
        self.rpc_type = rpc_type
        self.view = view
        self.id = view.id
        self.started = started
        self.plugin = ""
        """The plugin running now ("" between plugins), for error messages."""
        self.request: HTTPRequest | None = None
        self.task: asyncio.Task[None] | None = None

    def run(self, chain: Chain, schedule: Callable[[Callable[[], None]], object]) -> None:
        """Start the chain: in a Task (its first step comes on the next loop turn), or driven
        directly to its first wait or end."""
        if isinstance(self.view, codec.HTTPReqCall):
            self.request = HTTPRequest(self.view, self.owner)
        # needs_task() inline: a function call less on the hot path.
        for link in chain:
            if getattr(link.plugin, "needs_task", True) is not False:
                break
        else:
            self._start(self.coroutine(chain), None)
            self.step()
            return
        loop = _running_loop()
        if loop is not None:
            self.finished = False
            self.waiting_on = None
            self.task = loop.create_task(_in_task(self, chain))
            return
        self._start(self.coroutine(chain), schedule)
        self.step()

    def coroutine(self, chain: Chain) -> Coroutine[Any, Any, Any]:
        """The coroutine running ``chain``: a request chain returns the first Stop or None."""
        request = self.request
        if request is None:  # run() made the HTTPRequest of every HTTPReqCall
            response = HTTPResponse(cast(codec.HTTPRespCall, self.view), self.owner)
            return _run_response_chain(chain, response, self)
        if len(chain) != 1:
            return _run_request_chain(chain, request, self)
        # One plugin, the usual route: its own coroutine is driven directly, without the chain loop
        # around it (one coroutine frame less on every resume). The owner checks its result as the
        # loop does; whatever the loop would have turned into an Err reply still is one.
        link = chain[0]
        self.plugin = link.name
        try:
            awaitable = link.plugin.on_request(link.conf, request)
        except BaseException as exc:  # noqa: BLE001 - inside the loop this was a plugin failure too
            return _raise(exc)
        if type(awaitable) is CoroutineType:
            return awaitable
        return _await(awaitable)  # not a coroutine (or not awaitable): fails or works as in the loop

    def cancel(self) -> None:
        """Abandon the call (timeout or lost connection); its outcome is no longer reported."""
        task = self.task
        if task is None:
            super().cancel()
        elif not self.finished:
            # The filter sees CancelledError at its next await, where its finally blocks run; what the
            # Task reports after that goes to an owner that no longer listens (Session.call_done).
            self.finished = True
            task.cancel()

    def _finish(self, result: Any, error: BaseException | None) -> None:
        self.finished = True
        self.owner.call_done(self, result, error)


def needs_task(chain: Chain) -> bool:
    """Whether ``chain`` must run in a Task: unless every plugin declares ``needs_task = False``
    (exactly False: a None or 0 set by mistake keeps the Task, which is always safe)."""
    return any(getattr(link.plugin, "needs_task", True) is not False for link in chain)


async def _in_task(call: Call, chain: Chain) -> None:
    """The body of a call's Task. It reports to the owner itself, so the reply is written in the step
    that ends the filter (a done-callback would cost one more loop turn). The filter's coroutine is
    created here, not before the Task: a Task cancelled before its first step then leaves no
    never-awaited coroutine behind."""
    try:
        result = await call.coroutine(chain)
    except BaseException as exc:  # noqa: BLE001 - every plugin failure must become an Err reply
        # A CancelledError too: after the call's own cancel() nobody listens any more; any other (the
        # filter awaited something cancelled, the loop is shutting down) fails the call closed.
        call._finish(None, exc)
    else:
        call._finish(result, None)
    call.owner.call_ended()


async def _run_request_chain(chain: Chain, request: HTTPRequest, call: Call) -> Stop | None:
    """Run the plugins in order; the first Stop ends the chain (the owner builds the reply)."""
    for link in chain:
        call.plugin = link.name
        stop = await link.plugin.on_request(link.conf, request)
        if stop is not None:
            if not isinstance(stop, Stop):
                raise PluginFailure(f"plugin {link.name!r} returned {type(stop).__name__}, not Stop or None")
            return stop
    call.plugin = ""
    return None


async def _run_response_chain(chain: Chain, response: HTTPResponse, call: Call) -> HTTPRespCallReply:
    for link in chain:
        call.plugin = link.name
        await link.plugin.on_response(link.conf, response)
    call.plugin = ""
    status, headers, body = response.changes()
    return HTTPRespCallReply(response.id, status, headers, body)


async def _raise(error: BaseException) -> None:
    raise error


async def _await(awaitable: Any) -> Any:
    return await awaitable
