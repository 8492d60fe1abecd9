"""A CRL revoking the load's own client certificate takes effect on SIGHUP in the middle of steady load:
every call is answered, none wrongly, with one process and with two workers.

The load is APISIX-like (tests/integration/test_reload.py): a verified client certificate in
``ssl_client_escaped_cert`` on every call, one pipelined ExtraInfo round trip each, so calls are in
flight across the commit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from plugins.mtls_guard.tools.devcerts import escaped
from runner.testing import FakeApisix, conf
from tests.certs import CertFactory, crl_pem
from tests.integration.test_process import Spawn, apisix_env, wait_ready
from tests.integration.test_process import spawn as spawn  # noqa: PLC0414 - the fixture, shared
from tests.integration.test_reload import TRANSITION, Answer, assert_switched_once, load, wait_for_line
from tests.integration.test_workers import _wait_for_workers

FACTORY = CertFactory()
CA = FACTORY.ca("Reload Revocation CA")
CLIENT = FACTORY.leaf(CA, cn="billing")
# The default policy (a verified certificate, no exemption), naming its reason in the 403 body.
ENTRIES = conf(("mtls-guard", '{"reject": {"expose_reason": true}}'))
VARS = {
    "ssl_client_verify": "SUCCESS",
    "ssl_client_escaped_cert": escaped(CLIENT.pem),
    "ssl_server_name": "api.example.test",
}
HEADERS = (("host", "api.example.test"),)


def _write_crl(path: Path, number: int, revoked: bool) -> None:
    """Replace the CRL atomically, as a deployment would (a half-written file must never be read)."""
    staging = path.with_name(".staging")
    staging.write_bytes(crl_pem(FACTORY.crl(CA, [CLIENT] if revoked else [], number=number)))
    os.replace(staging, path)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["single-process", "two-workers"])
def test_crl_revoking_the_loads_certificate_applies_mid_run_without_a_failed_call(
    spawn: Spawn, sock_dir: Path, sock_path: str, workers: int
) -> None:
    """Before SIGHUP every call passes, after the reload line every call is `revoked` (403), each
    connection switches exactly once, and no call fails or gets anything else."""
    (sock_dir / "ca.pem").write_text(CA.pem)
    crl = sock_dir / "client-ca.crl"
    _write_crl(crl, 1, revoked=False)
    config = sock_dir / "runner.yaml"
    options = {"crl_files": ["client-ca.crl"], "crl_issuer_files": ["ca.pem"]}
    config.write_text(yaml.safe_dump({"log_level": "warning", "plugins": {"mtls-guard": options}}))
    runner = spawn(apisix_env(sock_path), "--config", str(config), "--workers", str(workers))
    wait_ready(runner, sock_path)
    if workers > 1:
        _wait_for_workers(runner, workers)

    async def why_denied() -> bytes:
        async with FakeApisix(sock_path, vars=VARS) as apisix:
            outcome = await apisix.request(ENTRIES, headers=HEADERS)
        assert outcome.stop is not None, outcome
        return outcome.stop.body or b""

    async def scenario() -> tuple[list[list[Answer]], float, float]:
        stop = asyncio.Event()
        running = asyncio.ensure_future(load(sock_path, 8, stop, ENTRIES, VARS, HEADERS))
        await asyncio.sleep(0.5)
        _write_crl(crl, 2, revoked=True)
        signalled = time.monotonic()
        runner.proc.send_signal(signal.SIGHUP)
        reloaded = await wait_for_line(runner, "reloaded")
        await asyncio.sleep(0.5)
        stop.set()
        return await running, signalled, reloaded

    per_connection, signalled, reloaded = asyncio.run(scenario())
    assert_switched_once(per_connection, signalled, reloaded)
    assert reloaded - signalled < TRANSITION
    assert b"revoked" in asyncio.run(why_denied())
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(5) == 0
