"""The parent's side of the link: a gRPC server its children dial into.

Children dial their parent because organisations behind firewalls can only dial out. Each child
holds one long-lived `Attach` stream. The parent admits a stream only if its first frame is a
Hello whose node path equals the identity in the child's certificate *and* is one of this
parent's children: TLS proves the peer holds a key the federation CA vouched for, and only this
check proves that it is the node it claims to be, in the right place in the tree.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from worldlm.security.certs import CertError, node_identity, validate_node_path
from worldlm.transport.grpc import link_pb2
from worldlm.transport.grpc.admission import DEFAULT_HELD_MESSAGES, ReceiveGate
from worldlm.transport.grpc.chunking import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES
from worldlm.transport.grpc.connection import ChildConnection
from worldlm.transport.grpc.endpoint import Endpoint
from worldlm.transport.grpc.errors import HelloError, LinkConfigError, LinkTimeout
from worldlm.transport.grpc.framing import Frame, attach_handler, frame_body
from worldlm.transport.grpc.hello import HelloInfo
from worldlm.transport.grpc.options import check_limits, server_options
from worldlm.transport.grpc.tls import TlsFiles, check_plaintext_allowed, server_credentials

log = logging.getLogger(__name__)

# After a stream is closed, its handler gets this long to send the final status before the
# call is cancelled outright (it may be stuck sending to a child that stopped reading).
_CANCEL_GRACE_S = 2.0


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ParentLinkServer:
    """Serves `Link` for the parent `node_path` and the given child paths; starts at once.

    `address` is `host:port`; port 0 picks a free port, see `port` and `address`. Without
    `tls`, plaintext is used only if `allow_plaintext` and the address is loopback (then the
    Hello's node path cannot be checked against a certificate). A non-empty `run_id` refuses
    children of another run. `held_messages` bounds the messages held from all children at
    once (`gate`, admission.py); the one the round waits for next is always let in.
    """

    def __init__(
        self,
        address: str,
        node_path: str,
        children: Iterable[str],
        tls: TlsFiles | None,
        *,
        allow_plaintext: bool = False,
        run_id: str = "",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        inbox_messages: int = 2,
        hello_timeout: float = 10.0,
        held_messages: int = DEFAULT_HELD_MESSAGES,
    ) -> None:
        self.node_path = _valid_path(node_path, "parent")
        self.child_paths = frozenset(_valid_path(c, "child") for c in children)
        if not self.child_paths:
            raise LinkConfigError(f"parent {node_path!r} was given no children to serve")
        strays = sorted(c for c in self.child_paths if c.rpartition("/")[0] != node_path)
        if strays:
            raise LinkConfigError(
                f"{', '.join(map(repr, strays))} are not direct children of {node_path!r}"
            )
        check_limits(chunk_bytes, max_message_bytes, inbox_messages)
        if not hello_timeout > 0:
            raise LinkConfigError(f"hello_timeout must be > 0 seconds, got {hello_timeout!r}")
        self._chunk_bytes = chunk_bytes
        self._max_message_bytes = max_message_bytes
        self._inbox_messages = inbox_messages
        # Messages held from all children at once, whatever their number (admission.py).
        self.gate = ReceiveGate(held_messages)
        self._hello_timeout = hello_timeout
        self._run_id = run_id
        self._tls = tls
        if tls is None:
            check_plaintext_allowed(address, allow_plaintext, f"the parent server on {address}")
            log.warning("parent %s serves plaintext on %s (loopback only)", node_path, address)
        else:
            tls.check_identity(node_path)
        self._ack = HelloInfo(node_path=node_path, run_id=run_id).to_frame()
        self._cond = threading.Condition()
        self._connections: dict[str, ChildConnection] = {}
        self._endpoints: dict[str, Endpoint] = {}  # the same streams, for closing with a status
        self._stopped = False

        # Every attached child holds one handler thread for its stream's lifetime; the spare
        # room lets a restarted child attach while its old stream is still being torn down.
        workers = 2 * len(self.child_paths) + 2
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="link-server")
        self._server = grpc.server(
            self._pool,
            options=server_options(self._chunk_bytes),
            maximum_concurrent_rpcs=workers,
        )
        self._server.add_generic_rpc_handlers((attach_handler(self._attach),))
        try:
            if tls is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, server_credentials(tls))
        except RuntimeError as exc:
            self._pool.shutdown(wait=False)
            raise LinkConfigError(
                f"parent {node_path!r} cannot listen on {address}: {exc} (is the port in use?)"
            ) from exc
        self.address = f"{address.rpartition(':')[0]}:{self.port}"
        self._server.start()
        log.info(
            "parent %s listening on %s for %d children",
            node_path,
            self.address,
            len(self.child_paths),
        )

    def __enter__(self) -> ParentLinkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the parent's API ------------------------------------------------------------------

    def children(self) -> dict[str, ChildConnection]:
        """The children attached right now, by path."""
        with self._cond:
            return {p: c for p, c in self._connections.items() if c.connected}

    def wait_for_children(
        self, paths: Iterable[str] | None = None, timeout: float | None = 30.0
    ) -> dict[str, ChildConnection]:
        """Wait until all `paths` (default: every child) are attached; return their links.

        Raises `LinkTimeout` naming the children still missing after `timeout` seconds.
        """
        wanted = set(self.child_paths if paths is None else paths)
        unknown = wanted - self.child_paths
        if unknown:
            raise LinkConfigError(
                f"{', '.join(sorted(map(repr, unknown)))} are not children of {self.node_path!r}"
            )

        def attached() -> bool:
            return all(p in self._connections and self._connections[p].connected for p in wanted)

        with self._cond:
            if not self._cond.wait_for(attached, timeout):
                missing = sorted(p for p in wanted if p not in self.children())
                raise LinkTimeout(
                    f"parent {self.node_path!r}: children {', '.join(missing)} did not attach "
                    f"within {timeout}s"
                )
            return {p: self._connections[p] for p in sorted(wanted)}

    def stop(self, grace: float | None = 1.0) -> None:
        """Close every child stream (they see UNAVAILABLE and may retry), then stop serving.

        Streams end at once; `grace` only bounds how long their final status may take to be
        sent. With `grace=0` children may just see their calls cancelled, without the reason.
        """
        with self._cond:
            self._stopped = True
            connections = list(self._connections.values())
        for conn in connections:
            conn.close(f"parent {self.node_path!r} is shutting down")
        self._server.stop(grace).wait()
        self._pool.shutdown(wait=False)
        log.info("parent %s stopped serving on %s", self.node_path, self.address)

    # --- stream handling -------------------------------------------------------------------

    def _attach(self, requests: Iterator[Frame], context: grpc.ServicerContext) -> Iterator[Frame]:
        peer = context.peer()
        if self._stopped:
            # UNAVAILABLE, not a refusal: the child should retry once the parent is back.
            context.abort(
                grpc.StatusCode.UNAVAILABLE, f"parent {self.node_path!r} is shutting down"
            )
        first = self._first_frame(requests, context, peer)
        if first is None:
            return
        try:
            info = self._admit(first, context)
        except _Refused as refused:
            log.warning("parent %s refused %s: %s", self.node_path, peer, refused.reason)
            yield link_pb2.Frame(refusal=link_pb2.Refusal(reason=refused.reason))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, refused.reason)
            return

        endpoint = Endpoint(
            f"child {info.node_path!r}",
            chunk_bytes=self._chunk_bytes,
            max_message_bytes=self._max_message_bytes,
            inbox_messages=self._inbox_messages,
            on_close=lambda: _cancel_later(context),
            gate=self.gate,
            gate_key=info.node_path,
        )
        self._register(ChildConnection(info, endpoint), endpoint)
        context.add_callback(
            lambda: endpoint.close(
                f"child {info.node_path!r} disconnected", grpc.StatusCode.CANCELLED
            )
        )
        threading.Thread(
            target=endpoint.pump,
            args=(requests,),
            name=f"link-reader-{info.node_path}",
            daemon=True,
        ).start()
        yield from endpoint.frames(first=self._ack)
        context.abort(endpoint.close_code, endpoint.close_reason or "the link closed")

    def _first_frame(
        self, requests: Iterator[Frame], context: grpc.ServicerContext, peer: str
    ) -> Frame | None:
        # A peer that passed TLS but never speaks would otherwise hold a worker thread forever.
        timer = threading.Timer(self._hello_timeout, context.cancel)
        timer.daemon = True
        timer.start()
        try:
            return next(requests, None)
        except grpc.RpcError:
            log.warning(
                "parent %s: %s sent no Hello within %ss", self.node_path, peer, self._hello_timeout
            )
            return None
        finally:
            timer.cancel()

    def _admit(self, first: Frame, context: grpc.ServicerContext) -> HelloInfo:
        if not isinstance(first, link_pb2.Frame) or frame_body(first) != "hello":
            got = frame_body(first) or "an empty frame"
            raise _Refused(f"the first frame must be a Hello, got {got}")
        try:
            info = HelloInfo.from_proto(first.hello)
        except HelloError as exc:
            raise _Refused(str(exc)) from exc
        if self._tls is not None:
            identity = _certificate_identity(context)
            if identity != info.node_path:
                raise _Refused(
                    f"certificate identity {identity!r} does not match the Hello's node_path "
                    f"{info.node_path!r}"
                )
        if info.node_path not in self.child_paths:
            raise _Refused(
                f"{info.node_path!r} is not a child of {self.node_path!r} (its children are "
                f"{', '.join(sorted(self.child_paths))})"
            )
        if self._run_id and info.run_id != self._run_id:
            raise _Refused(
                f"{info.node_path!r} belongs to run {info.run_id!r}, but this parent serves run "
                f"{self._run_id!r}"
            )
        return info

    def _register(self, conn: ChildConnection, endpoint: Endpoint) -> None:
        with self._cond:
            old = self._endpoints.get(conn.path)
            self._connections[conn.path] = conn
            self._endpoints[conn.path] = endpoint
            self._cond.notify_all()
        if old is not None and old.connected:
            log.info(
                "parent %s: %s reconnected; its old stream is closed", self.node_path, conn.path
            )
            # ABORTED rather than UNAVAILABLE: the old stream must not be retried as is.
            old.close(
                f"replaced by a newer connection from {conn.path!r} (a restarted child?)",
                grpc.StatusCode.ABORTED,
            )
        else:
            log.info("parent %s: %s attached", self.node_path, conn.path)


def _certificate_identity(context: grpc.ServicerContext) -> str:
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        raise _Refused("the connection presented no client certificate")
    try:
        return node_identity(pems[0])
    except CertError as exc:
        raise _Refused(f"the client certificate names no node: {exc}") from exc


def _cancel_later(context: grpc.ServicerContext) -> None:
    timer = threading.Timer(_CANCEL_GRACE_S, context.cancel)
    timer.daemon = True
    timer.start()


def _valid_path(path: str, role: str) -> str:
    try:
        return validate_node_path(path)
    except CertError as exc:
        raise LinkConfigError(f"invalid {role} path: {exc}") from exc
