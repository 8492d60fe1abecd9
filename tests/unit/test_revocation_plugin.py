"""Revocation in the plugin: every source of certificates, per-route CRLs, memos, and live reconfiguration."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from plugins.mtls_guard.decision import Decision
from plugins.mtls_guard.identity import CertificateCache
from plugins.mtls_guard.plugin import MtlsGuard
from plugins.mtls_guard.policy import REASON_HEADER, CompiledPolicy, RequestInput, compile_policy
from plugins.mtls_guard.schema_readers import PolicyError
from plugins.mtls_guard.tools.explain import Explanation, explain
from tests.certs import CertFactory, Issued, crl_pem, escaped

FACTORY = CertFactory()
NOW = FACTORY.now
ROOT = FACTORY.ca("Plugin Root")
ISSUING = FACTORY.ca("Plugin Issuing CA", parent=ROOT)
GOOD = FACTORY.leaf(ISSUING, cn="good", chain=[ISSUING])
BAD = FACTORY.leaf(ISSUING, cn="bad", chain=[ISSUING])
HOST = "api.example.com"
PEER = "10.0.0.7"
HEADER_POLICY = {
    "source": {"type": "header", "format": "pem-urlencoded", "trusted_proxies": ["10.0.0.0/8"], "ca": ROOT.pem},
    "reject": {"expose_reason": True},
}


def crl_text(issuer: Issued, revoked: list[Issued], **kwargs: Any) -> str:
    return crl_pem(FACTORY.crl(issuer, revoked, **kwargs)).decode("ascii")


Call = tuple[tuple[tuple[str, str | None], ...], dict[str, str | None]]


def call(cert: Issued, header_mode: bool) -> Call:
    """(headers, nginx variables) of a request over TLS with ``cert`` verified by nginx, or in header mode of
    one from a trusted proxy forwarding ``cert`` and its chain."""
    if header_mode:
        return (("host", HOST), ("x-client-cert", escaped(cert.chain_pem))), {"realip_remote_addr": PEER}
    tls = {"ssl_client_verify": "SUCCESS", "ssl_client_escaped_cert": escaped(cert.pem), "ssl_server_name": HOST}
    return (("host", HOST),), dict(tls)


def request(guard: MtlsGuard, cert: Issued, policy: dict[str, Any] | None = None) -> Explanation:
    """One request through the plugin, compiling ``policy`` first."""
    headers, variables = call(cert, "source" in (policy or {}))
    conf = guard.parse_conf(json.dumps(policy or {}))
    return explain(guard, conf, method="GET", path="/x", headers=headers, variables=variables)


def reason(guard: MtlsGuard, cert: Issued, policy: dict[str, Any] | None = None) -> tuple[str, str]:
    decision = request(guard, cert, policy).decision
    return str(decision.reason), decision.detail


@pytest.fixture
def crl_guard(tmp_path: Path) -> Any:
    """A plugin set up with the given CRL texts (name -> PEM) and the root + issuing CA as issuers."""

    def options(crls: dict[str, str], issuers: tuple[Issued, ...] = (ROOT, ISSUING), **extra: Any) -> dict[str, Any]:
        for name, text in crls.items():
            (tmp_path / name).write_text(text, encoding="ascii")
        (tmp_path / "ca.pem").write_text("".join(i.pem for i in issuers), encoding="ascii")
        return {
            "crl_files": [str(tmp_path / n) for n in crls],
            "crl_issuer_files": [str(tmp_path / "ca.pem")],
            **extra,
        }

    def make(crls: dict[str, str], **extra: Any) -> MtlsGuard:
        guard = MtlsGuard()
        guard.setup(options(crls, **extra))
        return guard

    make.options = options  # type: ignore[attr-defined]
    return make


class TestApisixMode:
    def test_revoked_leaf_gets_the_reject_response_with_reason_revoked(self, crl_guard: Any) -> None:
        """A revoked leaf is stopped with the policy's status; expose_reason shows "revoked"."""
        guard = crl_guard({"issuing.crl": crl_text(ISSUING, [BAD])})
        result = request(guard, BAD, {"reject": {"expose_reason": True}})
        assert result.stop is not None
        assert result.stop.status == 403
        assert (REASON_HEADER, "revoked") in result.stop.headers

    def test_report_mode_lets_a_revoked_certificate_through_but_never_vouches_for_it(self, crl_guard: Any) -> None:
        """In report mode a revoked certificate passes as a would-be denial, without identity headers."""
        guard = crl_guard({"issuing.crl": crl_text(ISSUING, [BAD])})
        result = request(guard, BAD, {"mode": "report", "forward": {"subject": "x-client-subject"}})
        assert (result.stop, result.decision.verdict, result.decision.reason) == (None, "deny", "revoked")
        assert all(value is None for _, value in result.upstream_headers)


class TestHeaderMode:
    def test_revoked_intermediate_of_the_forwarded_chain_is_found(self, crl_guard: Any) -> None:
        """Header mode checks every certificate of the path it verified: a revoked issuing CA refuses the leaf."""
        guard = MtlsGuard()
        guard.setup(crl_guard.options({"root.crl": crl_text(ROOT, [ISSUING])}, issuers=(ROOT,)))
        # Only the root is known as an issuer: the intermediate is found on the forwarded chain, not by name.
        assert reason(guard, GOOD, HEADER_POLICY) == ("revoked", "chain")

    def test_revoked_forwarded_leaf_is_refused(self, crl_guard: Any) -> None:
        """A forwarded leaf listed by its issuer's CRL is refused; its sibling passes."""
        guard = crl_guard({"issuing.crl": crl_text(ISSUING, [BAD])})
        assert reason(guard, BAD, HEADER_POLICY) == ("revoked", "leaf")
        assert reason(guard, GOOD, HEADER_POLICY) == ("verified", "")


class TestRouteCrl:
    def policy(self, crl: Any, ca: str = ISSUING.pem) -> dict[str, Any]:
        return {"require": {"ca": ca, "crl": crl}}

    def test_route_crl_revokes_under_the_route_ca(self) -> None:
        """require.crl, verified against require.ca, refuses the leaves it lists on that route only."""
        guard = MtlsGuard()
        policy = self.policy(crl_text(ISSUING, [BAD]))
        assert reason(guard, BAD, policy) == ("revoked", "leaf")
        assert reason(guard, GOOD, policy) == ("verified", "")
        assert reason(guard, BAD) == ("verified", "")

    def test_route_crl_may_be_a_list(self) -> None:
        """require.crl also takes a list of PEM texts (one per CA of the bundle)."""
        policy = self.policy([crl_text(ROOT, []), crl_text(ISSUING, [BAD])], ca=ROOT.pem + ISSUING.pem)
        assert reason(MtlsGuard(), BAD, policy) == ("revoked", "leaf")

    def test_runner_crls_apply_to_the_path_built_with_the_route_ca(self, crl_guard: Any) -> None:
        """The runner's CRLs also check the path require.ca builds (here its intermediate)."""
        guard = crl_guard({"root.crl": crl_text(ROOT, [])})
        compiled = {"require": {"ca": ROOT.pem + ISSUING.pem}}
        assert reason(guard, GOOD, compiled) == ("verified", "")
        revoking = crl_guard({"root2.crl": crl_text(ROOT, [ISSUING], number=2)})
        assert reason(revoking, GOOD, compiled)[0] == "revoked"

    def test_stale_route_crl_follows_the_runners_stale_crl_option(self, crl_guard: Any) -> None:
        """A route CRL past nextUpdate denies (crl-stale) unless the runner says stale_crl: allow."""
        stale = crl_text(ISSUING, [], this_update=NOW - timedelta(days=2), next_update=NOW - timedelta(days=1))
        policy = self.policy(stale)
        assert reason(MtlsGuard(), GOOD, policy) == ("crl-stale", "require.crl")
        allowing = MtlsGuard()
        allowing.setup({"stale_crl": "allow"})
        assert reason(allowing, GOOD, policy) == ("verified", "")

    @pytest.mark.parametrize(
        ("crl", "message"),
        [
            (crl_pem(FACTORY.crl(ISSUING, [], signing_key=FACTORY.new_key())).decode(), "signature does not verify"),
            (crl_pem(FACTORY.crl(ROOT, [])).decode(), "issued by CN=Plugin Root, which is none of the known"),
            ("not a crl", "no PEM X509 CRL block"),
            (ISSUING.pem, "holds PEM CERTIFICATE"),
        ],
    )
    def test_invalid_route_crl_rejects_the_policy(self, crl: str, message: str) -> None:
        """A require.crl that does not verify against require.ca, or is not a CRL, fails compilation."""
        with pytest.raises(PolicyError, match=rf"require\.crl: invalid CRL: require\.crl: .*{message}"):
            compile_policy(json.dumps(self.policy(crl)))

    def test_route_crl_needs_the_route_ca(self) -> None:
        """require.crl without require.ca is refused: there would be nothing to verify it against."""
        with pytest.raises(PolicyError, match=r"require\.crl: needs require\.ca"):
            compile_policy(json.dumps({"require": {"crl": crl_text(ISSUING, [])}}))


class TestMemos:
    def test_warm_memos_cannot_skip_a_crl_committed_later(self, crl_guard: Any) -> None:
        """After verified decisions warmed every memo, a commit installing a CRL that lists the certificate
        denies the very next request on the already-compiled policies (APISIX mode, route CA, header mode)."""
        guard = crl_guard({"root.crl": crl_text(ROOT, [])})
        policies = [json.dumps({}), json.dumps({"require": {"ca": ISSUING.pem}}), json.dumps(HEADER_POLICY)]
        compiled = [guard.parse_conf(p) for p in policies]
        for _ in range(3):
            assert [reason_of(guard, c, p) for c, p in zip(compiled, policies, strict=True)] == ["verified"] * 3
        assert all(c.engine.verified_memo for c in compiled), "the memos this test is about are warm"
        guard.reconfigure(crl_guard.options({"issuing.crl": crl_text(ISSUING, [GOOD])}))()
        assert [reason_of(guard, c, p) for c, p in zip(compiled, policies, strict=True)] == ["revoked"] * 3

    def test_removing_a_crl_takes_effect_on_compiled_policies(self, crl_guard: Any) -> None:
        """The reverse: a commit without the CRL lets the certificate through again."""
        guard = crl_guard({"issuing.crl": crl_text(ISSUING, [GOOD])})
        conf = guard.parse_conf("{}")
        assert reason_of(guard, conf, "{}") == "revoked"
        guard.reconfigure({})()
        assert reason_of(guard, conf, "{}") == "verified"

    def test_decide_with_explicit_tables_never_reuses_a_revocation(self, crl_guard: Any) -> None:
        """CompiledPolicy.decide reads the table it is given on every call, whatever it decided before."""
        revoking = crl_guard({"issuing.crl": crl_text(ISSUING, [GOOD])}).revocation
        policy = compile_policy("{}")
        cache = CertificateCache()
        request_input = RequestInput("GET", "/x", host=HOST)
        tls = {"ssl_client_verify": "SUCCESS", "ssl_client_escaped_cert": escaped(GOOD.pem), "ssl_server_name": HOST}
        first = policy.decide(request_input, tls, now=NOW, cache=cache)
        second = policy.decide(request_input, tls, now=NOW, cache=cache, revocation=revoking)
        assert isinstance(first, Decision)
        assert isinstance(second, Decision)
        assert (first.reason, second.reason) == ("verified", "revoked")


def reason_of(guard: MtlsGuard, conf: CompiledPolicy, policy: str) -> str:
    """The reason of one request with GOOD on an already compiled policy (its memos kept)."""
    headers, variables = call(GOOD, "source" in json.loads(policy))
    return str(explain(guard, conf, method="GET", path="/x", headers=headers, variables=variables).decision.reason)


class TestReconfigure:
    def test_nothing_changes_until_the_commit(self, crl_guard: Any) -> None:
        """reconfigure validates and builds; only its commit installs the new CRLs."""
        guard = MtlsGuard()
        commit = guard.reconfigure(crl_guard.options({"issuing.crl": crl_text(ISSUING, [BAD])}))
        assert reason(guard, BAD) == ("verified", "")
        commit()
        assert reason(guard, BAD) == ("revoked", "leaf")

    def test_failed_reconfigure_keeps_the_old_state(self, crl_guard: Any, tmp_path: Path) -> None:
        """A reconfigure naming an unusable CRL raises, naming the file, and the old CRLs stay in force."""
        guard = crl_guard({"issuing.crl": crl_text(ISSUING, [BAD])})
        before = (guard.revocation, guard.library, guard.cache)
        (tmp_path / "broken.crl").write_bytes(b"garbage")
        with pytest.raises(ValueError, match=r"broken\.crl: not a CRL"):
            guard.reconfigure({"crl_files": [str(tmp_path / "broken.crl")]})
        assert (guard.revocation, guard.library, guard.cache) == before
        assert reason(guard, BAD) == ("revoked", "leaf")

    def test_counters_observers_and_cache_survive(self, crl_guard: Any) -> None:
        """Decision counts, observers and the certificate cache (with its counts) are kept across a commit."""
        guard = crl_guard({"issuing.crl": crl_text(ISSUING, [])})
        seen: list[str] = []
        guard.observers.append(lambda _request, decision: seen.append(decision.reason))
        reason(guard, GOOD)
        reason(guard, GOOD)
        cache, counts = guard.cache, dict(guard.decisions)
        guard.reconfigure(crl_guard.options({"issuing.crl": crl_text(ISSUING, [GOOD])}))()
        reason(guard, GOOD)
        assert guard.cache is cache
        assert (cache.hits, cache.misses) == (2, 1)
        assert guard.decisions[("deny", "revoked", "enforce")] == 1
        assert all(guard.decisions[k] == n for k, n in counts.items())
        assert seen == ["verified", "verified", "revoked"]

    def test_new_cache_size_gets_a_new_cache_that_keeps_the_counts(self) -> None:
        """Changing cert_cache_size replaces the cache (never holding revocation) and carries its hit counts."""
        guard = MtlsGuard()
        reason(guard, GOOD)
        reason(guard, GOOD)
        old = guard.cache
        guard.reconfigure({"cert_cache_size": 16})()
        assert guard.cache is not old
        assert (guard.cache.max_entries, guard.cache.hits, guard.cache.misses) == (16, 1, 1)
        assert len(guard.cache) == 0

    def test_setup_is_a_reconfigure_and_its_commit(self, crl_guard: Any) -> None:
        """setup() installs exactly what reconfigure() builds."""
        options = crl_guard.options({"issuing.crl": crl_text(ISSUING, [BAD])})
        by_setup, by_commit = MtlsGuard(), MtlsGuard()
        by_setup.setup(options)
        by_commit.reconfigure(options)()
        assert [i.source for i in by_setup.revocation.crls] == [i.source for i in by_commit.revocation.crls]
        assert reason(by_setup, BAD) == reason(by_commit, BAD) == ("revoked", "leaf")
