"""Runs a plugin filter coroutine without creating an asyncio Task per request.

Most filters either finish at once or wait only for ExtraInfo answers from APISIX, which arrive on
the same connection and are handed over by the session. Driving the coroutine by hand for those
saves the Task machinery (about 6 µs and an event-loop turn per request, see bench/). Any other
awaitable a filter may use — an asyncio future, ``asyncio.sleep``, a lock — is still honoured: the
driver resumes the coroutine from the future's done-callback, the way a Task would. What filters
cannot rely on is ``asyncio.current_task()``; code that needs it must run in its own task
(``await asyncio.ensure_future(...)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = ["CoroutineDriver", "Pending"]

T = TypeVar("T")


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
    """Steps one coroutine; reports its outcome once through ``on_done(result, error)``."""

    __slots__ = ("_coro", "_foreign", "_on_done", "_schedule", "finished", "waiting_on")

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        on_done: Callable[[Any, BaseException | None], None],
        schedule: Callable[[Callable[[], None]], object],
    ) -> None:
        self._on_done = on_done
        self._start(coro, schedule)

    def _start(self, coro: Coroutine[Any, Any, Any], schedule: Callable[[Callable[[], None]], object]) -> None:
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
