"""Per-request CPU cost of the runner without sockets (not a test): where the microseconds go.

The session is sans-IO, so a whole HTTPReqCall conversation (request in, ExtraInfo query out,
answer in, reply out) can be replayed in a loop with pre-built frames: this is exactly the Python
work the runner adds on top of the event loop and the syscalls that the floor also pays. Each
component is timed on its own too. Numbers are the best of several repeats (robust against other
load on the machine), in microseconds per request.

Both ways a call can run are measured, whatever the scenario's plugins declare: driven directly
(``needs_task = False``) and in an asyncio Task (the default). A Task needs a running event loop,
so the same conversation is also replayed inside one: there a call in a Task costs its creation plus
one loop turn to start and one per ExtraInfo round trip (each turn includes an ``epoll_wait`` with a
zero timeout, as in the server, and one step of the task driving the replay, which the server has
not), while a call driven directly never lets the loop turn.

Run with ``.venv/bin/python -m bench.session_bench`` (``--profile`` adds a cProfile listing).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import inspect
import json
import os
import pstats
import sys
import time
import timeit
from collections.abc import Awaitable, Callable
from typing import Any

from runner.confcache import ConfStore
from runner.driver import CoroutineDriver
from runner.protocol import codec
from runner.protocol.messages import ConfEntry, VarQuery
from runner.session import Session, SessionConfig

from .floor import REQUEST_ID
from .plugins import build_registry
from .scenarios import SCENARIOS, SRC_IP, Scenario

__all__ = ["main"]


class Replay:
    """A Session fed with pre-built frames; ``one()`` runs one complete call (``one_in_loop()`` inside
    an event loop, where a call in a Task needs loop turns). ``needs_task`` is set on every plugin
    instance: the mode measured, whatever the plugin declares."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        needs_task: bool = False,
        schedule: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        registry = build_registry(scenario)
        for plugin in registry:
            plugin.setup(scenario.plugin_options.get(plugin.name, {}))
            setattr(plugin, "needs_task", needs_task)  # noqa: B010 - not part of the Plugin protocol's type
        kwargs: dict[str, Any] = {}
        if "first_token" in inspect.signature(ConfStore).parameters:
            kwargs["first_token"] = 1
        store = ConfStore(registry, ttl=4320.0, max_entries=1000, clock=time.monotonic, **kwargs)
        self.out: list[bytes] = []
        self.session = Session(SessionConfig(store=store), self.out.append, lambda: None, schedule or _call_now)
        entries = tuple(ConfEntry(n, v) for n, v in scenario.conf)
        self.session.data_received(codec.prepare_conf_request_frame(entries, "bench"))
        token = codec.decode_prepare_conf_reply(self.out.pop()[4:])
        self.request = codec.http_req_call_frame(
            id=REQUEST_ID,
            conf_token=token,
            method=scenario.method,
            path=scenario.path,
            src_ip=bytes(int(x) for x in SRC_IP.split(".")),
            headers=scenario.headers,
            args=scenario.args,
        )
        # One pre-built answer per query, in the order the plugin asks.
        self.answers = [b"".join(_answer(scenario, name) for name in trip) for trip in scenario.ei_trips]

    def one(self) -> None:
        self.out.clear()
        feed = self.session.data_received
        feed(self.request)
        for answer in self.answers:
            feed(answer)

    async def one_in_loop(self) -> None:
        out = self.out
        out.clear()
        feed = self.session.data_received
        feed(self.request)
        for answer in self.answers:
            while not out:  # the query goes out from the call's next step
                await asyncio.sleep(0)
            out.clear()
            feed(answer)
        while not out:
            await asyncio.sleep(0)

    def check(self) -> None:
        if not self.out or self.out[-1][0] != 2:
            raise SystemExit(f"the replayed call did not end in an HTTPReqCall reply: {self.out!r}")
        self.out.clear()


def _answer(scenario: Scenario, name: str) -> bytes:
    value = scenario.vars.get(name)
    return codec.extra_info_result_frame(None if value is None else value.encode())


def _call_now(callback: Callable[[], None]) -> None:
    callback()


def best_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


async def best_us_async(fn: Callable[[], Awaitable[object]], number: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            await fn()
        best = min(best, time.perf_counter() - started)
    return best / number * 1e6


async def in_loop(scenario: Scenario, number: int, repeat: int) -> dict[str, float]:
    """The whole call inside a running event loop, in both modes, and a Task's own cost."""
    loop = asyncio.get_running_loop()
    figures: dict[str, float] = {}
    for needs_task in (False, True):
        replay = Replay(scenario, needs_task=needs_task, schedule=loop.call_soon)
        await replay.one_in_loop()
        replay.check()
        mode = "in an asyncio Task (default)" if needs_task else "driven directly (needs_task = False)"
        figures[f"whole call in an event loop, {mode}"] = await best_us_async(replay.one_in_loop, number, repeat)

    async def noop() -> None:
        return None

    async def task() -> None:
        done = loop.create_task(noop())
        while not done.done():
            await asyncio.sleep(0)

    async def turn() -> None:
        await asyncio.sleep(0)

    figures["asyncio Task: create + run a no-op coroutine (one loop turn)"] = await best_us_async(task, number, repeat)
    figures["one loop turn of the replaying task (await asyncio.sleep(0))"] = await best_us_async(turn, number, repeat)
    return figures


def components(scenario: Scenario, replay: Replay) -> dict[str, Callable[[], object]]:
    request = replay.request
    payload = request[4:]
    answer = codec.extra_info_result_frame(b"api.example.com")
    decoder = codec.FrameDecoder()

    async def noop() -> None:
        return None

    def driver() -> None:
        CoroutineDriver(noop(), lambda _r, _e: None).step()

    return {
        "FrameDecoder.frames (one whole frame per read)": lambda: decoder.frames(request),
        "decode_http_req_call (lazy view)": lambda: codec.decode_http_req_call(payload),
        "decode_extra_info_result": lambda: codec.decode_extra_info_result(answer[4:]),
        "extra_info_query_frame(VarQuery) (cached)": lambda: codec.extra_info_query_frame(VarQuery("host")),
        "http_req_call_action_frame (no action)": lambda: codec.http_req_call_action_frame(REQUEST_ID, None),
        "CoroutineDriver: create + run a no-op coroutine": driver,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.session_bench", description=__doc__)
    parser.add_argument("--scenario", default=SCENARIOS[0].name)
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile listing of the replay")
    parser.add_argument("--json", action="store_true", help="print only the whole-call figure as JSON")
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    scenario = next((s for s in SCENARIOS if s.name == args.scenario), None)
    if scenario is None:
        raise SystemExit(f"unknown scenario {args.scenario!r}")
    replay = Replay(scenario)
    replay.one()
    replay.check()
    total = best_us(replay.one, args.number, args.repeat)
    if args.json:
        print(
            json.dumps(
                {
                    "scenario": scenario.name,
                    "us_per_call": total,
                    "mode": "driven directly",
                    "number": args.number,
                    "repeat": args.repeat,
                }
            )
        )
        return 0
    print(f"# runner sans-IO cost per request, scenario {scenario.name} (best of {args.repeat} x {args.number})\n")
    print("| what | µs |\n|---|--:|")
    print(f"| whole call: Session.data_received(request) + ExtraInfo answer(s), driven directly | {total:.2f} |")
    for name, figure in asyncio.run(in_loop(scenario, args.number, args.repeat)).items():
        print(f"| {name} | {figure:.2f} |")
    for name, fn in components(scenario, replay).items():
        print(f"| {name} | {best_us(fn, args.number, args.repeat):.2f} |")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.number):
            replay.one()
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
