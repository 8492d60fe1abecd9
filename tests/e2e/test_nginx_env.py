"""The nginx probe behind ``scripts/test`` and the skip-or-fail policy of the end-to-end fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import stack as harness
from tests.e2e.nginx_env import NginxEnv, probe

ROOT = Path(__file__).resolve().parents[2]


def _check(**overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **overrides}
    argv = [sys.executable, "-m", "tests.e2e.nginx_env", "--check"]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


class TestProbe:
    """``python -m tests.e2e.nginx_env --check`` decides whether scripts/test installs the Debian packages."""

    def test_missing_nginx_is_reported(self, tmp_path: Path) -> None:
        """A missing nginx binary makes the probe unusable and names what is missing."""
        result = probe({"PATH": os.defpath, "MTLS_GUARD_NGINX": str(tmp_path / "nginx")})
        assert not result.usable
        assert "nginx not found" in result.reason()
        assert "libnginx-mod-http-lua" in result.reason()

    def test_check_exits_1_with_the_reason(self, tmp_path: Path) -> None:
        """--check exits 1 and prints the missing piece on stderr."""
        done = _check(MTLS_GUARD_NGINX=str(tmp_path / "nginx"))
        assert done.returncode == 1
        assert "nginx not found" in done.stderr

    @pytest.mark.e2e
    def test_check_exits_0_when_usable(self, nginx_env: NginxEnv) -> None:
        """On a machine with nginx, the Lua module and lua-resty-core, --check exits 0."""
        done = _check()
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("ok: nginx")

    @pytest.mark.e2e
    def test_missing_lua_modules_are_reported(self, nginx_env: NginxEnv, tmp_path: Path) -> None:
        """A modules directory without the Lua module is reported by file name."""
        result = probe({"PATH": os.environ["PATH"], "MTLS_GUARD_NGINX_MODULES": str(tmp_path)})
        assert not result.usable
        assert "ngx_http_lua_module.so not found" in result.reason()

    @pytest.mark.e2e
    def test_lua_core_without_verify_client_fails_the_start_up_smoke(self, nginx_env: NginxEnv, tmp_path: Path) -> None:
        """An ngx/ssl.lua that lacks verify_client is caught by really starting nginx, not by a text search."""
        (tmp_path / "ngx").mkdir()
        (tmp_path / "ngx" / "ssl.lua").write_text("-- verify_client is mentioned but not provided\nreturn {}\n")
        result = probe({"PATH": os.environ["PATH"], "MTLS_GUARD_LUA_PATH": str(tmp_path)})
        assert not result.usable
        assert "ngx.ssl.verify_client is missing" in result.reason()


class TestSkipOrFail:
    """Without nginx the end-to-end tests skip, unless CI demands them with MTLS_GUARD_REQUIRE_E2E=1."""

    def test_unusable_nginx_skips(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """Locally, a machine without nginx skips the end-to-end tests with the reason."""
        monkeypatch.setenv("MTLS_GUARD_NGINX", str(tmp_path / "nginx"))
        monkeypatch.delenv(harness.REQUIRE_ENV, raising=False)
        with pytest.raises(pytest.skip.Exception, match="nginx not found"):
            harness.require_nginx()

    def test_unusable_nginx_fails_when_required(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """With MTLS_GUARD_REQUIRE_E2E=1 a machine without nginx fails instead of skipping."""
        monkeypatch.setenv("MTLS_GUARD_NGINX", str(tmp_path / "nginx"))
        monkeypatch.setenv(harness.REQUIRE_ENV, "1")
        with pytest.raises(pytest.fail.Exception, match="MTLS_GUARD_REQUIRE_E2E=1 but the end-to-end tests cannot run"):
            harness.require_nginx()
