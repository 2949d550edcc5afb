"""Large puts through the agent, written to the store while their bytes still arrive.

A put's frame is its small pickle (the request: op, key, ...) followed by its out-of-band
buffers. Reading the whole frame before writing would serialize the two slow steps (the
SSH stream, then the disk); here the request is decoded first, over buffers still empty,
the store starts writing at once, and each chunk is written as soon as it has arrived.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any, Callable

from hpc_serverless.adapters.wire import read_head

#: puts smaller than this are read whole first (no thread handoff for small objects)
STREAM_ABOVE = 8 << 20


class Filling:
    """How far each buffer of a frame has been filled; the writer waits on it."""

    def __init__(self, count: int) -> None:
        self._cv = threading.Condition()
        self._filled = [0] * count
        self._failed = False

    def advance(self, index: int, filled: int) -> None:
        with self._cv:
            self._filled[index] = filled
            self._cv.notify_all()

    def fail(self) -> None:
        """The stream broke: the writer stops (and removes its temporary file)."""
        with self._cv:
            self._failed = True
            self._cv.notify_all()

    def wait(self, index: int, end: int) -> None:
        with self._cv:
            while self._filled[index] < end:
                if self._failed:
                    raise EOFError("the put's stream ended before all its bytes arrived")
                self._cv.wait()


def read_request(read_exact: Callable[[int], Any], readinto: Callable[[memoryview], int],
                 start: Callable[[dict[str, Any], Filling | None], None]) -> None:
    """Read one request frame and hand it to `start` (which runs it elsewhere). A large
    write_parts is started before its buffers are filled, with a Filling to wait on (the
    store's chunk order is the buffers' order); any other request once it is whole."""
    sizes = read_head(read_exact)
    buffers = [bytearray(n) for n in sizes[1:]]
    message = pickle.loads(bytes(read_exact(sizes[0])), buffers=buffers)
    parts = message.get("args", ())[1] if message.get("op") == "write_parts" else None
    stream = (parts is not None and sum(sizes[1:]) >= STREAM_ABOVE
              and [id(getattr(p, "obj", p)) for p in parts] == [id(b) for b in buffers])  # (read-only: views)
    filling = Filling(len(buffers)) if stream else None
    if filling is not None:
        start(message, filling)
    try:
        for index, buf in enumerate(buffers):
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = readinto(view[got:])
                if not n:
                    raise EOFError("the stream ended")
                got += n
                if filling is not None:
                    filling.advance(index, got)
    except BaseException:
        if filling is not None:
            filling.fail()
        raise
    if filling is None:
        start(message, None)
