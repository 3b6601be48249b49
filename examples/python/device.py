"""A device in plain pyzmq, no SDK: readings as RECORD frames (docs/PROTOCOL.md 5.1) on PUSH.

    python examples/python/device.py tcp://127.0.0.1:7400 sensors dev-42 100
"""
import json, struct, sys, time

import zmq

bootstrap, topic, device_id, count = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode(), int(sys.argv[4])
ctx = zmq.Context()
dealer = ctx.socket(zmq.DEALER)  # METADATA (type 0x07): 8-byte header, reply's JSON after 12 bytes
dealer.connect(bootstrap)
dealer.send(struct.pack("<BBHI", 1, 0x07, 0, 1))
if not dealer.poll(5000):
    sys.exit("no reply from the bootstrap endpoint: is `ingest serve` running?")
endpoint = json.loads(dealer.recv()[12:])["workers"][0]["pull"]  # any worker forwards records
dealer.close()
push = ctx.socket(zmq.PUSH)
push.connect(endpoint)
for seq in range(count):
    value = json.dumps({"device": device_id.decode(), "seq": seq, "temp_c": 21.5}).encode()
    # header: version 1, RECORD, flags acks 0 + timestamp set, correlation 0; then topic_len,
    # reserved, header_count 0, key_len, timestamp_ms, partition -1 (the appliance picks).
    fixed = struct.pack("<BBHIBBHiqi", 1, 0x01, 1 << 3, 0, len(topic), 0, 0, len(device_id),
                        time.time_ns() // 1_000_000, -1)
    push.send(fixed + topic + device_id + value)
push.close(linger=10_000)  # wait for queued readings to leave
ctx.term()
print(f"pushed {count} readings")
