"""``skip_mtls_uri_regex`` patterns as APISIX runs them: unanchored PCRE searches on nginx's ``$uri``.

Python's ``re`` is close to PCRE but not equal, so a pattern is first translated for the few PCRE
spellings with a different meaning or no Python equivalent (``\\z``, ``\\Z``, ``(?<name>``); constructs
that cannot be translated faithfully are reported as "PCRE-only" rather than judged wrongly.
Anchoring is read from the pattern text per top-level alternative, so ``^/a$|^/b$`` counts as anchored.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .lint_pattern import structure, top_level_alternatives

__all__ = ["SkipPattern", "analyse", "catch_all", "may_exempt_route_uri", "unmatched_example"]

# Escapes whose PCRE meaning Python lacks or reads differently (\v is a class in PCRE, a character in Python).
_PCRE_ONLY_ESCAPES: Final = frozenset("KRhHvVgkNXCpPQEGeoc")
_META: Final = frozenset(".^$*+?()[]{}|\\")
_OPTIONAL: Final = ("*", "?", "{")
_PCRE_ONLY_GROUPS: Final = re.compile(r"\(\?(?:\||R\)|&|P>|[+-]?[0-9]|C|')|\(\*")
# URIs a catch-all list must exempt: $uri always starts with "/" (nginx rejects other request targets).
_PROBES: Final = (
    "/",
    "/admin",
    "/admin/users/42",
    "/api/v1/orders.json",
    "/internal/metrics",
    "/.well-known/x",
    "/A-_~.%x",
    "/index.html",
)


@dataclass(frozen=True, slots=True)
class SkipPattern:
    text: str
    compiled: re.Pattern[str] | None
    error: str | None  # why Python cannot compile the (translated) pattern
    pcre_only: str | None  # the PCRE-only construct found, when any
    start_anchored: bool
    end_anchored: bool
    end_open: bool  # every alternative ends with ".*" / ".+": an explicit "anything may follow"
    dollar_end: bool  # some alternative ends with "$" rather than "\z"

    def search(self, uri: str) -> bool:
        return self.compiled is not None and self.compiled.search(uri) is not None

    @property
    def catch_all(self) -> bool:
        return self.compiled is not None and all(self.search(p) for p in _PROBES)

    @property
    def literal_prefix(self) -> str | None:
        """What every matched URI starts with, for a single ^-anchored alternative; None when unknown."""
        if len(_alternatives(self.text)) != 1 or not self.text.startswith("^"):
            return None
        end = 1
        while end < len(self.text) and self.text[end] not in _META:
            end += 1
        # "^/healthz?" guarantees only "/health": a quantifier makes the last literal character optional.
        return self.text[1 : end - 1] if self.text[end : end + 1] in _OPTIONAL else self.text[1:end]


def _translate(pattern: str) -> tuple[str, str | None]:
    """PCRE -> Python ``re``; returns (translation, first PCRE-only construct or None)."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt in _PCRE_ONLY_ESCAPES or (nxt == "x" and pattern[i + 2 : i + 3] == "{"):
                return pattern, "\\" + nxt
            if not in_class and nxt == "z":
                out.append(r"\Z")  # PCRE \z (very end) is Python's \Z
            elif not in_class and nxt == "Z":
                out.append(r"(?=\n?\Z)")  # PCRE \Z also matches before a final newline
            else:
                out.append(ch + nxt)
            i += 2
            continue
        if in_class:
            if pattern.startswith("[:", i):
                return pattern, "[:class:]"
            in_class = ch != "]" or out[-1] in ("[", "[^")  # a "]" right after "[" is a literal
        elif ch == "[":
            in_class = True
            if pattern[i + 1 : i + 2] == "^":  # "[^]...]": the "]" is literal here too
                out.append("[^")
                i += 2
                continue
        elif ch == "(":
            found = _PCRE_ONLY_GROUPS.match(pattern, i)
            if found:
                return pattern, found.group(0)
            if pattern.startswith("(?<", i) and pattern[i + 3 : i + 4] not in ("=", "!"):
                out.append("(?P<")
                i += 3
                continue
        out.append(ch)
        i += 1
    return "".join(out), None


def _alternatives(pattern: str) -> list[str]:
    """Top-level ``|`` branches; a pattern wrapped in one group is unwrapped first."""
    branches = top_level_alternatives(pattern)
    if len(branches) == 1 and pattern.startswith("(") and _first_group_end(pattern) == len(pattern) - 1:
        inner = re.sub(r"\A\((?:\?:|\?P?<[A-Za-z_][A-Za-z0-9_]*>)?", "", pattern)[:-1]
        return _alternatives(inner)
    return branches


def _first_group_end(pattern: str) -> int | None:
    """Index of the ")" closing the group the pattern opens with."""
    return next((i for i, ch, depth in structure(pattern) if ch == ")" and depth == 1), None)


def _ends_with_unescaped(text: str, suffix: str) -> bool:
    if not text.endswith(suffix):
        return False
    body = text[: -len(suffix)]
    return (len(body) - len(body.rstrip("\\"))) % 2 == 0


def analyse(pattern: str) -> SkipPattern:
    translated, pcre_only = _translate(pattern)
    compiled: re.Pattern[str] | None = None
    error: str | None = None
    if pcre_only is None:
        try:
            with warnings.catch_warnings():
                # Python warns about PCRE-compatible oddities ("possible nested set"); not our concern here.
                warnings.simplefilter("ignore")
                compiled = re.compile(translated)
        except re.error as exc:
            error = str(exc)
    branches = _alternatives(pattern)
    ends = [b for b in branches if _ends_with_unescaped(b, "$") or b.endswith((r"\z", r"\Z"))]
    return SkipPattern(
        text=pattern,
        compiled=compiled,
        error=error,
        pcre_only=pcre_only,
        start_anchored=all(b.startswith(("^", r"\A")) for b in branches),
        end_anchored=len(ends) == len(branches),
        end_open=all(_ends_with_unescaped(b, ".*") or _ends_with_unescaped(b, ".+") for b in branches),
        dollar_end=any(_ends_with_unescaped(b, "$") for b in branches),
    )


def catch_all(patterns: Sequence[SkipPattern]) -> bool:
    """True when the list (OR-ed, as APISIX does) exempts every URI we probe."""
    return unmatched_example(patterns) is None and any(p.compiled is not None for p in patterns)


def unmatched_example(patterns: Sequence[SkipPattern]) -> str | None:
    """A URI that no pattern exempts, i.e. one APISIX itself still demands a certificate for."""
    return next((uri for uri in _PROBES if not any(p.search(uri) for p in patterns)), None)


def may_exempt_route_uri(patterns: Sequence[SkipPattern], route_uri: str) -> bool:
    """Could some URI served by ``route_uri`` (APISIX route syntax) match one of ``patterns``?

    Exact route URIs are tested directly. A prefix route (``/api/*``, or one with ``:param`` segments,
    cut at the first variable part) can only be ruled out against an anchored pattern whose literal
    prefix diverges from it; anything else counts as "may match", because a false "no" here would hide
    a reachable route.
    """
    cut = min((i for i in (route_uri.find("*"), route_uri.find(":")) if i >= 0), default=-1)
    if cut < 0:
        return any(p.search(route_uri) or p.pcre_only is not None for p in patterns)
    prefix = route_uri[:cut]
    for p in patterns:
        if p.compiled is None and p.pcre_only is None:
            continue  # APISIX treats a pattern that fails to compile as "no match"
        literal = p.literal_prefix if p.pcre_only is None else None
        if literal is None or literal.startswith(prefix) or prefix.startswith(literal):
            return True
    return False
