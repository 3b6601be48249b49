"""What CURVE (encryption + client authentication) costs, in one run on this machine.

    python -m bench.bench_curve [--records N] [--repeats R]

Two appliances (`ingest serve --workers 2`), one plain and one with [security] curve on,
driven the same way by the SDK: send() with acks=fsync (futures not kept),
send_batch() of 10,000 with acks=fsync, and Consumer.poll_batch(). Prints records/s and
the ratio CURVE / plain, median of --repeats runs, rows interleaved so that the machine's
noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.bench_sdk import _consume, _produce
from ingest.security import ClientCurve, generate_keys
from tests.support import Appliance


def start_pair(tmp: Path) -> tuple[Appliance, Appliance, ClientCurve]:
    _, server_secret = generate_keys(tmp / "keys", "appliance")
    client_public, client_secret = generate_keys(tmp / "keys", "bench")
    allowed = tmp / "authorized"
    allowed.mkdir()
    (allowed / client_public.name).write_bytes(client_public.read_bytes())
    plain = Appliance(tmp / "plain", workers=2).start()
    secured = Appliance(tmp / "curve", workers=2, config_text=f"""
[security]
curve = true
server_secret_key_file = "{server_secret}"
authorized_keys_dir = "{allowed}"
""").start(wait=False)
    curve = ClientCurve.from_files(tmp / "keys" / "appliance.key", client_secret)
    return plain, secured, curve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    values = [b"x" * 100] * args.records
    rows: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        plain, secured, curve = start_pair(Path(tmp))
        try:
            _produce(secured.bootstrap, "warm", "fsync", values[:10], False, False, curve)  # waits for ready
            for r in range(args.repeats):
                for name, app, keys in (("plain", plain, None), ("curve", secured, curve)):
                    topic = f"t{r}"
                    add = rows.setdefault
                    add("send() acks=fsync", {}).setdefault(name, []).append(
                        _produce(app.bootstrap, topic, "fsync", values, False, False, keys))
                    add("send_batch() acks=fsync", {}).setdefault(name, []).append(
                        _produce(app.bootstrap, topic, "fsync", values, True, True, keys))
                    add("Consumer.poll_batch()", {}).setdefault(name, []).append(
                        _consume(app.bootstrap, topic, 2 * args.records, True, keys))
        finally:
            plain.stop()
            secured.stop()
    print(f"{args.records} records of 100 B per row, median of {args.repeats}")
    print(f"{'path':28} {'plain rec/s':>12} {'CURVE rec/s':>12} {'CURVE/plain':>11}")
    for path, by in rows.items():
        p, c = statistics.median(by["plain"]), statistics.median(by["curve"])
        print(f"{path:28} {p:12,.0f} {c:12,.0f} {c / p:11.2f}")


if __name__ == "__main__":
    main()
