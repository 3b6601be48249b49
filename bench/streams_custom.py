"""Custom processor functions for bench/bench_streams.py: the same filter written over a
whole Batch and per record, for binary and JSON values."""

import struct

import orjson

_TEMP = struct.Struct("<f")


def hot_batch_binary(batch):
    return batch.binary_field("f32@0") > 50


def hot_record_binary(record):
    return record.value if _TEMP.unpack_from(record.value)[0] > 50 else None


def hot_batch_json(batch):
    return batch.json_field("temp_c") > 50


def hot_record_json(record):
    return record.value if orjson.loads(record.value)["temp_c"] > 50 else None
