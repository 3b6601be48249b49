"""A TCP relay that delays every byte by a fixed time in each direction: a delayed link
for kernels without sch_netem (tests/test_replication_netns.py runs it in the middle
network namespace with `ip netns exec`).

    python -m tests.delay_relay --listen 10.0.0.1 --connect 10.0.0.2 --ports 9000,9001 --delay-ms 40

Listens on every port at --listen and forwards each connection to the same port at
--connect. Prints "ready" once every port is bound. Order is kept: each chunk is sent
`delay_ms` after it was read, so the delay adds to latency and does not cap throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

CHUNK_BYTES = 1 << 16


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        try:
            while chunk := await reader.read(CHUNK_BYTES):
                queue.put_nowait((time.monotonic() + delay_s, chunk))
        except OSError:
            pass
        queue.put_nowait((time.monotonic() + delay_s, b""))  # end of stream, delayed like the data

    async def write() -> None:
        try:
            while True:
                due, chunk = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    reading = asyncio.ensure_future(read())
    await write()
    reading.cancel()


async def _serve(listen: str, connect: str, port: int, delay_s: float) -> asyncio.AbstractServer:
    async def on_connection(down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(connect, port)
        except OSError:
            down_writer.close()
            return
        await asyncio.gather(_pump(down_reader, up_writer, delay_s), _pump(up_reader, down_writer, delay_s))

    return await asyncio.start_server(on_connection, listen, port, reuse_address=True)


async def _main(args: argparse.Namespace) -> None:
    delay_s = args.delay_ms / 1000
    servers = [await _serve(args.listen, args.connect, port, delay_s) for port in args.ports]
    print("ready", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--connect", required=True)
    parser.add_argument("--ports", required=True, type=lambda s: [int(p) for p in s.split(",")])
    parser.add_argument("--delay-ms", required=True, type=float)
    args = parser.parse_args(argv)
    assert args.delay_ms >= 0, "a delay cannot be negative"
    try:
        asyncio.run(_main(args))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
