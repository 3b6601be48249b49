"""`ingest bridge mqtt`: the command line of ingest.bridge.mqtt.

Imports paho-mqtt only when the command runs, so that `ingest` works without the `mqtt`
extra installed; without it the command says how to install it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys

# The MQTT password comes from the environment, not argv (which `ps` shows to everyone).
PASSWORD_ENV = "INGEST_MQTT_PASSWORD"
# A clean stop: ack what ingest stored, disconnect, keep the session.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def add_parsers(sub, client_parent) -> None:
    bridge = sub.add_parser("bridge", help="move records from another protocol into ingest")
    kinds = bridge.add_subparsers(dest="bridge", required=True)
    m = kinds.add_parser("mqtt", parents=[client_parent],
                         help="subscribe to an MQTT broker (QoS 1, persistent session) and produce "
                              "each message with acks=fsync, acked to the broker once stored")
    m.add_argument("--broker", required=True, help="HOST:PORT of the MQTT broker")
    m.add_argument("--topics", required=True, nargs="+", action="extend", metavar="FILTER",
                   help="MQTT topic filters to subscribe to, e.g. 'sensors/#'")
    m.add_argument("--topic", default="mqtt", help="the ingest topic to produce to (default: mqtt)")
    m.add_argument("--key-from", default="mqtt-topic",
                   help="record key: mqtt-topic (default), topic-level:N (the N-th level, 1 = first) or none")
    m.add_argument("--client-id", default=None,
                   help="MQTT client id; fixed, since it names the persistent session "
                        "(default: ingest-bridge-HOSTNAME)")
    m.add_argument("--mqtt-version", choices=["5", "3.1.1"], default="5")
    m.add_argument("--username", help=f"MQTT user name; the password is read from ${PASSWORD_ENV}")
    m.add_argument("--pending-messages-max", type=int, default=None,
                   help="messages received and not yet acked to the broker, at most (default 1000): "
                        "more drains faster, fewer bounds what a crash makes the broker send twice")
    m.set_defaults(func=cmd_bridge_mqtt)


def cmd_bridge_mqtt(args) -> int:
    from ingest import Producer
    from ingest.bridge.mqtt import (PENDING_MESSAGES_MAX_DEFAULT, BridgeError, BridgeOptions, KeyMapping,
                                    MqttBridge, parse_broker, require_paho)
    from ingest.cli import CliError, _curve

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s bridge %(levelname)s %(message)s")
    try:
        require_paho()  # before connecting to anything
        host, port = parse_broker(args.broker)
        options = BridgeOptions(host, port, tuple(args.topics), args.topic, KeyMapping.parse(args.key_from),
                                args.client_id or f"ingest-bridge-{socket.gethostname()}",
                                args.mqtt_version, args.username, os.environ.get(PASSWORD_ENV),
                                PENDING_MESSAGES_MAX_DEFAULT if args.pending_messages_max is None
                                else args.pending_messages_max)
        with Producer(args.bootstrap, acks="fsync", curve=_curve(args)) as producer:
            producer.partitions_for(options.ingest_topic)  # creates it now, or says why not
            bridge = MqttBridge(options, producer)
            previous = {sig: signal.signal(sig, lambda *_: bridge.stop()) for sig in STOP_SIGNALS}
            try:
                bridge.run()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    except BridgeError as e:
        raise CliError(str(e)) from None
    return 0
