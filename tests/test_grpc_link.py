"""The gRPC parent-child link: real servers and clients on loopback, with a CA made per module."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import xxhash

from worldlm.errors import TransportError, WireError
from worldlm.security.certs import create_ca, issue_node_cert
from worldlm.transport.grpc import (
    ChildLink,
    ChunkError,
    HelloInfo,
    LinkConfigError,
    LinkDisconnected,
    LinkError,
    LinkTimeout,
    LinkUnreachable,
    ParentLinkServer,
    Reassembler,
    TlsFiles,
    is_loopback,
    split_payload,
)
from worldlm.transport.grpc.framing import (
    BadFrame,
    Chunk,
    Frame,
    attach_call,
    decode_frame,
    encode_frame,
)

PARENT = "world/eu"
CHILD_A = "world/eu/a"
CHILD_B = "world/eu/b"
STRANGER = "world/us/x"
KIB = 1 << 10
CHUNK = 64 * KIB


@dataclass(frozen=True)
class Pki:
    parent: TlsFiles
    a: TlsFiles
    b: TlsFiles
    stranger: TlsFiles  # valid certificate, but not a child of PARENT
    foreign_a: TlsFiles  # claims CHILD_A, issued by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    create_ca(root / "ca")
    create_ca(root / "foreign-ca", name="foreign CA")
    for path in (PARENT, CHILD_A, CHILD_B, STRANGER):
        issue_node_cert(root / "ca", path, root / "nodes")
    issue_node_cert(root / "foreign-ca", CHILD_A, root / "foreign-nodes")

    def files(path: str, nodes: str = "nodes") -> TlsFiles:
        return TlsFiles.for_node(root / "ca", root / nodes, path)

    foreign = TlsFiles.for_node(root / "foreign-ca", root / "foreign-nodes", CHILD_A)
    return Pki(
        parent=files(PARENT),
        a=files(CHILD_A),
        b=files(CHILD_B),
        stranger=files(STRANGER),
        foreign_a=TlsFiles(ca=files(CHILD_A).ca, cert=foreign.cert, key=foreign.key),
    )


def _serve(pki: Pki, address: str = "127.0.0.1:0") -> ParentLinkServer:
    return ParentLinkServer(address, PARENT, [CHILD_A, CHILD_B], pki.parent, chunk_bytes=CHUNK)


@pytest.fixture
def server(pki: Pki) -> Iterator[ParentLinkServer]:
    srv = _serve(pki)
    yield srv
    srv.stop(0)


@pytest.fixture
def child_a(pki: Pki, server: ParentLinkServer) -> Iterator[ChildLink]:
    link = ChildLink(
        server.address,
        CHILD_A,
        pki.a,
        run_id="r1",
        train_tokens=12345,
        resources={"gpus": 0, "available": True},
        chunk_bytes=CHUNK,
    )
    yield link
    link.close()


def _raw_attach(
    address: str, creds: grpc.ChannelCredentials, claimed_path: str, *then: Frame
) -> tuple[list[Frame], grpc.RpcError]:
    """Dial with plain gRPC (not ChildLink), as a misbehaving or foreign client would.

    Sends a Hello claiming `claimed_path`, then the frames `then`; returns what the parent sent
    back and the error status the stream ended with.
    """
    channel = grpc.secure_channel(address, creds)
    frames: list[Frame] = []
    try:
        hello = HelloInfo(node_path=claimed_path).to_frame()
        call = attach_call(channel)(iter([hello, *then]), timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            frames.extend(call)
        return frames, err.value
    finally:
        channel.close()


def _creds(files: TlsFiles, with_cert: bool = True) -> grpc.ChannelCredentials:
    ca = files.ca.read_bytes()
    if not with_cert:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )


# --- mutual TLS and admission ---------------------------------------------------------------


def test_valid_child_attaches_over_mutual_tls(server: ParentLinkServer, child_a: ChildLink):
    parent_hello = child_a.connect(timeout=5)
    assert parent_hello.node_path == PARENT
    assert child_a.connected and child_a.parent == parent_hello

    conn = server.wait_for_children([CHILD_A], timeout=5)[CHILD_A]
    assert conn.connected
    assert conn.info == HelloInfo(
        node_path=CHILD_A,
        run_id="r1",
        train_tokens=12345,
        resources={"gpus": 0, "available": True},
    )
    assert set(server.children()) == {CHILD_A}
    conn.send("ping", b"hello child")
    assert child_a.receive(timeout=5) == ("ping", b"hello child")


def test_client_without_certificate_cannot_attach(pki: Pki, server: ParentLinkServer):
    frames, err = _raw_attach(server.address, _creds(pki.a, with_cert=False), CHILD_A)
    assert frames == []
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert server.children() == {}


def test_certificate_from_a_foreign_ca_cannot_attach(pki: Pki, server: ParentLinkServer):
    # ChildLink refuses such files locally, before dialling ...
    with pytest.raises(LinkConfigError, match="not issued by"):
        ChildLink(server.address, CHILD_A, pki.foreign_a)
    # ... and a client that presents them anyway fails the TLS handshake at the parent.
    frames, err = _raw_attach(server.address, _creds(pki.foreign_a), CHILD_A)
    assert frames == []
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert server.children() == {}


def _expired_copy(cert: Path, ca_dir: Path, out: Path) -> Path:
    """The same certificate, re-signed by the CA with a validity that ended yesterday."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from worldlm.security.certs import CA_KEY_NAME

    original = x509.load_pem_x509_certificate(cert.read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY_NAME).read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(original.subject)
        .issuer_name(ca_cert.subject)
        .public_key(original.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now - timedelta(days=1))
    )
    for extension in original.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    out.write_bytes(
        builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]
    )
    return out


def test_expired_certificate_cannot_attach(pki: Pki, server: ParentLinkServer, tmp_path: Path):
    ca_dir = pki.a.ca.parent
    expired = TlsFiles(pki.a.ca, _expired_copy(pki.a.cert, ca_dir, tmp_path / "a.pem"), pki.a.key)
    with pytest.raises(LinkConfigError, match="expired"):
        ChildLink(server.address, CHILD_A, expired)
    frames, err = _raw_attach(server.address, _creds(expired), CHILD_A)
    assert frames == [] and err.code() == grpc.StatusCode.UNAVAILABLE
    assert server.children() == {}


def test_plaintext_client_cannot_attach_to_a_tls_parent(server: ParentLinkServer):
    channel = grpc.insecure_channel(server.address)
    try:
        call = attach_call(channel)(iter([HelloInfo(node_path=CHILD_A).to_frame()]), timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
    assert server.children() == {}


def test_hello_claiming_another_identity_is_refused(
    pki: Pki, server: ParentLinkServer, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING, logger="worldlm.transport.grpc.server"):
        frames, err = _raw_attach(server.address, _creds(pki.a), claimed_path=CHILD_B)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [f.WhichOneof("body") for f in frames] == ["refusal"]
    reason = frames[0].refusal.reason
    assert f"certificate identity {CHILD_A!r}" in reason and repr(CHILD_B) in reason
    assert err.details() == reason
    assert reason in caplog.text
    assert server.children() == {}


def test_node_that_is_not_a_child_is_refused(pki: Pki, server: ParentLinkServer):
    # A ChildLink of STRANGER pins its own parent (world/us) and would not even finish the
    # handshake here: the parent's own refusal is what a client that skips that check meets.
    frames, err = _raw_attach(server.address, _creds(pki.stranger), STRANGER)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [f.WhichOneof("body") for f in frames] == ["refusal"]
    assert "is not a child of 'world/eu'" in frames[0].refusal.reason
    assert STRANGER in frames[0].refusal.reason
    link = ChildLink(server.address, STRANGER, pki.stranger)
    try:
        with pytest.raises(LinkUnreachable):  # its parent is world/us: this is not it
            link.connect(timeout=3)
    finally:
        link.close()
    assert server.children() == {}


def test_reconnecting_child_replaces_its_old_stream(pki: Pki, server: ParentLinkServer):
    first = ChildLink(server.address, CHILD_A, pki.a, chunk_bytes=CHUNK)
    second = ChildLink(server.address, CHILD_A, pki.a, chunk_bytes=CHUNK)
    try:
        first.connect(timeout=5)
        old = server.wait_for_children([CHILD_A], timeout=5)[CHILD_A]
        second.connect(timeout=5)
        deadline = time.monotonic() + 5
        while server.children().get(CHILD_A) is old and time.monotonic() < deadline:
            time.sleep(0.01)
        new = server.children()[CHILD_A]
        assert new is not old and new.connected
        assert not old.connected and "replaced" in (old.close_reason or "")
        with pytest.raises(LinkDisconnected, match="replaced"):
            old.receive(timeout=1)
        new.send("task", b"for the new stream")
        assert second.receive(timeout=5) == ("task", b"for the new stream")
    finally:
        first.close()
        second.close()


def test_oversized_message_from_a_child_closes_its_stream(pki: Pki):
    srv = ParentLinkServer("127.0.0.1:0", PARENT, [CHILD_A], pki.parent, max_message_bytes=KIB)
    try:
        huge = Chunk(message_id=1, seq=0, kind="update", total_bytes=1 << 40, data=b"x")
        frames, err = _raw_attach(srv.address, _creds(pki.a), CHILD_A, huge)
        assert [f.hello.node_path for f in frames] == [PARENT]  # accepted, then cut off
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "declares 1099511627776 bytes, above the limit of 1024" in err.details()
    finally:
        srv.stop(0)


def test_peer_that_never_says_hello_is_cut_off(pki: Pki):
    srv = ParentLinkServer("127.0.0.1:0", PARENT, [CHILD_A], pki.parent, hello_timeout=0.3)
    channel = grpc.secure_channel(srv.address, _creds(pki.a))
    silence = threading.Event()

    def nothing() -> Iterator[Frame]:
        silence.wait(10)
        yield from ()

    try:
        call = attach_call(channel)(nothing(), timeout=5)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED
        assert time.monotonic() - start < 3
    finally:
        silence.set()
        channel.close()
        srv.stop(0)


def test_bad_server_settings_fail_at_construction(pki: Pki, server: ParentLinkServer):
    with pytest.raises(LinkConfigError, match="cannot listen on"):
        _serve(pki, server.address)  # the port is taken: no silent sharing via SO_REUSEPORT
    with pytest.raises(LinkConfigError, match="not direct children"):
        ParentLinkServer("127.0.0.1:0", PARENT, [STRANGER], pki.parent)
    with pytest.raises(LinkConfigError, match="invalid chunk size"):
        ParentLinkServer("127.0.0.1:0", PARENT, [CHILD_A], pki.parent, chunk_bytes=0)
    with pytest.raises(LinkConfigError, match="not usable"):
        ParentLinkServer("127.0.0.1:0", PARENT, [CHILD_A], pki.a)  # the child's certificate


def test_wait_for_children_names_the_missing_ones(server: ParentLinkServer):
    with pytest.raises(LinkTimeout, match=CHILD_B):
        server.wait_for_children(timeout=0.2)
    with pytest.raises(LinkConfigError, match="not children"):
        server.wait_for_children([STRANGER], timeout=0.2)


# --- payloads -------------------------------------------------------------------------------


def test_5mb_round_trip_both_directions(server: ParentLinkServer, child_a: ChildLink):
    child_a.connect(timeout=5)
    conn = server.wait_for_children([CHILD_A], timeout=5)[CHILD_A]
    down = os.urandom(5_000_000)
    up = os.urandom(5_000_000 + 17)  # not a multiple of the chunk size

    sender = threading.Thread(target=conn.send, args=("model", down))
    sender.start()
    kind, got = child_a.receive(timeout=20)
    sender.join(timeout=20)
    assert kind == "model" and got == down

    child_a.send("update", up)
    kind, got = conn.receive(timeout=20)
    assert kind == "update" and got == up
    assert hashlib.sha256(got).digest() == hashlib.sha256(up).digest()

    child_a.send("empty", b"")
    assert conn.receive(timeout=5) == ("empty", b"")


def test_receive_times_out_without_breaking_the_link(server: ParentLinkServer, child_a: ChildLink):
    child_a.connect(timeout=5)
    conn = server.wait_for_children([CHILD_A], timeout=5)[CHILD_A]
    with pytest.raises(LinkTimeout):
        conn.receive(timeout=0.1)
    with pytest.raises(TimeoutError):  # LinkTimeout is also the builtin TimeoutError
        child_a.receive(timeout=0.1)
    child_a.send("still", b"alive")
    assert conn.receive(timeout=5) == ("still", b"alive")


# --- plaintext ------------------------------------------------------------------------------


def test_plaintext_is_refused_off_loopback():
    with pytest.raises(LinkConfigError, match=r"plaintext refused for 10\.1\.2\.3:50051"):
        ChildLink("10.1.2.3:50051", CHILD_A, None, allow_plaintext=True)
    with pytest.raises(LinkConfigError, match=r"plaintext refused for 0\.0\.0\.0:0"):
        ParentLinkServer("0.0.0.0:0", PARENT, [CHILD_A], None, allow_plaintext=True)
    with pytest.raises(LinkConfigError, match="allow_plaintext=True"):
        ChildLink("127.0.0.1:50051", CHILD_A, None)
    assert is_loopback("127.0.0.1:1") and is_loopback("127.9.9.9:1")
    assert is_loopback("[::1]:1") and is_loopback("localhost:1")
    assert not is_loopback("10.0.0.1:1") and not is_loopback("[::]:1")
    assert not is_loopback("example.org:1") and not is_loopback("127.0.0.1")


def test_plaintext_on_loopback_works_when_allowed():
    srv = ParentLinkServer("127.0.0.1:0", PARENT, [CHILD_A], None, allow_plaintext=True)
    link = ChildLink(srv.address, CHILD_A, None, allow_plaintext=True)
    try:
        link.connect(timeout=5)
        conn = srv.wait_for_children(timeout=5)[CHILD_A]
        link.send("hi", b"plain")
        assert conn.receive(timeout=5) == ("hi", b"plain")
    finally:
        link.close()
        srv.stop(0)


# --- reconnecting ---------------------------------------------------------------------------


def test_child_reconnects_with_backoff_after_parent_restart(pki: Pki):
    first = _serve(pki)
    port = first.port
    link = ChildLink(first.address, CHILD_A, pki.a, chunk_bytes=CHUNK)
    restarted: list[ParentLinkServer] = []
    try:
        link.connect(timeout=5)
        first.wait_for_children([CHILD_A], timeout=5)[CHILD_A].send("round", b"1")
        assert link.receive(timeout=5) == ("round", b"1")

        first.stop(grace=2)  # with a grace period the child is told why
        with pytest.raises(LinkDisconnected, match="shutting down"):
            link.receive(timeout=5)
        assert not link.connected

        def restart() -> None:
            time.sleep(0.6)
            restarted.append(_serve(pki, f"127.0.0.1:{port}"))

        thread = threading.Thread(target=restart)
        thread.start()
        attempts = link.connect_with_backoff(max_wait=15, initial_delay=0.05, max_delay=0.3)
        thread.join()
        assert attempts > 1
        conn = restarted[0].wait_for_children([CHILD_A], timeout=5)[CHILD_A]
        link.send("round", b"2")
        assert conn.receive(timeout=5) == ("round", b"2")
    finally:
        link.close()
        for srv in restarted:
            srv.stop(0)


def test_backoff_gives_up_with_a_clear_error(pki: Pki):
    # A port that was just bound and released: nothing listens there.
    probe = _serve(pki)
    address = probe.address
    probe.stop(0)
    link = ChildLink(address, CHILD_A, pki.a)
    start = time.monotonic()
    with pytest.raises(LinkUnreachable, match=r"gave up after \d+ attempts") as err:
        link.connect_with_backoff(max_wait=1.0, initial_delay=0.05, max_delay=0.2)
    assert time.monotonic() - start < 4
    assert isinstance(err.value, TransportError)
    link.close()


# --- chunking, without a network ------------------------------------------------------------


def _chunks(payload: bytes, chunk_bytes: int = CHUNK, message_id: int = 1) -> list[Chunk]:
    return list(split_payload(message_id, "blob", payload, chunk_bytes))


def test_split_payload_frames():
    payload = os.urandom(3 * CHUNK + 5)
    chunks = _chunks(payload)
    assert [c.seq for c in chunks] == [0, 1, 2, 3]
    assert chunks[0].kind == "blob" and chunks[0].total_bytes == len(payload)
    assert all(not c.kind and not c.total_bytes for c in chunks[1:])
    assert [c.last for c in chunks] == [False, False, False, True]
    assert chunks[-1].xxh3_128 == xxhash.xxh3_128_hexdigest(payload)
    assert max(len(c.data) for c in chunks) == CHUNK
    assert b"".join(c.data for c in chunks) == payload


def test_a_payload_in_several_buffers_travels_as_one():
    parts = [os.urandom(n) for n in (10, CHUNK - 3, 0, 2 * CHUNK + 7, 1)]
    whole = b"".join(parts)
    chunks = list(split_payload(1, "blob", [memoryview(p) for p in parts], CHUNK))
    assert [len(c.data) for c in chunks] == [CHUNK, CHUNK, CHUNK, len(whole) - 3 * CHUNK]
    assert b"".join(c.data for c in chunks) == whole
    assert chunks[-1].xxh3_128 == xxhash.xxh3_128_hexdigest(whole)
    r = Reassembler()
    message = [r.feed(c) for c in chunks][-1]
    assert message is not None and bytes(message.payload) == whole
    assert not message.payload.readonly  # tensors may be built over it without a copy


def test_reassembler_round_trip_and_message_order():
    r = Reassembler(max_message_bytes=1 << 20)
    for message_id, payload in ((1, os.urandom(200_000)), (2, b"")):
        results = [r.feed(c) for c in _chunks(payload, message_id=message_id)]
        assert results[:-1] == [None] * (len(results) - 1)
        done = results[-1]
        assert done is not None and done.payload == payload and done.message_id == message_id
    with pytest.raises(ChunkError, match="ids must increase"):
        r.feed(_chunks(b"replayed", message_id=2)[0])


def test_declared_size_above_limit_is_refused_before_allocation():
    r = Reassembler(max_message_bytes=1 << 20)
    first = Chunk(message_id=1, seq=0, kind="model", total_bytes=1 << 62, data=b"x")
    with pytest.raises(ChunkError, match=r"declares 4611686018427387904 bytes, above the limit"):
        r.feed(first)
    assert r.in_progress is None  # nothing of the message was kept


def test_sizes_above_2_gib_are_representable_without_allocating():
    big = 5 << 30
    frame = Chunk(message_id=1, seq=0, kind="model", total_bytes=big)
    decoded = decode_frame(encode_frame(frame))
    assert isinstance(decoded, Chunk) and decoded.total_bytes == big
    r = Reassembler(max_message_bytes=8 << 30)
    first = Chunk(message_id=1, seq=0, kind="model", total_bytes=big, data=b"abc")
    assert r.feed(first) is None
    assert r.in_progress == ("model", big, 3)


def test_corrupted_chunk_fails_the_digest():
    payload = os.urandom(200_000)
    chunks = _chunks(payload)
    data = bytearray(chunks[1].data)
    data[100] ^= 0xFF
    chunks[1].data = bytes(data)
    r = Reassembler()
    for chunk in chunks[:-1]:
        assert r.feed(chunk) is None
    with pytest.raises(ChunkError, match="failed its digest") as err:
        r.feed(chunks[-1])
    assert isinstance(err.value, WireError)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda cs: cs.pop(1), "expected chunk 1, got chunk 2"),
        (lambda cs: setattr(cs[0], "total_bytes", cs[0].total_bytes - 1), "declared"),
        (lambda cs: setattr(cs[0], "total_bytes", cs[0].total_bytes + 1), "ended after"),
        (lambda cs: setattr(cs[-1], "xxh3_128", ""), "no valid xxh3_128"),
        (lambda cs: setattr(cs[2], "message_id", 9), "must not interleave"),
    ],
)
def test_reassembler_refuses_malformed_streams(mutate, message):
    chunks = _chunks(os.urandom(3 * CHUNK + 1))
    mutate(chunks)
    r = Reassembler()
    with pytest.raises(ChunkError, match=message):
        for chunk in chunks:
            r.feed(chunk)


def test_chunk_frames_round_trip_raw_and_garbage_is_named():
    chunk = Chunk(7, 3, b"payload bytes", True, "", 0, "ab" * 16)
    decoded = decode_frame(encode_frame(chunk))
    assert isinstance(decoded, Chunk)
    assert (decoded.message_id, decoded.seq, decoded.last, decoded.xxh3_128) == (
        7,
        3,
        True,
        "ab" * 16,
    )
    assert bytes(decoded.data) == b"payload bytes"
    hello = HelloInfo(node_path=CHILD_A).to_frame()
    assert decode_frame(encode_frame(hello)) == hello
    for raw, reason in (
        (b"", "unknown tag"),
        (b"Xabc", "unknown tag"),
        (b"Cshort", "shorter than its header"),
        (encode_frame(chunk)[:26], "does not fit"),
        (b"P\xff\xff\xff", "not valid protobuf"),
    ):
        bad = decode_frame(raw)
        assert isinstance(bad, BadFrame) and reason in bad.reason, (raw, bad)


def test_a_garbage_frame_after_the_handshake_closes_the_stream_with_its_reason(
    pki: Pki, server: ParentLinkServer
):
    channel = grpc.secure_channel(server.address, _creds(pki.a))
    try:
        call = channel.stream_stream("/worldlm.link.Link/Attach")(
            iter([b"P" + HelloInfo(node_path=CHILD_A).to_frame().SerializeToString(), b"Zjunk"]),
            timeout=5,
        )
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown tag" in err.value.details()
    finally:
        channel.close()


# --- issue 19: a leaf's certificate cannot pose as a parent ---------------------------------


@pytest.mark.parametrize("b_hosts", [(), ("localhost", "127.0.0.1")], ids=["leaf", "shared"])
def test_a_sibling_leaf_certificate_cannot_serve_as_the_parent(
    tmp_path: Path, b_hosts: tuple[str, ...]
) -> None:
    """`certs tree` gives leaves no host names (they only dial out), so the TLS handshake fails
    when a sibling leaf serves on the parent's address with its own certificate. With the host
    names every node used to get, the child's handshake with the impostor succeeds."""
    from concurrent.futures import ThreadPoolExecutor

    create_ca(tmp_path / "ca")
    issue_node_cert(tmp_path / "ca", CHILD_A, tmp_path / "nodes")
    issue_node_cert(tmp_path / "ca", CHILD_B, tmp_path / "nodes", hosts=b_hosts)
    a_files, b_files = (
        TlsFiles.for_node(tmp_path / "ca", tmp_path / "nodes", p) for p in (CHILD_A, CHILD_B)
    )
    impostor = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = impostor.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(b_files.key.read_bytes(), b_files.cert.read_bytes())],
            root_certificates=b_files.ca.read_bytes(),
            require_client_auth=True,
        ),
    )
    impostor.start()
    channel = grpc.secure_channel(f"127.0.0.1:{port}", _creds(a_files))
    try:
        ready = grpc.channel_ready_future(channel)
        if b_hosts:
            ready.result(timeout=5)  # the attack: the child's TLS accepts the impostor
        else:
            with pytest.raises(grpc.FutureTimeoutError):
                ready.result(timeout=3)
    finally:
        channel.close()
        impostor.stop(0)


def test_a_sibling_aggregator_certificate_cannot_serve_as_the_parent(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every certificate carries its node's identity host name, and a child checks its parent's
    (whatever address it dials): an aggregator elsewhere in the tree, with the same dial names
    (localhost), that serves on the parent's address and claims its path is refused. Checked by
    the address alone, as before, the child attaches to it."""
    from worldlm.transport.grpc import client as client_module

    impostor_files = TlsFiles(ca=pki.parent.ca, cert=pki.stranger.cert, key=pki.stranger.key)
    # A modified server: it skips the local check that its certificate is the parent's.
    monkeypatch.setattr(TlsFiles, "check_identity", lambda self, path: None)
    impostor = ParentLinkServer("127.0.0.1:0", PARENT, [CHILD_A], impostor_files, chunk_bytes=CHUNK)
    try:
        link = ChildLink(impostor.address, CHILD_A, pki.a, chunk_bytes=CHUNK)
        with pytest.raises(LinkUnreachable, match="must hold a certificate issued for"):
            link.connect(timeout=3)
        link.close()
        monkeypatch.setattr(client_module, "identity_host", lambda path: "localhost")
        undefended = ChildLink(impostor.address, CHILD_A, pki.a, chunk_bytes=CHUNK)
        assert undefended.connect(timeout=5).node_path == PARENT  # the attack succeeds
        undefended.close()
    finally:
        impostor.stop(0)


def test_the_real_parent_is_attached_to_by_its_identity(
    pki: Pki, server: ParentLinkServer, child_a: ChildLink
) -> None:
    assert child_a.connect(timeout=5).node_path == PARENT


def test_a_parent_that_names_another_node_in_its_hello_is_refused(
    pki: Pki, server: ParentLinkServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent whose Hello names a node other than the child's parent (as a modified server
    could, whatever its certificate) is not attached to."""
    from dataclasses import replace

    parse = HelloInfo.from_proto

    def forged(hello: object) -> HelloInfo:
        info = parse(hello)  # type: ignore[arg-type]
        return replace(info, node_path="world/us") if info.node_path == PARENT else info

    monkeypatch.setattr(HelloInfo, "from_proto", staticmethod(forged))
    link = ChildLink(server.address, CHILD_A, pki.a, chunk_bytes=CHUNK)
    try:
        with pytest.raises(LinkError, match="says it is 'world/us', not 'world/eu'"):
            link.connect(timeout=5)
    finally:
        link.close()
