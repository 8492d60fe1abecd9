"""Inputs of the operator commands, and how their errors reach the operator: one line on stderr, one exit code.

Exit codes (shared with runner.cli): 0 valid / allowed, 1 invalid policy / denied, 2 usage error or
unreadable input (missing, unreadable, a directory, not UTF-8, too large, the wrong format), 3 a runner
that could not start (the demo's).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from ..crl_files import CrlReadError
from ..identity import MAX_INPUT_BYTES, CertificateError, ClientCertificate, load_der, load_pem_chain
from ..library import PolicyLibrary
from ..options import load_revocation
from ..plugin import MtlsGuard
from ..policy import CompiledPolicy, compile_policy
from ..revocation import CrlError, RevocationTable
from ..schema_readers import PolicyError

__all__ = [
    "EXIT_NEGATIVE",
    "EXIT_STARTUP",
    "EXIT_USAGE",
    "CommandError",
    "fail",
    "load_library",
    "load_policy",
    "load_revocation_files",
    "read_certificates",
    "read_file",
]

EXIT_NEGATIVE: Final = 1
EXIT_USAGE: Final = 2
EXIT_STARTUP: Final = 3
MAX_POLICY_BYTES: Final = 4 << 20

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]*?-----END CERTIFICATE-----")
_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----")


class CommandError(Exception):
    """What ends a command early: ``code`` is its exit code, the message is the one line printed."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def fail(prog: str, code: int, message: str) -> int:
    """Print ``message`` on stderr as one line, shaped like argparse's ("PROG: error: ..."), and return ``code``.

    Scripts read the first line only, and YAML, JSON or file names can bring line breaks and control
    characters: whitespace runs become one space, other unprintable characters "?".
    """
    text = "".join(c if c.isprintable() else "?" for c in " ".join(message.split()))
    label = "error: " if code >= EXIT_USAGE else ""
    print(f"{prog}: {label}{text}", file=sys.stderr)
    return code


def read_file(path: str, what: str, limit: int) -> bytes:
    """The bytes of ``path``; CommandError (exit 2) naming the file when it cannot be read whole."""
    where = f"{what} {path}"
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise CommandError(EXIT_USAGE, f"{where}: no such file") from None
    except IsADirectoryError:
        raise CommandError(EXIT_USAGE, f"{where}: is a directory, not a file") from None
    except PermissionError:
        raise CommandError(EXIT_USAGE, f"{where}: permission denied") from None
    except OSError as exc:
        raise CommandError(EXIT_USAGE, f"{where}: cannot be read ({exc.strerror or exc})") from None
    except ValueError:  # a NUL in the name
        raise CommandError(EXIT_USAGE, f"{where}: not a valid file name") from None
    if len(data) > limit:
        raise CommandError(EXIT_USAGE, f"{where}: larger than {limit} bytes")
    return data


def _read_text(path: str, what: str) -> str:
    try:
        return read_file(path, what, MAX_POLICY_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(EXIT_USAGE, f"{what} {path}: not UTF-8 text") from None


def _policy_source(value: str, what: str) -> str | Mapping[str, Any]:
    """A policy given inline (JSON, starting with "{") or as a JSON/YAML file (anything else)."""
    if value.lstrip().startswith("{"):
        return value
    if not os.path.exists(value):
        # A mistyped file name used to be parsed as inline JSON: say what an inline policy looks like.
        hint = "an inline policy is a JSON object starting with '{'"
        raise CommandError(EXIT_USAGE, f"{what} {value}: no such file ({hint})")
    text = _read_text(value, what)
    if Path(value).suffix not in (".yaml", ".yml"):
        return text
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise CommandError(EXIT_NEGATIVE, f"invalid policy: {value}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise CommandError(EXIT_NEGATIVE, f"invalid policy: {value}: a policy must be a mapping")
    return data


def load_library(path: str | None) -> PolicyLibrary | None:
    """The ``--policy-file`` library: exit 2 when it cannot be read, 1 when it is not a valid library."""
    if path is None:
        return None
    _read_text(path, "--policy-file")  # unreadable (2) is told apart from invalid (1) before parsing
    try:
        return PolicyLibrary.from_yaml_file(path)
    except PolicyError as exc:
        raise CommandError(EXIT_NEGATIVE, f"invalid policy file: {exc}") from None


def load_policy(value: str, what: str, library: PolicyLibrary | None) -> tuple[MtlsGuard, CompiledPolicy]:
    """The plugin (with ``library``) and the compiled policy; invalid policies exit 1, unreadable files 2."""
    source = _policy_source(value, what)
    plugin = MtlsGuard()
    plugin.library = library
    try:
        return plugin, compile_policy(source, library)
    except PolicyError as exc:
        where = "" if value.lstrip().startswith("{") else f"{value}: "
        raise CommandError(EXIT_NEGATIVE, f"invalid policy: {where}{exc}") from None


def load_revocation_files(crls: list[str], issuers: list[str], library: PolicyLibrary | None) -> RevocationTable:
    """``--crl``/``--crl-issuer`` as the runner reads crl_files/crl_issuer_files (issuers also from the
    ``--policy-file`` bundles): exit 2 when a file cannot be read, 1 when a CRL is not usable."""
    if issuers and not crls:
        raise CommandError(EXIT_USAGE, "--crl-issuer serves to verify --crl, which is not given")
    try:
        return load_revocation(crls, issuers, library)
    except CrlReadError as exc:
        raise CommandError(EXIT_USAGE, f"--crl/--crl-issuer {exc}") from None
    except CrlError as exc:
        raise CommandError(EXIT_NEGATIVE, str(exc)) from None


def _pem_name(path: str) -> str:
    target = Path(path).with_suffix(".pem")
    # Never suggest writing over the input (openssl would truncate it before reading).
    return str(target) if str(target) != path else f"{path}.pem"


def read_certificates(path: str, what: str) -> tuple[ClientCertificate, ...]:
    """The certificates of a PEM file, in file order (exit 2 for anything else, DER said so with the fix).

    Like OpenSSL's PEM reader, text around the blocks (``openssl x509 -text``, PKCS#12 "Bag Attributes")
    and other blocks (the key of a combined cert+key file) are skipped.
    """
    data = read_file(path, what, MAX_INPUT_BYTES)
    where = f"{what} {path}"
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        labels = sorted({m.decode("ascii") for m in _PEM_LABEL.findall(data)})
        if labels:
            raise CommandError(EXIT_USAGE, f"{where}: holds no certificate, only PEM {', '.join(labels)}")
        try:
            load_der(data)
        except CertificateError:
            raise CommandError(EXIT_USAGE, f"{where}: not a PEM certificate (no BEGIN CERTIFICATE block)") from None
        convert = shlex.join(["openssl", "x509", "-inform", "der", "-in", path, "-out", _pem_name(path)])
        raise CommandError(EXIT_USAGE, f"{where}: is a DER certificate, PEM is needed; convert it: {convert}")
    try:
        return load_pem_chain(b"\n".join(blocks))
    except CertificateError as exc:
        raise CommandError(EXIT_USAGE, f"{where}: {exc}") from None
