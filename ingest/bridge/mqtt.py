"""MQTT -> ingest: subscribe with QoS 1 in a persistent session, produce with acks=fsync,
and acknowledge each MQTT message only once ingest has it on disk.

Delivery contract. The broker keeps an MQTT message until the bridge sends its PUBACK, and
the bridge sends that PUBACK only after the appliance acked the record with acks=fsync
(the SDK's idempotent producer). The session is persistent (a fixed client id with
clean_session false in MQTT 3.1.1, clean_start false and a session expiry in MQTT 5), so
messages published while the bridge is down wait in the broker. Nothing is lost across a
bridge crash, restart or reconnection, provided the broker itself keeps them (its
`max_queued_messages` bounds how many it queues for an absent client).

It is at-least-once: a record stored in ingest whose PUBACK had not reached the broker
when the bridge died, or when its connection dropped, is delivered again by the broker
and stored again. Such redeliveries carry MQTT's dup flag, which the bridge copies into
the record header ``mqtt_dup`` so that consumers can tell them apart. The SDK producer
cannot dedupe them: its producer id and sequences do not outlive the bridge process.

PUBACKs go out in the order the messages arrived (MQTT requires it), so one slow partition
holds back the acks of the others; the broker's in-flight window (MQTT 5 Receive
Maximum, asked for by the bridge; `max_inflight_messages` for MQTT 3.1.1) bounds how many
messages wait. A PUBACK is never sent on a later connection than the one its message came
on: MQTT packet ids are reused, so a late ack could release another message.

Threads: paho's network thread runs the callbacks (on_message hands the record to the
producer, which does no I/O in send()); the caller's thread waits for ingest's acks in
arrival order and sends the PUBACKs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

log = logging.getLogger("ingest.bridge.mqtt")

# Messages received and not yet PUBACKed, at most (--pending-messages-max): the bound on
# the bridge's memory and on what a crash can make the broker deliver twice. Acks wait for
# an fsync (a few ms), so the window must cover a few ms of traffic: on 2 cores 1000
# drained a backlog 1.26x as fast as 200 with MQTT 5 (bench/RESULTS.md). MQTT 5 asks the broker
# for it (Receive Maximum); the bridge also enforces it itself, since a broker may not
# (mosquitto 2.0 sends MQTT 3.1.1 clients more than its max_inflight_messages once acks
# flow).
PENDING_MESSAGES_MAX_DEFAULT = 1000
RECEIVE_MAXIMUM_MAX = 65535  # MQTT 5: a two-byte field
# MQTT 5 session expiry: how long the broker keeps the session (subscriptions, queued
# messages) while the bridge is away. A week covers a long maintenance window; the
# broker's own limits (max_queued_messages, persistent_client_expiration) still apply.
SESSION_EXPIRY_S = 7 * 24 * 3600
KEEPALIVE_S = 30
# Reconnection backoff after the broker went away (paho doubles from min to max).
RECONNECT_DELAY_MIN_S = 1
RECONNECT_DELAY_MAX_S = 30
# How often the ack loop looks up from waiting on a future (to notice a stop request).
ACK_POLL_S = 0.1
# On a clean stop: how long to wait for ingest's acks of what was already handed over.
STOP_FLUSH_TIMEOUT_S = 30
MQTT_TOPIC_HEADER = "mqtt_topic"
MQTT_DUP_HEADER = "mqtt_dup"
MQTT_RETAIN_HEADER = "mqtt_retain"  # a retained message, sent by the broker on subscribing
KEY_FROM_CHOICES = "mqtt-topic, topic-level:N (1 = first level) or none"


class BridgeError(Exception):
    """The bridge cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class KeyMapping:
    """MQTT topic -> ingest record key. ``level`` 0: the whole MQTT topic; N > 0: its N-th
    level (``sensors/dev-42/temp`` with level 2 gives ``dev-42``); None: no key."""

    level: int | None

    @classmethod
    def parse(cls, text: str) -> KeyMapping:
        if text == "mqtt-topic":
            return cls(0)
        if text == "none":
            return cls(None)
        prefix = "topic-level:"
        if text.startswith(prefix) and text[len(prefix):].isdigit() and int(text[len(prefix):]) >= 1:
            return cls(int(text[len(prefix):]))
        raise BridgeError(f"--key-from {text!r}: use {KEY_FROM_CHOICES}")

    def key_of(self, mqtt_topic: str) -> bytes | None:
        """The key; None for no key or a topic with fewer levels than asked for (such a
        record goes to a rotating partition, its MQTT topic still in its headers)."""
        if self.level is None:
            return None
        if self.level == 0:
            return mqtt_topic.encode()
        levels = mqtt_topic.split("/")
        return levels[self.level - 1].encode() if self.level <= len(levels) else None


@dataclass(frozen=True)
class BridgeOptions:
    host: str
    port: int
    topic_filters: tuple[str, ...]
    ingest_topic: str
    keys: KeyMapping
    client_id: str
    mqtt_version: str = "5"  # or "3.1.1"
    username: str | None = None
    password: str | None = None
    pending_messages_max: int = PENDING_MESSAGES_MAX_DEFAULT

    def __post_init__(self) -> None:
        if not 1 <= self.pending_messages_max <= RECEIVE_MAXIMUM_MAX:
            raise BridgeError(f"--pending-messages-max {self.pending_messages_max}: use 1..{RECEIVE_MAXIMUM_MAX}")


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BridgeError(f"--broker {text!r}: use HOST:PORT, for example 127.0.0.1:1883")
    return host.strip("[]"), int(port)


def require_paho():
    """paho.mqtt.client, or BridgeError saying how to install it."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise BridgeError("the MQTT bridge needs paho-mqtt 2.x: pip install 'ingest[mqtt]'") from None
    if not hasattr(mqtt, "CallbackAPIVersion"):
        raise BridgeError("the MQTT bridge needs paho-mqtt 2.x (manual acks): pip install 'ingest[mqtt]'")
    return mqtt


class _Pending:
    __slots__ = ("connection", "mid", "qos", "future")

    def __init__(self, connection: int, mid: int, qos: int, future) -> None:
        self.connection, self.mid, self.qos, self.future = connection, mid, qos, future


class MqttBridge:
    """One MQTT session feeding one ingest producer. ``run()`` blocks until ``stop()``
    (clean: acks what ingest stored, disconnects, keeps the session) or a failure
    (BridgeError: nothing unstored was acked, the broker redelivers it next time)."""

    def __init__(self, options: BridgeOptions, producer) -> None:
        self.options = options
        self.producer = producer
        self._mqtt = require_paho()
        self._pending: deque[_Pending] = deque()
        self._wakeup = threading.Condition()
        self._lock = threading.Lock()  # connection state, against acks from the ack loop
        self._connection = 0  # incremented on every connect and disconnect
        self._connected = False
        self._stopping = threading.Event()
        self._failure: str | None = None
        self.received = self.redelivered = self.acked = 0
        self.client = self._make_client()

    # ---- the MQTT session -------------------------------------------------------------

    def _make_client(self):
        mqtt, o = self._mqtt, self.options
        v5 = o.mqtt_version == "5"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=o.client_id,
                             clean_session=None if v5 else False,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, manual_ack=True)
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        client.reconnect_delay_set(RECONNECT_DELAY_MIN_S, RECONNECT_DELAY_MAX_S)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect(self) -> None:
        o = self.options
        kwargs = {}
        if o.mqtt_version == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
            properties.ReceiveMaximum = o.pending_messages_max
            kwargs = {"clean_start": False, "properties": properties}
        try:
            self.client.connect(o.host, o.port, KEEPALIVE_S, **kwargs)
        except OSError as e:
            raise BridgeError(f"cannot reach the MQTT broker at {o.host}:{o.port}: {e}") from None

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._fail(f"the MQTT broker refused the connection: {reason_code}")
            return
        with self._lock:
            self._connection += 1
            self._connected = True
        log.info("connected to %s:%d as %r (session %s)", self.options.host, self.options.port,
                 self.options.client_id, "resumed" if flags.session_present else "new")
        # A resumed session has its subscriptions already; subscribing again covers a
        # session the broker expired and filters added to --topics since.
        client.subscribe(self._subscriptions())

    def _subscriptions(self) -> list:
        if self.options.mqtt_version != "5":
            # MQTT 3.1.1 brokers resend retained messages on every SUBSCRIBE: they are
            # stored again, marked with the mqtt_retain header.
            return [(f, 1) for f in self.options.topic_filters]
        from paho.mqtt.subscribeoptions import SubscribeOptions

        # Retained messages only for a new subscription, not again on each reconnect.
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        return [(f, options) for f in self.options.topic_filters]

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [f for f, code in zip(self.options.topic_filters, reason_codes) if code.is_failure]
        if refused:
            self._fail(f"the MQTT broker refused the subscription to {refused}")
            return
        log.info("subscribed to %s with QoS 1", ", ".join(self.options.topic_filters))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            self._connection += 1  # acks still pending belong to a dead connection
            self._connected = False
        if not self._stopping.is_set():
            log.warning("disconnected from the MQTT broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        if self._stopping.is_set():
            return  # not acked: the broker sends it again in the next session
        topic = message.topic
        headers = [(MQTT_TOPIC_HEADER, topic.encode())]
        if message.dup:
            headers.append((MQTT_DUP_HEADER, b"1"))
            self.redelivered += 1
        if message.retain:
            headers.append((MQTT_RETAIN_HEADER, b"1"))
        try:
            future = self.producer.send(self.options.ingest_topic, message.payload,
                                        key=self.options.keys.key_of(topic), headers=headers)
        except Exception as e:  # the producer refused (closed, buffer full): stop, unacked
            self._fail(f"ingest refused a record from {topic!r}: {e}")
            return
        self.received += 1
        with self._wakeup:
            self._pending.append(_Pending(self._connection, message.mid, message.qos, future))
            self._wakeup.notify_all()
            # Back-pressure: stop reading from the broker until acks catch up. The ack loop
            # only queues PUBACKs, so it never waits for this thread.
            while (len(self._pending) >= self.options.pending_messages_max
                   and not self._stopping.is_set()):
                self._wakeup.wait(ACK_POLL_S)

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
        self._stopping.set()
        with self._wakeup:
            self._wakeup.notify()

    # ---- acks in arrival order ----------------------------------------------------------

    def run(self) -> None:
        self._connect()
        self.client.loop_start()
        try:
            while not self._stopping.is_set():
                self._ack_head(ACK_POLL_S)
            if self._failure is None:
                self._ack_stored(time.monotonic() + STOP_FLUSH_TIMEOUT_S)
        finally:
            self.client.disconnect()  # queued PUBACKs go out before the DISCONNECT
            self.client.loop_stop()
            log.info("stopped: %d messages received (%d redelivered), %d acked after ingest "
                     "stored them", self.received, self.redelivered, self.acked)
        if self._failure is not None:
            raise BridgeError(self._failure)

    def stop(self) -> None:
        """Stop taking messages; run() acks what ingest stores in time and returns. Safe
        in a signal handler: it only sets a flag, which the ack loop polls."""
        self._stopping.set()

    def _ack_head(self, timeout_s: float) -> bool:
        """Waits up to timeout_s for the oldest message's ingest ack; PUBACKs it. False if
        there was nothing to ack in time."""
        with self._wakeup:
            if not self._pending:
                self._wakeup.wait(timeout_s)
                if not self._pending:
                    return False
            head = self._pending[0]
        try:
            head.future.result(timeout=timeout_s)
        except TimeoutError:
            return False
        except Exception as e:  # delivery failed for good: leave it to the broker
            self._fail(f"ingest did not store a record: {e}")
            return False
        stored = self._take_stored()
        with self._lock:
            for entry in stored:
                if entry.connection == self._connection and self._connected:
                    self.client.ack(entry.mid, entry.qos)
                    self.acked += 1
        return True

    def _take_stored(self) -> list[_Pending]:
        """Removes the oldest messages that ingest stored (the head is one), in order;
        stops at the first one still waiting or failed (its turn comes in _ack_head)."""
        taken = []
        with self._wakeup:
            while self._pending:
                head = self._pending[0]
                if not head.future.done() or head.future.exception(0) is not None:
                    break
                taken.append(self._pending.popleft())
            self._wakeup.notify_all()
        return taken

    def _ack_stored(self, deadline_s: float) -> None:
        """On a clean stop: flush the producer and ack everything ingest stores in time."""
        try:
            self.producer.flush(timeout=max(0.0, deadline_s - time.monotonic()))
        except TimeoutError:
            pass  # what is not stored by now stays unacked: the broker sends it again
        while self._pending and time.monotonic() < deadline_s:
            if not self._ack_head(ACK_POLL_S) and self._failure is not None:
                return
