"""`[[processor]]` tables: a mistake is one clear ConfigError naming the processor and key."""

from __future__ import annotations

import pytest

from ingest import config as config_mod
from ingest.config import ConfigError, TopicConfig
from ingest.streams.sinks import sinks_to_create


def load(*processors: dict, topics: tuple[dict, ...] = ()) -> config_mod.Config:
    return config_mod.from_dict({"topic": list(topics), "processor": list(processors)})


AGG = {"name": "w", "kind": "aggregate", "source": "t", "sink": "t-1m", "fields": ["temp_c"]}


@pytest.mark.parametrize("change, message", [
    ({"kind": "median"}, "kind = 'median': use one of"),
    ({"fields": []}, "needs fields"),
    ({"aggregations": ["p99"]}, "aggregation 'p99'"),
    ({"advance_ms": 120_000}, "advance_ms must be"),
    ({"window_ms": 60_000, "advance_ms": 10}, "more than 64 windows"),
    ({"format": "binary"}, "layout.temp_c"),
    ({"format": "binary", "layout": {"temp_c": "f16@0"}}, "layout.temp_c"),
    ({"sink": "t"}, "different sink"),
    ({"colour": "red"}, "unknown key(s) colour"),
    ({"kind": "filter", "where": "temp_c >> 3"}, "is not `field OP number`"),
    ({"kind": "python", "function": "no_colon"}, "module:function"),
])
def test_invalid_processors_are_refused_with_the_key_named(change, message):
    with pytest.raises(ConfigError, match="w") as error:
        load(AGG | change)
    assert message in str(error.value)


def test_a_valid_processor_survives_the_trip_to_the_workers():
    config = load(AGG | {"advance_ms": 15_000, "grace_ms": 5_000}, {"name": "hot", "kind": "alert", "source": "t",
                                                                     "sink": "hot", "where": "temp_c > 80 and rh < 20"})
    assert config_mod.from_dict(config.to_dict()).processors == config.processors
    assert config.processors[1].condition_fields() == [("temp_c", 0, 80.0), ("rh", 2, 20.0)]


def test_sinks_are_co_partitioned_with_their_sources():
    with pytest.raises(ConfigError, match="must be equal"):
        load(AGG, topics=({"name": "t", "partitions": 4}, {"name": "t-1m", "partitions": 2}))
    with pytest.raises(ConfigError, match="same sink"):
        load(AGG, AGG | {"name": "w2"})
    config = load(AGG, AGG | {"name": "w2", "source": "t-1m", "sink": "t-1h"})
    # A chain: the second processor's source is the first one's sink.
    assert sinks_to_create(config.processors, {"t": {"partitions": 4}}) == [TopicConfig("t-1m", 4), TopicConfig("t-1h", 4)]
    assert sinks_to_create(config.processors, {"other": {"partitions": 4}}) == []
    with pytest.raises(ConfigError, match="must be equal"):
        sinks_to_create(config.processors, {"t": {"partitions": 4}, "t-1m": {"partitions": 3}})
