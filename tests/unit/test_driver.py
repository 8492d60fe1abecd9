"""CoroutineDriver and Pending: plugin coroutines driven by hand, without an asyncio Task.

Without a schedule callback the driver is strict (the session's fast path for plugins declaring
``needs_task = False``); with one it also resumes bare yields and asyncio futures (a sans-IO session
that has no event loop).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Generator
from typing import Any

import pytest

from runner.driver import CoroutineDriver, Pending, TaskRequired


class Outcome:
    """Collects on_done calls; a driver must report exactly once."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, BaseException | None]] = []

    def __call__(self, result: Any, error: BaseException | None) -> None:
        self.calls.append((result, error))

    @property
    def result(self) -> Any:
        assert len(self.calls) == 1, self.calls
        assert self.calls[0][1] is None, self.calls[0][1]
        return self.calls[0][0]

    @property
    def error(self) -> BaseException:
        assert len(self.calls) == 1, self.calls
        error = self.calls[0][1]
        assert error is not None
        return error


class ManualSchedule:
    """A schedule callback the test runs by hand (no event loop)."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []

    def __call__(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def run(self) -> int:
        ran = 0
        while self.callbacks:
            self.callbacks.pop(0)()
            ran += 1
        return ran


class Weird:
    def __await__(self) -> Generator[Any, None, None]:
        yield 42


class TestSynchronous:
    def test_finishes_within_step(self) -> None:
        """A coroutine that never suspends reports its result before step() returns."""

        async def filt() -> str:
            return "done"

        outcome, schedule = Outcome(), ManualSchedule()
        driver = CoroutineDriver(filt(), outcome, schedule)
        driver.step()

        assert outcome.result == "done"
        assert driver.finished
        assert schedule.callbacks == []

    def test_exception_is_reported(self) -> None:
        """An exception escaping the coroutine is passed to on_done, not raised from step()."""

        async def filt() -> None:
            raise KeyError("missing")

        outcome = Outcome()
        CoroutineDriver(filt(), outcome, ManualSchedule()).step()

        assert isinstance(outcome.error, KeyError)

    def test_base_exception_is_reported(self) -> None:
        """Even a BaseException from a plugin becomes an outcome (and so an Err reply)."""

        async def filt() -> None:
            raise SystemExit(1)

        outcome = Outcome()
        CoroutineDriver(filt(), outcome, ManualSchedule()).step()

        assert isinstance(outcome.error, SystemExit)

    def test_step_after_finish_is_a_no_op(self) -> None:
        """A finished driver ignores further steps and reports only once."""

        async def filt() -> int:
            return 1

        outcome = Outcome()
        driver = CoroutineDriver(filt(), outcome, ManualSchedule())
        driver.step()
        driver.step()

        assert outcome.calls == [(1, None)]


class TestPending:
    def test_waits_on_pending_until_stepped(self) -> None:
        """Awaiting a Pending suspends; the result arrives when the owner steps the driver."""
        pending: Pending[list[bytes | None]] = Pending()

        async def filt() -> list[bytes | None]:
            return await pending

        outcome = Outcome()
        driver = CoroutineDriver(filt(), outcome, ManualSchedule())
        driver.step()

        assert outcome.calls == []
        assert driver.waiting_on is pending
        assert not driver.finished

        pending.set_result([b"a", None])
        driver.step()

        assert outcome.result == [b"a", None]
        assert driver.waiting_on is None

    def test_pending_error_is_raised_in_the_coroutine(self) -> None:
        """Pending.set_error makes the await raise, so the plugin can handle it."""
        pending: Pending[int] = Pending()

        async def filt() -> str:
            try:
                await pending
            except LookupError as exc:
                return f"handled {exc}"
            return "not raised"

        outcome = Outcome()
        driver = CoroutineDriver(filt(), outcome, ManualSchedule())
        driver.step()
        pending.set_error(LookupError("gone"))
        driver.step()

        assert outcome.result == "handled gone"

    def test_already_done_pending_does_not_suspend(self) -> None:
        """Awaiting a Pending that already has its result continues at once."""
        pending: Pending[int] = Pending()
        pending.set_result(5)

        async def filt() -> int:
            return await pending + 1

        outcome = Outcome()
        CoroutineDriver(filt(), outcome, ManualSchedule()).step()

        assert outcome.result == 6

    def test_several_pendings_in_sequence(self) -> None:
        """A coroutine may wait on several Pendings one after another."""
        first: Pending[int] = Pending()
        second: Pending[int] = Pending()

        async def filt() -> int:
            return await first + await second

        outcome = Outcome()
        driver = CoroutineDriver(filt(), outcome, ManualSchedule())
        driver.step()
        first.set_result(1)
        driver.step()
        assert driver.waiting_on is second
        second.set_result(2)
        driver.step()

        assert outcome.result == 3

    def test_unsupported_awaitable_is_an_error(self) -> None:
        """Yielding something that is neither Pending, None nor a future fails the call."""

        async def filt() -> None:
            await Weird()

        outcome, schedule = Outcome(), ManualSchedule()
        CoroutineDriver(filt(), outcome, schedule).step()
        schedule.run()

        assert isinstance(outcome.error, RuntimeError)
        assert "unsupported" in str(outcome.error)


class TestStrict:
    """No schedule: only Pending may be awaited; anything else fails the call with a clear message."""

    def test_pending_works_without_a_schedule(self) -> None:
        """The fast path's own awaitable suspends and resumes as with a schedule."""
        pending: Pending[int] = Pending()

        async def filt() -> int:
            return await pending * 2

        outcome = Outcome()
        driver = CoroutineDriver(filt(), outcome)
        driver.step()
        assert driver.waiting_on is pending
        pending.set_result(21)
        driver.step()

        assert outcome.result == 42

    def test_foreign_future_fails_with_task_required(self) -> None:
        """Awaiting an asyncio future reports TaskRequired at once, naming the object and the declaration;
        the filter's finally block runs and the abandoned future is cancelled."""
        cleaned: list[str] = []

        async def main() -> tuple[Outcome, CoroutineDriver, asyncio.Future[None]]:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def filt() -> None:
                try:
                    await future
                finally:
                    cleaned.append("finally")

            outcome = Outcome()
            driver = CoroutineDriver(filt(), outcome)
            driver.step()
            return outcome, driver, future

        outcome, driver, future = asyncio.run(main())
        assert isinstance(outcome.error, TaskRequired)
        assert "Future" in str(outcome.error)
        assert "needs_task = False" in str(outcome.error)
        assert cleaned == ["finally"]
        assert driver.finished
        assert future.cancelled()

    def test_refused_gather_leaves_no_unretrieved_exception(self, caplog: pytest.LogCaptureFixture) -> None:
        """A refused asyncio.gather is cancelled with its children, and asyncio logs nothing about it."""

        async def main() -> Outcome:
            async def filt() -> None:
                await asyncio.gather(asyncio.sleep(0.001), asyncio.sleep(0.001))

            outcome = Outcome()
            CoroutineDriver(filt(), outcome).step()
            await asyncio.sleep(0.01)
            return outcome

        with caplog.at_level(logging.ERROR, logger="asyncio"):
            outcome = asyncio.run(main())
            gc.collect()
        assert isinstance(outcome.error, TaskRequired)
        assert caplog.records == []

    def test_bare_yield_fails_with_task_required(self) -> None:
        """asyncio.sleep(0) is refused too: it would need the loop to resume the coroutine."""

        async def filt() -> None:
            await asyncio.sleep(0)

        outcome = Outcome()
        CoroutineDriver(filt(), outcome).step()

        assert isinstance(outcome.error, TaskRequired)
        assert "bare yield" in str(outcome.error)

    def test_broad_except_cannot_swallow_the_refusal(self) -> None:
        """The coroutine is closed, not sent the error: ``except Exception: return None`` cannot pass the call."""
        reached: list[str] = []

        async def filt() -> str:
            try:
                await asyncio.sleep(0)
            except Exception:
                reached.append("except")
            return "passed"

        outcome = Outcome()
        CoroutineDriver(filt(), outcome).step()

        assert isinstance(outcome.error, TaskRequired)
        assert reached == []

    def test_refusal_after_pending_is_reported_once(self) -> None:
        """A foreign await after an ExtraInfo wait fails once and later steps change nothing."""
        pending: Pending[int] = Pending()

        async def filt() -> None:
            await pending
            await asyncio.sleep(0)

        outcome = Outcome()
        driver = CoroutineDriver(filt(), outcome)
        driver.step()
        pending.set_result(1)
        driver.step()
        driver.step()
        driver.cancel()

        assert isinstance(outcome.error, TaskRequired)


class TestForeignAwaitables:
    def test_sleep_zero_yields_to_the_schedule(self) -> None:
        """asyncio.sleep(0) (a bare yield) resumes via the schedule callback."""

        async def filt() -> str:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return "after two turns"

        outcome, schedule = Outcome(), ManualSchedule()
        CoroutineDriver(filt(), outcome, schedule).step()

        assert outcome.calls == []
        assert schedule.run() == 2
        assert outcome.result == "after two turns"

    def test_resumes_on_asyncio_future(self) -> None:
        """Awaiting an asyncio future resumes from its done-callback, the way a Task would."""

        async def main() -> Outcome:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[str] = loop.create_future()

            async def filt() -> str:
                return "got " + await future

            outcome = Outcome()
            driver = CoroutineDriver(filt(), outcome, loop.call_soon)
            driver.step()
            assert outcome.calls == []
            loop.call_soon(future.set_result, "value")
            for _ in range(5):
                await asyncio.sleep(0)
            return outcome

        assert asyncio.run(main()).result == "got value"

    def test_future_exception_is_raised_in_the_coroutine(self) -> None:
        """A failed asyncio future raises inside the filter."""

        async def main() -> Outcome:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[str] = loop.create_future()

            async def filt() -> str:
                return await future

            outcome = Outcome()
            CoroutineDriver(filt(), outcome, loop.call_soon).step()
            future.set_exception(ConnectionError("upstream gone"))
            for _ in range(5):
                await asyncio.sleep(0)
            return outcome

        assert isinstance(asyncio.run(main()).error, ConnectionError)

    def test_real_sleep_event_and_task(self) -> None:
        """Timers, events and awaiting a separate Task all work under the driver."""

        async def main() -> Outcome:
            loop = asyncio.get_running_loop()
            event = asyncio.Event()

            async def in_task() -> str:
                assert asyncio.current_task() is not None
                await asyncio.sleep(0.001)
                return "task"

            async def filt() -> list[str]:
                await asyncio.sleep(0.001)
                loop.call_soon(event.set)
                await event.wait()
                return ["slept", "event", await asyncio.ensure_future(in_task())]

            outcome = Outcome()
            CoroutineDriver(filt(), outcome, loop.call_soon).step()
            for _ in range(200):
                if outcome.calls:
                    break
                await asyncio.sleep(0.001)
            return outcome

        assert asyncio.run(main()).result == ["slept", "event", "task"]


class TestCancel:
    def test_cancel_closes_coroutine_and_foreign_future(self) -> None:
        """cancel() runs the filter's finally block, cancels the awaited future, and reports nothing."""
        cleaned: list[str] = []

        async def main() -> tuple[Outcome, asyncio.Future[None]]:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()

            async def filt() -> None:
                try:
                    await future
                finally:
                    cleaned.append("finally")

            outcome = Outcome()
            driver = CoroutineDriver(filt(), outcome, loop.call_soon)
            driver.step()
            driver.cancel()
            for _ in range(5):
                await asyncio.sleep(0)
            assert driver.finished
            return outcome, future

        outcome, future = asyncio.run(main())
        assert cleaned == ["finally"]
        assert future.cancelled()
        assert outcome.calls == []

    def test_cancel_while_waiting_on_pending(self) -> None:
        """A cut-off call waiting for ExtraInfo is closed; a late answer does not revive it."""
        pending: Pending[int] = Pending()
        cleaned: list[str] = []

        async def filt() -> int:
            try:
                return await pending
            finally:
                cleaned.append("finally")

        outcome = Outcome()
        driver = CoroutineDriver(filt(), outcome, ManualSchedule())
        driver.step()
        driver.cancel()
        pending.set_result(1)
        driver.step()

        assert cleaned == ["finally"]
        assert outcome.calls == []

    def test_cancel_ignores_errors_raised_while_closing(self) -> None:
        """A filter that misbehaves in its finally block cannot break the cut-off."""
        pending: Pending[int] = Pending()

        async def filt() -> None:
            try:
                await pending
            finally:
                raise RuntimeError("bad cleanup")

        outcome = Outcome()
        driver = CoroutineDriver(filt(), outcome, ManualSchedule())
        driver.step()
        driver.cancel()

        assert driver.finished
        assert outcome.calls == []

    def test_cancel_after_sleep_zero_drops_the_scheduled_step(self) -> None:
        """A step already scheduled by asyncio.sleep(0) does nothing after cancel()."""
        resumed: list[bool] = []

        async def filt() -> None:
            await asyncio.sleep(0)
            resumed.append(True)

        outcome, schedule = Outcome(), ManualSchedule()
        driver = CoroutineDriver(filt(), outcome, schedule)
        driver.step()
        driver.cancel()
        schedule.run()

        assert resumed == []
        assert outcome.calls == []

    def test_cancel_of_finished_driver_is_a_no_op(self) -> None:
        """Cancelling after the outcome was reported changes nothing."""

        async def filt() -> int:
            return 3

        outcome = Outcome()
        driver = CoroutineDriver(filt(), outcome, ManualSchedule())
        driver.step()
        driver.cancel()

        assert outcome.calls == [(3, None)]


def test_unawaited_pending_raises_nothing() -> None:
    """Pending is a plain awaitable: creating one and dropping it is harmless."""
    pending: Pending[int] = Pending()
    assert not pending.done
    pending.set_result(1)
    assert pending.done


@pytest.mark.parametrize("value", [None, 0, b""])
def test_pending_result_may_be_falsy(value: object) -> None:
    """A falsy result (an absent var is None) is delivered as is."""
    pending: Pending[object] = Pending()
    pending.set_result(value)

    async def filt() -> object:
        return await pending

    outcome = Outcome()
    CoroutineDriver(filt(), outcome, ManualSchedule()).step()
    assert outcome.calls == [(value, None)]
