"""Runs a plugin filter coroutine without an asyncio Task: the fast path of plugins that declare it.

Most filters either finish at once or wait only for ExtraInfo answers from APISIX, which arrive on
the same connection and are handed over by the session. Driving such a coroutine by hand saves the
Task machinery (its creation and an event-loop turn per start and per ExtraInfo answer, see
bench/session_bench.py). The price is that nothing in the filter runs inside a Task, so ordinary
asyncio (``asyncio.timeout``, ``current_task()``, anyio/httpx) cannot work there; the session uses
this driver only for plugins that declare ``needs_task = False`` (runner.plugin.Plugin).

Without a ``schedule`` callback (the session's fast path) the driver is strict: anything awaited
but the runner's own :class:`Pending` fails the call at once with :class:`TaskRequired`, because a
half-working asyncio (``sleep`` works, ``timeout`` does not) is a trap. With one (a sans-IO session
that has no event loop to create Tasks on: tests, the fuzz harness) a bare yield is resumed through
``schedule`` and an asyncio future from its done-callback, the way a Task would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = ["CoroutineDriver", "Pending", "TaskRequired"]

T = TypeVar("T")


class TaskRequired(RuntimeError):
    """A filter driven without a Task awaited something only an asyncio Task can wait for."""


class Pending(Generic[T]):
    """A result the runner itself will provide later (an ExtraInfo exchange)."""

    __slots__ = ("_done", "_error", "_result")

    def __init__(self) -> None:
        self._done = False
        self._result: T | None = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._done

    def set_result(self, result: T) -> None:
        self._result = result
        self._done = True

    def set_error(self, error: BaseException) -> None:
        self._error = error
        self._done = True

    def __await__(self) -> Generator[Any, None, T]:
        if not self._done:
            yield self
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


class CoroutineDriver:
    """Steps one coroutine; reports its outcome once through ``on_done(result, error)``.

    ``schedule`` (e.g. ``loop.call_soon``) lets the coroutine await bare yields and asyncio futures;
    without it only :class:`Pending` may be awaited (see the module docstring).
    """

    __slots__ = ("_coro", "_foreign", "_on_done", "_schedule", "finished", "waiting_on")

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        on_done: Callable[[Any, BaseException | None], None],
        schedule: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self._on_done = on_done
        self._start(coro, schedule)

    def _start(self, coro: Coroutine[Any, Any, Any], schedule: Callable[[Callable[[], None]], object] | None) -> None:
        """Set up everything but ``on_done``: for subclasses that override :meth:`_finish` instead
        (the session's call object reports to the session directly, with no callback object)."""
        self._coro = coro
        self._schedule = schedule
        self._foreign: Any = None
        self.finished = False
        self.waiting_on: Pending[Any] | None = None

    def step(self, error: BaseException | None = None) -> None:
        """Run the coroutine until it suspends or ends."""
        if self.finished:
            return
        self.waiting_on = None
        self._foreign = None
        try:
            yielded = self._coro.send(None) if error is None else self._coro.throw(error)
        except StopIteration as stop:
            self._finish(stop.value, None)
            return
        except BaseException as exc:  # noqa: BLE001 - every plugin failure must become an Err reply
            self._finish(None, exc)
            return
        if isinstance(yielded, Pending):
            self.waiting_on = yielded  # the session calls step() when APISIX has answered
        elif self._schedule is None:
            self._refuse(yielded)
        elif yielded is None:
            # A bare yield (asyncio.sleep(0)): give the loop a turn, then continue.
            self._schedule(self.step)
        elif getattr(yielded, "_asyncio_future_blocking", None) is not None:
            # Same hand-shake as asyncio.Task: clear the flag, wake up when the future is done.
            yielded._asyncio_future_blocking = False
            self._foreign = yielded
            yielded.add_done_callback(self._wake)
        else:
            self._schedule(lambda: self.step(RuntimeError(f"filter awaited unsupported object {yielded!r}")))

    def _refuse(self, yielded: Any) -> None:
        """Fail the call for awaiting something only a Task can wait for. The coroutine is closed
        rather than sent the error: a broad ``except`` in the filter must not turn a contract
        violation into a reply (close() still runs its finally blocks). An awaited future is
        cancelled as a cancelled Task would cancel it, so that what it stands for (a gather's
        children, a spawned Task) does not run on unobserved."""
        what = "a bare yield (asyncio.sleep(0))" if yielded is None else repr(yielded)
        self.finished = True
        with contextlib.suppress(BaseException):
            self._coro.close()
        if getattr(yielded, "_asyncio_future_blocking", None) is not None:
            yielded.cancel()
            # Its outcome has no reader now; without one asyncio logs "exception was never retrieved"
            # (a cancelled gather ends with an exception, not cancelled).
            yielded.add_done_callback(_consume)
        self._finish(
            None,
            TaskRequired(
                f"awaited {what} outside an asyncio Task: a plugin with needs_task = False may await only "
                "the runner's ExtraInfo (var, vars, body); remove the declaration to run it in a Task"
            ),
        )

    def cancel(self) -> None:
        """Abandon the coroutine (timeout or lost connection) without reporting an outcome."""
        if self.finished:
            return
        self.finished = True
        foreign, self._foreign = self._foreign, None
        if foreign is not None:
            foreign.remove_done_callback(self._wake)
            foreign.cancel()
        # close() runs the filter's finally blocks; anything it raises there is irrelevant now.
        with contextlib.suppress(BaseException):
            self._coro.close()

    def _wake(self, _future: object) -> None:
        self.step()

    def _finish(self, result: Any, error: BaseException | None) -> None:
        """Report the outcome once (subclasses may override this instead of passing ``on_done``)."""
        self.finished = True
        self._on_done(result, error)


def _consume(future: Any) -> None:
    if not future.cancelled():
        future.exception()
