"""Exemption path patterns against the canonical paths they are matched on (:mod:`.paths`).

mtls-guard full-matches a rule's RE2 pattern on the canonical path: decoded once, dot segments
resolved, slashes merged, and never holding ``%``, ``;``, ``\\``, ``?``, ``#``, controls or
look-alike Unicode (``paths.classify_path`` refuses every such path). Two questions matter to lint:

* Does the pattern match *every* canonical path (``.*``, ``/.*``, ``.+``, ``/(.*)?``)? Then the
  rule has no path condition at all. RE2 cannot answer universality, so the compiled pattern is
  run against probe paths chosen to differ in every way a real restriction could test: length,
  depth, case, digits, every character a canonical path may hold, non-ASCII.
* Can it match *any*? A pattern whose every match must contain text that no canonical path holds
  (``/public/\\.\\./admin``, ``//x``, ``%2e``, ``\\?q=``, a relative ``admin/.*``) exempts nothing,
  and shows the operator expected matching on the raw request-target. Python's regex parser
  (``re._parser``) gives the pattern's structure; the literal text every match must contain is then
  judged by ``paths.classify_path`` itself, so lint and the runner cannot disagree on what is canonical.
  An unescaped ``.`` is any character, so ``/public/../admin`` is not dead (it matches
  ``/public/xy/admin``) but *reads* as a dot segment: reported as well, as a pattern that never
  matches what it was written for.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ..matchers import compile_regex
from ..paths import classify_path

if TYPE_CHECKING:
    # typeshed describes re._parser / re._constants under their pre-3.11 names.
    import sre_constants as _constants
    import sre_parse as _parser
else:  # importing sre_parse itself is deprecated since 3.11 (and warnings are errors in the tests)
    _parser = importlib.import_module("re._parser")
    _constants = importlib.import_module("re._constants")

__all__ = [
    "PROBE_PATHS",
    "DeadAlternative",
    "dead_alternatives",
    "matches_every_path",
    "structure",
    "top_level_alternatives",
]

# Canonical paths (tests assert classify_path accepts each) that a pattern with any real path
# condition fails on at least one of.
PROBE_PATHS: Final = (
    "/",
    "/a",
    "/Z",
    "/0",
    "/admin",
    "/admin/",
    "/admin/users/42",
    "/api/v1/orders.json",
    "/.well-known/acme-challenge/token",
    "/x.",
    "/..x/...",
    "/ !\"$&'()*+,-.:<=>@[]^_`{|}~",
    "/caf\u00e9/\u65e5\u672c/\U0001f600",
    "/" + "deep/" * 30 + "end",
    "/" + "Long-Segment_0123456789" * 120,
)
# Past this many literal readings of one alternative, further branches count as unknown text.
_MAX_EXPANSIONS: Final = 64
# A run of unknown text (possibly empty) between the literal parts of one reading.
_UNKNOWN: Final = None
_Piece = str | None
# RE2 and Python read POSIX classes ([[:alpha:]]) differently: skip such patterns rather than misjudge.
_POSIX_CLASS: Final = "[:"


def matches_every_path(pattern: str) -> bool:
    """True when the (RE2, full-match) pattern matches every probe path, i.e. restricts no path."""
    try:
        regex = compile_regex(pattern)
    except ValueError:
        return False
    return all(regex.fullmatch(path.encode("utf-8")) is not None for path in PROBE_PATHS)


@dataclass(frozen=True, slots=True)
class DeadAlternative:
    """A top-level alternative of a pattern that matches no path it was meant for."""

    text: str  # the alternative as written
    required: str  # literal text each of its matches contains (with "." for "any character" when by_reading)
    reason: str  # why paths.classify_path refuses a path holding it
    by_reading: bool  # True: dead only when its unescaped "." are read as dots (it matches other paths)


def structure(pattern: str) -> Iterator[tuple[int, str, int]]:
    """(index, character, group depth before it) of each character outside escapes and classes: what
    splitting at ``|`` and matching parentheses need. Python and RE2 agree on this much syntax."""
    depth = i = 0
    in_class = False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            i += 2 if pattern[i + 1 : i + 2] == "^" else 1
            if pattern[i : i + 1] == "]":  # "[]a]", "[^]a]": a leading "]" is a member
                i += 1
            continue
        else:
            yield i, ch, depth
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
        i += 1


def top_level_alternatives(pattern: str) -> list[str]:
    """The pattern split at ``|`` outside groups and classes (each full-matched on its own)."""
    parts: list[str] = []
    start = 0
    for i, ch, depth in structure(pattern):
        if ch == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
    parts.append(pattern[start:])
    return parts


def dead_alternatives(pattern: str) -> tuple[list[DeadAlternative], int]:
    """(alternatives that match no canonical path, number of alternatives).

    Only sound findings: an alternative Python cannot parse the way RE2 does is never reported.
    """
    alternatives = top_level_alternatives(pattern)
    if _POSIX_CLASS in pattern:
        return [], len(alternatives)
    dead = [d for d in (_dead_alternative(a) for a in alternatives) if d is not None]
    return dead, len(alternatives)


def _dead_alternative(text: str) -> DeadAlternative | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "possible nested set" and the like: not our concern
            parsed = _parser.parse(text)
    except (_constants.error, RecursionError, OverflowError):
        return None  # RE2-only syntax (\pL, \z, (?U)...): cannot be judged here
    strict = _refusal(_expand(parsed, any_char=_UNKNOWN))
    if strict is not None:
        return DeadAlternative(text, strict[0], strict[1], by_reading=False)
    # Read each unescaped "." as a dot: only dot segments ("/./", "/../", "/..") count, the one
    # thing such a reading adds.
    read = _refusal(_expand(parsed, any_char="."))
    if read is not None and read[1] == "ambiguous-characters":
        return DeadAlternative(text, read[0], read[1], by_reading=True)
    return None


def _refusal(readings: list[list[_Piece]]) -> tuple[str, str] | None:
    """(required text, classify_path reason) when every reading holds refused text, else None."""
    first: tuple[str, str] | None = None
    for reading in readings:
        refused = _refused_piece(_joined(reading))
        if refused is None:
            return None
        first = first or refused
    return first


def _refused_piece(pieces: list[_Piece]) -> tuple[str, str] | None:
    if not pieces:
        return "", classify_path("", encoded=False)[1]
    last = len(pieces) - 1
    for index, piece in enumerate(pieces):
        if piece is None:
            continue
        # Neutral context where unknown text may precede or follow: "/x" and "x" can neither
        # create nor hide a refused form; at the start, nothing precedes a path's first "/".
        probe = ("" if index == 0 else "/x") + piece + ("" if index == last else "x")
        reason = classify_path(probe, encoded=False)[1]
        if reason:
            return piece, reason
    return None


def _joined(pieces: list[_Piece]) -> list[_Piece]:
    """Adjacent literals merged, adjacent unknown runs collapsed into one."""
    out: list[_Piece] = []
    for piece in pieces:
        if piece is None:
            if not out or out[-1] is not None:
                out.append(None)
        elif out and out[-1] is not None:
            out[-1] += piece
        else:
            out.append(piece)
    return out


def _expand(sub: _parser.SubPattern, *, any_char: str | None) -> list[list[_Piece]]:
    """Every literal reading of ``sub``: literal text and unknown runs, in order (capped)."""
    readings: list[list[_Piece]] = [[]]
    for op, av in sub.data:
        options = _options(op, av, any_char)
        if len(readings) * len(options) > _MAX_EXPANSIONS:
            options = [[_UNKNOWN]]
        readings = [r + o for r in readings for o in options]
    return readings


def _options(op: object, av: object, any_char: str | None) -> list[list[_Piece]]:
    c = _constants
    if op is c.LITERAL and isinstance(av, int):
        return [[chr(av)]]
    if op is c.ANY:
        return [[any_char]]
    if op is c.AT:
        return [[]]  # anchors consume nothing
    if op is c.SUBPATTERN and isinstance(av, tuple) and isinstance(av[-1], _parser.SubPattern):
        return _expand(av[-1], any_char=any_char)
    if op is c.ATOMIC_GROUP and isinstance(av, _parser.SubPattern):
        return _expand(av, any_char=any_char)
    if op is c.BRANCH and isinstance(av, tuple) and isinstance(av[1], list):
        options = [o for branch in av[1] for o in _expand(branch, any_char=any_char)]
        return options if len(options) <= _MAX_EXPANSIONS else [[_UNKNOWN]]
    if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT) and isinstance(av, tuple):
        low, high, body = av
        inner = _expand(body, any_char=any_char)
        if low == high and len(inner) ** low <= _MAX_EXPANSIONS:
            exact: list[list[_Piece]] = [[]]
            for _ in range(low):  # an exact count is plain repetition: \.{2} is ".."
                exact = [r + o for r in exact for o in inner]
            return exact
        if low == 0 and high == 1:
            return [[], *inner] if len(inner) < _MAX_EXPANSIONS else [[_UNKNOWN]]
        if low >= 1 and len(inner) ** 2 <= _MAX_EXPANSIONS:
            # The first repetition follows what precedes, the last one precedes what follows; with a
            # single repetition both are the same text, and each claim still holds.
            return [[*first, _UNKNOWN, *last] for first in inner for last in inner]
    return [[_UNKNOWN]]
