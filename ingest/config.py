"""Appliance configuration: embedded defaults, an optional TOML file, CLI overrides.

Every quantity carries its unit in its name; config keys, CLI flags and metric names agree
(`flush_interval_ms` in TOML is `--flush-interval-ms` on the CLI).

Example (every key optional):

    [server]
    bind = "127.0.0.1"
    advertised_host = ""     # what metadata tells clients; default: bind, or hostname if 0.0.0.0
    port = 7400              # bootstrap; worker i uses port + 1 + 2*i (PULL), port + 2 + 2*i (ROUTER)
    metrics_port = 9740
    metrics_bind = "127.0.0.1"   # HTTP /metrics /healthz /readyz; "0.0.0.0" for a remote Prometheus
    data_dir = "./data"
    workers = "auto"         # or a number
    auto_create_topics = true
    default_partitions = 0   # 0 = one per worker

    [storage]
    segment_bytes = 268435456
    flush_interval_ms = 5

    [limits]
    max_record_bytes = 1048576
    topics_max = 256         # topics created at run time (CREATE_TOPIC, auto-create) stop here

    [security]
    curve = true             # encrypt and authenticate every connection (ZeroMQ CURVE)
    server_secret_key_file = "/etc/ingest/keys/appliance.key_secret"
    authorized_keys_dir = "/etc/ingest/keys/authorized"   # *.key of allowed clients

    [replication]            # peers to replicate with: see ingest/replication/settings.py
    role = "leader"
    peers = ["tcp://10.0.0.2:7400"]
    min_insync_replicas = 2

    [kafka]                  # Kafka wire protocol for kcat & co: see docs/KAFKA.md
    enabled = false
    port = 9092              # worker i listens on port + i (broker i in Kafka's Metadata)
    connections_max = 1000   # per worker

    [[topic]]
    name = "telemetry"
    partitions = 4
    raw_port = 7450          # optional: every frame on this port is one record value

    [[uplink]]               # forward topics to a Kafka cluster: see ingest/uplink/config.py
    name = "datacentre"
    bootstrap_servers = "kafka-1:9092"
    [[uplink.topic]]
    name = "telemetry"

    [[processor]]            # stream processing, topic to topic: see ingest/streams/spec.py
    name = "temp-1m"
    kind = "aggregate"
    source = "telemetry"
    sink = "telemetry-1m"
    fields = ["temp_c"]
    window_ms = 60000
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ingest.replication.settings import ReplicationConfig
from ingest.net.kafka.config import KafkaConfig
from ingest.security import SecurityConfig
from ingest.shards.log import LogConfig
from ingest.uplink.config import UplinkConfig, UplinkConfigError
from ingest.uplink.config import parse as parse_uplinks
from ingest.streams.spec import ProcessorConfig, ProcessorConfigError, parse_processors

WILDCARD_HOSTS = ("0.0.0.0", "*", "::")
TOPIC_NAME_RE = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")

# Kafka's own cap is far higher, but one appliance with more partitions than this spends
# its time on fsyncs and file handles rather than records.
PARTITIONS_MAX = 1024
WORKERS_MAX = 256


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and what is allowed."""


@dataclass(frozen=True, slots=True)
class TopicConfig:
    name: str
    partitions: int
    raw_port: int | None = None

    def __post_init__(self) -> None:
        if not TOPIC_NAME_RE.match(self.name) or self.name in (".", ".."):
            raise ConfigError(
                f"topic name {self.name!r} is invalid: use 1-249 characters of [a-zA-Z0-9._-]"
            )
        if not 1 <= self.partitions <= PARTITIONS_MAX:
            raise ConfigError(
                f"topic {self.name!r}: partitions must be 1..{PARTITIONS_MAX}, got {self.partitions}"
            )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    # A record bigger than this is refused with MESSAGE_TOO_LARGE: telemetry readings are
    # bytes to kilobytes; a megabyte is already a firmware image, not a reading.
    max_record_bytes: int = 1 << 20
    # Bytes a worker accepts for acked produce before they are fsynced and answered;
    # beyond it producers get THROTTLED. Bounds memory held by pending acks.
    inflight_bytes_max: int = 64 << 20
    # ZeroMQ high-water marks in messages: they bound the memory of queued frames per socket.
    pull_rcvhwm: int = 100_000
    router_rcvhwm: int = 10_000
    forward_sndhwm: int = 100_000
    # Topics the appliance creates at run time (CREATE_TOPIC, auto-create by PUSH) stop
    # at this many in all; topics declared in the config always exist. Every partition
    # holds open files, is fsynced on drain if written and is listed in every METADATA
    # answer and topic-table broadcast: without a bound, any client that can reach a
    # port (a fuzzer, a firmware bug naming topics by serial number) grows all of that
    # without end. Telemetry needs a handful of topics; raise it if you need more.
    topics_max: int = 256


@dataclass(frozen=True, slots=True)
class ServerConfig:
    bind: str = "127.0.0.1"
    advertised_host: str = ""  # what clients are told to connect to; "" = bind (or hostname)
    port: int = 7400
    metrics_port: int = 9740
    # /metrics, /healthz, /readyz: loopback unless asked, even when devices reach `bind`.
    metrics_bind: str = "127.0.0.1"
    data_dir: Path = Path("./data")
    workers: int = 0  # 0 = usable cores
    auto_create_topics: bool = True
    default_partitions: int = 0  # 0 = one per worker
    # A worker whose heartbeat is older than this is considered stalled: the systemd
    # watchdog is no longer petted. Must stay well below WatchdogSec.
    heartbeat_timeout_ms: int = 3000
    heartbeat_interval_ms: int = 500
    # Drain bound on SIGTERM; systemd's TimeoutStopSec must exceed it.
    shutdown_timeout_ms: int = 20_000


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: LogConfig = field(default_factory=LogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    topics: tuple[TopicConfig, ...] = ()
    security: SecurityConfig = field(default_factory=SecurityConfig)
    uplinks: tuple[UplinkConfig, ...] = ()  # [[uplink]]: see ingest/uplink/config.py
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)  # [kafka]: see docs/KAFKA.md

    processors: tuple[ProcessorConfig, ...] = ()  # [[processor]]: see ingest/streams/spec.py

    @property
    def worker_count(self) -> int:
        return self.server.workers or usable_cores()

    @property
    def partitions_default(self) -> int:
        return self.server.default_partitions or self.worker_count

    def worker_pull_port(self, worker_id: int) -> int:
        return self.server.port + 1 + 2 * worker_id

    def worker_router_port(self, worker_id: int) -> int:
        return self.server.port + 2 + 2 * worker_id

    def endpoint(self, port: int) -> str:
        """Where the appliance binds `port`."""
        return f"tcp://{self.server.bind}:{port}"

    def advertised_host(self) -> str:
        """What clients connect to (metadata, banner): advertised_host if set, else the
        bind address, or this machine's name when bound to every interface."""
        host = self.server.advertised_host or self.server.bind
        return socket.gethostname() if host in WILDCARD_HOSTS else host

    def advertised_endpoint(self, port: int) -> str:
        return f"tcp://{self.advertised_host()}:{port}"

    def local_endpoint(self, port: int) -> str:
        """Where another process of this appliance connects to `port` (same machine)."""
        host = "127.0.0.1" if self.server.bind in WILDCARD_HOSTS else self.server.bind
        return f"tcp://{host}:{port}"

    def to_dict(self) -> dict:
        """A JSON-able form, used to hand the exact config to worker processes."""
        return dataclasses.asdict(self) | {"server": _server_dict(self.server)}


def _server_dict(server: ServerConfig) -> dict:
    return dataclasses.asdict(server) | {"data_dir": str(server.data_dir)}


def usable_cores() -> int:
    """Cores this process may run on (affinity), not the machine's total."""
    try:
        return max(1, len(psutil.Process().cpu_affinity()))
    except (AttributeError, NotImplementedError):
        return max(1, os.cpu_count() or 1)


def _build(cls, table: dict, section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"[{section}]: unknown key(s) {', '.join(unknown)}")
    try:
        return cls(**table)
    except (TypeError, ValueError) as e:  # ValueError includes the storage's InvalidConfigError
        raise ConfigError(f"[{section}]: {e}") from None


def from_dict(doc: dict) -> Config:
    doc = dict(doc)
    unknown = sorted(set(doc) - {"server", "storage", "limits", "topic", "topics", "security", "uplink", "uplinks",
                                 "processor", "processors", "replication", "kafka"})
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}")
    server = dict(doc.get("server", {}))
    if "data_dir" in server:
        server["data_dir"] = Path(server["data_dir"])
    if server.get("workers") == "auto":
        server["workers"] = 0
    topics = doc.get("topic", doc.get("topics", []))
    config = Config(
        server=_build(ServerConfig, server, "server"),
        storage=_build(LogConfig, dict(doc.get("storage", {})), "storage"),
        limits=_build(LimitsConfig, dict(doc.get("limits", {})), "limits"),
        topics=tuple(_build(TopicConfig, dict(t), "topic") for t in topics),
        security=_build(SecurityConfig, dict(doc.get("security", {})), "security"),
        uplinks=_uplinks(doc.get("uplink", doc.get("uplinks", []))),
        processors=_processors(doc.get("processor", doc.get("processors", [])), topics),
        replication=_build(ReplicationConfig, dict(doc.get("replication", {})), "replication"),
        kafka=_build(KafkaConfig, dict(doc.get("kafka", {})), "kafka"),
    )
    validate(config)
    return config


def _uplinks(tables: list[dict]) -> tuple[UplinkConfig, ...]:
    try:
        return parse_uplinks(tables)
    except UplinkConfigError as e:
        raise ConfigError(str(e)) from None


def _processors(tables: list[dict], topics: list[dict]) -> tuple[ProcessorConfig, ...]:
    try:
        return parse_processors([dict(t) for t in tables], {t.get("name"): t.get("partitions") for t in topics})
    except ProcessorConfigError as e:
        raise ConfigError(str(e)) from None


def validate(config: Config) -> None:
    s = config.server
    if not 0 <= s.workers <= WORKERS_MAX:
        raise ConfigError(f"[server] workers must be 'auto' or 1..{WORKERS_MAX}, got {s.workers}")
    for name, port in (("port", s.port), ("metrics_port", s.metrics_port)):
        if not 0 < port < 65536:
            raise ConfigError(f"[server] {name} must be 1..65535, got {port}")
    if config.limits.topics_max < 1:
        raise ConfigError(f"[limits] topics_max must be at least 1, got {config.limits.topics_max}")
    if config.limits.max_record_bytes > config.storage.max_batch_bytes:
        raise ConfigError("[limits] max_record_bytes must not exceed [storage] max_batch_bytes")
    names = [t.name for t in config.topics]
    if len(set(names)) != len(names):
        raise ConfigError("a topic is declared twice")
    raw_ports = [t.raw_port for t in config.topics if t.raw_port]
    if len(set(raw_ports)) != len(raw_ports):
        raise ConfigError("two topics declare the same raw_port")


def load(path: str | os.PathLike | None, overrides: dict | None = None) -> Config:
    """Embedded defaults, then the TOML file (if any), then `overrides` ({section: {key: v}})."""
    doc: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    for section, values in (overrides or {}).items():
        doc.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return from_dict(doc)
