"""A worker's Kafka TCP listener: non-blocking sockets on the worker's own zmq.Poller.

No thread and no process per connection: the worker loop polls the listening socket and
every connection next to its ZeroMQ sockets, and calls `on_events` with what is ready.
Each connection handles one request at a time, in order, as a Kafka broker does (the
next frame waits while a response is deferred: acks=-1 until the group commit, a Fetch
long poll), so responses go out in request order without any reordering.

A malformed frame (size, api key, version, truncated or malformed body) closes its
connection: the stream cannot be resynchronised. It is counted in
kafka_frames_invalid_total{reason}; nothing else is affected.
"""

from __future__ import annotations

import logging
import socket

import zmq

from ingest.net.kafka import codec
from ingest.net.kafka.schema import ApiKey
from ingest.shards.kafka_api import NO_RESPONSE, UNSUPPORTED_VERSION, Deferred, KafkaApi
from ingest.shards.kafka_groups import GroupOffsetsApi
from ingest.shards.kafka_membership import Membership

log = logging.getLogger("ingest.kafka")

RECV_BYTES = 256 << 10
# Reads per connection per loop turn: bounds how long one fast client holds the loop.
RECVS_PER_TURN = 16
# Requests read ahead of the one being handled; past it the connection is not read until
# they are answered (Kafka clients keep at most 5 in flight by default).
QUEUED_REQUESTS_MAX = 32
# Response bytes waiting for a slow reader; past it no further request is handled.
OUTPUT_BYTES_MAX = 32 << 20
LISTEN_BACKLOG = 128


class Connection:
    __slots__ = ("sock", "fd", "peer", "reader", "queued", "out", "deferred", "events")

    def __init__(self, sock: socket.socket, peer) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.reader = codec.FrameReader()
        self.queued: list[bytes] = []
        self.out = bytearray()
        self.deferred: tuple[int, int, int, Deferred] | None = None  # api, version, correlation id
        self.events = 0


class KafkaListener:
    def __init__(self, worker) -> None:
        self.w = worker
        self.config = worker.config.kafka
        self.api = KafkaApi(worker)
        self.groups = GroupOffsetsApi(worker)
        self.api.handlers |= {ApiKey.FIND_COORDINATOR: self.groups.find_coordinator,
                              ApiKey.OFFSET_COMMIT: self.groups.offset_commit,
                              ApiKey.OFFSET_FETCH: self.groups.offset_fetch}
        self.membership = Membership(worker, self.groups.refusal)
        self.api.handlers |= {ApiKey.JOIN_GROUP: self.membership.join, ApiKey.SYNC_GROUP: self.membership.sync,
                              ApiKey.HEARTBEAT: self.membership.heartbeat, ApiKey.LEAVE_GROUP: self.membership.leave}
        self.conns: dict[int, Connection] = {}
        self.waiting: set[Connection] = set()  # connections with a deferred response
        port = self.config.worker_port(worker.worker_id)
        self.sock = socket.create_server((worker.config.server.bind, port), backlog=LISTEN_BACKLOG, reuse_port=False)
        self.sock.setblocking(False)
        worker.poller.register(self.sock.fileno(), zmq.POLLIN)
        # Every family exists from the start at 0, so rates and alerts see a first sample.
        for reason in ("size", "api_key", "version", "truncated", "malformed"):
            worker.probe.count("kafka_frames_invalid_total", 0, reason=reason)
        worker.probe.count("kafka_connections_total", 0)
        worker.probe.count("kafka_connections_refused_total", 0)
        log.info("worker %d: Kafka listener on port %d", worker.worker_id, port)

    # ---- events --------------------------------------------------------------------------

    def on_events(self, events: dict) -> None:
        self.groups.peers.on_events(events)
        if self.sock.fileno() in events:
            self._accept()
        # Only the sockets with events: a turn costs nothing per idle connection.
        for fd, ev in list(events.items()):
            conn = self.conns.get(fd)
            if conn is None:
                continue
            if ev & zmq.POLLIN:
                self._read(conn)
            if fd in self.conns and ev & (zmq.POLLOUT | zmq.POLLERR):
                self._write(conn)

    def pump(self, t_ms: int) -> None:
        """Answer deferred requests that became ready, then handle what queued behind them."""
        for conn in list(self.waiting):
            if conn.deferred is not None and conn.fd in self.conns:
                api_key, version, correlation_id, deferred = conn.deferred
                body = deferred.poll(t_ms)
                if body is None:
                    continue
                conn.deferred = None
                self.waiting.discard(conn)
                self._respond(conn, api_key, version, correlation_id, body)
                self._handle_queued(conn)
                if conn.fd in self.conns:
                    self._write(conn)

    def wait_ms(self, t_ms: int, idle_ms: int) -> int:
        deadlines = [c.deferred[3].deadline_ms for c in self.waiting
                     if c.deferred is not None and c.deferred[3].deadline_ms is not None]
        return max(0, min(deadlines) - t_ms) if deadlines else idle_ms

    # ---- sockets -------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: try again on the next turn
                log.warning("kafka accept: %s", e)
                return
            if len(self.conns) >= self.config.connections_max:
                self.w.probe.count("kafka_connections_refused_total")
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, peer)
            self.conns[conn.fd] = conn
            self._set_events(conn)
            self.w.probe.count("kafka_connections_total")

    def _set_events(self, conn: Connection) -> None:
        want = 0
        if len(conn.queued) < QUEUED_REQUESTS_MAX and len(conn.out) < OUTPUT_BYTES_MAX:
            want |= zmq.POLLIN
        if conn.out:
            want |= zmq.POLLOUT
        if want != conn.events:
            self.w.poller.register(conn.fd, want)  # register() again modifies the flags
            conn.events = want

    def _read(self, conn: Connection) -> None:
        for _ in range(RECVS_PER_TURN):
            try:
                data = conn.sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn)
                return
            if not data:
                self._close(conn)
                return
            try:
                conn.queued += conn.reader.feed(data)
            except codec.KafkaProtocolError as e:
                self._refuse(conn, e)
                return
            if len(conn.queued) >= QUEUED_REQUESTS_MAX:
                break
        self._handle_queued(conn)
        if conn.fd in self.conns:
            self._write(conn)

    def _write(self, conn: Connection) -> None:
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
                del conn.out[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._close(conn)
                return
            if conn.queued and conn.deferred is None:  # held back by a full output buffer
                self._handle_queued(conn)
                if conn.fd not in self.conns:
                    return
        self._set_events(conn)

    def _close(self, conn: Connection) -> None:
        self.conns.pop(conn.fd, None)
        self.waiting.discard(conn)
        try:
            self.w.poller.unregister(conn.fd)
        except KeyError:
            pass
        conn.sock.close()

    def _refuse(self, conn: Connection, error: codec.KafkaProtocolError) -> None:
        self.w.probe.count("kafka_frames_invalid_total", reason=error.reason)
        log.warning("kafka client %s: %s; closing the connection", conn.peer, error)
        self._close(conn)

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._write(conn)  # best effort: what is ready goes out, deferred ones are dropped
            self._close(conn)
        self.w.poller.unregister(self.sock.fileno())
        self.sock.close()
        self.groups.peers.close()

    # ---- requests ------------------------------------------------------------------------

    def _handle_queued(self, conn: Connection) -> None:
        while conn.queued and conn.deferred is None and len(conn.out) < OUTPUT_BYTES_MAX and conn.fd in self.conns:
            frame = conn.queued.pop(0)
            try:
                self._handle(conn, frame)
            except codec.KafkaProtocolError as e:
                self._refuse(conn, e)
                return

    def _handle(self, conn: Connection, frame: bytes) -> None:
        header, pos = codec.decode_header(frame)
        if header.api_key == ApiKey.API_VERSIONS and not self.api.served(header.api_key, header.api_version):
            # Kafka's answer to a newer client: error 35 and the supported versions in a
            # v0 body, so that the client retries with a version both sides know.
            conn.out += codec.encode_response(ApiKey.API_VERSIONS, 0, header.correlation_id,
                                              self.api.api_versions_body(UNSUPPORTED_VERSION))
            return
        if header.api_key not in self.api.handlers:
            raise codec.KafkaProtocolError("api_key", f"api key {header.api_key} is not served")
        if not self.api.served(header.api_key, header.api_version):
            raise codec.KafkaProtocolError("version", f"api key {header.api_key} version "
                                                      f"{header.api_version} is not served")
        _, body = codec.decode_request(frame)
        self.w.probe.count("kafka_requests_total", api=ApiKey(header.api_key).name.lower())
        try:
            result = self.api.handlers[header.api_key](header.api_version, body)
        except Exception:  # a bug costs this connection, never the worker and its partitions
            log.exception("kafka %s request failed", ApiKey(header.api_key).name)
            self._close(conn)
            return
        if result is NO_RESPONSE:
            return
        if isinstance(result, Deferred):
            conn.deferred = (header.api_key, header.api_version, header.correlation_id, result)
            self.waiting.add(conn)
            return
        self._respond(conn, header.api_key, header.api_version, header.correlation_id, result)

    def _respond(self, conn: Connection, api_key: int, version: int, correlation_id: int, body: dict) -> None:
        conn.out += codec.encode_response(api_key, version, correlation_id, body)
