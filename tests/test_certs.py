"""The development CA: certificates round-trip, bind identities, and refuse what they should."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from worldlm.errors import WorldLMError
from worldlm.security.certs import (
    CaFiles,
    CertError,
    NodeFiles,
    create_ca,
    identity_host,
    issue_node_cert,
    node_identity,
    verify_node_cert,
)

NODE = "world/eu/paris"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CaFiles, NodeFiles]:
    """One CA and one node certificate, shared by the read-only tests to keep the file fast."""
    root = tmp_path_factory.mktemp("pki")
    ca = create_ca(root / "ca")
    node = issue_node_cert(root / "ca", NODE, root / "nodes")
    return ca, node


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_round_trip_writes_files_and_verifies(pki: tuple[CaFiles, NodeFiles]) -> None:
    ca, node = pki
    assert ca.cert.name == "ca.pem" and ca.key.name == "ca.key"
    assert node.cert.name == "world__eu__paris.pem"
    assert node.key.name == "world__eu__paris.key"
    assert node.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    cert_pem, ca_pem = node.cert.read_bytes(), ca.cert.read_bytes()
    assert verify_node_cert(cert_pem, ca_pem) == NODE
    assert verify_node_cert(cert_pem, ca_pem, expected_path=NODE) == NODE
    assert node_identity(cert_pem) == NODE


def test_ca_extensions(pki: tuple[CaFiles, NodeFiles]) -> None:
    ca = _load(pki[0].cert)
    assert ca.issuer == ca.subject
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_node_extensions(pki: tuple[CaFiles, NodeFiles]) -> None:
    ca, cert = _load(pki[0].cert), _load(pki[1].cert)
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == NODE
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", identity_host(NODE)]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"worldlm://node/{NODE}"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    cert.verify_directly_issued_by(ca)


def test_custom_hosts_go_into_san(tmp_path: Path, pki: tuple[CaFiles, NodeFiles]) -> None:
    node = issue_node_cert(
        pki[0].cert.parent, "world/us", tmp_path, hosts=["agg.example.org", "10.0.0.7", "::1"]
    )
    san = _load(node.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["agg.example.org", identity_host("world/us")]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]
    assert node_identity(node.cert.read_bytes()) == "world/us"


def test_key_files_are_private(pki: tuple[CaFiles, NodeFiles]) -> None:
    ca, node = pki
    assert stat.S_IMODE(ca.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(node.key.stat().st_mode) == 0o600


def test_certs_work_for_mutual_tls(pki: tuple[CaFiles, NodeFiles], tmp_path: Path) -> None:
    """A real TLS 1.3 handshake, both sides authenticated, over in-memory buffers (no sockets)."""
    ca, server_files = pki
    client_files = issue_node_cert(ca.cert.parent, "world/eu/paris/leaf-1", tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the server's hostname too
    for ctx, files in ((server_ctx, server_files), (client_ctx, client_files)):
        ctx.load_cert_chain(files.cert, files.key)
        ctx.load_verify_locations(ca.cert)
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    done = {"server": False, "client": False}
    for _ in range(10):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    client.write(b"ping")  # the server only sees the client cert once it reads application data
    s_in.write(c_out.read())
    assert server.read() == b"ping"
    peer = server.getpeercert(binary_form=True)
    assert peer is not None
    peer_pem = ssl.DER_cert_to_PEM_cert(peer).encode()
    assert verify_node_cert(peer_pem, ca.cert.read_bytes()) == "world/eu/paris/leaf-1"


def test_foreign_ca_is_rejected(tmp_path: Path, pki: tuple[CaFiles, NodeFiles]) -> None:
    other = create_ca(tmp_path / "other")  # same default name: only the signature differs
    with pytest.raises(CertError, match="not issued by"):
        verify_node_cert(pki[1].cert.read_bytes(), other.cert.read_bytes())
    renamed = create_ca(tmp_path / "renamed", name="someone else's CA")
    with pytest.raises(CertError, match="not issued by"):
        verify_node_cert(pki[1].cert.read_bytes(), renamed.cert.read_bytes())


def test_wrong_identity_names_both_paths(pki: tuple[CaFiles, NodeFiles]) -> None:
    ca, node = pki
    with pytest.raises(CertError) as info:
        verify_node_cert(node.cert.read_bytes(), ca.cert.read_bytes(), expected_path="world/us")
    assert "'world/us'" in str(info.value) and f"'{NODE}'" in str(info.value)


def test_expired_cert_is_rejected(tmp_path: Path, pki: tuple[CaFiles, NodeFiles]) -> None:
    node = issue_node_cert(pki[0].cert.parent, "world/short", tmp_path, days=1)
    ca_pem, cert_pem = pki[0].cert.read_bytes(), node.cert.read_bytes()
    now = datetime.now(UTC)
    assert verify_node_cert(cert_pem, ca_pem, now=now) == "world/short"
    with pytest.raises(CertError, match="expired"):
        verify_node_cert(cert_pem, ca_pem, now=now + timedelta(days=2))
    with pytest.raises(CertError, match="not valid yet"):
        verify_node_cert(cert_pem, ca_pem, now=now - timedelta(days=1))
    with pytest.raises(CertError, match="timezone-aware"):
        verify_node_cert(cert_pem, ca_pem, now=datetime.now())


def test_overwrite_needs_force(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca")
    before = issue_node_cert(tmp_path / "ca", "world/old", tmp_path / "n")
    with pytest.raises(CertError, match=r"refusing to overwrite.*ca\.pem.*force=True"):
        create_ca(tmp_path / "ca")
    old_ca = ca.cert.read_bytes()
    assert create_ca(tmp_path / "ca", force=True) == ca
    assert ca.cert.read_bytes() != old_ca
    assert stat.S_IMODE(ca.key.stat().st_mode) == 0o600
    with pytest.raises(CertError, match="not issued by"):  # the replaced CA's nodes are orphaned
        verify_node_cert(before.cert.read_bytes(), ca.cert.read_bytes())

    node = issue_node_cert(tmp_path / "ca", "world/a", tmp_path / "n")
    with pytest.raises(CertError, match=r"refusing to overwrite.*world__a\.pem"):
        issue_node_cert(tmp_path / "ca", "world/a", tmp_path / "n")
    old_node = node.cert.read_bytes()
    assert issue_node_cert(tmp_path / "ca", "world/a", tmp_path / "n", force=True) == node
    assert node.cert.read_bytes() != old_node
    assert verify_node_cert(node.cert.read_bytes(), ca.cert.read_bytes()) == "world/a"
    assert not [p for d in ("ca", "n") for p in (tmp_path / d).glob(".*")]  # no temp files left


@pytest.mark.parametrize(
    "bad", ["", "/abs", "a//b", "a/../b", "a b", "a__b", "a/", "./a", "é", "a" * 65]
)
def test_invalid_node_paths_are_rejected(bad: str, pki: tuple[CaFiles, NodeFiles]) -> None:
    out = pki[1].cert.parent
    with pytest.raises(CertError, match="invalid node path") as info:
        issue_node_cert(pki[0].cert.parent, bad, out)
    assert "separated by single '/'" in str(info.value)  # the rule is explained
    assert isinstance(info.value, WorldLMError)


def test_missing_ca_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CertError, match=r"CA certificate not found: .*ca\.pem"):
        issue_node_cert(tmp_path / "nowhere", NODE, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_identity_requires_exactly_one_node_uri(pki: tuple[CaFiles, NodeFiles]) -> None:
    with pytest.raises(CertError, match="names no worldlm node"):
        node_identity(pki[0].cert.read_bytes())  # the CA cert has no SAN
    with pytest.raises(CertError, match=r"not a PEM X\.509 certificate"):
        node_identity(b"not a certificate")


def test_invalid_hosts_and_days_are_rejected(
    tmp_path: Path, pki: tuple[CaFiles, NodeFiles]
) -> None:
    with pytest.raises(CertError, match="invalid host"):
        issue_node_cert(pki[0].cert.parent, NODE, tmp_path, hosts=["bad host"])
    with pytest.raises(CertError, match="days"):
        issue_node_cert(pki[0].cert.parent, NODE, tmp_path, days=0)
    assert list(tmp_path.iterdir()) == []


def test_certs_tree_command_issues_one_certificate_per_node(tmp_path: Path) -> None:
    from worldlm.cli import main

    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    config = tmp_path / "c.toml"
    config.write_text(
        '[nodes.w]\n[nodes."w/eu"]\n[nodes."w/eu/a"]\ndata = { paths = ["a.txt"] }\n',
        encoding="utf-8",
    )
    pki = tmp_path / "pki"
    assert main(["certs", "tree", str(config), "--out", str(pki)]) == 0
    ca_pem = (pki / "ca.pem").read_bytes()
    for path in ("w", "w/eu", "w/eu/a"):
        pem = (pki / (path.replace("/", "__") + ".pem")).read_bytes()
        assert verify_node_cert(pem, ca_pem, expected_path=path) == path
    assert main(["certs", "tree", str(config), "--out", str(pki)]) == 2  # no silent overwrite
    # Host names go to aggregators only (PATH=NAME for one of them); a leaf only dials out.
    hosts = ["--host", "root.example", "--host", "w/eu=eu.example", "--force"]
    assert main(["certs", "tree", str(config), "--out", str(pki), *hosts]) == 0

    def dns_names(path: str) -> list[str]:
        cert = x509.load_pem_x509_certificate(
            (pki / (path.replace("/", "__") + ".pem")).read_bytes()
        )
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
        assert names[-1] == identity_host(path)  # what its children pin it by
        return names[:-1]

    assert dns_names("w") == ["root.example"] and dns_names("w/eu") == ["eu.example"]
    assert dns_names("w/eu/a") == []
    assert (
        main(["certs", "tree", str(config), "--out", str(pki), "--host", "w/x=h", "--force"]) == 2
    )
