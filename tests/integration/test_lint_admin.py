"""``mtls-guard lint --admin-url``: a live Admin API replayed on 127.0.0.1 (pages, empty lists, errors).

The fake answers as APISIX 3.x does, shapes taken from its source (apache/apisix):
``apisix/admin/v3_adapter.lua`` (``{"total", "list"}``, ``total`` before paging, ``page``/``page_size``
with 400 outside 10..500, pages past the end empty), ``apisix/core/etcd.lua`` (items ``{key, value,
createdIndex, modifiedIndex}``, 404 ``{"message": "Key not found"}`` for a missing directory) and
``apisix/admin/init.lua`` (``X-API-KEY``; a bad key is a bare 401).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from plugins.mtls_guard.tools.lint import lint_files
from plugins.mtls_guard.tools.lint_admin import AdminError, fetch_admin
from runner.cli import main as cli_main
from tests.certs import CertFactory

KEY = "edd1c9f0-lint-test-key"
ENV = "MTLS_GUARD_TEST_ADMIN_KEY"
KINDS = ("routes", "services", "plugin_configs", "global_rules", "ssls")
FACTORY = CertFactory()
CA = FACTORY.ca("Client CA")
SERVER = FACTORY.leaf(CA, cn="api.example.com", dns=["api.example.com"], client_auth=False, chain=[CA])
GUARD = {"ext-plugin-pre-req": {"conf": [{"name": "mtls-guard", "value": "{}"}], "allow_degradation": False}}


@dataclass
class FakeAdmin:
    objects: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    raw: dict[str, tuple[int, bytes, dict[str, str]]] = field(default_factory=dict)  # path -> canned answer
    requests: list[str] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    url: str = ""

    def add(self, kind: str, *values: dict[str, Any]) -> None:
        self.objects.setdefault(kind, []).extend(values)

    def paths(self, kind: str) -> list[str]:
        return [r for r in self.requests if urlsplit(r).path.rstrip("/") == f"/apisix/admin/{kind}"]

    def answer(self, path: str, query: str, key: str | None) -> tuple[int, bytes, dict[str, str]]:
        if path in self.raw:
            return self.raw[path]
        if key != KEY:
            return 401, b"", {}
        kind = path.removeprefix("/apisix/admin/").strip("/")
        if not path.startswith("/apisix/admin/") or kind not in KINDS:
            return 404, b"<html>404 Not Found</html>", {"Content-Type": "text/html"}
        items = [
            {"key": f"/apisix/{kind}/{v['id']}", "value": v, "createdIndex": i + 10, "modifiedIndex": i + 10}
            for i, v in enumerate(self.objects.get(kind, []))
        ]
        body: dict[str, Any] = {"total": len(items), "list": items}
        args = {k: v[0] for k, v in parse_qs(query).items()}
        if "page" in args and "page_size" in args:
            size = int(args["page_size"])
            if not 10 <= size <= 500:
                return 400, b"page_size must be between 10 and 500", {}
            page = max(int(args["page"]), 1)
            body["list"] = items[(page - 1) * size : page * size]
        return 200, json.dumps(body).encode(), {"Content-Type": "application/json"}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        fake = self.server.fake
        fake.requests.append(self.path)
        fake.keys.append(self.headers.get("X-API-KEY"))
        parts = urlsplit(self.path)
        status, body, headers = fake.answer(parts.path, parts.query, self.headers.get("X-API-KEY"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    def __init__(self, fake: FakeAdmin) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake


@pytest.fixture
def admin() -> Iterator[FakeAdmin]:
    fake = FakeAdmin()
    server = _Server(fake)
    # A short poll interval keeps shutdown() quick; the default 0.5 s adds up over the tests.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)
    monkeypatch.delenv("APISIX_ADMIN_KEY", raising=False)


def tolerant_ssl() -> dict[str, Any]:
    return {
        "id": "api",
        "snis": ["api.example.com"],
        "cert": SERVER.chain_pem,
        "client": {"ca": CA.pem, "skip_mtls_uri_regex": ["^/"]},
    }


def lint(*args: str) -> int:
    return cli_main(["lint", *args])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- reading -------------------------------------------------------------------------------------------


class TestReading:
    def test_pages_are_walked_until_total(self, admin: FakeAdmin) -> None:
        """23 routes at page_size 10 arrive over pages 1, 2 and 3, in APISIX's order, each with its id."""
        admin.add("routes", *({"id": str(n), "uri": f"/r{n}"} for n in range(23)))
        snapshot = fetch_admin(admin.url, KEY, page_size=10)
        assert [o["id"] for o in snapshot.objects["routes"]] == [str(n) for n in range(23)]  # type: ignore[index]
        assert [parse_qs(urlsplit(r).query)["page"] for r in admin.paths("routes")] == [["1"], ["2"], ["3"]]

    def test_default_page_size_is_apisix_maximum_and_key_is_sent(self, admin: FakeAdmin) -> None:
        """Every kind is asked for with page_size=500 and the X-API-KEY header."""
        fetch_admin(admin.url, KEY)
        assert sorted(urlsplit(r).path for r in admin.requests) == sorted(f"/apisix/admin/{k}" for k in KINDS)
        assert all(parse_qs(urlsplit(r).query)["page_size"] == ["500"] for r in admin.requests)
        assert set(admin.keys) == {KEY}

    def test_empty_list_old_empty_object_and_key_not_found_are_empty(self, admin: FakeAdmin) -> None:
        """{"total":0,"list":[]}, the old {"list":{}} and a 404 "Key not found" all mean: no objects of that kind."""
        admin.raw["/apisix/admin/services"] = (200, b'{"total":0,"list":{}}', {})
        admin.raw["/apisix/admin/plugin_configs"] = (404, b'{"message":"Key not found"}', {})
        snapshot = fetch_admin(admin.url, KEY)
        assert snapshot.objects == {kind: [] for kind in KINDS}

    def test_server_that_ignores_paging_is_not_walked_forever(self, admin: FakeAdmin) -> None:
        """Pages that repeat the same items without a total end the walk after the first repeat."""
        items = [{"key": f"/apisix/routes/{n}", "value": {"uri": "/"}} for n in range(3)]
        admin.raw["/apisix/admin/routes"] = (200, json.dumps({"list": items}).encode(), {})
        snapshot = fetch_admin(admin.url, KEY, page_size=10)
        assert [o["id"] for o in snapshot.objects["routes"]] == ["0", "1", "2"]  # type: ignore[index]
        assert len(admin.paths("routes")) == 1

    def test_v2_node_shape_is_accepted(self, admin: FakeAdmin) -> None:
        """The 2.x answer {"node": {"nodes": [...]}} is read too (it has no paging)."""
        body = {
            "node": {"dir": True, "key": "/apisix/ssls", "nodes": [{"key": "/apisix/ssls/s", "value": {"sni": "a"}}]}
        }
        admin.raw["/apisix/admin/ssls"] = (200, json.dumps(body).encode(), {})
        assert fetch_admin(admin.url, KEY).objects["ssls"] == [{"sni": "a", "id": "s"}]

    def test_page_size_outside_apisix_range_is_refused(self) -> None:
        """fetch_admin refuses a page size APISIX would answer with 400."""
        with pytest.raises(ValueError, match=r"10\.\.500"):
            fetch_admin("http://127.0.0.1:9", KEY, page_size=5)


# -- the command line ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("key")
class TestCommandLine:
    def test_live_findings_carry_admin_sources(self, admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
        """An unguarded route on a tolerant SNI is MG010 with source admin:routes/1, and exit 1."""
        admin.add("routes", {"id": "1", "uri": "/*", "host": "api.example.com"})
        admin.add("ssls", tolerant_ssl())
        assert lint("--admin-url", admin.url, "--admin-key-env", ENV) == 1
        out = capsys.readouterr().out
        assert "admin:routes/1: error MG010 routes/1: reachable without a client certificate" in out
        assert "admin:routes (admin-api, 1 objects)" in out

    def test_admin_url_merges_with_files(
        self, admin: FakeAdmin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A global rule from a FILE guards the live routes: both inputs form one configuration."""
        admin.add("routes", {"id": "1", "uri": "/*", "host": "api.example.com"})
        admin.add("ssls", tolerant_ssl())
        path = tmp_path / "apisix.yaml"
        path.write_text(yaml.safe_dump({"global_rules": [{"id": "g", "plugins": GUARD}]}) + "#END\n", encoding="utf-8")
        assert lint("--admin-url", admin.url + "/apisix/admin/", "--admin-key-env", ENV, str(path)) == 0
        assert "MG010" not in capsys.readouterr().out

    def test_empty_admin_api_is_a_clean_run(self, admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
        """An APISIX with no objects at all lints with exit 0 and no MG003."""
        assert lint("--format", "json", "--admin-url", admin.url, "--admin-key-env", ENV) == 0
        document = json.loads(capsys.readouterr().out)
        assert document["findings"] == []
        assert [(f["path"], f["shape"], f["resources"]) for f in document["files"]] == [
            (f"admin:{kind}", "admin-api", 0) for kind in KINDS
        ]

    def test_wrong_key_is_one_line_and_exit_two(
        self, admin: FakeAdmin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A 401 is one stderr line naming the variable, never the key, and nothing on stdout."""
        monkeypatch.setenv(ENV, "wrong-key-value")
        assert lint("--admin-url", admin.url, "--admin-key-env", ENV) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1
        assert "HTTP 401" in captured.err
        assert f"${ENV}" in captured.err
        assert "wrong-key-value" not in captured.err

    def test_default_variable_unset_sends_no_key(
        self, admin: FakeAdmin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without --admin-key-env and without APISIX_ADMIN_KEY no key is sent, and the 401 says so."""
        assert lint("--admin-url", admin.url) == 2
        assert admin.keys == [None]
        assert "no key" in capsys.readouterr().err

    def test_named_variable_unset_is_exit_two_before_any_request(
        self, admin: FakeAdmin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--admin-key-env naming an unset or empty variable exits 2 without contacting the Admin API."""
        monkeypatch.setenv(ENV, "")
        assert lint("--admin-url", admin.url, "--admin-key-env", ENV) == 2
        assert admin.requests == []
        assert "unset or empty" in capsys.readouterr().err

    def test_key_on_the_command_line_is_refused(self, admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
        """--admin-key VALUE and a key passed as --admin-key-env exit 2 without echoing it or sending requests."""
        assert lint("--admin-url", admin.url, "--admin-key", "s3cret-key") == 2
        assert lint("--admin-url", admin.url, "--admin-key-env", "s3cret-key") == 2
        assert "s3cret-key" not in capsys.readouterr().err
        assert admin.requests == []

    @pytest.mark.parametrize(
        ("answer", "expected"),
        [
            ((404, b"<html>nope</html>", {}), "HTTP 404"),
            ((200, b"<html>a web page</html>", {}), "not JSON"),
            ((500, b'{"error_msg":"etcd down"}', {}), "HTTP 500 Internal Server Error: etcd down"),
            ((403, b"", {}), "allow_admin"),
            ((302, b"", {"Location": "http://127.0.0.1:9/steal"}), "not followed"),
            ((200, b'{"unexpected": true}', {}), "unexpected answer"),
        ],
        ids=["404", "not-json", "500", "403", "redirect", "shape"],
    )
    def test_http_failures_are_one_line_and_exit_two(
        self,
        admin: FakeAdmin,
        capsys: pytest.CaptureFixture[str],
        answer: tuple[int, bytes, dict[str, str]],
        expected: str,
    ) -> None:
        """Each Admin API failure is one stderr line with the URL and the reason, and exit code 2."""
        admin.raw["/apisix/admin/routes"] = answer
        assert lint("--admin-url", admin.url, "--admin-key-env", ENV) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"GET {admin.url}/apisix/admin/routes?page=1&page_size=500" in err
        assert expected in err
        assert KEY not in err

    def test_connection_refused_is_exit_two(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A port nobody listens on is one line, "connection refused", exit 2."""
        assert lint("--admin-url", f"http://127.0.0.1:{free_port()}", "--admin-key-env", ENV) == 2
        assert "connection refused" in capsys.readouterr().err

    def test_tls_error_is_exit_two(self, admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
        """https:// to a plain-HTTP listener fails the handshake: one line, "TLS error", exit 2."""
        assert lint("--admin-url", admin.url.replace("http:", "https:"), "--admin-key-env", ENV) == 2
        assert "TLS" in capsys.readouterr().err

    def test_silent_server_times_out(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A listener that never answers is "no answer within" the --admin-timeout, exit 2."""
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            url = f"http://127.0.0.1:{silent.getsockname()[1]}"
            assert lint("--admin-url", url, "--admin-key-env", ENV, "--admin-timeout", "0.2") == 2
        assert "no answer within 0.2 s" in capsys.readouterr().err

    @pytest.mark.parametrize("url", ["ftp://127.0.0.1:9180", "127.0.0.1:9180", "http://admin:pw@127.0.0.1:9180"])
    def test_bad_admin_url_is_exit_two(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        """A URL that is not http(s)://host[:port], or that carries credentials, is refused without echoing them."""
        assert lint("--admin-url", url, "--admin-key-env", ENV) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert ":pw@" not in err

    def test_neither_files_nor_admin_url_is_a_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`mtls-guard lint` with no FILE and no --admin-url exits 2 with one line."""
        assert lint() == 2
        assert "--admin-url" in capsys.readouterr().err


def test_lint_files_accepts_a_fetched_snapshot(admin: FakeAdmin) -> None:
    """lint_files(admin=...) lints a snapshot offline, with one file entry per kind."""
    admin.add("global_rules", {"id": "g", "plugins": GUARD})
    result = lint_files([], admin=fetch_admin(admin.url, KEY))
    assert [r.source for r in result.config.of("global_rules")] == ["admin:global_rules/g"]
    assert result.exit_code == 0


def test_standalone_configs_export_is_a_combined_file(tmp_path: Path) -> None:
    """A saved GET /apisix/admin/configs answer (API-driven standalone) lints with no unknown-key warnings."""
    export = {"routes": [{"id": "1", "uri": "/*", "modifiedIndex": 3}], "routes_conf_version": 3}
    export |= {"X-Last-Modified": 1765000000, "X-Digest": "abc"}
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(export), encoding="utf-8")
    result = lint_files([str(path)])
    assert result.config.files[0].shape == "combined"
    assert not [f for f in result.findings if f.code in ("MG002", "MG003")]


def test_admin_error_messages_never_hold_the_key(admin: FakeAdmin) -> None:
    """An AdminError raised for a rejected key mentions the variable, not the key."""
    with pytest.raises(AdminError) as raised:
        fetch_admin(admin.url, "not-the-key", key_env=ENV)
    assert "not-the-key" not in str(raised.value)
    assert ENV in str(raised.value)
