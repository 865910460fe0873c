"""Mutual-TLS credentials for the link, and the rule for when plaintext is allowed.

Both ends trust only the federation CA, never the system roots: a certificate from any public
CA proves nothing about membership of the federation. The parent requires a client certificate,
so an unauthenticated peer fails in the TLS handshake, before any application code runs.

Plaintext exists for tests and single-machine demos only. It needs two things at once: the
caller asks for it explicitly, and the address is loopback, so that a typo or a copied
configuration can never send a model or a node identity across a network in the clear.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

from worldlm.security.certs import (
    CA_CERT_NAME,
    CertError,
    safe_name,
    verify_node_cert,
)
from worldlm.transport.grpc.errors import LinkConfigError

__all__ = [
    "TlsFiles",
    "channel_credentials",
    "check_plaintext_allowed",
    "is_loopback",
    "server_credentials",
]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one node: the federation CA certificate, its own certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def for_node(cls, ca_dir: Path, nodes_dir: Path, node_path: str) -> TlsFiles:
        """The files of `create_ca(ca_dir)` and `issue_node_cert(ca_dir, node_path, nodes_dir)`."""
        stem = safe_name(node_path)
        nodes_dir = Path(nodes_dir)
        return cls(
            ca=Path(ca_dir) / CA_CERT_NAME,
            cert=nodes_dir / f"{stem}.pem",
            key=nodes_dir / f"{stem}.key",
        )

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA certificate, node certificate, node key) as PEM bytes."""
        return (
            _read(self.ca, "CA certificate"),
            _read(self.cert, "node certificate"),
            _read(self.key, "node key"),
        )

    def check_identity(self, node_path: str) -> None:
        """Refuse to start with a certificate that is not this node's or not from this CA.

        Checked locally so that a mix-up of files fails here with a plain message, instead of
        as a refusal or a handshake failure on the other end of the link.
        """
        ca, cert, _ = self.read()
        try:
            verify_node_cert(cert, ca, expected_path=node_path)
        except CertError as exc:
            raise LinkConfigError(
                f"TLS files for node {node_path!r} are not usable: {exc}"
            ) from exc


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Server side: present the node's certificate and require one from the federation CA."""
    ca, cert, key = tls.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Client side: trust only the federation CA, and present the node's own certificate."""
    ca, cert, key = tls.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def is_loopback(address: str) -> bool:
    """Whether a gRPC address (`host:port`, `[v6]:port`, optional scheme) is on this machine.

    Loopback means 127.0.0.0/8, ::1 or the name `localhost`. Anything unparsable, a wildcard
    such as 0.0.0.0, or a name that must be resolved, is not loopback.
    """
    host = _host_of(address)
    if host is None:
        return False
    if host.lower().removesuffix(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext_allowed(address: str, allow_plaintext: bool, what: str) -> None:
    """Raise `LinkConfigError` unless plaintext was asked for and `address` is loopback.

    `what` names the link in the message, e.g. "the link to the parent at 10.0.0.1:7000".
    """
    if not allow_plaintext:
        raise LinkConfigError(
            f"no TLS files were given for {what}; pass TlsFiles, or pass allow_plaintext=True "
            "to use plaintext on a loopback address (tests only)"
        )
    if not is_loopback(address):
        raise LinkConfigError(
            f"plaintext refused for {address}: it is not a loopback address (127.0.0.0/8, "
            "::1, localhost); use TLS with TlsFiles for anything that leaves this machine"
        )


def _host_of(address: str) -> str | None:
    rest = address.strip()
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        if rest.startswith(scheme):
            rest = rest[len(scheme) :]
            break
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0 or not rest[end + 1 :].startswith(":"):
            return None
        return rest[1:end] or None
    host, sep, port = rest.rpartition(":")
    if not sep or not host or ":" in host or not port.isdigit():
        return None
    return host


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise LinkConfigError(
            f"{what} not found: {path}; create it with `worldlm certs` (ca, node or tree)"
        ) from exc
    except OSError as exc:
        raise LinkConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
