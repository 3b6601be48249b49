"""The three payloads every system is given, byte for byte the same in every run."""

from __future__ import annotations

import random

import orjson

# A seeded generator: the same bytes every run, and incompressible binary payloads (no
# system here compresses by default, but none should get the chance to look better).
_RANDOM = random.Random(20261126)


def _telemetry_json() -> bytes:
    """A device's reading as firmware sends it: ~300 B of JSON."""
    reading = {
        "device_id": "sensor-eu-west-000042", "ts_ms": 1764150000123, "seq": 1837465,
        "firmware": "2.14.3", "temperature_c": 21.53, "humidity_pct": 45.2, "pressure_hpa": 1013.25,
        "co2_ppm": 612, "battery_v": 3.71, "rssi_dbm": -67, "uptime_s": 8123456,
        "location": {"lat": 52.520008, "lon": 13.404954, "alt_m": 34.0},
        "status": "ok", "flags": ["door_closed", "fan_auto"],
    }
    return orjson.dumps(reading)


PAYLOADS: dict[str, bytes] = {
    "100 B binary": _RANDOM.randbytes(100),
    "300 B JSON": _telemetry_json(),
    "1 KB binary": _RANDOM.randbytes(1024),
}
assert 250 <= len(PAYLOADS["300 B JSON"]) <= 350, len(PAYLOADS["300 B JSON"])
