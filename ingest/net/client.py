"""Client connections: the bootstrap client and one link per worker (sockets live here).

- ``BootstrapClient``: METADATA, CREATE_TOPIC and PING to the supervisor's bootstrap
  endpoint, one request at a time, with a timeout and a clear error when nothing answers.
  Safe to share between threads (a lock serialises its one socket).
- ``Metadata``: the METADATA document, parsed: topics and their partition counts, worker
  endpoints, and which worker owns a partition (``p % worker_count``).
- ``WorkerLink``: one DEALER socket to one worker's request endpoint, with correlation ids,
  a bounded window of requests in flight, and a socket monitor so that a dropped connection
  (worker killed, restarted by the supervisor) is noticed at once instead of after a
  timeout. A link belongs to one thread (ZeroMQ sockets are not thread-safe): the
  producer's I/O thread, or the thread that uses a consumer.

The codec is ``ingest.net.wire``; nothing here builds frames by hand.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

from ingest.net import wire
from ingest.security import ClientCurve
from ingest.net.errors import ErrorCode, IngestError, WireError

DEFAULT_BOOTSTRAP = "tcp://127.0.0.1:7400"
# A bootstrap request is a dictionary lookup on the supervisor: a healthy appliance
# answers in about a millisecond; seconds of silence mean it is not there.
BOOTSTRAP_TIMEOUT_MS = 5_000
# Requests one link keeps in flight to its worker: enough to cover the group-commit wait
# of acks=fsync (five partitions' worth of five batches each, plus fetches), small enough
# that one client cannot fill a worker's ROUTER queue (router_rcvhwm 10,000).
REQUESTS_IN_FLIGHT_MAX = 32
# ZeroMQ reconnects a dropped link on its own; a restarted worker binds again within a
# few hundred milliseconds, so poll for it often at first, and at most every second.
RECONNECT_IVL_MS = 50
RECONNECT_IVL_MAX_MS = 1_000
# Retries of a failed request back off from the first to the max, doubling.
RETRY_BACKOFF_FIRST_MS = 20
RETRY_BACKOFF_MAX_MS = 1_000
# Metadata is asked for again at most this often, however many errors call for it.
METADATA_REFRESH_MIN_INTERVAL_MS = 500
# Errors after which a request is simply tried again later (with fresh metadata).
RETRIABLE = frozenset(code for code in ErrorCode if code.retriable) | {
    ErrorCode.UNKNOWN_TOPIC_OR_PARTITION}  # a new topic reaches the workers a moment after it is created
# Correlation ids are u32 on the wire; a link's counter wraps there.
CORRELATION_ID_MODULUS = 1 << 32
# Replies at least this large (fetched records) are decoded in place from ZeroMQ's message
# instead of being copied into a bytes object first; below it a copy is cheaper than the
# Frame object that keeps the message alive. pyzmq's own copy threshold is 64 KiB too.
REPLY_ZERO_COPY_BYTES_MIN = 1 << 16
_MONITOR_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED


class UnreachableError(IngestError):
    """Nothing answered at ``endpoint`` within the timeout: the appliance is not running
    there, or not reachable from here."""

    def __init__(self, endpoint: str, timeout_ms: int) -> None:
        super().__init__(ErrorCode.TIMEOUT, f"no reply from {endpoint} within {timeout_ms} ms")
        self.endpoint = endpoint

    def __str__(self) -> str:
        return (f"{self.message}: is `ingest serve` running there? "
                f"(check with `ingest status --bootstrap {self.endpoint}`)")


def configure(sock: zmq.Socket) -> zmq.Socket:
    """Options every client socket shares: never block close, bound frame size."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    return sock


# ---------------------------------------------------------------------------------------
# Metadata


@dataclass(frozen=True, slots=True)
class Metadata:
    """The parts of the METADATA document a client acts on (unknown keys are ignored)."""

    document: dict
    worker_count: int
    routers: tuple[str, ...]      # request endpoint (ROUTER) of worker i
    pulls: tuple[str, ...]        # fire-and-forget endpoint (PULL) of worker i
    up: tuple[bool, ...]
    topics: dict[str, int]        # topic -> partition count
    auto_create_topics: bool
    default_partitions: int       # partitions of a topic created without a count

    def owner(self, partition: int) -> int:
        """The worker that owns ``partition`` of every topic."""
        return partition % self.worker_count

    @classmethod
    def parse(cls, document: Any) -> Metadata:
        try:
            workers = sorted(document["workers"], key=lambda w: int(w["id"]))
            count = int(document.get("worker_count", len(workers)))
            if count < 1 or [int(w["id"]) for w in workers] != list(range(count)):
                raise ValueError(f"worker ids {[w.get('id') for w in workers]} are not 0..{count - 1}")
            topics = {str(name): int(t["partitions"]) for name, t in document["topics"].items()}
            return cls(document, count, tuple(str(w["router"]) for w in workers),
                       tuple(str(w["pull"]) for w in workers),
                       tuple(bool(w.get("up", True)) for w in workers), topics,
                       bool(document.get("auto_create_topics", True)),
                       int(document.get("default_partitions") or count))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise IngestError(ErrorCode.CORRUPT_MESSAGE,
                              f"METADATA document is not usable: {error!r}") from None


# ---------------------------------------------------------------------------------------
# Bootstrap


class BootstrapClient:
    """Synchronous requests to the supervisor's bootstrap endpoint.

    Each call sends one request and waits up to ``timeout_ms`` for its reply; silence
    raises UnreachableError, an error reply raises IngestError with its code.

    ``bootstrap`` may list several appliances of a replicated set, comma-separated
    (Kafka's bootstrap.servers): ``metadata()`` then asks each and answers with the
    document of the leader of the newest leader epoch, and later requests go to it. So a
    client follows a promotion through metadata.
    """

    def __init__(self, bootstrap: str = DEFAULT_BOOTSTRAP, timeout_ms: int = BOOTSTRAP_TIMEOUT_MS,
                 context: zmq.Context | None = None, curve: ClientCurve | None = None) -> None:
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be > 0, not {timeout_ms}")
        self.endpoint = bootstrap
        self._endpoints = [e.strip() for e in bootstrap.split(",") if e.strip()] or [bootstrap]
        self._current = self._endpoints[0]
        self.timeout_ms = timeout_ms
        self._own_context = context is None
        self._context = context or zmq.Context()
        if curve is not None:
            curve.apply(self._context)
        self._lock = threading.Lock()
        self._correlation_ids = itertools.count(1)
        self._socket: zmq.Socket | None = None

    def __enter__(self) -> BootstrapClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def metadata(self) -> dict:
        """The appliance's metadata document (see docs/PROTOCOL.md, section 1); of the
        current leader when several appliances are listed."""
        if len(self._endpoints) == 1:
            return self.request(wire.MetadataRequest()).document
        best, unreachable = None, None
        for endpoint in self._endpoints:
            self._use(endpoint)
            try:
                document = self.request(wire.MetadataRequest()).document
            except UnreachableError as error:
                unreachable = error
                continue
            rank = _leader_rank(document)
            if best is None or rank > best[0]:
                best = (rank, endpoint, document)
        if best is None:
            raise unreachable
        self._use(best[1])
        return best[2]

    def _use(self, endpoint: str) -> None:
        with self._lock:
            if endpoint != self._current and self._socket is not None:
                self._socket.close()
                self._socket = None
            self._current = endpoint

    def create_topic(self, topic: str, partitions: int | None = None,
                     config: dict | None = None) -> dict:
        """Create ``topic`` (``partitions`` None: the appliance's default count); returns
        the reply document, which holds the metadata with the topic in it. Creating a
        topic that exists with the same count is not an error."""
        if partitions is None or len(self._endpoints) > 1:  # metadata() picks the leader
            metadata = Metadata.parse(self.metadata())
            partitions = partitions or metadata.default_partitions
        return self.request(wire.CreateTopicRequest(topic, partitions, config or {})).document

    def ping(self) -> float:
        """Round-trip time to the supervisor in milliseconds."""
        started = time.perf_counter()
        self.request(wire.PingRequest())
        return (time.perf_counter() - started) * 1000

    def request(self, message) -> Any:
        """Send ``message`` (its correlation id is replaced) and return the reply."""
        with self._lock:
            correlation_id = next(self._correlation_ids) % CORRELATION_ID_MODULUS
            frame = dataclasses.replace(message, correlation_id=correlation_id).encode()
            sock = self._connected()
            sock.send(frame)
            reply = self._await_reply(sock, correlation_id)
        if isinstance(reply, wire.ErrorReply):
            raise reply.exception()
        return reply

    def _connected(self) -> zmq.Socket:
        if self._socket is None:
            self._socket = configure(self._context.socket(zmq.DEALER))
            self._socket.connect(self._current)
        return self._socket

    def _await_reply(self, sock: zmq.Socket, correlation_id: int):
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms):
                # A reply could still arrive later and be taken for the next request's:
                # start over on a fresh socket.
                sock.close()
                self._socket = None
                raise UnreachableError(self._current, self.timeout_ms)
            try:
                reply = wire.decode_reply(sock.recv())
            except WireError:
                continue  # not a reply of this protocol: keep waiting for ours
            if reply.correlation_id == correlation_id:
                return reply

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
            if self._own_context:
                self._context.term()
                self._own_context = False


def _leader_rank(document: dict) -> tuple[int, int]:
    """Orders METADATA documents: a leader before a follower, then the newer epoch.
    An appliance without replication counts as a leader of epoch 0."""
    replication = document.get("replication") or {}
    is_leader = replication.get("role", "leader") == "leader"
    return (1 if is_leader else 0, int(replication.get("leader_epoch", 0)))


# ---------------------------------------------------------------------------------------
# Worker links


class WorkerLink:
    """A DEALER to one worker's request endpoint: requests in flight by correlation id.

    ``send`` refuses (returns False) when the window is full or the worker is not
    connected: the socket sets ZMQ_IMMEDIATE, so nothing is queued for a worker that is
    down, and nothing stale is delivered after it comes back. ``lost()`` reports a dropped
    connection; then ``reset()`` opens a fresh socket and hands back every request that was
    in flight, which may or may not have been served.
    """

    def __init__(self, context: zmq.Context, worker_id: int, endpoint: str,
                 window: int = REQUESTS_IN_FLIGHT_MAX) -> None:
        self.context = context
        self.worker_id = worker_id
        self.endpoint = endpoint
        self.window = window
        self.inflight: dict[int, Any] = {}
        self.blocked = False  # the last send found no connected worker
        self._next_id = 1
        self._open()

    def _open(self) -> None:
        sock = configure(self.context.socket(zmq.DEALER))
        sock.setsockopt(zmq.IMMEDIATE, 1)
        self.monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        sock.connect(self.endpoint)
        self.socket = sock
        self.blocked = False

    @property
    def window_open(self) -> bool:
        return len(self.inflight) < self.window

    def correlation_id(self) -> int:
        correlation_id = self._next_id
        self._next_id = (self._next_id + 1) % CORRELATION_ID_MODULUS or 1
        return correlation_id

    def send(self, correlation_id: int, frame, request: Any) -> bool:
        """Queue ``frame``; ``request`` comes back with its reply. False: not sent."""
        if len(self.inflight) >= self.window:
            return False
        try:
            self.socket.send(frame, zmq.NOBLOCK, copy=len(frame) < 65536)
        except zmq.Again:
            self.blocked = True
            return False
        self.inflight[correlation_id] = request
        return True

    def replies(self) -> Iterator[tuple[Any, Any]]:
        """(request, decoded reply) for every reply waiting on the socket. Replies to
        requests no longer in flight (given up, reset) and undecodable frames are
        dropped."""
        recv = self.socket.recv
        while True:
            try:
                message = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            # A fetched chunk's records stay a view of the message: the consumer copies
            # them once, into the bytes its records are sliced from.
            frame = message.buffer if len(message) >= REPLY_ZERO_COPY_BYTES_MIN else message.bytes
            try:
                reply = wire.decode_reply(frame)
            except WireError:
                continue
            request = self.inflight.pop(reply.correlation_id, None)
            if request is not None:
                yield request, reply

    def lost(self) -> bool:
        """True if the monitor saw the connection drop since the last call."""
        dropped = False
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return dropped
            if event["event"] == zmq.EVENT_DISCONNECTED:
                dropped = True
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.blocked = False

    def forget(self, correlation_id: int) -> None:
        """Stop waiting for one request (its reply, if any, will be dropped)."""
        self.inflight.pop(correlation_id, None)

    def reset(self, endpoint: str | None = None) -> list[Any]:
        """Reconnect on a fresh socket; returns the requests that were in flight."""
        lost = list(self.inflight.values())
        self.inflight.clear()
        self._close_sockets()
        if endpoint is not None:
            self.endpoint = endpoint
        self._open()
        return lost

    def _close_sockets(self) -> None:
        try:
            self.socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close()
        self.socket.close()

    def close(self) -> None:
        self.inflight.clear()
        self._close_sockets()
