"""Property tests: path tricks never buy an exemption, the path judged is the path the upstream reads,
and the optimised matcher equals the naive rules."""

from __future__ import annotations

import json
import re
import unicodedata
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from plugins.mtls_guard.identity import CertificateCache
from plugins.mtls_guard.matchers import APISIX_METHODS, DomainSet, authority_host, normalize_fingerprint
from plugins.mtls_guard.paths import exempt_path
from plugins.mtls_guard.policy import CompiledPolicy, Decision, NeedVars, Reason, RequestInput, compile_policy
from runner.testing import uri_safe_encode
from tests.certs import CertFactory, escaped

NOW = datetime.now(UTC)
FACTORY = CertFactory()
ROOT = FACTORY.ca()
LEAF = FACTORY.leaf(ROOT, cn="client-a", dns=["a.svc.example.com"])
CACHE = CertificateCache()
METHODS = sorted(APISIX_METHODS)

# Building blocks that the known path-confusion attacks are made of, plus harmless ones.
TOKENS = [
    "/",
    "//",
    ".",
    "..",
    "public",
    "admin",
    "healthz",
    "Public",
    "a",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "\\",
    ";",
    "..;",
    "%3b",
    "%0a",
    "%0A",
    "\n",
    "\r",
    "\x00",
    "%00",
    "%",
    "%4",
    "%zz",
    "%25",
    "%252e",
    "%41",
    "%C3%A9",
    "%C3",
    "%C0%AF",
    "é",
    "?",
    "#",
    "%3F",
    "\x7f",
    "\x85",
    " ",
    "%20",
    "~",
]
paths = st.one_of(
    st.lists(st.sampled_from(TOKENS), max_size=12).map(lambda parts: "/" + "".join(parts)),
    st.lists(st.sampled_from(TOKENS), max_size=12).map("".join),
    st.text(max_size=40).map(lambda s: "/" + s),
    st.none(),
)
EXEMPT_PATTERNS = [
    "/public(/.*)?",
    "/healthz|/readyz",
    "/a",
    "/admin",
    "/static/[^/]+\\.css",
    "/api/v[0-9]+/status",
    "/[a-z]+",
    "/public/.*",
    "/.*admin",
]


def compiled(document: dict[str, Any]) -> CompiledPolicy:
    return compile_policy(json.dumps(document))


def first_call(policy: CompiledPolicy, method: str, path: str | None) -> Decision | NeedVars:
    return policy.decide(RequestInput(method, path), None, now=NOW, cache=CACHE)


def decide(policy: CompiledPolicy, method: str, path: str | None, *, encoded: bool) -> Decision:
    """Both calls, over plain HTTP: ``encoded`` says whether ``path`` is an earlier plugin's
    ``$upstream_uri`` (delivered as is) or ``$uri`` (delivered by the guard's Rewrite)."""
    outcome = first_call(policy, method, path)
    if isinstance(outcome, NeedVars):
        vars = {"upstream_uri": path if encoded else ""}
        outcome = policy.decide(RequestInput(method, path), vars, now=NOW, cache=CACHE)
    assert isinstance(outcome, Decision)
    return outcome


def judged(path: str | None, encoded: bool) -> str | None:
    return exempt_path(path, encoded=encoded)


def is_exempt(outcome: Decision | NeedVars) -> bool:
    return isinstance(outcome, Decision) and outcome.reason is Reason.EXEMPT


CATCH_ALL = compiled({"exempt": [{"path": "(?s).*"}]})
POOL = compiled({"exempt": [{"id": p, "path": p} for p in EXEMPT_PATTERNS]})
METHODS_ONLY = compiled({"exempt": [{"methods": ["OPTIONS", "GET"]}]})


class TestAmbiguousPathsNeverExempt:
    @given(paths, st.booleans())
    @example("/public/../admin", False)
    @example("//admin", True)
    @example("/public%2F..%2Fadmin", True)
    @example("/public;/../admin", True)
    @example("/health%0A", True)
    @example("/%2570ublic/x", False)
    def test_catch_all_rule_exempts_exactly_the_unambiguous(self, path: str | None, encoded: bool) -> None:
        """Even a rule matching everything exempts a path only when it is unambiguous."""
        outcome = decide(CATCH_ALL, "GET", path, encoded=encoded)
        assert is_exempt(outcome) == (judged(path, encoded) is not None)

    @given(paths, st.sampled_from(["GET", "OPTIONS"]), st.booleans())
    def test_methods_only_rule_does_not_exempt_ambiguous_paths(
        self, path: str | None, method: str, encoded: bool
    ) -> None:
        """A rule without a path condition still never exempts an ambiguous path."""
        outcome = decide(METHODS_ONLY, method, path, encoded=encoded)
        assert is_exempt(outcome) == (judged(path, encoded) is not None)

    @given(paths, st.booleans())
    @example("/Public", False)
    @example("/public/..;/admin", True)
    def test_exempt_implies_full_match_of_the_judged_path(self, path: str | None, encoded: bool) -> None:
        """If a path is exempt, the judged path full-matches the reported rule (checked with Python re)."""
        outcome = decide(POOL, "GET", path, encoded=encoded)
        value = judged(path, encoded)
        if is_exempt(outcome):
            assert value is not None
            assert re.fullmatch(outcome.detail, value) is not None
        elif value is not None:
            # Conversely, a judged path that some rule full-matches is exempt (no false negatives).
            assert not any(re.fullmatch(p, value) for p in EXEMPT_PATTERNS)

    @given(paths)
    def test_a_literal_percent_in_uri_is_never_decoded_again(self, path: str | None) -> None:
        """$uri was decoded once by nginx: a "%" left in it never buys an exemption (no double decoding)."""
        if path is not None and "%" in path:
            assert not is_exempt(decide(CATCH_ALL, "GET", path, encoded=False))


# Mostly-unambiguous paths (so that assume() rarely discards): segments of ordinary characters, some
# of them percent-encoded.
SEGMENT = st.text(
    st.characters(
        codec="utf-8",
        exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"),
        exclude_characters="/\\;%?#",
    ),
    min_size=1,
    max_size=8,
)
clean_paths = st.lists(
    st.tuples(SEGMENT, st.booleans()).map(lambda t: quote(t[0], safe="") if t[1] else t[0]), max_size=5
).map(lambda segments: "/" + "/".join(segments))
canonical_inputs = st.one_of(paths, clean_paths)
FILTERING = settings(suppress_health_check=[HealthCheck.filter_too_much])


class TestJudgedForm:
    @FILTERING
    @given(canonical_inputs, st.booleans())
    def test_unambiguous_value_is_clean(self, path: str | None, encoded: bool) -> None:
        """A judged path is absolute, has no dot or empty segments and no unsafe characters."""
        value = judged(path, encoded)
        assume(value is not None)
        assert value is not None
        assert value.startswith("/")
        segments = value.split("/")[1:]
        assert all(s not in (".", "..") for s in segments)
        assert all(s for s in segments[:-1])
        assert not any(c in value for c in ";\\%")
        assert all(unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") for c in value)

    @FILTERING
    @given(canonical_inputs)
    def test_percent_encoding_round_trip(self, path: str | None) -> None:
        """Re-encoding a judged encoded path and judging it again gives the same value; a judged
        $uri is judged as itself."""
        value = judged(path, True)
        assume(value is not None)
        assert value is not None
        assert judged(quote(value, safe="/"), True) == value
        assert judged(value, False) == value


def unquote_lenient(text: str) -> str:
    return unquote_to_bytes(text).decode("utf-8", "surrogateescape")


def resolve(path: str) -> str:
    """What nginx (merge_slashes on) and most servers make of dot segments and empty segments."""
    out: list[str] = []
    for segment in path.split("/")[1:]:
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
        else:
            out.append(segment)
    trailing = "/" if path.endswith("/") and out else ""
    return "/" + "/".join(out) + trailing


def upstream_views(raw: str) -> dict[str, str]:
    """How differently built upstreams could read the same raw path (an independent oracle)."""
    once = unquote_lenient(raw)
    return {
        "decode-then-resolve": resolve(once),
        "double-decode": resolve(unquote_lenient(once)),
        "servlet-params": resolve("/".join(s.split(";", 1)[0] for s in once.split("/"))),
        "backslash-is-slash": resolve(once.replace("\\", "/")),
    }


class TestUpstreamViewsAgree:
    @FILTERING
    @given(canonical_inputs)
    @example("/public%2Fx")
    @example("/public/%252e%252e/admin")
    @example("/public;x/../admin")
    @example("/public\\..\\admin")
    @example("/public/\uff0e\uff0e/admin")
    def test_unambiguous_means_every_reading_is_the_same(self, path: str | None) -> None:
        """For an unambiguous encoded path (delivered as is), every upstream reading equals the judged value."""
        value = judged(path, True)
        assume(path is not None and value is not None)
        assert path is not None
        assert value is not None
        for view, reading in upstream_views(path).items():
            assert reading == value, view
        # Segment boundaries are the same whether the upstream splits before or after decoding.
        assert [unquote_lenient(s) for s in path.split("/")] == value.split("/")
        folded = unicodedata.normalize("NFKC", value)
        assert resolve(folded) == folded
        assert folded.count("/") == value.count("/")

    @FILTERING
    @given(canonical_inputs)
    @example("/public/a b")
    @example("/public/a?b")
    @example("/caf\u00e9")
    def test_delivered_uri_reads_back_as_judged(self, path: str | None) -> None:
        """A $uri the guard judged and delivers with a Rewrite (APISIX's uri_safe_encode) reads back as
        exactly that path in every upstream, whichever way it splits and decodes."""
        value = judged(path, False)
        assume(value is not None)
        assert value is not None
        delivered = uri_safe_encode(value)
        for view, reading in upstream_views(delivered).items():
            assert reading == value, view
        assert [unquote_lenient(s) for s in delivered.split("/")] == value.split("/")


RULE = st.fixed_dictionaries(
    {},
    optional={
        "path": st.sampled_from(EXEMPT_PATTERNS),
        "methods": st.lists(st.sampled_from(METHODS), min_size=1, max_size=3, unique=True),
        "hosts": st.lists(
            st.sampled_from(["a.example.com", "*.example.com", "b.example.org"]), min_size=1, max_size=2, unique=True
        ),
    },
).filter(bool)
HOSTS = st.sampled_from(
    ["a.example.com", "x.example.com", "x.y.example.com", "b.example.org", "B.Example.org.", "example.com"]
)


def host_matches(pattern: str, host: str) -> bool:
    if not pattern.startswith("*."):
        return pattern == host
    label, _, parent = host.partition(".")
    return bool(label) and parent == pattern[2:]


def reference_exempt(rules: list[dict[str, Any]], method: str, path: str, host: str) -> str:
    """The specification, evaluated naively: the first rule whose every condition holds."""
    value = judged(path, True)
    if value is None:
        return ""
    normalized = host.lower().rstrip(".")
    for index, rule in enumerate(rules):
        if "path" in rule and re.fullmatch(rule["path"], value) is None:
            continue
        if "methods" in rule and method not in rule["methods"]:
            continue
        if "hosts" in rule and not any(host_matches(h, normalized) for h in rule["hosts"]):
            continue
        return f"exempt[{index}]"
    return ""


class TestMatcherEqualsSpecification:
    # Each example compiles a policy; under a loaded CI machine that can exceed Hypothesis' 200 ms deadline.
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(RULE, min_size=1, max_size=8), st.sampled_from([*METHODS, "CONNECT"]), paths, HOSTS)
    def test_first_matching_rule(self, rules: list[dict[str, Any]], method: str, path: str | None, host: str) -> None:
        """Method grouping plus the RE2 Set report the same first rule as the naive evaluation."""
        policy = compiled({"exempt": rules, "require_sni_match": False})
        request = RequestInput(method, path, host=authority_host(host))
        # Plain HTTP (no ssl_* variables): the Host header is taken as sent; the path is an encoded $upstream_uri.
        outcome = policy.decide(request, {"upstream_uri": path, "host": host}, now=NOW, cache=CACHE)
        expected = reference_exempt(rules, method, path or "", host) if path else ""
        assert (outcome.detail if outcome.reason is Reason.EXEMPT else "") == expected  # type: ignore[union-attr]

    @settings(deadline=None)
    @given(st.lists(RULE, min_size=1, max_size=8), st.sampled_from(METHODS), paths, HOSTS)
    def test_first_call_asks_for_the_sni_only_when_a_host_rule_may_match(
        self, rules: list[dict[str, Any]], method: str, path: str | None, host: str
    ) -> None:
        """The first call exempts without vars, or asks for the SNI exactly when a host rule matches the Host."""
        policy = compiled({"exempt": rules, "require_sni_match": False})
        first = policy.decide(RequestInput(method, path, host=authority_host(host)), None, now=NOW, cache=CACHE)
        if path is not None and "%" in path:
            # $uri or an encoded $upstream_uri? Only the upstream_uri variable tells (paths module).
            assert isinstance(first, NeedVars)
            assert "upstream_uri" in first.names
            return
        value = judged(path, False)
        normalized = host.lower().rstrip(".")
        candidates = [
            r
            for r in rules
            if value is not None
            and ("path" not in r or re.fullmatch(r["path"], value))
            and ("methods" not in r or method in r["methods"])
            and ("hosts" not in r or any(host_matches(h, normalized) for h in r["hosts"]))
        ]
        if any("hosts" not in r for r in candidates):
            assert is_exempt(first)
        else:
            assert isinstance(first, NeedVars)
            assert ("ssl_server_name" in first.names) == bool(candidates)


FULL_VARS = {
    "ssl_client_verify": "SUCCESS",
    "ssl_client_escaped_cert": escaped(LEAF.pem),
    "ssl_server_name": "api.example.com",
}
API = "api.example.com"
STRICT = compiled({"require": {"san": {"dns": ["*.svc.example.com"]}}})
REPORT = compiled({"mode": "report", "require": {"san": {"dns": ["*.svc.example.com"]}}})
VAR_VALUES = st.dictionaries(
    st.sampled_from(sorted(FULL_VARS)),
    st.one_of(st.none(), st.sampled_from(["", "NONE", "SUCCESS", "FAILED:x", "https", "http", "api.example.com"])),
)


class TestVariables:
    @given(st.sets(st.sampled_from(sorted(FULL_VARS))))
    def test_missing_variable_never_verifies(self, dropped: set[str]) -> None:
        """Dropping any needed variable turns an allowed request into a denial."""
        vars = {k: v for k, v in FULL_VARS.items() if k not in dropped}
        outcome = STRICT.decide(RequestInput("GET", "/api", host=API), vars, now=NOW, cache=CACHE)
        assert isinstance(outcome, Decision)
        assert outcome.allowed == (not dropped)

    @given(VAR_VALUES, paths)
    def test_report_mode_same_verdict_never_blocks(self, overrides: dict[str, str | None], path: str | None) -> None:
        """Report mode computes the enforce-mode verdict and reason but always lets the request through."""
        vars = {**FULL_VARS, **overrides}
        enforce = STRICT.decide(RequestInput("GET", path, host=API), vars, now=NOW, cache=CACHE)
        report = REPORT.decide(RequestInput("GET", path, host=API), vars, now=NOW, cache=CACHE)
        assert isinstance(enforce, Decision)
        assert isinstance(report, Decision)
        assert (report.verdict, report.reason, report.detail) == (enforce.verdict, enforce.reason, enforce.detail)
        assert report.allowed
        assert report.status == 0
        assert enforce.allowed == (enforce.verdict == "allow")


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


class TestSmallMatchers:
    @given(st.lists(LABEL, min_size=0, max_size=3), st.lists(LABEL, min_size=2, max_size=3))
    def test_wildcard_covers_exactly_one_label(self, prefix: list[str], parent: list[str]) -> None:
        """ "*.parent" matches a name iff exactly one non-empty label precedes the parent."""
        domains = DomainSet.of(["*." + ".".join(parent)])
        name = ".".join([*prefix, *parent])
        assert domains.matches(name) == (len(prefix) == 1)
        assert domains.matches(name.upper() + ".") == (len(prefix) == 1)

    @given(st.binary(min_size=32, max_size=32), st.booleans(), st.booleans())
    def test_fingerprint_styles_normalise(self, digest: bytes, upper: bool, colons: bool) -> None:
        """Any case and colon style of a SHA-256 fingerprint normalises to lower-case hex."""
        text = digest.hex(":") if colons else digest.hex()
        assert normalize_fingerprint(text.upper() if upper else text) == digest.hex()
