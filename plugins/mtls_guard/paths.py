"""Canonicalisation of the request path, done once per request before any exemption rule is consulted.

The runner hands us APISIX's normalised ``$uri`` (already percent-decoded, dot segments resolved, slashes
merged) or, after a rewrite by an earlier plugin, a raw ``upstream_uri`` that may still carry encodings.
We cannot tell which, and the upstream may interpret the path differently from nginx (servlet ``;``
parameters, backslashes, double decoding, NFKC or "best-fit" folding of look-alike characters, ...).
Exemptions are the only thing a path can buy, so every form that two parsers could read differently is
declared AMBIGUOUS: such a path is never exempt and always goes through the certificate checks (fail
closed). Only an unambiguous path is decoded and matched.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Final

__all__ = ["CanonicalPath", "canonical_value", "canonicalize"]

# Characters that make a path ambiguous whether they arrive raw or percent-encoded:
#   C0 controls and DEL (CRLF / NUL injection, PCRE's "$ before final newline", "." not matching "\n"),
#   C1 controls (U+0080-U+009F; some stacks treat them as line breaks),
#   ";" (servlet path parameters: "/public;/../admin", "/public/..;/admin"),
#   "\" (Windows/IIS and some normalisers turn it into "/").
_FORBIDDEN_CHARS: Final = r"\x00-\x1f\x7f-\x9f;\\"
_FORBIDDEN: Final = re.compile(rf"[{_FORBIDDEN_CHARS}]")
_DOT_SEGMENT: Final = re.compile(r"(?:^|/)\.{1,2}(?:/|\Z)")


def _structurally_ambiguous(path: str) -> bool:
    # "//": nginx merges slashes, so an empty segment means an un-normalised (raw or rewritten) path.
    # Plain substring tests first: this runs on every request, and a clean path must stay cheap.
    return (
        _FORBIDDEN.search(path) is not None or "//" in path or ("/." in path and _DOT_SEGMENT.search(path) is not None)
    )


# A "%" not followed by two hex digits ("%zz", "%4", trailing "%").
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Encodings that must never be decoded for matching: "%2F" (a slash the router did not split on),
# "%5C" (backslash) and "%25" (a literal "%": decoding once leaves "%2e%2e" behind, which a
# double-decoding upstream would turn into "..").
_DANGEROUS_ESCAPE: Final = re.compile(r"%(?:2[fF]|5[cC]|25)")
_ESCAPE: Final = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
# Non-ASCII code points no legitimate route needs and that some stacks drop or treat as line breaks:
# other controls, format characters (zero-width, bidi overrides), line/paragraph separators,
# surrogates, private use, unassigned.
_BAD_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
# ASCII characters that give a path its structure; compatibility forms of them (U+FF0F fullwidth
# solidus, U+FF0E fullwidth full stop, U+2024 one dot leader, ...) become the real thing in upstreams
# that apply NFKC or Windows "best-fit" mappings.
_STRUCTURAL: Final = "/.\\;%?#"


@dataclass(frozen=True, slots=True)
class CanonicalPath:
    """The path exemption rules are matched against.

    ``value`` is the decoded path when ``ambiguous`` is False; for an ambiguous path it is the raw input
    (or "" for None) and must not be matched. ``reason`` names why a path is ambiguous, for logs.
    """

    value: str
    ambiguous: bool
    reason: str = ""


def _decode_run(match: re.Match[str]) -> str:
    # Decode a run of consecutive escapes at once so multi-byte UTF-8 sequences stay together; strict
    # UTF-8 so overlong forms and lone continuation bytes cannot smuggle "/" or "." past the checks.
    return bytes.fromhex(match.group(0).replace("%", "")).decode("utf-8", "strict")


def _unicode_ambiguous(value: str) -> bool:
    if any(unicodedata.category(c) in _BAD_CATEGORIES for c in value if c > "\x7f"):
        return True
    folded = unicodedata.normalize("NFKC", value)
    return folded != value and any(value.count(c) != folded.count(c) for c in _STRUCTURAL)


def _classify(raw: str | None) -> tuple[str, str]:
    """(decoded path, "") when unambiguous, else (raw input, reason)."""
    if not raw:
        return "", "empty"
    if raw[0] != "/":
        return raw, "not-absolute"
    # "?" and "#" cannot be part of a path the runner passes (the query is split off): seen raw, they
    # mean a raw request line leaked through. Once decoded (%3F, %23) they are ordinary characters.
    if _structurally_ambiguous(raw) or "?" in raw or "#" in raw:
        return raw, "raw-ambiguous"
    if not raw.isascii():
        try:
            # Lone surrogates come from bytes that were not valid UTF-8 (surrogateescape decoding).
            raw.encode("utf-8", "strict")
        except UnicodeEncodeError:
            return raw, "invalid-utf8"
        if "%" not in raw and _unicode_ambiguous(raw):
            return raw, "unicode-ambiguous"
    if "%" not in raw:
        return raw, ""
    if _BAD_ESCAPE.search(raw) is not None:
        return raw, "bad-escape"
    if _DANGEROUS_ESCAPE.search(raw) is not None:
        return raw, "encoded-separator"
    try:
        decoded = _ESCAPE.sub(_decode_run, raw)
    except UnicodeDecodeError:
        return raw, "invalid-utf8"
    if _structurally_ambiguous(decoded):
        return raw, "decoded-ambiguous"
    if not decoded.isascii() and _unicode_ambiguous(decoded):
        return raw, "unicode-ambiguous"
    return decoded, ""


def canonical_value(raw: str | None) -> str | None:
    """The path to match, or None when it is ambiguous (the per-request fast path of ``canonicalize``)."""
    value, reason = _classify(raw)
    return None if reason else value


def canonicalize(raw: str | None) -> CanonicalPath:
    """Return the canonical form of ``raw`` and whether it is ambiguous (see the module docstring)."""
    value, reason = _classify(raw)
    return CanonicalPath(value, bool(reason), reason)
