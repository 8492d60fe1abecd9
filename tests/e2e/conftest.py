"""Fixtures of the end-to-end world: nginx + bridge + a real runner process, started once per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.nginx_env import NginxEnv
from tests.e2e.pki import Pki
from tests.e2e.policies import all_routes
from tests.e2e.stack import Stack, require_nginx, running_stack


@pytest.fixture(scope="session")
def nginx_env() -> NginxEnv:
    """The probed nginx; skips (or fails under MTLS_GUARD_REQUIRE_E2E=1) when unusable."""
    return require_nginx()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stack(nginx_env: NginxEnv, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The full world with every route, shared by the tests of one module."""
    with running_stack(nginx_env, pki, tmp_path_factory.mktemp("e2e"), all_routes(pki)) as world:
        yield world
