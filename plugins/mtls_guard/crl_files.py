"""Where CRLs and their issuer certificates come from: files, directories and policy text.

Strict about what a file holds, because a CRL that is silently skipped revokes nothing: a file named as
a CRL must hold only CRLs (PEM ``X509 CRL`` blocks, or one DER CRL), an issuer file only certificates,
a directory at least one CRL file. Every error names the file (and the block) it is about.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Sequence
from typing import Final

from cryptography import x509

from .identity import ClientCertificate
from .revocation import CrlError, CrlSource, RevocationTable, build_table

__all__ = ["MAX_CRL_BYTES", "CrlReadError", "parse_crls", "read_crl_paths", "read_issuer_files", "route_table"]

MAX_CRL_BYTES: Final = 64 << 20  # a CA with a million revoked certificates has a ~40 MB CRL
MAX_ISSUER_BYTES: Final = 16 << 20
_PEM_BLOCK: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----(.*?)-----END \1-----", re.DOTALL)
_PEM_BEGIN: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----")
_CRL_LABEL: Final = b"X509 CRL"


class CrlReadError(CrlError):
    """A file or directory could not be read at all (as opposed to holding something unusable)."""


def _pem_bodies(data: bytes, name: str, label: bytes) -> list[bytes]:
    """The DER of every PEM block of ``data``, all of which must be ``label`` blocks."""
    labels = {m.group(1) for m in _PEM_BEGIN.finditer(data)}
    others = sorted(other.decode("ascii") for other in labels - {label})
    if others:
        raise CrlError(f"{name}: holds PEM {', '.join(others)}, where only {label.decode('ascii')} blocks belong")
    bodies: list[bytes] = []
    for index, match in enumerate(_PEM_BLOCK.finditer(data), 1):
        try:
            bodies.append(base64.b64decode(b"".join(match.group(2).split()), validate=True))
        except (binascii.Error, ValueError):
            raise CrlError(f"{name}: PEM block #{index} is not valid base64") from None
    if not bodies:
        raise CrlError(f"{name}: no complete PEM {label.decode('ascii')} block")
    return bodies


def parse_crls(data: bytes, name: str) -> list[CrlSource]:
    """The CRLs of a PEM text (one or more ``X509 CRL`` blocks) or of one DER CRL."""
    ders = _pem_bodies(data, name, _CRL_LABEL) if b"-----BEGIN " in data else [data]
    sources: list[CrlSource] = []
    for index, der in enumerate(ders, 1):
        where = name if len(ders) == 1 else f"{name}#{index}"
        try:
            crl = x509.load_der_x509_crl(der)
        except ValueError:
            raise CrlError(f"{where}: not a CRL (neither PEM X509 CRL blocks nor a DER CRL)") from None
        sources.append(CrlSource(where, crl))
    return sources


def _read(path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except IsADirectoryError:
        raise CrlReadError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise CrlReadError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError:  # a NUL in the name
        raise CrlReadError(f"{path}: not a valid file name") from None
    if len(data) > limit:
        raise CrlReadError(f"{path}: larger than {limit} bytes")
    return data


def _directory_files(path: str) -> list[str]:
    # Hidden entries are left out: editors' temporary files, and Kubernetes' "..data" links of a mounted
    # ConfigMap or Secret (the visible names link to the same files).
    try:
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
    except OSError as exc:
        raise CrlReadError(f"{path}: cannot be listed ({exc.strerror or exc})") from None
    files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    if not files:
        raise CrlError(f"{path}: the directory holds no CRL file")
    return files


def read_crl_paths(paths: Iterable[str]) -> list[CrlSource]:
    """The CRLs of every file named, and of every (non-hidden) file of every directory named."""
    sources: list[CrlSource] = []
    for path in paths:
        files = _directory_files(path) if os.path.isdir(path) else [path]
        for file in files:
            sources.extend(parse_crls(_read(file, MAX_CRL_BYTES), file))
    return sources


def read_issuer_files(paths: Iterable[str]) -> list[x509.Certificate]:
    """The certificates of PEM bundles; text between the blocks (comments, ``openssl x509 -text``) is allowed."""
    certificates: list[x509.Certificate] = []
    for path in paths:
        data = _read(path, MAX_ISSUER_BYTES)
        for index, der in enumerate(_pem_bodies(data, path, b"CERTIFICATE"), 1):
            try:
                certificates.append(x509.load_der_x509_certificate(der))
            except ValueError:
                raise CrlError(f"{path}: certificate #{index} cannot be parsed") from None
    return certificates


def route_table(texts: str | Sequence[str], anchors: Sequence[ClientCertificate]) -> RevocationTable:
    """A policy's ``require.crl`` (PEM text, or a list of them) verified against its ``require.ca`` anchors;
    CrlError if unusable."""
    sources: list[CrlSource] = []
    for index, text in enumerate((texts,) if isinstance(texts, str) else texts):
        where = "require.crl" if isinstance(texts, str) else f"require.crl[{index}]"
        try:
            data = text.encode("ascii")
        except UnicodeEncodeError:
            raise CrlError(f"{where}: not ASCII PEM text") from None
        if b"-----BEGIN " not in data:
            raise CrlError(f"{where}: no PEM X509 CRL block")
        sources.extend(parse_crls(data, where))
    return build_table(sources, (a.certificate for a in anchors), issuers_from="require.ca")
