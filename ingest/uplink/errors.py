"""librdkafka's error names, sorted into the few reasons `uplink_errors_total` counts.

A bounded label set (every reason is exported from the start at 0, so rate() and alerts see
"no errors" rather than "no data"); the exact librdkafka name goes to the log.
"""

from __future__ import annotations

# Delivery errors that mean the cluster no longer accepts this producer id or its sequence
# numbers (librdkafka bumps the epoch after a message timeout; a broker may fence that):
# resending with the same producer would fail forever, so the uplink starts a new one.
PRODUCER_STATE_ERRORS = frozenset(("PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH", "OUT_OF_ORDER_SEQUENCE_NUMBER",
                                   "UNKNOWN_PRODUCER_ID", "INVALID_PRODUCER_ID_MAPPING", "_FENCED",
                                   "_GAPLESS_GUARANTEE", "_INCONSISTENT"))
UNREACHABLE = frozenset(("_TRANSPORT", "_ALL_BROKERS_DOWN", "_RESOLVE", "_TIMED_OUT", "REQUEST_TIMED_OUT",
                         "NETWORK_EXCEPTION", "NOT_LEADER_FOR_PARTITION", "LEADER_NOT_AVAILABLE"))
AUTHENTICATION = frozenset(("_AUTHENTICATION", "_SSL", "SASL_AUTHENTICATION_FAILED", "TOPIC_AUTHORIZATION_FAILED",
                            "CLUSTER_AUTHORIZATION_FAILED", "ILLEGAL_SASL_STATE", "UNSUPPORTED_SASL_MECHANISM"))

# reason label -> what it means (docs/UPLINK.md lists the same).
REASONS = {
    "unreachable": "no connection to the cluster, or a request timed out",
    "timed_out": "a record was not delivered within message.timeout.ms (it is sent again)",
    "fenced": "the cluster refused the producer id or sequence (a new producer takes over)",
    "authentication": "TLS, SASL or ACLs refused the uplink",
    "refused": "the cluster refused records (unknown topic or partition, too large, ...)",
    "internal": "a fault in the uplink itself (logged with its traceback)",
}


def reason_of(name: str) -> str:
    """The reason label for a librdkafka error name (KafkaError.name())."""
    if name == "_MSG_TIMED_OUT":
        return "timed_out"
    if name in PRODUCER_STATE_ERRORS:
        return "fenced"
    if name in UNREACHABLE:
        return "unreachable"
    if name in AUTHENTICATION:
        return "authentication"
    if name == "internal":
        return "internal"
    return "refused"
