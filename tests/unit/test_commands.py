"""Operator commands fail in one line on stderr with a distinct exit code, never a traceback.

Exit codes: 0 valid / allowed, 1 invalid policy / denied, 2 usage error or unreadable input, 3 the demo's
runner could not start. The --client-ca verdicts are also compared with `openssl verify`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from plugins.mtls_guard.identity import load_pem_chain
from plugins.mtls_guard.tools import commands_io, demo
from plugins.mtls_guard.tools.commands_verify import client_verify
from runner.cli import main
from tests.certs import CertFactory

ROOT = Path(__file__).resolve().parents[2]
FACTORY = CertFactory()
CA = FACTORY.ca("Commands Root")
LEAF = FACTORY.leaf(CA)
POLICY = '{"exempt": [{"id": "public", "path": "/public/.*"}]}'
EXPLAIN = ("explain", "--policy", POLICY, "--path", "/api")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Input files, good and bad, by name."""
    contents: dict[str, bytes] = {
        "policy.json": POLICY.encode(),
        "policy.yaml": b"exempt:\n  - id: public\n    path: /public/.*\n",
        "broken.json": b'{"exempt": [',
        "broken.yaml": b"exempt: [\n",
        "unknown-key.json": b'{"exempts": []}',
        "latin1.json": '{"exempt": [{"id": "caf\u00e9", "path": "/x"}]}'.encode("latin-1"),
        "library.yaml": b"policies:\n  open:\n    exempt:\n      - id: all\n        path: /public/.*\n",
        "library-open.yaml": b"policies:\n  open:\n    exempt:\n      - id: all\n        path: /.*\n",
        "library-broken.yaml": b"policies: [\n",
        "library-invalid.yaml": b"policies:\n  open:\n    exempts: []\n",
        "ca.pem": CA.pem.encode(),
        "leaf.pem": LEAF.pem.encode(),
        "leaf.der": LEAF.der,
        "key.pem": LEAF.key_pem.encode(),
        "garbage.bin": b"\x00\x01 certainly not a certificate \xff",
    }
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "directory").mkdir()
    paths = {name: str(tmp_path / name) for name in contents}
    paths["directory"] = str(tmp_path / "directory")
    paths["missing"] = str(tmp_path / "missing.json")
    return paths


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `mtls-guard ARGV`, argparse's exits included."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str) -> None:
    assert "Traceback" not in err
    assert err.endswith("\n"), err
    assert err.count("\n") == 1, err


Args = Callable[[dict[str, str]], list[str]]

ERRORS: list[tuple[str, Args, int, str]] = [
    # check: unreadable input is 2, a malformed policy in a readable file 1
    ("check-missing-file", lambda f: ["check", f["missing"]], 2, "no such file (an inline policy is a JSON object"),
    ("check-not-json-nor-file", lambda _: ["check", "[1]"], 2, "no such file"),
    ("check-directory", lambda f: ["check", f["directory"]], 2, "is a directory"),
    ("check-not-utf8", lambda f: ["check", f["latin1.json"]], 2, "not UTF-8"),
    ("check-broken-json", lambda f: ["check", f["broken.json"]], 1, "invalid JSON at line 1"),
    ("check-broken-yaml", lambda f: ["check", f["broken.yaml"]], 1, "invalid YAML at line 2"),
    ("check-schema", lambda f: ["check", f["unknown-key.json"]], 1, "exempts"),
    ("check-inline-schema", lambda _: ["check", '{"mode": "loud"}'], 1, "invalid policy: mode"),
    ("check-nothing", lambda _: ["check"], 2, "give a POLICY, or --policy-file"),
    ("check-library-missing", lambda f: ["check", "--policy-file", f["missing"]], 2, "no such file"),
    ("check-library-directory", lambda f: ["check", "--policy-file", f["directory"]], 2, "is a directory"),
    ("check-library-yaml", lambda f: ["check", "--policy-file", f["library-broken.yaml"]], 1, "invalid YAML"),
    ("check-library-invalid", lambda f: ["check", "--policy-file", f["library-invalid.yaml"]], 1, "exempts"),
    ("check-unknown-option", lambda _: ["check", "--bogus"], 2, "unrecognized arguments: --bogus"),
    # explain: usage errors and bad values
    ("method", lambda _: [*EXPLAIN, "--method", "FOO"], 2, "'FOO' is not a method APISIX passes to the runner"),
    ("peer", lambda _: [*EXPLAIN, "--peer", "notanip"], 2, "'notanip' is not an IP address"),
    ("header-colon", lambda _: [*EXPLAIN, "--header", "X-Foo"], 2, "'X-Foo' is not NAME:VALUE"),
    ("header-name", lambda _: [*EXPLAIN, "--header", "X Foo: 1"], 2, "'X Foo' is not a header name"),
    ("header-host", lambda _: [*EXPLAIN, "--header", "Host: a"], 2, "the Host header is set with --host"),
    ("verify-value", lambda _: [*EXPLAIN, "--verify", "OK"], 2, "'OK' is not SUCCESS, NONE or FAILED:<reason>"),
    ("http-cert", lambda f: [*EXPLAIN, "--scheme", "http", "--cert", f["leaf.pem"]], 2, "--cert with --scheme http"),
    ("http-sni", lambda _: [*EXPLAIN, "--scheme", "http", "--sni", "a.test"], 2, "--sni with --scheme http"),
    ("verify-and-ca", lambda f: [*EXPLAIN, "--verify", "NONE", "--client-ca", f["ca.pem"]], 2, "not allowed with"),
    ("depth-alone", lambda _: [*EXPLAIN, "--client-depth", "2"], 2, "--client-depth applies to --client-ca"),
    ("depth-value", lambda _: [*EXPLAIN, "--client-depth", "two"], 2, "'two' is not a depth"),
    ("no-policy", lambda _: ["explain", "--path", "/x"], 2, "the following arguments are required: --policy"),
    ("unknown-option", lambda _: [*EXPLAIN, "--bogus"], 2, "unrecognized arguments: --bogus"),
    # explain: input files
    ("cert-der", lambda f: [*EXPLAIN, "--cert", f["leaf.der"]], 2, "is a DER certificate, PEM is needed"),
    ("cert-garbage", lambda f: [*EXPLAIN, "--cert", f["garbage.bin"]], 2, "not a PEM certificate"),
    ("cert-key", lambda f: [*EXPLAIN, "--cert", f["key.pem"]], 2, "holds no certificate, only PEM PRIVATE KEY"),
    ("cert-missing", lambda f: [*EXPLAIN, "--cert", f["missing"]], 2, "no such file"),
    ("cert-directory", lambda f: [*EXPLAIN, "--cert", f["directory"]], 2, "is a directory"),
    ("ca-der", lambda f: [*EXPLAIN, "--cert", f["leaf.pem"], "--client-ca", f["leaf.der"]], 2, "is a DER"),
    ("ca-not-ca", lambda f: [*EXPLAIN, "--cert", f["leaf.pem"], "--client-ca", f["leaf.pem"]], 2, "is not a CA"),
    ("policy-missing", lambda f: ["explain", "--policy", f["missing"], "--path", "/x"], 2, "no such file"),
    ("policy-broken", lambda f: ["explain", "--policy", f["broken.yaml"], "--path", "/x"], 1, "invalid YAML"),
    ("library-missing", lambda f: [*EXPLAIN, "--policy-file", f["missing"]], 2, "--policy-file"),
    ("library-not-utf8", lambda f: [*EXPLAIN, "--policy-file", f["latin1.json"]], 2, "not UTF-8"),
    ("library-yaml", lambda f: [*EXPLAIN, "--policy-file", f["library-broken.yaml"]], 1, "invalid YAML"),
    ("library-invalid", lambda f: [*EXPLAIN, "--policy-file", f["library-invalid.yaml"]], 1, "exempts"),
    ("target-400", lambda _: ["explain", "--policy", POLICY, "--target", "/a/../../b"], 1, "nginx answers 400"),
]


class TestErrors:
    @pytest.mark.parametrize(("argv", "code", "fragment"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
    def test_one_line_and_exit_code(
        self, capsys: pytest.CaptureFixture[str], files: dict[str, str], argv: Args, code: int, fragment: str
    ) -> None:
        """Each bad input or combination exits with its code and one stderr line saying what is wrong."""
        got, _, err = run(capsys, argv(files))
        assert_one_line(err)
        assert got == code, err
        assert fragment in err
        assert err.startswith(("mtls-guard check: ", "mtls-guard explain: "))

    @pytest.mark.parametrize("command", ["check", "explain"])
    def test_permission_denied(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, files: dict[str, str], command: str
    ) -> None:
        """A policy file that may not be read is exit 2, naming the file (simulated: tests may run as root)."""

        def refuse(*_: object, **__: object) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(commands_io, "open", refuse, raising=False)
        argv = ["check", files["policy.json"]] if command == "check" else ["explain", "--policy", files["policy.json"]]
        code, _, err = run(capsys, [*argv, *(["--path", "/x"] if command == "explain" else [])])
        assert_one_line(err)
        assert code == 2
        assert f"{files['policy.json']}: permission denied" in err

    def test_too_large(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        """A policy file over the size bound is exit 2 rather than read whole."""
        monkeypatch.setattr(commands_io, "MAX_POLICY_BYTES", 8)
        code, _, err = run(capsys, ["check", str(ROOT / "conf" / "policies.yaml")])
        assert_one_line(err)
        assert (code, "larger than 8 bytes" in err) == (2, True)

    def test_der_message_says_how_to_convert(self, capsys: pytest.CaptureFixture[str], files: dict[str, str]) -> None:
        """A DER certificate is named as such, with the openssl command that converts it."""
        _, _, err = run(capsys, [*EXPLAIN, "--cert", files["leaf.der"]])
        target = files["leaf.der"].removesuffix(".der") + ".pem"
        assert f"openssl x509 -inform der -in {files['leaf.der']} -out {target}" in err

    def test_demo_runner_start_failure_is_exit_3(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The demo's runner failing to start (its socket) is exit 3, one line."""

        def cannot_bind() -> int:
            raise OSError(98, "Address already in use")

        monkeypatch.setattr(demo, "main", cannot_bind)
        code, _, err = run(capsys, ["demo"])
        assert_one_line(err)
        assert code == 3
        assert "mtls-guard demo: error: the demo's runner could not start" in err

    @pytest.mark.parametrize(
        "argv",
        [
            ["check", "nonexistent.json"],
            [*EXPLAIN, "--method", "FOO"],
            [*EXPLAIN, "--peer", "notanip"],
            [*EXPLAIN, "--header", "nocolon"],
        ],
    )
    def test_real_process(self, argv: list[str]) -> None:
        """Run as `python -m runner.cli`, the process exits 2 with one stderr line and no traceback."""
        result = subprocess.run(
            [sys.executable, "-m", "runner.cli", *argv], capture_output=True, text=True, check=False, cwd=ROOT
        )
        assert_one_line(result.stderr)
        assert result.returncode == 2


class TestSuccess:
    def test_check_file_and_inline(self, capsys: pytest.CaptureFixture[str], files: dict[str, str]) -> None:
        """A valid policy, inline, as a JSON file or as a YAML file, is exit 0 with nothing on stderr."""
        for policy in (POLICY, files["policy.json"], files["policy.yaml"]):
            code, out, err = run(capsys, ["check", policy])
            assert (code, err, out.splitlines()[0]) == (0, "", "valid policy")

    def test_check_library(self, capsys: pytest.CaptureFixture[str], files: dict[str, str]) -> None:
        """--policy-file alone checks every named policy."""
        code, out, err = run(capsys, ["check", "--policy-file", files["library.yaml"]])
        assert (code, out, err) == (0, "policy 'open': valid\n", "")

    def test_explain_named_policy(self, capsys: pytest.CaptureFixture[str], files: dict[str, str]) -> None:
        """explain reads a named policy from --policy-file: allowed is exit 0."""
        argv = ["explain", "--json", "--policy", '{"policy": "open"}', "--policy-file", files["library.yaml"]]
        code, out, _ = run(capsys, [*argv, "--path", "/public/x"])
        assert (code, json.loads(out)["detail"]) == (0, "all")


# -- --client-ca against OpenSSL -------------------------------------------------------------------------


def _openssl_3() -> bool:
    found = shutil.which("openssl")
    if found is None:
        return False
    version = subprocess.run([found, "version"], capture_output=True, text=True, check=False).stdout
    return version.startswith("OpenSSL 3.")


def _scenarios() -> dict[str, tuple[str, str, int]]:
    """name -> (chain the client sends, leaf first; the CA file; client.depth)."""
    f = FACTORY
    root, other = f.ca("Diff Root"), f.ca("Diff Other Root")
    inter = f.ca("Diff Intermediate", parent=root)
    deep = f.ca("Diff Deep Intermediate", parent=inter)
    tight = f.ca("Diff Tight Root", path_length=0)
    below_tight = f.ca("Diff Below Tight", parent=tight)
    old_inter = f.ca("Diff Old Intermediate", parent=root, not_after=f.now - timedelta(days=1))
    past = f.now - timedelta(days=2)
    return {
        "good": (f.leaf(root).pem, root.pem, 1),
        "untrusted": (f.leaf(other).pem, root.pem, 1),
        "self-signed": (f.self_signed_leaf().pem, root.pem, 1),
        "expired": (f.leaf(root, not_before=past - timedelta(days=1), not_after=past).pem, root.pem, 1),
        "not-yet-valid": (f.leaf(root, not_before=f.now + timedelta(days=1)).pem, root.pem, 1),
        "intermediate-sent": (f.leaf(inter).pem + inter.pem, root.pem, 1),
        "intermediate-in-ca-file": (f.leaf(inter).pem, root.pem + inter.pem, 1),
        "intermediate-missing": (f.leaf(inter).pem, root.pem, 1),
        "ca-file-without-root": (f.leaf(inter).pem, inter.pem, 1),
        "root-sent-untrusted": (f.leaf(inter).pem + inter.pem + root.pem, other.pem, 2),
        "root-sent-untrusted-too-deep": (f.leaf(inter).pem + inter.pem + root.pem, other.pem, 1),
        "too-deep": (f.leaf(deep).pem + deep.pem + inter.pem, root.pem, 1),
        "deep-enough": (f.leaf(deep).pem + deep.pem + inter.pem, root.pem, 2),
        "ca-file-intermediates-count": (f.leaf(deep).pem, deep.pem + inter.pem + root.pem, 1),
        "ca-file-without-root-too-deep": (f.leaf(deep).pem + deep.pem, inter.pem, 1),
        "path-length": (f.leaf(below_tight).pem + below_tight.pem, tight.pem, 1),
        "server-only-eku": (f.leaf(root, eku=[ExtendedKeyUsageOID.SERVER_AUTH]).pem, root.pem, 1),
        "forged-issuer": (f.leaf(f.ca("Diff Root")).pem, root.pem, 1),
        "expired-intermediate": (f.leaf(old_inter, not_before=past).pem + old_inter.pem, root.pem, 1),
    }


SCENARIOS = _scenarios()
_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", re.S)


@pytest.mark.skipif(not _openssl_3(), reason="compares with OpenSSL 3's wording")
class TestClientCaMatchesOpenssl:
    @pytest.mark.parametrize("name", sorted(SCENARIOS))
    def test_same_verdict(self, tmp_path: Path, name: str) -> None:
        """client_verify gives the $ssl_client_verify that `openssl verify -purpose sslclient` implies."""
        chain, ca, depth = SCENARIOS[name]
        leaf, *intermediates = _BLOCK.findall(chain)
        (tmp_path / "ca.pem").write_text(ca)
        (tmp_path / "leaf.pem").write_text(leaf)
        argv = ["openssl", "verify", "-purpose", "sslclient", "-verify_depth", str(depth)]
        argv += ["-CAfile", str(tmp_path / "ca.pem")]
        if intermediates:
            (tmp_path / "sent.pem").write_text("".join(intermediates))
            argv += ["-untrusted", str(tmp_path / "sent.pem")]
        result = subprocess.run([*argv, str(tmp_path / "leaf.pem")], capture_output=True, text=True, check=False)
        found = re.search(r"error \d+ at \d+ depth lookup: (.+)", result.stdout + result.stderr)
        expected = "SUCCESS" if result.returncode == 0 else f"FAILED:{found.group(1) if found else result.stderr}"
        ours = client_verify(load_pem_chain(chain), load_pem_chain(ca), now=datetime.now(UTC), depth=depth)
        assert ours.verify == expected


def test_check_reports_a_catch_all_exemption_as_an_error_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """A policy that is valid but exempts every request is reported on stderr with its lint code, exit 1."""
    code, out, err = run(capsys, ["check", '{"exempt": [{"id": "everything", "path": ".*"}]}'])
    assert code == 1
    assert out.startswith("valid policy")
    assert_one_line(err)
    assert "error MG070" in err
    assert "everything" in err


def test_check_prints_warnings_but_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """A warning-level fail-open setting (require_sni_match: false) is printed; the policy stays valid (exit 0)."""
    code, _, err = run(capsys, ["check", '{"require_sni_match": false}'])
    assert code == 0
    assert_one_line(err)
    assert "warning MG076" in err


def test_check_of_a_library_names_the_policy_that_fails_open(
    capsys: pytest.CaptureFixture[str], files: dict[str, str]
) -> None:
    """Checking every named policy names the one whose exemption covers every path, and exits 1."""
    code, out, err = run(capsys, ["check", "--policy-file", files["library-open.yaml"]])
    assert code == 1
    assert "policy 'open': valid" in out
    assert_one_line(err)
    assert "MG070: policy 'open':" in err


def test_check_of_a_narrow_policy_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    """An ordinary policy (one public prefix) gets no finding: exit 0 and nothing on stderr."""
    code, _, err = run(capsys, ["check", POLICY])
    assert (code, err) == (0, "")


@pytest.mark.parametrize(
    "argv",
    [
        ["bogus"],
        [],
        ["run", "--workers", "many"],
        ["run", "--no-such-option"],
        ["lint", "--format", "xml", "apisix.yaml"],
        ["check", "--no-such-option"],
    ],
)
def test_usage_errors_of_every_command_are_one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """Usage errors of the top level, `run`, `lint` and the plugin's commands are one line on stderr, exit 2."""
    code, out, err = run(capsys, argv)
    assert code == 2
    assert out == ""
    assert_one_line(err)
    assert "usage:" not in err
