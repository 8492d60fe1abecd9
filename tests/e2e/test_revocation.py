"""Revocation through real TLS: nginx verifies the chain against client.ca, the runner denies what its CRLs
list, and ``kill -HUP`` installs new CRLs, or keeps the old ones when the new files do not verify."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.certs import CertFactory, crl_pem
from tests.e2e.bridge import Route
from tests.e2e.nginx_env import NginxEnv
from tests.e2e.pki import SPIFFE_PROD, Pki
from tests.e2e.policies import enforce_policy
from tests.e2e.runner_process import RunnerProcess
from tests.e2e.stack import Stack, running_stack

pytestmark = pytest.mark.e2e

FACTORY = CertFactory()


@dataclass
class World:
    stack: Stack
    pki: Pki
    crl: Path  # the CRL file the runner's config names (through its directory)
    number: int = 1  # the CRL number last written

    def write_crl(self, revoked: list[str], *, forged: bool = False) -> None:
        """Replace the CRL file atomically, as a deployment would, listing the named clients."""
        self.number += 1
        issued = [self.pki.clients[name].issued for name in revoked]
        key = FACTORY.new_key() if forged else None
        crl = FACTORY.crl(self.pki.ca, issued, number=self.number, signing_key=key)
        staging = self.crl.with_name(".staging")
        staging.write_bytes(crl_pem(crl))
        os.replace(staging, self.crl)

    def reload(self, outcome: str) -> None:
        """``kill -HUP`` the runner and wait for its log to report ``outcome`` (reloaded / reload_failed)."""
        marker = f"event={outcome} "
        seen = self.stack.runner.log().count(marker)
        os.kill(self.stack.runner.pid, signal.SIGHUP)
        deadline = time.monotonic() + 15
        while self.stack.runner.log().count(marker) == seen:
            assert time.monotonic() < deadline, f"no {marker!r} after SIGHUP{self.stack.diagnostics()}"
            time.sleep(0.05)


def _runner_config(directory: Path, pki: Pki, crl_dir: str) -> Path:
    config = directory / "runner.yaml"
    # Relative paths: the runner resolves them against the config file's directory.
    options = {"crl_files": [crl_dir], "crl_issuer_files": [os.path.relpath(pki.ca_file, directory)]}
    config.write_text(yaml.safe_dump({"plugins": {"mtls-guard": options}}), encoding="utf-8")
    return config


@pytest.fixture(scope="module")
def world(nginx_env: NginxEnv, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Route ``/`` enforcing the SPIFFE ID policy; the runner reads ``crls/`` (one CRL of the test CA)."""
    workdir = tmp_path_factory.mktemp("revocation")
    for name in ("crl-revoked", "crl-later"):
        pki.add_client(name, FACTORY.leaf(pki.ca, cn="web-prod", uris=[SPIFFE_PROD]))
    (workdir / "crls").mkdir()
    crl = workdir / "crls" / "test-ca.crl"
    crl.write_bytes(crl_pem(FACTORY.crl(pki.ca, [pki.clients["crl-revoked"].issued], number=1)))
    config = _runner_config(workdir, pki, "crls")
    routes = [Route.mtls_guard("1", "/", enforce_policy())]
    with running_stack(nginx_env, pki, workdir, routes, runner_args=("--config", str(config))) as stack:
        yield World(stack, pki, crl)


def test_revoked_certificate_is_denied_and_the_others_pass(world: World) -> None:
    """A client certificate nginx verified but the CRL lists gets 403 revoked; a valid one reaches the upstream."""
    stack = world.stack
    stack.expect(stack.clients.request("/orders/1", cert="crl-revoked"), 403, "revoked")
    assert stack.bridge.records[-1].vars["ssl_client_verify"] == "SUCCESS"
    stack.expect(stack.clients.request("/orders/1", cert="valid"), 200)
    stack.expect(stack.clients.request("/health", cert="crl-revoked"), 200)


def test_sighup_installs_a_new_crl(world: World) -> None:
    """After a new CRL is written and the runner gets SIGHUP, the certificate it adds is denied at once."""
    stack = world.stack
    stack.expect(stack.clients.request("/orders/2", cert="crl-later"), 200)
    world.write_crl(["crl-revoked", "crl-later"])
    world.reload("reloaded")
    stack.expect(stack.clients.request("/orders/2", cert="crl-later"), 403, "revoked")
    stack.expect(stack.clients.request("/orders/2", cert="valid"), 200)


def test_sighup_with_a_forged_crl_keeps_the_old_crls(world: World) -> None:
    """A reload whose CRL does not verify is refused as a whole: the CRLs in force stay in force."""
    stack = world.stack
    world.write_crl(["crl-revoked"])
    world.reload("reloaded")
    world.write_crl([], forged=True)
    world.reload("reload_failed")
    assert "test-ca.crl: its signature does not verify" in stack.runner.log()
    stack.expect(stack.clients.request("/orders/3", cert="crl-revoked"), 403, "revoked")
    stack.expect(stack.clients.request("/orders/3", cert="valid"), 200)


def test_forged_crl_stops_the_runner_at_start_up(tmp_path: Path, pki: Pki) -> None:
    """A runner whose CRL does not verify never serves: exit 3, one line naming the file."""
    forged = FACTORY.crl(pki.ca, [], signing_key=FACTORY.new_key())
    (tmp_path / "forged.crl").write_bytes(crl_pem(forged))
    config = _runner_config(tmp_path, pki, "forged.crl")
    sock = Path("/tmp") / f"mg-crl-{os.getpid()}.sock"
    runner = RunnerProcess(str(sock), tmp_path / "runner.log", "--config", str(config))
    with pytest.raises(RuntimeError, match="runner exited with 3 at start-up"):
        runner.start(timeout=10)
    lines = [line for line in runner.log().splitlines() if "forged.crl" in line]
    assert len(lines) == 1, runner.log()
    assert "its signature does not verify" in lines[0]
