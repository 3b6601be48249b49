"""Kafka consumer-group membership at the group's coordinator worker: JoinGroup,
SyncGroup, Heartbeat, LeaveGroup.

As in Kafka, the coordinator does not assign partitions: it gathers the members, picks a
leader and a protocol (the assignor, e.g. kafka-python's and librdkafka's "range"), hands
the leader every member's subscription, and hands each member the assignment the leader
computed. State per group, in memory (a worker restart makes members rejoin, as a
coordinator failover does in Kafka):

    empty --join--> preparing --all joined or deadline--> awaiting_sync --leader syncs--> stable
    stable/awaiting_sync --join, leave, session expiry--> preparing

Committed offsets are kafka_groups.py's; they do not check generations.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from ingest.clock import mono_ms
from ingest.shards.kafka_api import NONE, Deferred

ILLEGAL_GENERATION = 22
INCONSISTENT_GROUP_PROTOCOL = 23
UNKNOWN_MEMBER_ID = 25
INVALID_SESSION_TIMEOUT = 26
REBALANCE_IN_PROGRESS = 27
GROUP_MAX_SIZE_REACHED = 81
# A new group waits this long for more members before its first generation (Kafka's
# group.initial.rebalance.delay.ms): members starting together get one rebalance, not N.
INITIAL_REBALANCE_DELAY_MS = 3000
SESSION_TIMEOUT_MS_MIN, SESSION_TIMEOUT_MS_MAX = 1000, 300_000  # Kafka's broker defaults
# Groups with members one coordinator keeps, and members per group: bound the memory a
# client can make a worker hold.
GROUPS_MAX = 10_000
MEMBERS_MAX = 1000


@dataclass(slots=True)
class Member:
    member_id: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    protocols: list[tuple[str, bytes]]
    last_seen_ms: int
    joining: bool = True
    assignment: bytes = b""


@dataclass(slots=True)
class Group:
    protocol_type: str = ""
    state: str = "empty"
    generation: int = 0
    leader: str = ""
    protocol: str = ""
    members: dict[str, Member] = field(default_factory=dict)
    deadline_ms: int = 0       # preparing: when the generation completes anyway
    joined: dict[str, dict] = field(default_factory=dict)  # JoinGroup responses not yet taken


class Membership:
    def __init__(self, worker, refusal) -> None:
        self.w = worker
        self._refusal = refusal  # group id -> Kafka error code, or None (kafka_groups.py)
        self.groups: dict[str, Group] = {}

    # ---- JoinGroup -------------------------------------------------------------------------

    def join(self, version: int, body: dict):
        t = mono_ms()
        gid, mid = body["group_id"], body["member_id"]
        fail = {"throttle_time_ms": 0, "generation_id": -1, "protocol_name": "", "leader": "", "member_id": mid,
                "members": []}
        code = self._refusal(gid)
        if code is None and not SESSION_TIMEOUT_MS_MIN <= body["session_timeout_ms"] <= SESSION_TIMEOUT_MS_MAX:
            code = INVALID_SESSION_TIMEOUT
        group = self.groups.get(gid)
        if code is None and group is None and len(self.groups) >= GROUPS_MAX:
            code = GROUP_MAX_SIZE_REACHED
        if code is not None:
            return fail | {"error_code": code}
        group = self.groups.setdefault(gid, Group(protocol_type=body["protocol_type"]))
        self._expire(group, t)
        if group.members and group.protocol_type != body["protocol_type"]:
            return fail | {"error_code": INCONSISTENT_GROUP_PROTOCOL}
        if mid and mid not in group.members:
            return fail | {"error_code": UNKNOWN_MEMBER_ID}
        if not mid and len(group.members) >= MEMBERS_MAX:
            return fail | {"error_code": GROUP_MAX_SIZE_REACHED}
        mid = mid or f"member-{uuid.uuid4().hex}"
        group.protocol_type = body["protocol_type"]
        group.members[mid] = Member(mid, body["session_timeout_ms"],
                                    body.get("rebalance_timeout_ms", body["session_timeout_ms"]),
                                    [(p["name"], p["metadata"]) for p in body["protocols"]], t)
        if group.state != "preparing":
            self._prepare(group, t)

        def joined(t_ms: int):
            self._advance(gid, group, t_ms)
            return group.joined.pop(mid, None)
        return Deferred(joined, group.deadline_ms)

    def _prepare(self, group: Group, t_ms: int) -> None:
        wait = INITIAL_REBALANCE_DELAY_MS if group.state == "empty" else \
            max(m.rebalance_timeout_ms for m in group.members.values())
        group.state = "preparing"
        group.deadline_ms = t_ms + wait
        for m in group.members.values():
            m.assignment = b""

    def _advance(self, gid: str, group: Group, t_ms: int) -> None:
        if group.state != "preparing":
            return
        everyone = all(m.joining for m in group.members.values())
        first = group.generation == 0
        if t_ms < group.deadline_ms and not (everyone and not first):
            return
        for mid in [mid for mid, m in group.members.items() if not m.joining]:
            del group.members[mid]  # did not rejoin in time
        if not group.members:
            group.state = "empty"
            return
        self._complete(group, t_ms)

    def _complete(self, group: Group, t_ms: int) -> None:
        group.generation += 1
        if group.leader not in group.members:
            group.leader = next(iter(group.members))
        leader = group.members[group.leader]
        common = [name for name, _ in leader.protocols
                  if all(name in dict(m.protocols) for m in group.members.values())]
        group.protocol = common[0] if common else leader.protocols[0][0]
        everyone = [{"member_id": m.member_id, "group_instance_id": None, "metadata": dict(m.protocols).get(
            group.protocol, b"")} for m in group.members.values()]
        for m in group.members.values():
            m.joining = False
            m.last_seen_ms = t_ms
            group.joined[m.member_id] = {
                "throttle_time_ms": 0, "error_code": NONE, "generation_id": group.generation,
                "protocol_name": group.protocol, "leader": group.leader, "member_id": m.member_id,
                "members": everyone if m.member_id == group.leader else []}
        group.state = "awaiting_sync"

    def _expire(self, group: Group, t_ms: int) -> None:
        gone = [mid for mid, m in group.members.items()
                if not m.joining and t_ms - m.last_seen_ms > m.session_timeout_ms]
        for mid in gone:
            del group.members[mid]
        if gone and group.state in ("stable", "awaiting_sync"):
            if group.members:
                self._prepare(group, t_ms)
            else:
                group.state = "empty"

    def _member(self, gid: str, mid: str, generation: int | None, t_ms: int) -> tuple[Group | None, int]:
        code = self._refusal(gid)
        if code is not None:
            return None, code
        group = self.groups.get(gid)
        if group is None or mid not in group.members:
            return None, UNKNOWN_MEMBER_ID
        self._expire(group, t_ms)
        if mid not in group.members:
            return None, UNKNOWN_MEMBER_ID
        group.members[mid].last_seen_ms = t_ms
        if group.state == "preparing":
            return group, REBALANCE_IN_PROGRESS
        if generation is not None and generation != group.generation:
            return group, ILLEGAL_GENERATION
        return group, NONE

    # ---- SyncGroup, Heartbeat, LeaveGroup -----------------------------------------------------

    def sync(self, version: int, body: dict):
        t = mono_ms()
        gid, mid = body["group_id"], body["member_id"]
        group, code = self._member(gid, mid, body["generation_id"], t)
        if code != NONE:
            return {"throttle_time_ms": 0, "error_code": code, "assignment": b""}
        if group.state == "awaiting_sync" and mid == group.leader:
            for a in body["assignments"]:
                if a["member_id"] in group.members:
                    group.members[a["member_id"]].assignment = a["assignment"]
            group.state = "stable"
        generation = group.generation
        deadline = t + group.members[mid].session_timeout_ms

        def assigned(t_ms: int):
            if group.generation != generation or group.state == "preparing" or mid not in group.members:
                return {"throttle_time_ms": 0, "error_code": REBALANCE_IN_PROGRESS, "assignment": b""}
            if group.state == "stable":
                return {"throttle_time_ms": 0, "error_code": NONE, "assignment": group.members[mid].assignment}
            if t_ms >= deadline:  # the leader never synced: start over
                self._prepare(group, t_ms)
                return {"throttle_time_ms": 0, "error_code": REBALANCE_IN_PROGRESS, "assignment": b""}
            return None
        return assigned(t) or Deferred(assigned, deadline)

    def heartbeat(self, version: int, body: dict):
        _, code = self._member(body["group_id"], body["member_id"], body["generation_id"], mono_ms())
        return {"throttle_time_ms": 0, "error_code": code}

    def leave(self, version: int, body: dict):
        gid = body["group_id"]
        ids = [body["member_id"]] if version < 3 else [m["member_id"] for m in body["members"]]
        code = self._refusal(gid)
        group = self.groups.get(gid)
        rows = []
        for mid in ids:
            known = code is None and group is not None and mid in group.members
            if known:
                del group.members[mid]
            rows.append({"member_id": mid, "group_instance_id": None,
                         "error_code": NONE if known else (code or UNKNOWN_MEMBER_ID)})
        if group is not None and any(r["error_code"] == NONE for r in rows):
            if not group.members:
                group.state = "empty"
                del self.groups[gid]
            elif group.state != "preparing":
                self._prepare(group, mono_ms())
        top = code if code is not None else (rows[0]["error_code"] if version < 3 else NONE)
        return {"throttle_time_ms": 0, "error_code": top, "members": rows}
