"""Error codes of the ingest wire protocol and the exceptions that carry them.

The table below is the whole list: a code's number, whether a client may retry the same
request unchanged, and the one line a user is shown about what to do. Codes travel as
u16 in every reply (docs/PROTOCOL.md, "Error codes"); numbers are never reused.

Two exceptions:
- ``IngestError(code, message)``: a request failed. Clients raise it from error replies;
  the worker raises it (or a subclass) where a request cannot be served.
- ``WireError``: a frame is malformed (truncated, wrong version, bad field). Decoders raise
  only this, never IndexError/struct.error/UnicodeDecodeError; its code is what the
  worker sends back, like h11's LocalProtocolError carries its error_status_hint.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """u16 error code with ``.retriable`` and ``.hint`` (what the user should do)."""

    retriable: bool
    hint: str

    def __new__(cls, value: int, retriable: bool, hint: str) -> ErrorCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.retriable = retriable
        member.hint = hint
        return member

    NONE = 0, False, "success"
    CORRUPT_MESSAGE = 1, False, (
        "the frame is malformed: fix the sender's encoder; resending the same bytes fails again")
    UNKNOWN_TOPIC_OR_PARTITION = 2, False, (
        "create the topic first (CREATE_TOPIC) or use a partition below its count (METADATA)")
    NOT_OWNER = 3, True, (
        "another worker owns this partition: refresh METADATA and resend to its endpoint")
    MESSAGE_TOO_LARGE = 4, False, (
        "split the batch or shrink the record: a frame must fit MAX_FRAME_BYTES")
    THROTTLED = 5, True, "the appliance is at capacity: back off, then retry"
    DISK_FULL = 6, True, (
        "the appliance's disk is full: retry later; the operator must free space or lower retention")
    OFFSET_OUT_OF_RANGE = 7, False, (
        "the offset is outside [log start, log end]: use LIST_OFFSETS, then fetch from there")
    INVALID_REQUEST = 8, False, "a field of the request is invalid (see the message): fix the sender"
    UNSUPPORTED_VERSION = 9, False, (
        "the appliance speaks a different protocol version (the version byte of this reply)")
    OUT_OF_ORDER_SEQUENCE = 10, False, (
        "the producer's sequence skipped numbers: records were lost; restart the producer")
    INVALID_PRODUCER_EPOCH = 11, False, (
        "a newer producer with the same id fenced this one: stop this producer")
    TIMEOUT = 12, True, (
        "the durability level was not reached in time: retry (idempotent producers dedupe)")
    NOT_ENOUGH_REPLICAS = 13, True, (
        "acks=all needs in-sync replicas: retry later or produce with acks=fsync")
    INVALID_TOPIC = 14, False, (
        "topic names are 1..249 bytes of [a-zA-Z0-9._-] and not '.' or '..'")
    STORAGE_ERROR = 15, False, (
        "the appliance hit an I/O error on this partition: the operator must check disk and logs")
    SHUTTING_DOWN = 16, True, "the appliance is draining: reconnect and retry once it is back"
    INVALID_GROUP = 17, False, "group ids are 1..249 bytes of [a-zA-Z0-9._-] and not '.' or '..'"
    TOPIC_ALREADY_EXISTS = 18, False, (
        "the topic exists already: use it (METADATA shows its partition count)")
    UNKNOWN_SERVER_ERROR = 19, False, (
        "the appliance failed unexpectedly: report it with the appliance's log")
    NOT_LEADER = 20, True, (
        "this appliance is a follower replica: refresh METADATA and send to the leader appliance")
    FENCED_LEADER_EPOCH = 21, True, (
        "the appliance was replaced as leader (a newer leader epoch exists): refresh METADATA")
    TOPIC_LIMIT_REACHED = 22, False, (
        "the appliance holds [limits] topics_max topics: use an existing topic, or the operator raises the limit")


def describe(code: int) -> str:
    """``NAME (n)`` for a code, also for codes from a newer appliance this client lacks."""
    try:
        return f"{ErrorCode(code).name} ({code})"
    except ValueError:
        return f"UNKNOWN_ERROR ({code})"


class IngestError(Exception):
    """A request failed with ``code``; ``partition`` is -1 when no one partition is meant.

    ``str(error)`` is one line: the code, the appliance's message, and what to do.
    """

    def __init__(self, code: int, message: str = "", partition: int = -1) -> None:
        self.code = code
        self.message = message
        self.partition = partition
        super().__init__(code, message, partition)

    @property
    def retriable(self) -> bool:
        """True if resending the same request unchanged may succeed."""
        try:
            return ErrorCode(self.code).retriable
        except ValueError:
            return False  # a code this client does not know: retrying blindly could loop

    @property
    def hint(self) -> str:
        try:
            return ErrorCode(self.code).hint
        except ValueError:
            return "upgrade the client: the appliance sent an error code it does not know"

    def __str__(self) -> str:
        where = f" [partition {self.partition}]" if self.partition >= 0 else ""
        message = f": {self.message}" if self.message else ""
        return f"{describe(self.code)}{where}{message} -- {self.hint}"


class WireError(IngestError):
    """A frame is malformed; ``code`` is the error to reply with: CORRUPT_MESSAGE for
    broken structure (truncated, lengths past the end), a precise code otherwise
    (UNSUPPORTED_VERSION, INVALID_TOPIC, INVALID_REQUEST, MESSAGE_TOO_LARGE, ...)."""
