"""Exemption rules compiled for matching: which rule, if any, exempts a request from the certificate checks.

A request's method and judged path select candidate rules (pre-grouped by method, all path patterns
in one RE2 full-match Set, each hit confirmed by the rule's own regex); ``select`` then applies what
depends on the request beyond its method and path (the Host and its binding, method overrides and
CORS preflights). Splitting the two lets the decision memoise the first part per path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, NamedTuple, cast

import re2

from .matchers import APISIX_METHODS, DomainSet, compile_regex

__all__ = [
    "NO_MATCH",
    "PLAIN_METHOD",
    "CompiledRule",
    "ExemptMatch",
    "ExemptMatcher",
    "ExemptRuleSpec",
    "MethodTraits",
    "plain_method",
    "select",
]

_SET_MAX_MEM: Final = 16 << 20


@dataclass(frozen=True, slots=True)
class ExemptRuleSpec:
    """What the exemption matcher needs from one schema rule (kept separate from the schema types)."""

    id: str
    path: str | None
    methods: frozenset[str] | None
    hosts: DomainSet | None
    preflight: bool = False  # only OPTIONS with Origin and Access-Control-Request-Method


@dataclass(frozen=True, slots=True)
class ExemptMatch:
    """The outcome of matching one request against the exemption rules.

    ``rule`` is the id of the rule that exempts ("" for none). ``needs_sni``: a host rule matched the
    Host header but what binds it (``$host`` and the TLS SNI) is not known yet. ``host_refused``: a
    host rule matched the Host header but the routed host or the SNI is another name, so the Host
    cannot be believed.
    """

    rule: str = ""
    needs_sni: bool = False
    host_refused: bool = False


NO_MATCH: Final = ExemptMatch()


class MethodTraits(NamedTuple):
    """What decides whether a rule naming methods may apply (read from the request only when one could)."""

    overridden: bool  # a method-override header, _method argument or form body: another method may be acted on
    preflight: bool  # OPTIONS with Origin and Access-Control-Request-Method


PLAIN_METHOD: Final = MethodTraits(overridden=False, preflight=False)


def plain_method() -> MethodTraits:
    return PLAIN_METHOD


@dataclass(frozen=True, slots=True)
class CompiledRule:
    position: int  # index in the policy: the first matching rule wins
    id: str
    path_index: int  # -1 = no path condition
    hosts: DomainSet | None
    method_bound: bool  # the rule names methods: a method-override header or _method arg defeats it
    preflight: bool
    matched: ExemptMatch  # returned as is when this rule exempts: built once, not per request


@dataclass(frozen=True, slots=True)
class _MethodRules:
    """The rules that can apply to one method: path rules by pattern index, and rules without a path."""

    by_path: Mapping[int, CompiledRule]
    pathless: tuple[CompiledRule, ...]


@dataclass(frozen=True, slots=True)
class ExemptMatcher:
    """Finds the first exempt rule matching (method, path[, host]).

    Rules are pre-grouped by method, and all path patterns sit in one RE2 full-match Set, so a request
    costs one Set scan plus a look at the few rules whose pattern matched. A Set hit is confirmed with
    the rule's own compiled regex before it can exempt anything: a disagreement can only ever cost an
    exemption, never grant one.
    """

    by_method: Mapping[str, _MethodRules]
    other_methods: _MethodRules
    regexes: tuple[re2._Regexp[bytes], ...]
    path_set: re2.Set | None
    has_host_rules: bool = False

    @classmethod
    def of(cls, rules: Iterable[ExemptRuleSpec]) -> ExemptMatcher:
        compiled: list[tuple[CompiledRule, frozenset[str] | None]] = []
        patterns: list[str] = []
        for position, rule in enumerate(rules):
            index = -1
            if rule.path is not None:
                index = len(patterns)
                patterns.append(rule.path)
            methods = frozenset({"OPTIONS"}) if rule.preflight else rule.methods
            bound = methods is not None
            entry = CompiledRule(position, rule.id, index, rule.hosts, bound, rule.preflight, ExemptMatch(rule.id))
            compiled.append((entry, methods))
        regexes = tuple(compile_regex(p) for p in patterns)
        path_set: re2.Set | None = None
        if patterns:
            options = re2.Options()
            options.max_mem = _SET_MAX_MEM
            options.log_errors = False
            path_set = re2.Set.FullMatchSet(options)
            for pattern in patterns:
                path_set.Add(pattern.encode("utf-8"))
            try:
                path_set.Compile()
            except re2.error:
                raise ValueError("the path patterns together exceed RE2's memory budget") from None

        def group(method: str | None) -> _MethodRules:
            applicable = [r for r, methods in compiled if methods is None or (method is not None and method in methods)]
            return _MethodRules(
                MappingProxyType({r.path_index: r for r in applicable if r.path_index >= 0}),
                tuple(r for r in applicable if r.path_index < 0),
            )

        return cls(
            by_method=MappingProxyType({m: group(m) for m in APISIX_METHODS}),
            other_methods=group(None),
            regexes=regexes,
            path_set=path_set,
            has_host_rules=any(r.hosts is not None for r, _ in compiled),
        )

    def candidates(self, method: str, path: bytes | None) -> tuple[CompiledRule, ...]:
        """The rules whose method and path conditions hold, in policy order (``path`` None: ambiguous,
        no rule). This is the costly, request-independent part of matching: callers may memoise it
        per (method, path)."""
        if path is None:
            return ()
        group = self.by_method.get(method, self.other_methods)
        found = list(group.pathless)
        if group.by_path and self.path_set is not None:
            # Set.Match returns a list of pattern indices (the stub says bool), or None for no match.
            hits = cast("list[int] | None", self.path_set.Match(path))
            if hits:
                by_path = group.by_path
                # A Set hit is confirmed with the rule's own regex: a disagreement can only cost an exemption.
                found.extend(by_path[i] for i in hits if i in by_path and self.regexes[i].fullmatch(path) is not None)
                if len(found) > 1:
                    found.sort(key=_position)
        return tuple(found)


def select(
    candidates: tuple[CompiledRule, ...],
    host: str | None,
    *,
    host_bound: bool | None,
    method_traits: Callable[[], MethodTraits] = plain_method,
) -> ExemptMatch:
    """The first of ``candidates`` (ExemptMatcher.candidates) that exempts the request.

    ``host`` is the Host header (normalised, port removed). ``host_bound`` says whether that Host can
    be believed (decision.host_binds): False when it cannot, None when not known yet; a host rule is
    then skipped and reported through ``needs_sni``, and a later rule that needs no host still
    exempts (the outcome cannot change, only which id is reported). ``method_traits`` is called (at
    most once) only when a rule naming methods is a candidate: an overridden method defeats such a
    rule (the upstream may act on another method), and a preflight rule needs a real CORS preflight.
    """
    needs_sni = host_refused = False
    traits: MethodTraits | None = None
    for rule in candidates:
        if rule.method_bound:
            if traits is None:
                traits = method_traits()
            if traits.overridden or (rule.preflight and not traits.preflight):
                continue
        if rule.hosts is None:
            return rule.matched
        if not rule.hosts.matches(host):
            continue
        if host_bound is None:
            needs_sni = True
        elif host_bound:
            return rule.matched
        else:
            host_refused = True
    if needs_sni or host_refused:
        return ExemptMatch("", needs_sni, host_refused)
    return NO_MATCH


def _position(rule: CompiledRule) -> int:
    return rule.position
