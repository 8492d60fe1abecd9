"""CRLs in the operator tools: ``check --crl``, ``explain --crl``, and ``lint`` of a policy with require.crl."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from plugins.mtls_guard.tools.lint import lint_files
from runner.cli import main
from tests.certs import CertFactory, crl_der, crl_pem

FACTORY = CertFactory()
NOW = FACTORY.now
ROOT = FACTORY.ca("Tools Root")
GOOD = FACTORY.leaf(ROOT, cn="good")
BAD = FACTORY.leaf(ROOT, cn="bad")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``mtls-guard ARGV``."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    files = {
        "ca.pem": ROOT.pem.encode(),
        "root.crl": crl_pem(FACTORY.crl(ROOT, [BAD])),
        "root.der": crl_der(FACTORY.crl(ROOT, [BAD])),
        "forged.crl": crl_pem(FACTORY.crl(ROOT, [GOOD], signing_key=FACTORY.new_key())),
        "stale.crl": crl_pem(
            FACTORY.crl(ROOT, [], this_update=NOW - timedelta(days=2), next_update=NOW - timedelta(days=1))
        ),
        "good.pem": GOOD.pem.encode(),
        "bad.pem": BAD.pem.encode(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: str(tmp_path / name) for name in [*files, "missing.crl"]}


class TestCheck:
    def test_valid_crl_is_described(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """check --crl verifies each CRL against --crl-issuer and prints its issuer, entries and nextUpdate."""
        code, out, err = run(capsys, "check", "--crl", pki["root.der"], "--crl-issuer", pki["ca.pem"])
        assert (code, err) == (0, "")
        assert "valid CRLs: 1 in use" in out
        assert f"{pki['root.der']}: issuer 'Tools Root', 1 revoked, nextUpdate " in out

    def test_forged_crl_exits_1_naming_the_file(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """A CRL whose signature does not verify is invalid: exit 1, one line naming it."""
        code, _, err = run(capsys, "check", "--crl", pki["forged.crl"], "--crl-issuer", pki["ca.pem"])
        assert code == 1
        assert err.count("\n") == 1
        assert f"{pki['forged.crl']}: its signature does not verify" in err

    def test_missing_crl_exits_2(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """A CRL file that cannot be read is a usage error (2), like every unreadable input."""
        code, _, err = run(capsys, "check", "--crl", pki["missing.crl"], "--crl-issuer", pki["ca.pem"])
        assert code == 2
        assert "missing.crl: cannot be read" in err

    def test_issuer_without_crl_is_a_usage_error(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """--crl-issuer alone has nothing to verify."""
        code, _, err = run(capsys, "check", "--crl-issuer", pki["ca.pem"], '{"mode": "enforce"}')
        assert code == 2
        assert "--crl-issuer serves to verify --crl" in err

    def test_stale_crl_is_valid_with_a_warning(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """A stale CRL verifies (exit 0) but check warns that the runner would deny its issuer's certificates."""
        code, out, err = run(capsys, "check", "--crl", pki["stale.crl"], "--crl-issuer", pki["ca.pem"])
        assert code == 0
        assert "(STALE)" in out
        assert "crl-stale" in err

    def test_invalid_route_crl_is_an_invalid_policy(
        self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]
    ) -> None:
        """A policy whose require.crl does not verify against its require.ca fails check with exit 1."""
        policy = {"require": {"ca": ROOT.pem, "crl": Path(pki["forged.crl"]).read_text()}}
        code, _, err = run(capsys, "check", json.dumps(policy))
        assert code == 1
        assert "require.crl: invalid CRL: require.crl: its signature does not verify" in err

    def test_valid_route_crl_is_described(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """check describes a policy's require.crl: which CRL, its issuer and its entries."""
        policy = {"require": {"ca": ROOT.pem, "crl": Path(pki["root.crl"]).read_text()}}
        code, out, _ = run(capsys, "check", json.dumps(policy))
        assert code == 0
        assert "not revoked by route CRL require.crl: issuer 'Tools Root', 1 revoked" in out


class TestExplain:
    @pytest.mark.parametrize(("cert", "code", "reason"), [("bad.pem", 1, "revoked"), ("good.pem", 0, "verified")])
    def test_explain_reports_revoked(
        self, capsys: pytest.CaptureFixture[str], pki: dict[str, str], cert: str, code: int, reason: str
    ) -> None:
        """explain --cert with --crl/--crl-issuer reaches the runner's verdict: revoked certificates are denied."""
        argv = ["explain", "--policy", "{}", "--path", "/x", "--cert", pki[cert], "--json"]
        got, out, _ = run(capsys, *argv, "--crl", pki["root.crl"], "--crl-issuer", pki["ca.pem"])
        result = json.loads(out)
        assert (got, result["reason"]) == (code, reason)
        assert len(result["crls"]) == 1

    def test_explain_text_names_the_crls(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """The text output says which CRLs the decision was checked against."""
        argv = ["explain", "--policy", "{}", "--path", "/x", "--cert", pki["bad.pem"]]
        code, out, _ = run(capsys, *argv, "--crl", pki["root.crl"], "--crl-issuer", pki["ca.pem"])
        assert code == 1
        assert "reason=revoked detail=leaf" in out
        assert f"revocation checked against --crl {pki['root.crl']}: issuer 'Tools Root'" in out

    def test_explain_refuses_a_forged_crl(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """explain validates --crl like the runner: a forged CRL is an error, not ignored."""
        argv = ["explain", "--policy", "{}", "--path", "/x", "--cert", pki["bad.pem"]]
        code, _, err = run(capsys, *argv, "--crl", pki["forged.crl"], "--crl-issuer", pki["ca.pem"])
        assert code == 1
        assert "forged.crl: its signature does not verify" in err


def test_lint_reports_an_invalid_route_crl_as_mg022(tmp_path: Path, pki: dict[str, str]) -> None:
    """A route whose require.crl does not verify is an invalid policy for lint (MG022): the route would answer 503."""
    policy = {"require": {"ca": ROOT.pem, "crl": Path(pki["forged.crl"]).read_text()}}
    config = {
        "routes": [
            {
                "id": "1",
                "uri": "/*",
                "plugins": {
                    "ext-plugin-pre-req": {
                        "conf": [{"name": "mtls-guard", "value": json.dumps(policy)}],
                        "allow_degradation": False,
                    }
                },
            }
        ]
    }
    path = tmp_path / "apisix.yaml"
    path.write_text(yaml.safe_dump(config) + "#END\n", encoding="utf-8")
    findings = [f for f in lint_files([str(path)], now=NOW).findings if f.code == "MG022"]
    assert len(findings) == 1
    assert "require.crl: invalid CRL" in findings[0].message


class TestLintCrlFiles:
    """``lint --crl/--crl-issuer`` checks the runner's crl_files as the runner loads them."""

    STANDALONE = str(Path(__file__).resolve().parents[1] / "fixtures" / "lint" / "host-exemptions.yaml")

    def codes(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, set[str]]:
        code, out, _ = run(capsys, "lint", "--format", "json", self.STANDALONE, *argv)
        return code, {f["code"] for f in json.loads(out)["findings"]}

    def test_valid_crl_adds_no_finding(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """A CRL that verifies against its issuer and is current gives neither MG080 nor MG081."""
        _, codes = self.codes(capsys, "--crl", pki["root.crl"], "--crl-issuer", pki["ca.pem"])
        assert not codes & {"MG080", "MG081"}

    def test_forged_crl_is_an_error(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """A CRL whose signature does not verify is MG080, an error: lint exits 1."""
        code, codes = self.codes(capsys, "--crl", pki["forged.crl"], "--crl-issuer", pki["ca.pem"])
        assert code == 1
        assert "MG080" in codes

    def test_crl_of_an_unknown_issuer_is_an_error(
        self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]
    ) -> None:
        """Without its issuer among --crl-issuer, the runner would refuse the CRL: MG080."""
        _, codes = self.codes(capsys, "--crl", pki["root.crl"])
        assert "MG080" in codes

    def test_stale_crl_is_a_warning(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """A CRL past its nextUpdate is MG081 (its issuer's certificates are denied as crl-stale)."""
        _, codes = self.codes(capsys, "--crl", pki["stale.crl"], "--crl-issuer", pki["ca.pem"])
        assert "MG081" in codes

    def test_unreadable_crl_exits_2(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """A CRL file that cannot be read is unreadable input: exit 2, one line."""
        code, out, err = run(
            capsys, "lint", self.STANDALONE, "--crl", pki["missing.crl"], "--crl-issuer", pki["ca.pem"]
        )
        assert (code, out) == (2, "")
        assert err.count("\n") == 1
        assert "missing.crl" in err
