"""A TCP proxy on loopback that adds a fixed round-trip time, to measure sshd "far away".

    python benchmarks/latency_proxy.py --rtt-ms 40 --target 127.0.0.1:2222 --lifetime 600

prints the port it listens on (127.0.0.1 only), then forwards every connection to the
target, holding each chunk rtt/2 in each direction. Chunks are delayed, not serialized:
bytes keep flowing at the link's speed, only later (a long fat pipe, like a WAN).
Bounded: loopback only, at most --max-conns connections, at most 8 MiB in flight per
direction, and it exits by itself after --lifetime seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
import time

_IN_FLIGHT = 8 << 20


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader to writer, each chunk delivered `delay` seconds after it arrived."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=max(1, _IN_FLIGHT // 65536))

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(65536):
            await queue.put((time.monotonic() + delay, data))
    except ConnectionError:
        pass
    await queue.put((time.monotonic() + delay, b""))
    try:
        await sender
    except ConnectionError:
        pass


async def _serve(target: tuple[str, int], rtt: float, lifetime: float, max_conns: int) -> None:
    active = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        if active >= max_conns:
            writer.close()
            return
        active += 1
        try:
            up_r, up_w = await asyncio.open_connection(*target)
            await asyncio.gather(_pipe(reader, up_w, rtt / 2), _pipe(up_r, writer, rtt / 2))
        except OSError:
            pass
        finally:
            active -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await asyncio.sleep(lifetime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rtt-ms", type=float, default=40.0)
    ap.add_argument("--target", default="127.0.0.1:2222")
    ap.add_argument("--lifetime", type=float, default=600.0, help="seconds before it exits by itself")
    ap.add_argument("--max-conns", type=int, default=16)
    args = ap.parse_args()
    host, _, port = args.target.rpartition(":")
    if not ipaddress.ip_address(host).is_loopback:
        print(f"latency_proxy: refusing a target off loopback: {host}", file=sys.stderr)
        return 2
    asyncio.run(_serve((host, int(port)), args.rtt_ms / 1000.0, args.lifetime, args.max_conns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
