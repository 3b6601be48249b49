"""The uplink's read-back (ingest/uplink/readback.py): the header every shipped record
carries, and the scan of a real remote partition's tail (Tansu) that finds the highest local
offset the cluster holds, among other producers' records, within its documented window."""

from __future__ import annotations

import pytest

pytest.importorskip("confluent_kafka", reason="the uplink needs confluent-kafka: pip install '.[uplink]'")

from ingest.uplink.config import UplinkConfig  # noqa: E402
from ingest.uplink.progress import PartitionProgress  # noqa: E402
from ingest.uplink.readback import (HEADER, ReadbackError, TailReader, consumer_settings,  # noqa: E402
                                    header_value, offset_of, parse_header, source_of)
from tests.kafka_target import Tansu  # noqa: E402

SOURCE = source_of("a1b2c3", "telemetry", 3)
OTHER = source_of("ffff00", "telemetry", 3)  # another appliance shipping a topic of the same name


def test_the_header_names_appliance_topic_partition_and_offset_and_parses_back():
    assert header_value(SOURCE, 1234) == b"a1b2c3/telemetry/3/1234"
    assert parse_header(header_value(SOURCE, 1234)) == (SOURCE, 1234)
    assert parse_header(b"no-offset") is None and parse_header(b"a/b/x") is None
    headers = [("seq", b"1"), (HEADER, header_value(OTHER, 99)), (HEADER, header_value(SOURCE, 7))]
    assert offset_of(headers, SOURCE) == 7
    assert offset_of(headers[:2], SOURCE) is None and offset_of(None, SOURCE) is None


def test_resume_after_passes_over_what_the_cluster_holds_and_stops_at_the_first_record_it_lacks():
    p = PartitionProgress("t", 0, "remote.t", committed=100)
    p.resync_pending = True
    assert not p.ready(0), "nothing is shipped before the read-back answered"
    # 100..149 arrived, 150 failed, 151..159 arrived after it (a gap a failed delivery left).
    assert p.resume_after(set(range(90, 150)) | set(range(151, 160))) == 50
    assert (p.committed, p.delivered, p.sent, p.already_delivered_records) == (100, 150, 150, 50)
    assert p.ready(0) and p.committable() == 150
    p.resync_pending = True
    assert p.resume_after(set(range(120, 140))) == 0 and p.delivered == 150, "an older tail changes nothing"
    assert p.resume_after(set()) == 0 and p.delivered == 150
    q = PartitionProgress("t", 0, "remote.t", committed=100)
    assert q.resume_after(set(range(101, 200))) == 0, "the tail must join up with the committed offset"


@pytest.fixture
def tansu(tmp_path):
    broker = Tansu(tmp_path / "tansu", via_link=False).start()
    yield broker
    broker.stop()


def produce(tansu: Tansu, topic: str, rows: list[tuple[int, bytes | None, int]]) -> None:
    """(partition, source or None for a record without our header, offset) in order."""
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": tansu.bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for partition, source, offset in rows:
        headers = [(HEADER, header_value(source, offset))] if source is not None else [("seq", b"%d" % offset)]
        producer.produce(topic, b"v", partition=partition, headers=headers)
        producer.flush(10)  # one batch per record: the scan must read across batches
    assert producer.flush(10) == 0


def reader(tansu: Tansu, window_records: int) -> TailReader:
    config = UplinkConfig("dc", tansu.bootstrap)
    return TailReader(consumer_settings(config.producer_settings(), config.group), window_records, timeout_s=10)


def test_the_tail_scan_finds_our_last_offset_among_other_producers_records_within_the_window(tansu):
    tansu.create_topic("remote", 3)
    ours = [(0, SOURCE, o) for o in range(10)]
    foreign = [(0, OTHER, o) for o in range(500, 505)] + [(0, None, o) for o in range(5)]
    produce(tansu, "remote", ours + foreign + [(1, SOURCE, 40)] + [(1, None, o) for o in range(30)])
    found = reader(tansu, window_records=20).find({("remote", 0): SOURCE, ("remote", 1): SOURCE,
                                                   ("remote", 2): SOURCE})
    # Partition 0: ten foreign records after ours, inside the window of 20 (which reaches back
    # to offset 0 of ours). Partition 2: empty.
    assert found[("remote", 0)] == set(range(10)) and found[("remote", 2)] == set()
    # Partition 1: thirty foreign records after ours, beyond the window: not found, which the
    # uplink treats as "resume at the committed offset" (docs/UPLINK.md states this bound).
    assert found[("remote", 1)] == set()
    assert reader(tansu, window_records=40).find({("remote", 1): SOURCE})[("remote", 1)] == {40}


def test_an_unreachable_cluster_is_a_readback_error_not_a_hang():
    config = UplinkConfig("dc", "127.0.0.1:1")  # nothing listens on port 1
    slow = TailReader(consumer_settings(config.producer_settings(), config.group), 10, timeout_s=1)
    with pytest.raises(ReadbackError):
        slow.find({("remote", 0): SOURCE})
