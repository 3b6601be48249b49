"""The `ingest` command: serve, produce, consume, topics, status, processors, check, bridge.

Errors a user can cause end as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ingest.net.client import DEFAULT_BOOTSTRAP


# Futures `ingest produce` holds before it checks the older half: hundreds of thousands of
# live futures cost Python's garbage collector more than the sends themselves.
PRODUCE_FUTURES_MAX = 20_000
# `ingest status` samples the metrics twice this far apart to show rates.
STATUS_RATE_INTERVAL_S = 0.5


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 1 (or .exit_code)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---- serve -------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from ingest import config as config_mod
    from ingest.supervisor import Supervisor

    server = {"data_dir": args.data_dir, "bind": args.bind, "port": args.port, "advertised_host": args.advertised_host,
              "metrics_port": args.metrics_port,
              "workers": None if args.workers is None else (0 if args.workers == "auto" else _int(args.workers, "--workers"))}
    storage = {"flush_interval_ms": args.flush_interval_ms}
    cfg = config_mod.load(args.config, {"server": server, "storage": storage})
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s supervisor %(levelname)s %(message)s")
    return Supervisor(cfg).run()


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CliError(f"{flag} takes a number or 'auto', not {text!r}") from None


# ---- produce / consume -------------------------------------------------------------------

def cmd_produce(args) -> int:
    from collections import deque

    from ingest import Producer

    stream = open(args.file, "rb") if args.file else sys.stdin.buffer
    key = args.key.encode() if args.key is not None else None
    pending: deque = deque()
    outcome = {"sent": 0, "failed": 0, "first_error": None}

    def settle(count: int) -> None:
        for _ in range(count):
            try:
                pending.popleft().result(timeout=args.timeout_ms / 1000)
            except Exception as e:  # each failure is counted, the first one shown
                outcome["failed"] += 1
                outcome["first_error"] = outcome["first_error"] or e

    with Producer(args.bootstrap, acks=args.acks, curve=_curve(args)) as producer:
        for line in stream:
            pending.append(producer.send(args.topic, line.rstrip(b"\r\n"), key=key))
            outcome["sent"] += 1
            if len(pending) >= PRODUCE_FUTURES_MAX:
                settle(PRODUCE_FUTURES_MAX // 2)
        producer.flush()
        settle(len(pending))
    if stream is not sys.stdin.buffer:
        stream.close()
    failed = outcome["failed"]
    word = "sent" if args.acks == "0" else "acked"
    print(f"{outcome['sent'] - failed} records {word}" + (f", {failed} failed: {outcome['first_error']}" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


def cmd_consume(args) -> int:
    import orjson

    from ingest import Consumer

    partitions = [args.partition] if args.partition is not None else None
    out = sys.stdout.buffer
    count = 0
    with Consumer(args.bootstrap, args.topic, group=args.group, from_beginning=args.from_beginning,
                  partitions=partitions, curve=_curve(args)) as consumer:
        if args.offset is not None:
            if args.partition is None:
                raise CliError("--offset needs --partition")
            consumer.seek(args.partition, args.offset)
        for record in consumer.records(idle_timeout_ms=args.idle_timeout_ms):
            if args.format == "json":
                out.write(orjson.dumps(_record_json(record)) + b"\n")
            else:
                out.write((record.value or b"") + b"\n")
            count += 1
            if args.max_records and count >= args.max_records:
                break
        out.flush()
        if args.group:
            consumer.commit()
    return 0


def _record_json(r) -> dict:
    def text(b):
        if b is None:
            return None
        try:
            return bytes(b).decode()
        except UnicodeDecodeError:
            return bytes(b).hex()

    return {"topic": r.topic, "partition": r.partition, "offset": r.offset, "timestamp_ms": r.timestamp_ms,
            "key": text(r.key), "value": text(r.value), "headers": {k: text(v) for k, v in r.headers}}


# ---- topics / status / check -------------------------------------------------------------

def cmd_topics(args) -> int:
    import orjson

    from ingest.net.client import BootstrapClient

    with BootstrapClient(args.bootstrap, curve=_curve(args)) as client:
        if args.action == "create":
            if not args.topic:
                raise CliError("topics create needs a topic name")
            doc = client.create_topic(args.topic, args.partitions)
            t = doc["topics"][args.topic]
            print(f"topic {args.topic}: {t['partitions']} partitions" + ("" if doc.get("created", True) else " (exists)"))
            return 0
        topics = client.metadata()["topics"]
        if args.action == "list":
            for name, t in topics.items():
                print(f"{name}\t{t['partitions']}")
            return 0
        if args.topic not in topics:
            raise CliError(f"topic {args.topic!r} does not exist")
        print(orjson.dumps({args.topic: topics[args.topic]}, option=orjson.OPT_INDENT_2).decode())
        return 0


def cmd_promote(args) -> int:
    from ingest.net import wire
    from ingest.net.client import BootstrapClient

    with BootstrapClient(args.bootstrap, curve=_curve(args)) as client:
        doc = client.request(wire.PromoteRequest()).document
    print(f"{args.bootstrap}: {doc['role']} at leader epoch {doc['leader_epoch']}")
    return 0


def cmd_status(args) -> int:
    import orjson

    from ingest.net.client import BootstrapClient

    with BootstrapClient(args.bootstrap, curve=_curve(args)) as client:
        meta = client.metadata()
        if args.json:
            print(orjson.dumps(meta, option=orjson.OPT_INDENT_2).decode())
        else:
            before = _scrape(meta)
            time.sleep(STATUS_RATE_INTERVAL_S)
            meta = client.metadata()
            print(_render(meta, _scrape(meta), before, STATUS_RATE_INTERVAL_S, args.bootstrap))
    return 0 if all(w["up"] for w in meta["workers"]) else 1


def cmd_top(args) -> int:
    from ingest.net.client import BootstrapClient

    interval_s = args.interval_ms / 1000
    shown = 0
    with BootstrapClient(args.bootstrap, curve=_curve(args)) as client:
        before = None
        while not args.iterations or shown < args.iterations:
            meta = client.metadata()
            now = _scrape(meta)
            screen = _render(meta, now, before, interval_s, args.bootstrap)
            sys.stdout.write("\x1b[H\x1b[2J" + screen + "\n" if sys.stdout.isatty() else screen + "\n\n")
            sys.stdout.flush()
            before, shown = now, shown + 1
            if not args.iterations or shown < args.iterations:
                time.sleep(interval_s)
    return 0


def _scrape(meta: dict):
    """The appliance's /metrics as samples, or None if it cannot be read from here."""
    import urllib.request

    from ingest.status import parse_metrics

    try:
        with urllib.request.urlopen(meta["metrics"], timeout=2) as response:
            return parse_metrics(response.read().decode())
    except (OSError, ValueError, KeyError):
        return None


def _render(meta: dict, now, before, interval_s: float, bootstrap: str) -> str:
    from ingest.status import render

    if now is None:
        return render(meta, {}, None, 0, bootstrap) + f"\n(metrics at {meta.get('metrics')} unreachable from here)"
    return render(meta, now, before, interval_s, bootstrap)


def cmd_processors(args) -> int:
    import orjson

    from ingest.net.client import BootstrapClient
    from ingest.streams import status

    with BootstrapClient(args.bootstrap, curve=_curve(args)) as client:
        meta = client.metadata()
    if args.action == "list":
        print(orjson.dumps(meta.get("processors", []), option=orjson.OPT_INDENT_2).decode() if args.json
              else status.render_list(meta))
        return 0
    samples = _scrape(meta)
    if samples is None:
        raise CliError(f"metrics at {meta.get('metrics')} are unreachable from here")
    rows = status.status_rows(meta, samples)
    print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() if args.json else status.render_status(rows))
    return 1 if any(r["failed"] for r in rows) else 0


def cmd_keys(args) -> int:
    from ingest.security import generate_keys

    public, secret = generate_keys(args.directory, args.name)
    print(f"public key (hand out; put clients' into authorized_keys_dir): {public}")
    print(f"secret key (keep private, mode 0600): {secret}")
    return 0


def cmd_check(args) -> int:
    from ingest.shards import check

    return check.main([args.data_dir])


def _curve(args):
    """CURVE credentials from --curve-server-key/--curve-client-key (or their env vars)."""
    if not args.curve_server_key and not args.curve_client_key:
        return None
    if not (args.curve_server_key and args.curve_client_key):
        raise CliError("CURVE needs both --curve-server-key (appliance .key) and --curve-client-key (your .key_secret)")
    from ingest.security import ClientCurve

    return ClientCurve.from_files(args.curve_server_key, args.curve_client_key)


# ---- parser ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingest", description="IoT telemetry ingestion appliance")
    sub = p.add_subparsers(dest="command", required=True)
    client = argparse.ArgumentParser(add_help=False)  # options of every command that connects
    client.add_argument("--bootstrap", default=DEFAULT_BOOTSTRAP)
    client.add_argument("--curve-server-key", default=os.environ.get("INGEST_CURVE_SERVER_KEY"),
                        help="the appliance's public key file, when it requires CURVE")
    client.add_argument("--curve-client-key", default=os.environ.get("INGEST_CURVE_CLIENT_KEY"),
                        help="this client's secret key file (its public key must be authorized)")

    s = sub.add_parser("serve", help="run the appliance (supervisor + one worker per core)")
    s.add_argument("--config", help="TOML config file (optional; defaults are embedded)")
    s.add_argument("--data-dir")
    s.add_argument("--workers", help="number of workers or 'auto' (usable cores)")
    s.add_argument("--bind", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="bootstrap port (default 7400); workers use the ports after it")
    s.add_argument("--advertised-host", help="host name clients are told to connect to (default: bind address)")
    s.add_argument("--metrics-port", type=int, help="HTTP port for /metrics, /healthz, /readyz (default 9740)")
    s.add_argument("--flush-interval-ms", type=int, help="group commit interval (default 5)")
    s.set_defaults(func=cmd_serve)

    pr = sub.add_parser("produce", help="send one record per input line", parents=[client])
    pr.add_argument("--topic", required=True)
    pr.add_argument("--key")
    pr.add_argument("--acks", default="fsync", choices=["0", "1", "fsync", "all"])
    pr.add_argument("--file", help="read lines from this file instead of stdin")
    pr.add_argument("--timeout-ms", type=int, default=120_000, help="how long to wait for all acks")
    pr.set_defaults(func=cmd_produce)

    c = sub.add_parser("consume", help="print records, one per line", parents=[client])
    c.add_argument("--topic", required=True)
    c.add_argument("--from-beginning", action="store_true")
    c.add_argument("--partition", type=int)
    c.add_argument("--offset", type=int)
    c.add_argument("--group")
    c.add_argument("--max-records", type=int, default=0)
    c.add_argument("--idle-timeout-ms", type=int, default=0, help="exit when no record came this long (0: never)")
    c.add_argument("--format", choices=["value", "json"], default="value")
    c.set_defaults(func=cmd_consume)

    t = sub.add_parser("topics", help="list, create or describe topics", parents=[client])
    t.add_argument("action", choices=["list", "create", "describe"])
    t.add_argument("topic", nargs="?")
    t.add_argument("--partitions", type=int)
    t.set_defaults(func=cmd_topics)

    st = sub.add_parser("status", help="workers, endpoints and topics of a running appliance", parents=[client])
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    pm = sub.add_parser("promote", help="make this follower appliance the leader (leader epoch + 1)",
                        parents=[client])
    pm.set_defaults(func=cmd_promote)

    tp = sub.add_parser("top", help="the status table, refreshed live", parents=[client])
    tp.add_argument("--interval-ms", type=int, default=1000)
    tp.add_argument("--iterations", type=int, default=0, help="screens to show (0: until Ctrl-C)")
    tp.set_defaults(func=cmd_top)

    pc = sub.add_parser("processors", help="stream processors: list them, or their position, lag and windows",
                        parents=[client])
    pc.add_argument("action", choices=["list", "status"])
    pc.add_argument("--json", action="store_true")
    pc.set_defaults(func=cmd_processors)

    k = sub.add_parser("keys", help="generate a CURVE key pair (appliance or client)")
    k.add_argument("action", choices=["generate"])
    k.add_argument("directory", help="where to write NAME.key and NAME.key_secret")
    k.add_argument("--name", default="appliance")
    k.set_defaults(func=cmd_keys)

    ch = sub.add_parser("check", help="verify every segment of a data directory offline")
    ch.add_argument("data_dir")
    ch.set_defaults(func=cmd_check)

    from ingest.bridge import cli as bridge_cli  # `ingest bridge mqtt`; paho is imported lazily
    bridge_cli.add_parsers(sub, client)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import zmq

    from ingest.config import ConfigError
    from ingest.net.errors import IngestError
    from ingest.security import SecurityError

    try:
        return args.func(args)
    except zmq.ZMQError as e:
        print(f"ingest {args.command}: {e} (is another appliance using these ports?)", file=sys.stderr)
        return 1
    except (CliError, ConfigError, IngestError, SecurityError, OSError) as e:
        print(f"ingest {args.command}: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
