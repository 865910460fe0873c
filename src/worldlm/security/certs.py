"""A development certificate authority for mutual TLS between federation nodes.

Every node of the federation tree gets one certificate, signed by a shared CA, that it uses both
as a server (inner aggregators serve their children) and as a client (every non-root node dials
its parent). A node's identity is its path in the tree, e.g. ``world/eu/paris``; it is bound into
the certificate as the URI SAN ``worldlm://node/<path>`` so a peer can check *who* it is talking
to, not merely that the certificate chains to the CA.

Keys are ECDSA P-256: small, fast to generate, and accepted by every TLS stack gRPC uses
(BoringSSL, OpenSSL). This is a *development* CA: the CA key sits unencrypted on disk (mode
0o600). Every failure raises `CertError` with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from worldlm.errors import WorldLMError

__all__ = [
    "CA_CERT_NAME",
    "CA_KEY_NAME",
    "NODE_URI_PREFIX",
    "CaFiles",
    "CertError",
    "NodeFiles",
    "create_ca",
    "issue_node_cert",
    "node_identity",
    "safe_name",
    "validate_node_path",
    "verify_node_cert",
]

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
NODE_URI_PREFIX = "worldlm://node/"

# X.509 caps a CommonName at 64 characters (RFC 5280 ub-common-name) and the CN holds the path.
MAX_NODE_PATH_LEN = 64
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
_DNS_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# Tolerate small clock differences between the machine that issues and the one that verifies.
_BACKDATE = timedelta(minutes=5)
_PATH_RULE = (
    "a node path is 1 to 64 characters of segments made of letters, digits, '_', '-' or '.', "
    "separated by single '/' (e.g. 'world/eu/paris'); no leading or trailing '/', no empty "
    "segments, no segment made only of dots ('.', '..'), and no '__' (it stands for '/' in "
    "file names)"
)


class CertError(WorldLMError):
    """A certificate or key cannot be created, read, or trusted; the message says why."""


@dataclass(frozen=True)
class CaFiles:
    """Where `create_ca` wrote the CA: `cert` is shareable, `key` must stay secret."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeFiles:
    """Where `issue_node_cert` wrote one node's certificate and private key."""

    cert: Path
    key: Path


def validate_node_path(node_path: str) -> str:
    """Return `node_path` unchanged if it is a valid node identity, else raise `CertError`.

    Strict on purpose: the path becomes a file name and a URI, so separators, whitespace and
    dot-only segments (path traversal) are refused rather than escaped.
    """
    if not isinstance(node_path, str) or not node_path:
        raise CertError(f"invalid node path {node_path!r}: {_PATH_RULE}")
    if len(node_path) > MAX_NODE_PATH_LEN:
        raise CertError(
            f"invalid node path {node_path!r}: it is {len(node_path)} characters long; {_PATH_RULE}"
        )
    for segment in node_path.split("/"):
        # '__' is reserved: it stands for '/' in file names, so a/b and a__b cannot collide
        if not _SEGMENT.fullmatch(segment) or set(segment) == {"."} or "__" in segment:
            raise CertError(
                f"invalid node path {node_path!r}: bad segment {segment!r}; {_PATH_RULE}"
            )
    return node_path


IDENTITY_HOST_SUFFIX = "node.worldlm"


def identity_host(node_path: str) -> str:
    """The DNS name every certificate issued for `node_path` carries, and that its children
    check when they attach (TLS host-name verification against this name, whatever address they
    dial): a certificate of any other node, a sibling aggregator's or a leaf's, cannot serve as
    their parent. A hash, so that every node path makes a valid DNS label."""
    digest = hashlib.sha256(validate_node_path(node_path).encode()).hexdigest()[:32]
    return f"{digest}.{IDENTITY_HOST_SUFFIX}"


def safe_name(node_path: str) -> str:
    """File stem for a node's files: the validated path with '/' replaced by '__'."""
    return validate_node_path(node_path).replace("/", "__")


def create_ca(
    out_dir: Path, name: str = "worldlm dev CA", days: int = 365, force: bool = False
) -> CaFiles:
    """Create a self-signed CA in `out_dir` (`ca.pem`, and `ca.key` with mode 0o600).

    The CA may only sign end-entity certificates (path length 0), which is all a federation
    needs and limits the damage of a leaked node key. Existing files are kept unless `force`,
    because overwriting a CA silently invalidates every certificate it issued.
    """
    _check_days(days)
    if not name or len(name) > 64:
        raise CertError(f"invalid CA name {name!r}: it must be 1 to 64 characters")
    out_dir = Path(out_dir)
    files = CaFiles(cert=out_dir / CA_CERT_NAME, key=out_dir / CA_KEY_NAME)
    _refuse_overwrite([files.cert, files.key], force, what="CA")

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "worldlm"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(files.key, _key_pem(key), mode=0o600)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return files


def issue_node_cert(
    ca_dir: Path,
    node_path: str,
    out_dir: Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    force: bool = False,
) -> NodeFiles:
    """Issue a certificate for the node `node_path`, signed by the CA in `ca_dir`.

    Writes `<safe name>.pem` and `<safe name>.key` (mode 0o600) in `out_dir`. The certificate
    is valid for both TLS server and client auth because every node is both; `hosts` are the
    names and IP addresses peers dial it by; the URI SAN carries the node identity, and the DNS
    name `identity_host(node_path)` lets its children pin it as their parent. Validity is
    clamped to the CA's own expiry, since a leaf cannot outlive the CA that vouches for it.
    """
    stem = safe_name(node_path)
    _check_days(days)
    if isinstance(hosts, str):
        raise CertError(f"hosts must be a list of names, not the single string {hosts!r}")
    san = [_host_entry(host) for host in dict.fromkeys(hosts)]
    san.append(x509.DNSName(identity_host(node_path)))
    san.append(x509.UniformResourceIdentifier(NODE_URI_PREFIX + node_path))

    ca_cert, ca_key = _load_ca(Path(ca_dir))
    now = datetime.now(UTC)
    if ca_cert.not_valid_after_utc <= now:
        raise CertError(
            f"the CA in {ca_dir} expired on {ca_cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "create a new one with create_ca(..., force=True) and reissue every node"
        )
    out_dir = Path(out_dir)
    files = NodeFiles(cert=out_dir / f"{stem}.pem", key=out_dir / f"{stem}.key")
    _refuse_overwrite([files.cert, files.key], force, what=f"node {node_path!r}")

    key = ec.generate_private_key(ec.SECP256R1())
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "worldlm"),
                    x509.NameAttribute(NameOID.COMMON_NAME, node_path),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - _BACKDATE, ca_cert.not_valid_before_utc))
        .not_valid_after(min(now + timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    try:
        cert = builder.sign(ca_key, hashes.SHA256())
    except ValueError as exc:
        raise CertError(f"cannot issue a certificate for node {node_path!r}: {exc}") from exc
    _write(files.key, _key_pem(key), mode=0o600)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return files


def node_identity(cert_pem: bytes) -> str:
    """Return the node path bound into a certificate by its `worldlm://node/` URI SAN.

    Exactly one such URI must be present: with none the certificate names no node, and with
    several it would be ambiguous which node the holder is, so both are refused.
    """
    cert = _parse_cert(cert_pem, what="node certificate")
    return _identity_of(cert)


def verify_node_cert(
    cert_pem: bytes,
    ca_pem: bytes,
    expected_path: str | None = None,
    now: datetime | None = None,
) -> str:
    """Check a node certificate against the CA and return the node path it proves.

    Checks, in order: the certificate was signed directly by this CA; it and the CA are inside
    their validity windows at `now` (default: the current time; must be timezone-aware); and,
    when `expected_path` is given, the bound identity equals it. This is the application-level
    identity check that TLS chain validation alone does not do.
    """
    cert = _parse_cert(cert_pem, what="node certificate")
    ca = _parse_cert(ca_pem, what="CA certificate")
    subject = _cn(cert)
    _check_is_ca(ca, source="the given CA certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except ValueError as exc:
        raise CertError(
            f"certificate {subject!r} was not issued by CA {_cn(ca)!r}: its issuer is "
            f"{cert.issuer.rfc4514_string()!r}, the CA is {ca.subject.rfc4514_string()!r}"
        ) from exc
    except InvalidSignature as exc:
        raise CertError(
            f"certificate {subject!r} was not issued by this CA {_cn(ca)!r}: the signature does "
            "not verify with the CA's key (signed by another CA of the same name, or altered)"
        ) from exc
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise CertError(
            f"certificate {subject!r} cannot be checked against CA {_cn(ca)!r}: {exc}"
        ) from exc

    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None or now.utcoffset() is None:
        raise CertError("`now` must be a timezone-aware datetime, e.g. datetime.now(UTC)")
    for label, c in ((f"certificate {subject!r}", cert), (f"CA {_cn(ca)!r}", ca)):
        if now < c.not_valid_before_utc:
            raise CertError(
                f"{label} is not valid yet: valid from {c.not_valid_before_utc:%Y-%m-%d %H:%M} "
                f"UTC, now is {now.astimezone(UTC):%Y-%m-%d %H:%M} UTC (check the clocks)"
            )
        if now > c.not_valid_after_utc:
            raise CertError(
                f"{label} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC (now is "
                f"{now.astimezone(UTC):%Y-%m-%d %H:%M} UTC); issue a new one"
            )

    identity = _identity_of(cert)
    if expected_path is not None:
        validate_node_path(expected_path)
        if identity != expected_path:
            raise CertError(
                f"wrong node identity: expected {expected_path!r}, but the certificate is "
                f"for {identity!r}"
            )
    return identity


# --- helpers -------------------------------------------------------------------------------


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise CertError(f"invalid validity {days!r}: days must be a whole number >= 1")


def _host_entry(host: str) -> x509.GeneralName:
    """An IP address becomes an IPAddress SAN (TLS stacks never match IPs against DNSName)."""
    if not isinstance(host, str) or not host:
        raise CertError(f"invalid host {host!r}: give a DNS name or an IP address")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if labels[0] == "*":
        labels = labels[1:]
    if len(host) > 253 or not labels or not all(_DNS_LABEL.fullmatch(lb) for lb in labels):
        raise CertError(
            f"invalid host {host!r}: a host is an IP address or a DNS name of dot-separated "
            "labels of letters, digits, '-' and '_' (an optional leading '*.' is allowed)"
        )
    return x509.DNSName(host)


def _refuse_overwrite(paths: Sequence[Path], force: bool, what: str) -> None:
    """Checked before anything is written, so a refusal never leaves a half-written pair."""
    if force:
        return
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise CertError(
            f"refusing to overwrite the existing {what} files: {', '.join(existing)}; "
            "pass force=True to replace them"
        )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically via a temp file created 0o600, so a key is never briefly readable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise CertError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise CertError(
            f"{what} not found: {path}; create the CA first with create_ca({str(path.parent)!r})"
        ) from exc
    except OSError as exc:
        raise CertError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_dir / CA_CERT_NAME, ca_dir / CA_KEY_NAME
    cert = _parse_cert(_read(cert_path, "CA certificate"), what=f"CA certificate {cert_path}")
    _check_is_ca(cert, source=str(cert_path))
    try:
        key = serialization.load_pem_private_key(_read(key_path, "CA key"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertError(f"CA key {key_path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"CA key {key_path} is not an ECDSA key; recreate the CA with create_ca")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise CertError(
            f"CA key {key_path} does not match CA certificate {cert_path}; "
            "they come from different create_ca runs"
        )
    return cert, key


def _parse_cert(pem: bytes, what: str) -> x509.Certificate:
    if isinstance(pem, str):
        pem = pem.encode()
    try:
        return x509.load_pem_x509_certificate(pem)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{what} is not a PEM X.509 certificate: {exc}") from exc


def _check_is_ca(cert: x509.Certificate, source: str) -> None:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    except ValueError as exc:  # malformed extensions are only parsed on access
        raise CertError(f"{source} has malformed extensions: {exc}") from exc
    if not is_ca:
        raise CertError(f"{source} is not a CA certificate (BasicConstraints ca=True missing)")


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else cert.subject.rfc4514_string()
    return value if isinstance(value, str) else value.decode(errors="replace")


def _identity_of(cert: x509.Certificate) -> str:
    subject = _cn(cert)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise CertError(
            f"certificate {subject!r} has no SubjectAlternativeName, so it names no worldlm node"
        ) from exc
    except ValueError as exc:
        raise CertError(f"certificate {subject!r} has malformed extensions: {exc}") from exc
    uris = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(NODE_URI_PREFIX)
    ]
    if not uris:
        raise CertError(
            f"certificate {subject!r} has no {NODE_URI_PREFIX}<path> URI, so it names no "
            "worldlm node; issue it with issue_node_cert"
        )
    if len(uris) > 1:
        raise CertError(
            f"certificate {subject!r} names {len(uris)} worldlm nodes ({', '.join(uris)}); "
            "a node certificate must bind exactly one identity"
        )
    path = uris[0].removeprefix(NODE_URI_PREFIX)
    try:
        return validate_node_path(path)
    except CertError as exc:
        raise CertError(f"certificate {subject!r} binds a malformed identity: {exc}") from exc
