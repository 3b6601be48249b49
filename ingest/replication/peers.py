"""The supervisor's side of replication: the appliance's role, its peers, promotion.

- At start, and every peer_check_interval_ms (a thread), the supervisor asks each peer's
  bootstrap endpoint for METADATA, whose "replication" section holds the peer's role and
  leader epoch.
- ``decide`` is the one rule (a pure function): the leader with the highest epoch leads.
  A leader that sees a peer leading a newer epoch becomes its follower (fencing: from then
  on its workers refuse produce and truncate to the new leader's history). Two leaders of
  the same epoch (misconfiguration) resolve to the larger appliance id following.
- ``promote`` (``ingest promote``): role leader, epoch = the newest epoch known + 1.

The role is on disk (role.py) before any worker is told. There is no consensus here:
promotion is an operator's decision (or an external coordinator's), as the design says.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ingest.net.client import BootstrapClient
from ingest.net.errors import IngestError
from ingest.replication import role as role_file
from ingest.replication.role import Role

log = logging.getLogger("ingest.replication")

# A peer's bootstrap answers in about a millisecond; this long without an answer and the
# peer counts as unreachable for this round.
PEER_TIMEOUT_MS = 1_000


@dataclass(frozen=True, slots=True)
class PeerLeader:
    url: str
    leader_epoch: int
    appliance_id: str
    routers: tuple[str, ...]
    topics: dict


def leader_of(url: str, doc: dict | None) -> PeerLeader | None:
    """The peer as a leader, or None if it is not one (or did not answer)."""
    if not doc:
        return None
    repl = doc.get("replication") or {}
    if repl.get("role") != "leader":
        return None
    try:
        workers = sorted(doc.get("workers", []), key=lambda w: int(w["id"]))
        return PeerLeader(url, int(repl.get("leader_epoch", 0)), str(doc.get("appliance_id", "")),
                          tuple(str(w["router"]) for w in workers), dict(doc.get("topics", {})))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        log.error("peer %s: METADATA not usable (%r): ignored", url, e)
        return None


def decide(own: Role, appliance_id: str, leaders: list[PeerLeader]) -> tuple[Role, PeerLeader | None]:
    """(the role this appliance must take, the leader to follow or None)."""
    best = max(leaders, key=lambda p: (p.leader_epoch, p.appliance_id), default=None)
    if best is None:
        return own, None
    if own.is_leader:
        newer = best.leader_epoch > own.leader_epoch or (
            best.leader_epoch == own.leader_epoch and best.appliance_id < appliance_id)
        return (Role("follower", best.leader_epoch), best) if newer else (own, None)
    if best.leader_epoch >= own.leader_epoch:
        return Role("follower", best.leader_epoch), best
    return own, None  # only a stale leader answers: wait for the current one


class PeerWatcher(threading.Thread):
    """Asks every peer for METADATA every interval; keeps the latest answers."""

    def __init__(self, peers: tuple[str, ...], interval_ms: int) -> None:
        super().__init__(name="peer-watcher", daemon=True)
        self.peers = peers
        self.interval_ms = interval_ms
        self._lock = threading.Lock()
        self._latest: dict[str, dict | None] = {}
        self._fresh = False
        self._stop = threading.Event()
        # One client per peer for the watcher's life (a client starts over on a fresh
        # socket after a timeout by itself).
        self._clients = {url: BootstrapClient(url, timeout_ms=PEER_TIMEOUT_MS) for url in peers}

    def ask_all(self) -> dict[str, dict | None]:
        answers = {}
        for url, client in self._clients.items():
            try:
                answers[url] = client.metadata()
            except (IngestError, OSError) as e:
                log.debug("peer %s: %s", url, e)
                answers[url] = None
        return answers

    def run(self) -> None:
        while not self._stop.wait(self.interval_ms / 1000):
            answers = self.ask_all()
            with self._lock:
                self._latest, self._fresh = answers, True
        for client in self._clients.values():
            client.close()

    def take(self) -> dict[str, dict | None] | None:
        """The answers of the latest round, once; None if no new round finished."""
        with self._lock:
            if not self._fresh:
                return None
            self._fresh = False
            return self._latest

    def stop(self) -> None:
        self._stop.set()


class SupervisorReplication:
    """Role, epoch and leader of this appliance, as the supervisor keeps them."""

    def __init__(self, settings, data_dir: Path, appliance_id: str) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self.data_dir = Path(data_dir)
        self.appliance_id = appliance_id
        self.role = role_file.load(self.data_dir, settings.role)
        self.leader: PeerLeader | None = None
        self.watcher: PeerWatcher | None = None
        # Appliance ids of the configured peers that answered: only they may fetch as
        # followers (a client posing as one could otherwise make acks=all lie).
        self.replica_ids: set[str] = set()

    def start(self) -> None:
        """Decide the role before any worker starts (a returning old leader must not take
        one write), then keep watching."""
        if not self.enabled:
            return
        self.watcher = PeerWatcher(self.settings.peers, self.settings.peer_check_interval_ms)
        self._apply(self.watcher.ask_all())
        log.info("replication: %s at leader epoch %d%s", self.role.role, self.role.leader_epoch,
                 f", following {self.leader.url}" if self.leader else "")
        self.watcher.start()

    def poll(self) -> bool:
        """Apply the watcher's latest round; True if workers must be told."""
        answers = self.watcher.take() if self.watcher else None
        return answers is not None and self._apply(answers)

    def _apply(self, answers: dict[str, dict | None]) -> bool:
        leaders = [p for p in (leader_of(url, doc) for url, doc in answers.items()) if p]
        new_role, leader = decide(self.role, self.appliance_id, leaders)
        if not new_role.is_leader and leader is None:
            leader = self.leader  # keep following the last known leader while none answers
        replica_ids = self.replica_ids | {str(doc["appliance_id"]) for doc in answers.values()
                                          if isinstance(doc, dict) and doc.get("appliance_id")}
        changed = (new_role != self.role or _endpoints(leader) != _endpoints(self.leader)
                   or replica_ids != self.replica_ids)
        self.replica_ids = replica_ids
        if new_role != self.role:
            if self.role.is_leader:
                log.warning("replication: %s leads epoch %d (newer than ours, %d): becoming its follower",
                            leader.url, leader.leader_epoch, self.role.leader_epoch)
            self._save(new_role)
        self.leader = leader
        return changed

    def _save(self, new_role: Role) -> None:
        assert new_role.leader_epoch >= self.role.leader_epoch, (new_role, self.role)
        role_file.save(self.data_dir, new_role)
        self.role = new_role

    def promote(self) -> dict:
        if not self.enabled:
            raise ValueError("replication is not configured: there is nothing to promote")
        if not self.role.is_leader:
            known = max(self.role.leader_epoch, self.leader.leader_epoch if self.leader else 0)
            self._save(Role("leader", known + 1))
            self.leader = None
            log.warning("replication: promoted to leader at epoch %d", self.role.leader_epoch)
        return self.metadata()

    def fenced(self, leader_epoch: int) -> bool:
        """A worker heard of a newer epoch from a follower; True if workers must be told."""
        if not self.role.is_leader or leader_epoch <= self.role.leader_epoch:
            return False
        log.warning("replication: fenced by leader epoch %d: becoming a follower", leader_epoch)
        self._save(Role("follower", leader_epoch))
        return True

    def may_create_topics(self) -> bool:
        """A follower takes its topics from the leader only."""
        return not self.enabled or self.role.is_leader

    def worker_doc(self) -> dict:
        leader = {"routers": list(self.leader.routers)} if self.leader else None
        return {"role": self.role.role, "leader_epoch": self.role.leader_epoch,
                "replica_id": self.appliance_id, "leader": leader, "replicas": sorted(self.replica_ids)}

    def metadata(self) -> dict:
        doc = {"role": self.role.role if self.enabled else "leader",
               "leader_epoch": self.role.leader_epoch, "peers": list(self.settings.peers),
               "min_insync_replicas": self.settings.min_insync_replicas}
        if self.leader:
            doc["leader"] = self.leader.url
        return doc

    def topics_to_create(self, known: dict) -> list[tuple[str, int]]:
        """A follower has the leader's topics, with the same partition counts."""
        if not self.leader or self.role.is_leader:
            return []
        wanted = []
        for name, t in self.leader.topics.items():
            if name not in known and isinstance(t, dict) and isinstance(t.get("partitions"), int):
                wanted.append((name, t["partitions"]))
        return wanted

    def close(self) -> None:
        if self.watcher:
            self.watcher.stop()


def _endpoints(leader: PeerLeader | None):
    return leader.routers if leader else None
