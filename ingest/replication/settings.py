"""The ``[replication]`` section of the appliance config.

    [replication]
    role = "follower"                      # the role on first start: "leader" or "follower"
    peers = ["tcp://10.0.0.2:7400"]        # bootstrap URLs of the other appliances
    min_insync_replicas = 2                # acks=all needs this many in-sync copies
    replica_lag_max_ms = 10000             # a follower not caught up for this long leaves the ISR

Without peers (the default) the appliance is alone: nothing is replicated, the high
watermark is the log end, and acks=all means acks=fsync.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("leader", "follower")
# Two appliances are the common case; a leader tracks every follower per partition, and
# each follower costs the leader a parked fetch per partition.
PEERS_MAX = 8


class ReplicationConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    role: str = "leader"
    peers: tuple[str, ...] = ()
    min_insync_replicas: int = 1
    # Kafka's replica.lag.time.max.ms is 30 s; an appliance pair on one LAN catches up in
    # milliseconds, and acks=all waits at most this long before failing instead of hanging.
    replica_lag_max_ms: int = 10_000
    # How often the supervisor asks its peers for their role and epoch (fencing of a stale
    # leader, the follower's leader endpoints).
    peer_check_interval_ms: int = 1_000
    # Long-poll wait of a follower's fetch: bounds how long a change of leader or epoch
    # goes unnoticed by a fetch parked at the old leader.
    fetch_max_wait_ms: int = 500
    fetch_max_bytes: int = 4 << 20
    # Kafka's replica.high.watermark.checkpoint.interval.ms: how often a leader writes each
    # partition's high watermark and in-sync set down (checkpoint.py), when they changed.
    high_watermark_checkpoint_interval_ms: int = 5_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "peers", tuple(self.peers))
        if self.role not in ROLES:
            raise ReplicationConfigError(f"role must be one of {ROLES}, got {self.role!r}")
        if len(self.peers) > PEERS_MAX:
            raise ReplicationConfigError(f"at most {PEERS_MAX} peers, got {len(self.peers)}")
        for peer in self.peers:
            if not isinstance(peer, str) or not peer.startswith("tcp://"):
                raise ReplicationConfigError(f"peer {peer!r} is not a tcp:// bootstrap URL")
        if self.role == "follower" and not self.peers:
            raise ReplicationConfigError("a follower needs peers (the leader's bootstrap URL)")
        if not 1 <= self.min_insync_replicas <= len(self.peers) + 1:
            raise ReplicationConfigError(
                f"min_insync_replicas must be 1..{len(self.peers) + 1} (this appliance and its "
                f"peers), got {self.min_insync_replicas}")
        for name in ("replica_lag_max_ms", "peer_check_interval_ms", "fetch_max_wait_ms",
                     "high_watermark_checkpoint_interval_ms"):
            if not 1 <= getattr(self, name) <= 600_000:
                raise ReplicationConfigError(f"{name} must be 1..600000, got {getattr(self, name)}")
        if self.fetch_max_wait_ms >= self.replica_lag_max_ms:
            raise ReplicationConfigError("fetch_max_wait_ms must be below replica_lag_max_ms: a "
                                         "caught-up follower parked at the leader must stay in sync")
        if not 1 <= self.fetch_max_bytes <= 8 << 20:
            raise ReplicationConfigError("fetch_max_bytes must be 1..8388608")

    @property
    def enabled(self) -> bool:
        return bool(self.peers)
