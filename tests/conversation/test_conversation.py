"""The runner in-process on a real Unix socket, with FakeApisix playing APISIX's ext-plugin side."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import pytest

from runner import PluginRegistry
from runner.protocol import codec
from runner.protocol.messages import MAX_PAYLOAD, ErrCode, RPCType, Stop
from runner.testing import ApisixOutcome, FakeApisix, conf, http_req_call_frame
from tests.conftest import ServeFactory
from tests.plugins_for_tests import Hang

STOP_403 = conf(("stop", '{"status": 403, "body": "denied"}'))


def body_of(outcome: ApisixOutcome) -> Any:
    assert outcome.kind == "stop", outcome
    assert outcome.stop is not None
    return json.loads(outcome.stop.body)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(4)
    size = int.from_bytes(head[1:], "big")
    return head[0], await reader.readexactly(size)


class TestTokens:
    def test_expired_token_is_reprepared(self, serve: ServeFactory, sock_path: str) -> None:
        """After the token TTL the runner says CONF_TOKEN_NOT_FOUND; APISIX re-prepares and the request succeeds."""

        async def main() -> tuple[ApisixOutcome, ApisixOutcome, int]:
            async with serve(conf_expire_time=1, token_ttl=1.2), FakeApisix(sock_path) as apisix:
                first = await apisix.request(STOP_403)
                await asyncio.sleep(1.35)
                second = await apisix.request(STOP_403)
                return first, second, apisix.prepare_count

        first, second, prepares = asyncio.run(main())
        assert (first.client_status, first.tries) == (403, 1)
        assert (second.client_status, second.tries) == (403, 2)
        assert prepares == 2

    def test_token_in_use_does_not_expire(self, serve: ServeFactory, sock_path: str) -> None:
        """Each use extends the token (sliding TTL), so steady traffic never re-prepares."""

        async def main() -> tuple[list[int], int]:
            async with serve(conf_expire_time=1, token_ttl=1.2), FakeApisix(sock_path) as apisix:
                tries = []
                for _ in range(4):
                    tries.append((await apisix.request(STOP_403)).tries)
                    await asyncio.sleep(0.4)
                return tries, apisix.prepare_count

        tries, prepares = asyncio.run(main())
        assert tries == [1, 1, 1, 1]
        assert prepares == 1

    def test_runner_restart_recovers(self, serve: ServeFactory, sock_path: str) -> None:
        """A new runner on the same path knows no tokens; APISIX recovers via CONF_TOKEN_NOT_FOUND."""

        async def main() -> tuple[ApisixOutcome, ApisixOutcome, int]:
            async with FakeApisix(sock_path) as apisix:
                async with serve():
                    before = await apisix.request(STOP_403)
                async with serve():
                    after = await apisix.request(STOP_403)
                return before, after, apisix.prepare_count

        before, after, prepares = asyncio.run(main())
        assert (before.client_status, before.tries) == (403, 1)
        assert (after.client_status, after.tries) == (403, 2)
        assert prepares == 2

    def test_stale_token_never_selects_another_route(self, serve: ServeFactory, sock_path: str) -> None:
        """After a restart a token cached by one worker must not name a route another worker prepared."""
        enforcing, permissive = "route#1#ext-plugin-pre-req#1", "route#2#ext-plugin-pre-req#1"

        async def main() -> tuple[ApisixOutcome, ApisixOutcome]:
            async with FakeApisix(sock_path) as worker1:
                async with serve():
                    await worker1.request(STOP_403, key=enforcing)
                async with serve(), FakeApisix(sock_path) as worker2:
                    passed = await worker2.request(conf(), key=permissive)  # the new runner's first token
                    return passed, await worker1.request(STOP_403, key=enforcing)

        passed, enforced = asyncio.run(main())
        assert passed.kind == "pass"
        assert (enforced.client_status, enforced.tries) == (403, 2)

    def test_invalid_conf_is_503(self, serve: ServeFactory, sock_path: str) -> None:
        """A route whose conf the plugin rejects answers 503: PrepareConf fails, nothing passes."""

        async def main() -> ApisixOutcome:
            async with serve(), FakeApisix(sock_path) as apisix:
                return await apisix.request(conf(("strict-json", "[]")))

        outcome = asyncio.run(main())
        assert outcome.client_status == 503
        assert outcome.error == ErrCode.BAD_REQUEST


class TestExtraInfo:
    def test_batched_vars_cost_one_round_trip(self, serve: ServeFactory, sock_path: str) -> None:
        """One vars() call with several names is one extra round trip (round_trips == 2)."""

        async def main() -> ApisixOutcome:
            async with serve(), FakeApisix(sock_path, vars={"a": "1", "b": "2", "c": "3"}) as apisix:
                return await apisix.request(conf(("vars", "a,b,c")))

        outcome = asyncio.run(main())
        assert outcome.round_trips == 2
        assert outcome.extra_info == ("var:a", "var:b", "var:c")
        assert body_of(outcome) == {"a": "1", "b": "2", "c": "3"}

    def test_absent_vars_are_none(self, serve: ServeFactory, sock_path: str) -> None:
        """Vars APISIX lacks arrive as None, empty ones as ""."""

        async def main() -> ApisixOutcome:
            async with serve(), FakeApisix(sock_path, vars={"empty": ""}) as apisix:
                return await apisix.request(conf(("vars", "route_id,empty")))

        assert body_of(asyncio.run(main())) == {"route_id": None, "empty": ""}

    @pytest.mark.parametrize("size", [300 * 1024, 4 * 1024 * 1024 + 7])
    def test_request_body_arrives_intact(self, serve: ServeFactory, sock_path: str, size: int) -> None:
        """Large ExtraInfo ReqBody answers are read completely (no single-recv truncation)."""
        body = hashlib.sha256(b"seed").digest() * (size // 32) + b"t" * (size % 32)

        async def main() -> ApisixOutcome:
            async with serve(), FakeApisix(sock_path) as apisix:
                return await apisix.request(conf(("body-digest", "")), body=body)

        outcome = asyncio.run(main())
        assert outcome.stop is not None
        assert dict(outcome.stop.headers) == {
            "x-body-length": str(size),
            "x-body-sha256": hashlib.sha256(body).hexdigest(),
        }

    def test_largest_frame_end_to_end(self, serve: ServeFactory, sock_path: str) -> None:
        """A 16 MiB - 1 byte frame crosses the socket and is accepted."""
        empty = len(codec.extra_info_result_frame(b"")) - 4
        payload = codec.extra_info_result_frame(b"\x5a" * (MAX_PAYLOAD - empty - 8))[4:]
        body_length = len(codec.decode_extra_info_result(payload) or b"")
        frame = codec.encode_frame(RPCType.EXTRA_INFO, payload + bytes(MAX_PAYLOAD - len(payload)))
        assert len(frame) == 4 + MAX_PAYLOAD

        async def main() -> tuple[int, bytes]:
            async with serve(), FakeApisix(sock_path) as apisix:
                token = await apisix.prepare(conf(("body-digest", "")))
                reader, writer = await asyncio.open_unix_connection(sock_path)
                writer.write(http_req_call_frame(id=1, conf_token=token))
                kind, _ = await read_frame(reader)
                assert kind == RPCType.EXTRA_INFO
                writer.write(frame)
                await writer.drain()
                reply = await asyncio.wait_for(read_frame(reader), 10)
                writer.close()
                return reply

        kind, reply = asyncio.run(main())
        assert kind == RPCType.HTTP_REQ_CALL
        stop = codec.decode_http_req_call_reply(reply).action
        assert isinstance(stop, Stop)
        assert dict(stop.headers)["x-body-length"] == str(body_length)


class TestRobustness:
    def test_garbage_connection_closed_others_unaffected(self, serve: ServeFactory, sock_path: str) -> None:
        """Garbage on one connection closes that connection only; another keeps getting right answers."""

        async def main() -> tuple[ErrCode, bytes, list[ApisixOutcome]]:
            async with serve(), FakeApisix(sock_path, vars={"a": "x"}) as apisix:
                good = [await apisix.request(conf(("vars", "a")))]
                reader, writer = await asyncio.open_unix_connection(sock_path)
                writer.write(codec.encode_frame(RPCType.HTTP_REQ_CALL, b"\x07" * 40))
                kind, payload = await read_frame(reader)
                assert kind == RPCType.ERR
                good.append(await apisix.request(conf(("vars", "a"))))
                writer.write(b"\x02\x00\x00\x00" + b"garbage after a zero-length header")
                eof = await asyncio.wait_for(reader.read(), 5)
                writer.close()
                good.append(await apisix.request(conf(("vars", "a"))))
                return codec.decode_error(payload), eof, good

        code, eof, good = asyncio.run(main())
        assert code == ErrCode.BAD_REQUEST
        assert eof == b""
        assert [body_of(o) for o in good] == [{"a": "x"}] * 3

    def test_prepare_on_another_connection_mid_call(self, serve: ServeFactory, sock_path: str) -> None:
        """While a call waits for ExtraInfo on one connection, PrepareConf on another is answered."""

        async def main() -> tuple[int, int]:
            async with serve(), FakeApisix(sock_path) as apisix:
                token = await apisix.prepare(conf(("vars", "a")))
                reader, writer = await asyncio.open_unix_connection(sock_path)
                writer.write(http_req_call_frame(id=1, conf_token=token))
                kind, _ = await read_frame(reader)
                assert kind == RPCType.EXTRA_INFO
                other = await apisix.prepare(conf(("stop", "{}")))
                writer.write(codec.extra_info_result_frame(b"v"))
                kind, _ = await read_frame(reader)
                writer.close()
                return other, kind

        other, kind = asyncio.run(main())
        assert other > 0
        assert kind == RPCType.HTTP_REQ_CALL

    def test_many_concurrent_long_lived_connections(self, serve: ServeFactory, sock_path: str) -> None:
        """64 pooled connections, each carrying many requests, all get their own correct answers."""
        workers, per_worker = 64, 50

        async def worker(n: int, ready: asyncio.Barrier, apisix: FakeApisix) -> list[Any]:
            entries = conf(("set-header", "x-worker: yes"), ("vars", "worker,seq"))
            seen = [body_of(await apisix.request(entries, key=f"route#{n}", vars={"seq": "0"}))]
            await ready.wait()
            for i in range(1, per_worker):
                outcome = await apisix.request(entries, key=f"route#{n}", vars={"seq": str(i)})
                seen.append(body_of(outcome))
            return seen

        async def main() -> tuple[list[list[Any]], int, int]:
            async with serve() as server:
                fakes = [FakeApisix(sock_path, vars={"worker": str(n)}, pool_size=1) for n in range(workers)]
                ready = asyncio.Barrier(workers + 1)
                tasks = [asyncio.ensure_future(worker(n, ready, fakes[n])) for n in range(workers)]
                await ready.wait()
                open_at_start = len(server.connections)
                results = await asyncio.gather(*tasks)
                open_at_end = len(server.connections)
                for fake in fakes:
                    await fake.close()
                return results, open_at_start, open_at_end

        results, open_at_start, open_at_end = asyncio.run(main())
        assert open_at_start == workers
        assert open_at_end == workers
        for n, seen in enumerate(results):
            assert seen == [{"worker": str(n), "seq": str(i)} for i in range(per_worker)]


class TestFailures:
    def test_hung_plugin_cut_off_with_503(self, serve: ServeFactory, sock_path: str, registry: PluginRegistry) -> None:
        """A filter awaiting an event nobody sets is cut off with 503 well before APISIX's timeout."""
        hang = registry.get("hang")
        assert isinstance(hang, Hang)

        async def main() -> tuple[ApisixOutcome, float, ApisixOutcome]:
            async with serve(call_timeout=0.5), FakeApisix(sock_path, pool_size=1) as apisix:
                started = time.monotonic()
                outcome = await apisix.request(conf(("hang", "")))
                elapsed = time.monotonic() - started
                after = await apisix.request(STOP_403, key="route#2")
                return outcome, elapsed, after

        outcome, elapsed, after = asyncio.run(main())
        assert outcome.client_status == 503
        assert outcome.error == ErrCode.SERVICE_UNAVAILABLE
        assert elapsed < 0.5 + 1.0
        assert hang.closed == 1
        assert after.client_status == 403

    def test_hung_plugin_with_pending_extra_info(self, serve: ServeFactory, sock_path: str) -> None:
        """A cut-off while vars are in flight still leaves the pooled connection usable."""

        async def main() -> tuple[ApisixOutcome, ApisixOutcome]:
            async with serve(call_timeout=0.5), FakeApisix(sock_path, pool_size=1) as apisix:
                outcome = await apisix.request(conf(("hang", "a,b")))
                after = await apisix.request(STOP_403, key="route#2")
                return outcome, after

        outcome, after = asyncio.run(main())
        assert outcome.client_status == 503
        assert outcome.extra_info == ("var:a", "var:b")
        assert after.client_status == 403

    def test_plugin_raising_is_503(self, serve: ServeFactory, sock_path: str) -> None:
        """A filter exception is a 503; only allow_degradation lets the request through."""

        async def main() -> tuple[ApisixOutcome, ApisixOutcome]:
            async with serve(), FakeApisix(sock_path) as apisix:
                strict = await apisix.request(conf(("raise", "x")))
                degraded = await apisix.request(conf(("raise", "x")), allow_degradation=True)
                return strict, degraded

        strict, degraded = asyncio.run(main())
        assert strict.client_status == 503
        assert strict.error == ErrCode.SERVICE_UNAVAILABLE
        assert degraded.kind == "pass"
        assert degraded.error == ErrCode.SERVICE_UNAVAILABLE
        assert degraded.client_status is None

    def test_plugin_awaiting_a_timer(self, serve: ServeFactory, sock_path: str) -> None:
        """A filter awaiting asyncio.sleep is resumed by the server's loop."""

        async def main() -> ApisixOutcome:
            async with serve(), FakeApisix(sock_path) as apisix:
                return await apisix.request(conf(("sleep", "0.01")))

        outcome = asyncio.run(main())
        assert outcome.stop == Stop(200, (), b"slept")


class TestChain:
    def test_plugins_run_in_conf_order_first_stop_wins(self, serve: ServeFactory, sock_path: str) -> None:
        """Plugins run in the PrepareConf order; the first Stop ends the chain."""

        async def main() -> ApisixOutcome:
            async with serve(), FakeApisix(sock_path) as apisix:
                entries = conf(("order", "3"), ("order", "1"), ("order", "2!"), ("raise", "never"), ("order", "x!"))
                return await apisix.request(entries)

        outcome = asyncio.run(main())
        assert outcome.stop == Stop(299, (), b"3,1,2")

    def test_rewrites_merge(self, serve: ServeFactory, sock_path: str) -> None:
        """Changes by several plugins reach APISIX as one Rewrite."""

        async def main() -> ApisixOutcome:
            async with serve(), FakeApisix(sock_path) as apisix:
                entries = conf(("set-header", "x-a: 1"), ("order", "/moved"), ("set-header", "x-b: 2"))
                return await apisix.request(entries, path="/orig")

        outcome = asyncio.run(main())
        assert outcome.kind == "rewrite"
        assert outcome.rewrite is not None
        assert outcome.rewrite.path == "/moved"
        assert outcome.upstream_headers == (("x-a", "1"), ("x-b", "2"))

    def test_empty_conf_passes(self, serve: ServeFactory, sock_path: str) -> None:
        """A route with no runner plugins passes unchanged."""

        async def main() -> ApisixOutcome:
            async with serve(), FakeApisix(sock_path) as apisix:
                return await apisix.request(conf())

        outcome = asyncio.run(main())
        assert outcome.kind == "pass"
        assert outcome.error is None
