"""[kafka]: the optional Kafka wire-protocol listener of each worker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    enabled: bool = False
    # Base port: worker i listens on port + i and is advertised in Metadata as broker
    # (node id) i; the supervisor binds nothing here, any worker bootstraps a client.
    port: int = 9092
    # Connections one worker keeps open at once; beyond it new ones are closed at accept.
    connections_max: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        if self.connections_max < 1:
            raise ValueError(f"connections_max must be >= 1, got {self.connections_max}")

    def worker_port(self, worker_id: int) -> int:
        return self.port + worker_id
