"""Message schemas of the Kafka APIs the listener serves, as tables.

Each field is (name, type, first_version, last_version), the same "versions" ranges as
Kafka's clients/src/main/resources/common/message/*.json. A type is a primitive name
("int8", "int16", "int32", "int64", "bool", "string", "nstring", "bytes", "nbytes"),
("array", fields) / ("narray", fields) for arrays of structs (narray: nullable), or
("array", "int32") for an array of a primitive. Only non-flexible versions are listed:
compact and tagged encodings are never needed, so a version is served only if it is in
SUPPORTED_VERSIONS below, which ApiVersions advertises exactly.
"""

from __future__ import annotations

from enum import IntEnum

LAST = 1 << 15  # "and every later version"


class ApiKey(IntEnum):
    PRODUCE = 0
    FETCH = 1
    LIST_OFFSETS = 2
    METADATA = 3
    OFFSET_COMMIT = 8
    OFFSET_FETCH = 9
    FIND_COORDINATOR = 10
    JOIN_GROUP = 11
    HEARTBEAT = 12
    LEAVE_GROUP = 13
    SYNC_GROUP = 14
    API_VERSIONS = 18
    INIT_PRODUCER_ID = 22


def f(name: str, kind, first: int = 0, last: int = LAST) -> tuple:
    return (name, kind, first, last)


PRODUCE_REQUEST = [
    f("transactional_id", "nstring", 3),
    f("acks", "int16"),
    f("timeout_ms", "int32"),
    f("topics", ("array", [
        f("name", "string"),
        f("partitions", ("array", [
            f("index", "int32"),
            f("records", "nbytes"),
        ])),
    ])),
]
PRODUCE_RESPONSE = [
    f("responses", ("array", [
        f("name", "string"),
        f("partitions", ("array", [
            f("index", "int32"),
            f("error_code", "int16"),
            f("base_offset", "int64"),
            f("log_append_time_ms", "int64", 2),
            f("log_start_offset", "int64", 5),
            f("record_errors", ("array", [
                f("batch_index", "int32"),
                f("batch_index_error_message", "nstring"),
            ]), 8),
            f("error_message", "nstring", 8),
        ])),
    ])),
    f("throttle_time_ms", "int32", 1),
]

FETCH_REQUEST = [
    f("replica_id", "int32"),
    f("max_wait_ms", "int32"),
    f("min_bytes", "int32"),
    f("max_bytes", "int32", 3),
    f("isolation_level", "int8", 4),
    f("session_id", "int32", 7),
    f("session_epoch", "int32", 7),
    f("topics", ("array", [
        f("topic", "string"),
        f("partitions", ("array", [
            f("partition", "int32"),
            f("current_leader_epoch", "int32", 9),
            f("fetch_offset", "int64"),
            f("log_start_offset", "int64", 5),
            f("partition_max_bytes", "int32"),
        ])),
    ])),
    f("forgotten_topics_data", ("array", [
        f("topic", "string"),
        f("partitions", ("array", "int32")),
    ]), 7),
    f("rack_id", "string", 11),
]
FETCH_RESPONSE = [
    f("throttle_time_ms", "int32", 1),
    f("error_code", "int16", 7),
    f("session_id", "int32", 7),
    f("responses", ("array", [
        f("topic", "string"),
        f("partitions", ("array", [
            f("partition_index", "int32"),
            f("error_code", "int16"),
            f("high_watermark", "int64"),
            f("last_stable_offset", "int64", 4),
            f("log_start_offset", "int64", 5),
            f("aborted_transactions", ("narray", [
                f("producer_id", "int64"),
                f("first_offset", "int64"),
            ]), 4),
            f("preferred_read_replica", "int32", 11),
            f("records", "nbytes"),
        ])),
    ])),
]

LIST_OFFSETS_REQUEST = [
    f("replica_id", "int32"),
    f("isolation_level", "int8", 2),
    f("topics", ("array", [
        f("name", "string"),
        f("partitions", ("array", [
            f("partition_index", "int32"),
            f("current_leader_epoch", "int32", 4),
            f("timestamp", "int64"),
            f("max_num_offsets", "int32", 0, 0),
        ])),
    ])),
]
LIST_OFFSETS_RESPONSE = [
    f("throttle_time_ms", "int32", 2),
    f("topics", ("array", [
        f("name", "string"),
        f("partitions", ("array", [
            f("partition_index", "int32"),
            f("error_code", "int16"),
            f("old_style_offsets", ("array", "int64"), 0, 0),
            f("timestamp", "int64", 1),
            f("offset", "int64", 1),
            f("leader_epoch", "int32", 4),
        ])),
    ])),
]

METADATA_REQUEST = [
    # v0: an empty array means every topic; v1+: null means every topic, empty means none.
    f("topics", ("array", [f("name", "string")]), 0, 0),
    f("topics", ("narray", [f("name", "string")]), 1),
    f("allow_auto_topic_creation", "bool", 4),
    f("include_cluster_authorized_operations", "bool", 8),
    f("include_topic_authorized_operations", "bool", 8),
]
METADATA_RESPONSE = [
    f("throttle_time_ms", "int32", 3),
    f("brokers", ("array", [
        f("node_id", "int32"),
        f("host", "string"),
        f("port", "int32"),
        f("rack", "nstring", 1),
    ])),
    f("cluster_id", "nstring", 2),
    f("controller_id", "int32", 1),
    f("topics", ("array", [
        f("error_code", "int16"),
        f("name", "string"),
        f("is_internal", "bool", 1),
        f("partitions", ("array", [
            f("error_code", "int16"),
            f("partition_index", "int32"),
            f("leader_id", "int32"),
            f("leader_epoch", "int32", 7),
            f("replica_nodes", ("array", "int32")),
            f("isr_nodes", ("array", "int32")),
            f("offline_replicas", ("array", "int32"), 5),
        ])),
        f("topic_authorized_operations", "int32", 8),
    ])),
    f("cluster_authorized_operations", "int32", 8),
]

OFFSET_COMMIT_REQUEST = [
    f("group_id", "string"),
    f("generation_id", "int32", 1),
    f("member_id", "string", 1),
    f("group_instance_id", "nstring", 7),
    f("retention_time_ms", "int64", 2, 4),
    f("topics", ("array", [
        f("name", "string"),
        f("partitions", ("array", [
            f("partition_index", "int32"),
            f("committed_offset", "int64"),
            f("committed_leader_epoch", "int32", 6),
            f("commit_timestamp", "int64", 1, 1),
            f("committed_metadata", "nstring"),
        ])),
    ])),
]
OFFSET_COMMIT_RESPONSE = [
    f("throttle_time_ms", "int32", 3),
    f("topics", ("array", [
        f("name", "string"),
        f("partitions", ("array", [
            f("partition_index", "int32"),
            f("error_code", "int16"),
        ])),
    ])),
]

OFFSET_FETCH_REQUEST = [
    f("group_id", "string"),
    f("topics", ("array", [
        f("name", "string"),
        f("partition_indexes", ("array", "int32")),
    ]), 0, 1),
    f("topics", ("narray", [
        f("name", "string"),
        f("partition_indexes", ("array", "int32")),
    ]), 2),
]
OFFSET_FETCH_RESPONSE = [
    f("throttle_time_ms", "int32", 3),
    f("topics", ("array", [
        f("name", "string"),
        f("partitions", ("array", [
            f("partition_index", "int32"),
            f("committed_offset", "int64"),
            f("committed_leader_epoch", "int32", 5),
            f("metadata", "nstring"),
            f("error_code", "int16"),
        ])),
    ])),
    f("error_code", "int16", 2),
]

FIND_COORDINATOR_REQUEST = [
    f("key", "string"),
    f("key_type", "int8", 1),
]
FIND_COORDINATOR_RESPONSE = [
    f("throttle_time_ms", "int32", 1),
    f("error_code", "int16"),
    f("error_message", "nstring", 1),
    f("node_id", "int32"),
    f("host", "string"),
    f("port", "int32"),
]

API_VERSIONS_REQUEST: list = []
API_VERSIONS_RESPONSE = [
    f("error_code", "int16"),
    f("api_keys", ("array", [
        f("api_key", "int16"),
        f("min_version", "int16"),
        f("max_version", "int16"),
    ])),
    f("throttle_time_ms", "int32", 1),
]

INIT_PRODUCER_ID_REQUEST = [
    f("transactional_id", "nstring"),
    f("transaction_timeout_ms", "int32"),
]
INIT_PRODUCER_ID_RESPONSE = [
    f("throttle_time_ms", "int32"),
    f("error_code", "int16"),
    f("producer_id", "int64"),
    f("producer_epoch", "int16"),
]

JOIN_GROUP_REQUEST = [
    f("group_id", "string"),
    f("session_timeout_ms", "int32"),
    f("rebalance_timeout_ms", "int32", 1),
    f("member_id", "string"),
    f("group_instance_id", "nstring", 5),
    f("protocol_type", "string"),
    f("protocols", ("array", [
        f("name", "string"),
        f("metadata", "bytes"),
    ])),
]
JOIN_GROUP_RESPONSE = [
    f("throttle_time_ms", "int32", 2),
    f("error_code", "int16"),
    f("generation_id", "int32"),
    f("protocol_name", "string"),
    f("leader", "string"),
    f("member_id", "string"),
    f("members", ("array", [
        f("member_id", "string"),
        f("group_instance_id", "nstring", 5),
        f("metadata", "bytes"),
    ])),
]

SYNC_GROUP_REQUEST = [
    f("group_id", "string"),
    f("generation_id", "int32"),
    f("member_id", "string"),
    f("group_instance_id", "nstring", 3),
    f("assignments", ("array", [
        f("member_id", "string"),
        f("assignment", "bytes"),
    ])),
]
SYNC_GROUP_RESPONSE = [
    f("throttle_time_ms", "int32", 1),
    f("error_code", "int16"),
    f("assignment", "bytes"),
]

HEARTBEAT_REQUEST = [
    f("group_id", "string"),
    f("generation_id", "int32"),
    f("member_id", "string"),
    f("group_instance_id", "nstring", 3),
]
HEARTBEAT_RESPONSE = [
    f("throttle_time_ms", "int32", 1),
    f("error_code", "int16"),
]

LEAVE_GROUP_REQUEST = [
    f("group_id", "string"),
    f("member_id", "string", 0, 2),
    f("members", ("array", [
        f("member_id", "string"),
        f("group_instance_id", "nstring"),
    ]), 3),
]
LEAVE_GROUP_RESPONSE = [
    f("throttle_time_ms", "int32", 1),
    f("error_code", "int16"),
    f("members", ("array", [
        f("member_id", "string"),
        f("group_instance_id", "nstring"),
        f("error_code", "int16"),
    ]), 3),
]

# api key -> (request fields, response fields)
SCHEMAS = {
    ApiKey.PRODUCE: (PRODUCE_REQUEST, PRODUCE_RESPONSE),
    ApiKey.FETCH: (FETCH_REQUEST, FETCH_RESPONSE),
    ApiKey.LIST_OFFSETS: (LIST_OFFSETS_REQUEST, LIST_OFFSETS_RESPONSE),
    ApiKey.METADATA: (METADATA_REQUEST, METADATA_RESPONSE),
    ApiKey.OFFSET_COMMIT: (OFFSET_COMMIT_REQUEST, OFFSET_COMMIT_RESPONSE),
    ApiKey.OFFSET_FETCH: (OFFSET_FETCH_REQUEST, OFFSET_FETCH_RESPONSE),
    ApiKey.FIND_COORDINATOR: (FIND_COORDINATOR_REQUEST, FIND_COORDINATOR_RESPONSE),
    ApiKey.API_VERSIONS: (API_VERSIONS_REQUEST, API_VERSIONS_RESPONSE),
    ApiKey.INIT_PRODUCER_ID: (INIT_PRODUCER_ID_REQUEST, INIT_PRODUCER_ID_RESPONSE),
    ApiKey.JOIN_GROUP: (JOIN_GROUP_REQUEST, JOIN_GROUP_RESPONSE),
    ApiKey.SYNC_GROUP: (SYNC_GROUP_REQUEST, SYNC_GROUP_RESPONSE),
    ApiKey.HEARTBEAT: (HEARTBEAT_REQUEST, HEARTBEAT_RESPONSE),
    ApiKey.LEAVE_GROUP: (LEAVE_GROUP_REQUEST, LEAVE_GROUP_RESPONSE),
}

# The versions the codec can encode and decode (every non-flexible one from the first
# that carries RecordBatch v2 where that matters). The listener advertises the subset it
# serves (ingest/net/kafka/server.py SERVED).
CODEC_VERSIONS = {
    ApiKey.PRODUCE: (3, 8),
    ApiKey.FETCH: (4, 11),
    ApiKey.LIST_OFFSETS: (1, 5),
    ApiKey.METADATA: (0, 8),
    ApiKey.OFFSET_COMMIT: (2, 7),
    ApiKey.OFFSET_FETCH: (1, 5),
    ApiKey.FIND_COORDINATOR: (0, 2),
    ApiKey.API_VERSIONS: (0, 2),
    ApiKey.INIT_PRODUCER_ID: (0, 1),
    ApiKey.JOIN_GROUP: (0, 5),
    ApiKey.SYNC_GROUP: (0, 3),
    ApiKey.HEARTBEAT: (0, 3),
    ApiKey.LEAVE_GROUP: (0, 3),
}
