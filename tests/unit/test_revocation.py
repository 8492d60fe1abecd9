"""CRLs: how they are read and verified at start-up, looked up per certificate, and judged when stale."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from plugins.mtls_guard.decision import Decision
from plugins.mtls_guard.identity import Name, load_pem
from plugins.mtls_guard.plugin import MtlsGuard
from plugins.mtls_guard.revocation import STALE_WARNING_INTERVAL, CrlSource, build_table
from plugins.mtls_guard.tools.explain import explain
from runner.metrics import GaugeSnapshot
from tests.certs import CertFactory, Issued, crl_der, crl_pem, escaped

FACTORY = CertFactory()
NOW = FACTORY.now
ROOT = FACTORY.ca("Revocation Root")
ISSUING = FACTORY.ca("Revocation Issuing CA", parent=ROOT)
GOOD = FACTORY.leaf(ISSUING, cn="good")
BAD = FACTORY.leaf(ISSUING, cn="bad")
DIRECT = FACTORY.leaf(ROOT, cn="direct")
OTHER = FACTORY.ca("Unrelated CA")
HOST = "api.example.com"
PAST: dict[str, Any] = {"this_update": NOW - timedelta(days=2), "next_update": NOW - timedelta(days=1)}

Files = Callable[..., MtlsGuard]


def decide(guard: MtlsGuard, cert: Issued, policy: str = "{}") -> Decision:
    """The decision the plugin makes for an HTTPS request on which nginx verified ``cert``."""
    variables = {"ssl_client_verify": "SUCCESS", "ssl_client_escaped_cert": escaped(cert.pem), "ssl_server_name": HOST}
    return explain(
        guard, guard.parse_conf(policy), method="GET", path="/x", headers=(("host", HOST),), variables=variables
    ).decision


def outcome(guard: MtlsGuard, cert: Issued) -> tuple[str, str]:
    decision = decide(guard, cert)
    return str(decision.reason), decision.detail


@pytest.fixture
def files(tmp_path: Path) -> Files:
    """Write CRL files (name -> bytes, or a directory as name -> {name -> bytes}) and an issuer bundle, then
    set a plugin up with them (``issuers`` replaces the bundle's certificates, ``options`` are added)."""

    def setup(crls: dict[str, Any], issuers: tuple[Issued, ...] = (ROOT, ISSUING), **options: Any) -> MtlsGuard:
        paths = []
        for name, content in crls.items():
            path = tmp_path / name
            if isinstance(content, dict):
                path.mkdir()
                for inner, data in content.items():
                    (path / inner).write_bytes(data)
            else:
                path.write_bytes(content)
            paths.append(str(path))
        bundle = tmp_path / "issuers.pem"
        bundle.write_text("".join(i.pem for i in issuers), encoding="ascii")
        guard = MtlsGuard()
        guard.setup({"crl_files": paths, "crl_issuer_files": [str(bundle)] if issuers else [], **options})
        return guard

    return setup


class TestLoading:
    def test_pem_crl_revokes_the_leaf_it_lists(self, files: Files) -> None:
        """A leaf listed by its issuer's PEM CRL is denied as revoked; its sibling passes."""
        guard = files({"issuing.crl": crl_pem(FACTORY.crl(ISSUING, [BAD]))})
        assert outcome(guard, BAD) == ("revoked", "leaf")
        assert outcome(guard, GOOD) == ("verified", "")

    def test_der_crl_works_like_pem(self, files: Files) -> None:
        """A DER CRL file is read like a PEM one."""
        guard = files({"issuing.der": crl_der(FACTORY.crl(ISSUING, [BAD]))})
        assert outcome(guard, BAD) == ("revoked", "leaf")

    def test_one_pem_file_may_hold_several_crls(self, files: Files) -> None:
        """Every X509 CRL block of a PEM file is used (here: the root's and the issuing CA's)."""
        both = crl_pem(FACTORY.crl(ROOT, [DIRECT])) + crl_pem(FACTORY.crl(ISSUING, [BAD]))
        guard = files({"all.pem": both})
        assert (outcome(guard, DIRECT), outcome(guard, BAD)) == (("revoked", "leaf"), ("revoked", "leaf"))
        assert {i.source.rsplit("#", 1)[1] for i in guard.revocation.crls} == {"1", "2"}

    def test_directory_of_crls_is_read_whole_without_hidden_files(self, files: Files) -> None:
        """Every visible file of a directory is a CRL file; hidden ones (editor files, ..data links) are skipped."""
        directory = {
            "root.der": crl_der(FACTORY.crl(ROOT, [DIRECT])),
            "issuing.pem": crl_pem(FACTORY.crl(ISSUING, [BAD])),
            ".issuing.pem.swp": b"not a CRL",
        }
        guard = files({"crls": directory})
        assert (outcome(guard, DIRECT), outcome(guard, BAD)) == (("revoked", "leaf"), ("revoked", "leaf"))

    def test_empty_directory_is_a_startup_error(self, files: Files) -> None:
        """A directory without a CRL file is refused (a mount that failed would otherwise revoke nothing)."""
        with pytest.raises(ValueError, match=r"crls: the directory holds no CRL file"):
            files({"crls": {}})

    def test_crl_signed_by_another_key_is_a_startup_error_naming_the_file(self, files: Files) -> None:
        """A CRL whose signature does not verify with its issuer's key stops the start, naming the file."""
        forged = FACTORY.crl(ISSUING, [GOOD], signing_key=FACTORY.new_key())
        with pytest.raises(ValueError, match=r"forged\.crl: its signature does not verify"):
            files({"forged.crl": crl_pem(forged)})

    def test_crl_of_an_unknown_issuer_is_a_startup_error(self, files: Files) -> None:
        """A CRL whose issuer is none of the known issuer certificates is refused, naming the file."""
        with pytest.raises(ValueError, match=r"other\.crl: issued by CN=Unrelated CA, which is none of the known"):
            files({"other.crl": crl_pem(FACTORY.crl(OTHER, []))})

    def test_crl_without_issuer_bundle_is_a_startup_error(self, files: Files) -> None:
        """Without crl_issuer_files (nor library CAs) no CRL can be verified, so none is accepted."""
        with pytest.raises(ValueError, match=r"none of the known issuer certificates"):
            files({"issuing.crl": crl_pem(FACTORY.crl(ISSUING, []))}, issuers=())

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            (b"garbage\x00\x01", r"junk\.crl: not a CRL"),
            (ROOT.pem.encode(), r"junk\.crl: holds PEM CERTIFICATE, where only X509 CRL blocks belong"),
            (b"-----BEGIN X509 CRL-----\n!!!!\n-----END X509 CRL-----\n", r"junk\.crl: PEM block #1 is not valid"),
            (b"-----BEGIN X509 CRL-----\nAAAA\n", r"junk\.crl: no complete PEM X509 CRL block"),
        ],
    )
    def test_unusable_file_is_a_startup_error_naming_it(self, files: Files, content: bytes, message: str) -> None:
        """Garbage, a certificate, bad base64 or a truncated block in a CRL file stops the start with its name."""
        with pytest.raises(ValueError, match=message):
            files({"junk.crl": content})

    def test_missing_file_is_a_startup_error(self, tmp_path: Path) -> None:
        """A CRL file that does not exist stops the start, naming it."""
        with pytest.raises(ValueError, match=r"nowhere\.crl: cannot be read"):
            MtlsGuard().setup({"crl_files": [str(tmp_path / "nowhere.crl")]})

    def test_unusable_issuer_file_is_a_startup_error_naming_it(self, tmp_path: Path) -> None:
        """An issuer bundle without a certificate stops the start, naming the option and the file."""
        bundle = tmp_path / "issuers.pem"
        bundle.write_bytes(crl_pem(FACTORY.crl(ROOT, [])))
        with pytest.raises(ValueError, match=r"crl_issuer_files: .*issuers\.pem: holds PEM X509 CRL"):
            MtlsGuard().setup({"crl_issuer_files": [str(bundle)]})

    def test_issuer_without_crl_sign_cannot_sign_crls(self, files: Files) -> None:
        """A CRL signed by a CA whose keyUsage lacks cRLSign is refused."""
        no_crl_sign = FACTORY.ca("No cRLSign CA", crl_sign=False)
        with pytest.raises(ValueError, match=r"keyUsage lacks cRLSign"):
            files({"ca.crl": crl_pem(FACTORY.crl(no_crl_sign, []))}, issuers=(no_crl_sign,))

    @pytest.mark.parametrize(
        ("extension", "message"),
        [
            (x509.DeltaCRLIndicator(1), "a delta CRL"),
            (x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"), "unsupported critical"),
        ],
    )
    def test_crl_this_module_cannot_honour_is_refused(
        self, files: Files, extension: x509.ExtensionType, message: str
    ) -> None:
        """Delta CRLs and CRLs with an unknown critical extension are refused rather than half-understood."""
        crl = FACTORY.crl(ISSUING, [BAD], extensions=[(extension, True)])
        with pytest.raises(ValueError, match=message):
            files({"odd.crl": crl_pem(crl)})

    def test_policy_library_cas_are_crl_issuers(self, files: Files, tmp_path: Path) -> None:
        """The CA bundles of the named policies (require.ca, source.ca) verify CRLs without crl_issuer_files."""
        library = tmp_path / "policies.yaml"
        library.write_text(yaml.safe_dump({"policies": {"issuing": {"require": {"ca": ISSUING.pem}}}}))
        guard = files({"issuing.crl": crl_pem(FACTORY.crl(ISSUING, [BAD]))}, issuers=(), policy_file=str(library))
        assert outcome(guard, BAD) == ("revoked", "leaf")

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"crl_files": "one.crl"}, "crl_files must be a list of paths"),
            ({"crl_issuer_files": [""]}, "crl_issuer_files must be a list of paths"),
            ({"stale_crl": "ignore"}, "stale_crl must be one of deny, allow"),
            ({"crl_file": ["x"]}, "unknown mtls-guard option"),
        ],
    )
    def test_bad_options_are_startup_errors(self, options: dict[str, Any], message: str) -> None:
        """Option values of the wrong shape are refused with the option's name."""
        with pytest.raises(ValueError, match=message):
            MtlsGuard().setup(options)

    def test_newest_crl_of_an_issuer_supersedes_older_ones(self, files: Files) -> None:
        """Of two CRLs of one issuer the higher CRL number is used: a stale old one left next to it is harmless."""
        old = FACTORY.crl(ISSUING, [BAD], number=1, **PAST)
        new = FACTORY.crl(ISSUING, [], number=2)
        guard = files({"crls": {"a-old.crl": crl_pem(old), "b-new.crl": crl_pem(new)}})
        assert outcome(guard, BAD) == ("verified", "")
        assert [i.label for i in guard.revocation.crls] == ["b-new.crl"]


class TestLookup:
    def test_certificate_whose_issuer_has_no_crl_is_not_checked(self, files: Files) -> None:
        """Only the issuers with a CRL are checked: a leaf of the root passes while only the issuing CA has one,
        even when that CRL is stale."""
        guard = files({"issuing.crl": crl_pem(FACTORY.crl(ISSUING, [BAD], **PAST))})
        assert outcome(guard, DIRECT) == ("verified", "")

    def test_authority_key_id_keeps_the_crls_of_two_keys_of_one_name_apart(self) -> None:
        """A CA that changed keys under the same name: the old key's CRL does not apply to the new key's
        certificates, found by their AKI; a certificate without an AKI is checked against both (fail closed)."""
        renewed = FACTORY.ca("Revocation Issuing CA", parent=ROOT)
        leaf = FACTORY.leaf(renewed, cn="new-key")
        table = build_table(
            [CrlSource("old.crl", FACTORY.crl(ISSUING, [leaf.cert.serial_number]))], [ISSUING.cert, renewed.cert]
        )
        cert = load_pem(leaf.pem)
        assert table.check_leaf(cert, NOW, False) is None
        without_aki = ((Name.from_x509(ISSUING.cert.subject).key(), b""), leaf.cert.serial_number)
        assert table.check_path((without_aki,), NOW, False) == ("revoked", "leaf")

    def test_revoked_intermediate_revokes_its_leaves_when_only_the_leaf_is_seen(self, files: Files) -> None:
        """nginx passes the leaf alone: an issuing CA listed by the root's CRL revokes every leaf it issued."""
        guard = files({"root.crl": crl_pem(FACTORY.crl(ROOT, [ISSUING]))})
        assert outcome(guard, GOOD) == ("revoked", "issuer-revoked")
        assert outcome(guard, DIRECT) == ("verified", "")

    def test_revocation_of_a_ca_reaches_the_cas_below_it(self, files: Files) -> None:
        """A leaf two CAs below a revoked one is revoked too."""
        sub = FACTORY.ca("Revocation Sub CA", parent=ISSUING)
        leaf = FACTORY.leaf(sub, cn="deep")
        guard = files({"root.crl": crl_pem(FACTORY.crl(ROOT, [ISSUING]))}, issuers=(ROOT, ISSUING, sub))
        assert outcome(guard, leaf) == ("revoked", "issuer-revoked")

    def test_recertified_ca_keeps_working_while_its_new_certificate_is_known(self, tmp_path: Path) -> None:
        """An issuing CA re-certified with the same key, its old certificate revoked (superseded): its leaves
        pass while the new certificate is among the issuers."""
        renewed = FACTORY.ca("Revocation Issuing CA", parent=ROOT, key=ISSUING.key)
        crl = [CrlSource("root.crl", FACTORY.crl(ROOT, [ISSUING]))]
        cert = load_pem(GOOD.pem)
        assert build_table(crl, [ROOT.cert, ISSUING.cert, renewed.cert]).check_leaf(cert, NOW, False) is None
        assert build_table(crl, [ROOT.cert, ISSUING.cert]).check_leaf(cert, NOW, False) == ("revoked", "issuer-revoked")


class TestStaleness:
    def test_stale_crl_denies_every_certificate_of_its_issuer_by_default(self, files: Files) -> None:
        """A CRL past its nextUpdate fails closed: crl-stale, with the CRL file as detail."""
        guard = files({"issuing.crl": crl_pem(FACTORY.crl(ISSUING, [], **PAST))})
        assert outcome(guard, GOOD) == ("crl-stale", "issuing.crl")

    def test_stale_crl_allowed_lets_unlisted_certificates_through(self, files: Files) -> None:
        """With stale_crl: allow a stale CRL still revokes what it lists, and lets the others through."""
        guard = files({"issuing.crl": crl_pem(FACTORY.crl(ISSUING, [BAD], **PAST))}, stale_crl="allow")
        assert (outcome(guard, GOOD), outcome(guard, BAD)) == (("verified", ""), ("revoked", "leaf"))

    def test_revocation_outranks_staleness(self, files: Files) -> None:
        """A certificate listed by a stale CRL is reported revoked, not crl-stale."""
        guard = files({"issuing.crl": crl_pem(FACTORY.crl(ISSUING, [BAD], **PAST))})
        assert outcome(guard, BAD) == ("revoked", "leaf")

    def test_crl_goes_stale_while_the_runner_runs(self) -> None:
        """Staleness is judged per request: the same table allows before nextUpdate and denies after it."""
        crl = FACTORY.crl(ISSUING, [], next_update=NOW + timedelta(hours=1))
        table = build_table([CrlSource("issuing.crl", crl)], [ISSUING.cert])
        cert = load_pem(GOOD.pem)
        assert table.check_leaf(cert, NOW, False) is None
        assert table.check_leaf(cert, NOW + timedelta(hours=2), False) == ("crl-stale", "issuing.crl")

    def test_stale_warning_is_logged_at_most_once_a_minute(self, caplog: pytest.LogCaptureFixture) -> None:
        """However many requests meet a stale CRL, it is logged once per CRL per minute."""
        table = build_table([CrlSource("/etc/crls/issuing.crl", FACTORY.crl(ISSUING, [], **PAST))], [ISSUING.cert])
        cert = load_pem(GOOD.pem)
        with caplog.at_level(logging.WARNING, logger="mtls_guard.revocation"):
            for seconds in (0, 1, 30, 59):
                assert table.check_leaf(cert, NOW + timedelta(seconds=seconds), True) is None
            table.check_leaf(cert, NOW + STALE_WARNING_INTERVAL, True)
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 2
        assert "event=crl_stale crl=issuing.crl" in warnings[0]


class TestMetrics:
    def test_each_crl_reports_seconds_to_next_update_and_entries(self, files: Files) -> None:
        """Gauges per CRL, labelled by the issuer's CN and the CRL file (never a path or a DN)."""
        guard = files({"issuing.crl": crl_pem(FACTORY.crl(ISSUING, [BAD, GOOD], next_update=NOW + timedelta(hours=1)))})
        gauges = {g.name: g for g in guard.metrics() if isinstance(g, GaugeSnapshot)}
        seconds = gauges["mtls_guard_crl_next_update_seconds"]
        assert seconds.merge == "min"
        ((labels, value),) = seconds.values.items()
        assert labels == ("Revocation Issuing CA", "issuing.crl")
        assert 0 < value <= 3600
        assert gauges["mtls_guard_crl_entries"].values == {labels: 2.0}

    def test_no_crl_no_series(self) -> None:
        """Without CRLs the gauges are exposed empty."""
        gauges = [g for g in MtlsGuard().metrics() if isinstance(g, GaugeSnapshot)]
        assert [dict(g.values) for g in gauges] == [{}, {}]
