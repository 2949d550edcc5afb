"""The agent protocol's frames: what travels between a client and its agent.

A frame is one pickled message plus its out-of-band buffers (pickle protocol 5), so the
bytes of a put or a result are written to the channel straight from their memory::

    b"HPCW" | u32 part count | u64 length of each part | part 0 (the pickle) | parts 1..n

Both ends are the same user's code (the agent runs in the cluster account the SSH login
authenticated), so pickles are as trusted as the store's. A request is
``{"id": str, "op": str, "args": tuple}``; its reply ``{"id": str, "ok": bool,
"value" | "error": ...}``. Ids are unique per client: the agent runs a request it has
seen before only once and answers the copy with the first answer.
"""

from __future__ import annotations

import pickle
import platform
import struct
from typing import Any, Callable

__all__ = ["PROTOCOL", "MAGIC", "versions", "encode", "read_head", "read_frame", "exact_reader",
           "exact_reader_into"]

#: bumped whenever a message changes shape; the handshake refuses a different one
PROTOCOL = 2  # 2: session_beat, session_close, gc, du, remove_program; task ids carry a session
MAGIC = b"HPCW"
_HEAD = struct.Struct("<4sI")
_SIZE = struct.Struct("<Q")
#: a frame bigger than this is a damaged stream, not a message
MAX_FRAME = 1 << 40


def versions() -> dict[str, Any]:
    """What client and agent must agree on: protocol, package and Python minor version."""
    from hpc_serverless.version import __version__

    return {"protocol": PROTOCOL, "hpc_serverless": __version__,
            "python": ".".join(platform.python_version_tuple()[:2])}


def encode(message: Any) -> list[memoryview]:
    """The parts of one frame, ready to be written in order."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [memoryview(data)] + [b.raw() for b in buffers]
    head = _HEAD.pack(MAGIC, len(raws)) + b"".join(_SIZE.pack(r.nbytes) for r in raws)
    return [memoryview(head), *raws]


class FrameError(Exception):
    """The stream does not hold frames (a damaged stream, or not an agent at the far end)."""


def read_head(read_exact: Callable[[int], bytes | bytearray | memoryview]) -> list[int]:
    """The sizes of a frame's parts (the pickle, then each buffer), from its head."""
    magic, count = _HEAD.unpack(read_exact(_HEAD.size))
    if magic != MAGIC or count > 1 << 20:
        raise FrameError(f"not an agent frame (starts {bytes(magic)!r})")
    sizes = [_SIZE.unpack(read_exact(_SIZE.size))[0] for _ in range(count)]
    if sum(sizes) > MAX_FRAME:
        raise FrameError("a frame of impossible size")
    return sizes


def read_frame(read_exact: Callable[[int], bytes | bytearray | memoryview]) -> Any:
    """One message from a stream; `read_exact(n)` returns n bytes or raises EOFError."""
    parts = [read_exact(n) for n in read_head(read_exact)]
    return pickle.loads(parts[0], buffers=parts[1:])


def exact_reader(recv: Callable[[int], bytes]) -> Callable[[int], bytes | bytearray | memoryview]:
    """`read_exact` over a recv-like function (socket, paramiko channel, file read)."""

    def read_exact(n: int) -> bytes | bytearray | memoryview:
        if n == 0:
            return b""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            chunk = recv(min(n - got, 1 << 20))
            if not chunk:
                raise EOFError("the stream ended")
            view[got:got + len(chunk)] = chunk
            got += len(chunk)
        return buf

    return read_exact


def exact_reader_into(readinto: Callable[[memoryview], int]) -> Callable[[int], bytes | bytearray | memoryview]:
    """`read_exact` over a readinto-like function (os.readv on a pipe, socket.recv_into):
    the bytes land in their final buffer, with no copy per chunk (puts are hundreds of MB)."""

    def read_exact(n: int) -> bytes | bytearray | memoryview:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = readinto(view[got:])
            if not k:
                raise EOFError("the stream ended")
            got += k
        return buf

    return read_exact
