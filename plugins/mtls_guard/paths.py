"""Which path an exemption is judged on, given how the upstream will receive it.

APISIX hands the runner ``$uri`` (nginx's decoded path: ``%XX`` decoded, dot segments resolved,
slashes merged), while with an empty ``$upstream_uri`` nginx proxies the client's *raw* request-target
(``/admin/..%2Fpublic/x`` is judged as ``/public/x`` and delivered as is). mtls-guard closes that gap
from the delivery side: every request it lets through carries a Rewrite ``path`` equal to the path it
judged, so APISIX proxies ``uri_safe_encode(path)``, which an upstream decodes once back into exactly
that path. Such a path is matched *literally*: it was decoded once already and is never decoded again.

The one exception is a path an earlier plugin already rewrote (``$upstream_uri`` set, e.g. by
proxy-rewrite before ext-plugin-post-req): it reaches the upstream as it is, still percent-encoded, and
is matched after decoding it once. The two cases can only differ for a path holding a ``%`` (an encoded
``$upstream_uri`` without one reads the same both ways), so only such a path costs the ``upstream_uri``
variable (see ``decision.Engine``).

Either way, every form that two parsers could read differently is AMBIGUOUS: such a path is never
exempt and always goes through the certificate checks (fail closed). That covers servlet ``;``
parameters, backslashes, controls, empty or dot segments, look-alike Unicode, a literal ``%`` in a
decoded path (a double-decoding upstream would decode it again), and in an encoded path ``%2F``,
``%5C`` and ``%25``.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

__all__ = ["classify_path", "exempt_path"]

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


def _decode_run(match: re.Match[str]) -> str:
    # Decode a run of consecutive escapes at once so multi-byte UTF-8 sequences stay together; strict
    # UTF-8 so overlong forms and lone continuation bytes cannot smuggle "/" or "." past the checks.
    return bytes.fromhex(match.group(0).replace("%", "")).decode("utf-8", "strict")


def _unicode_ambiguous(value: str) -> bool:
    if any(unicodedata.category(c) in _BAD_CATEGORIES for c in value if c > "\x7f"):
        return True
    folded = unicodedata.normalize("NFKC", value)
    return folded != value and any(value.count(c) != folded.count(c) for c in _STRUCTURAL)


def classify_path(raw: str | None, *, encoded: bool) -> tuple[str, str]:
    """(path to match, "") when unambiguous, else (raw input, reason for the logs and ``explain``).

    ``encoded`` says how the upstream receives ``raw``: False for a path mtls-guard delivers itself
    with a Rewrite (``$uri``, already decoded: matched literally), True for an ``$upstream_uri`` an
    earlier plugin set (delivered as is: decoded once here, as the upstream will).
    """
    if not raw:
        return "", "empty"
    if raw[0] != "/":
        return raw, "not-absolute"
    # "?" and "#" in a decoded path came from %3F/%23; in an encoded one the query was split off
    # already. Either way an upstream or a log line could cut the path there: never exempt.
    if _structurally_ambiguous(raw) or "?" in raw or "#" in raw:
        return raw, "ambiguous-characters"
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
    if not encoded:
        # The client sent "%25": delivered re-encoded, a double-decoding upstream reads another path.
        return raw, "literal-percent"
    if _BAD_ESCAPE.search(raw) is not None:
        return raw, "bad-escape"
    if _DANGEROUS_ESCAPE.search(raw) is not None:
        return raw, "encoded-separator"
    try:
        decoded = _ESCAPE.sub(_decode_run, raw)
    except UnicodeDecodeError:
        return raw, "invalid-utf8"
    if _structurally_ambiguous(decoded) or "?" in decoded or "#" in decoded:
        return raw, "decoded-ambiguous"
    if not decoded.isascii() and _unicode_ambiguous(decoded):
        return raw, "unicode-ambiguous"
    return decoded, ""


def exempt_path(raw: str | None, *, encoded: bool) -> str | None:
    """The path exemption rules are matched against, or None when it is ambiguous (never exempt)."""
    value, reason = classify_path(raw, encoded=encoded)
    return None if reason else value
