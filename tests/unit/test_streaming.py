"""A large put through the agent is written to the store while its bytes arrive
(hpc_serverless/adapters/streaming.py), over a pipe as the agent reads its SSH channel."""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import threading

import pytest

from hpc_serverless.adapters.streaming import STREAM_ABOVE, Filling, read_request
from hpc_serverless.adapters.wire import encode, exact_reader_into
from hpc_serverless.core.store import ObjectStore


def _put_frame(key: str, parts: list[bytes]) -> list[memoryview]:
    return encode({"id": "r1", "op": "write_parts",
                   "args": (key, [pickle.PickleBuffer(p) for p in parts], False, "bytes", None, None)})


def _serve_one(tmp_path, frame_parts, cut_after: int | None = None):
    """Feed the frame into a pipe (cut after `cut_after` bytes, if given); read one request
    as the agent does, running a streamed write_parts on a thread."""
    store = ObjectStore(tmp_path / "store")
    rfd, wfd = os.pipe()
    data = b"".join(bytes(p) for p in frame_parts)
    if cut_after is not None:
        data = data[:cut_after]

    def feed() -> None:
        view = memoryview(data)
        while view.nbytes:
            view = view[os.write(wfd, view[:1 << 16]):]
        os.close(wfd)

    threading.Thread(target=feed, daemon=True).start()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    started: list[tuple[dict, Filling | None, concurrent.futures.Future]] = []

    def start(request, filling):
        key, parts, overwrite, type_name, meta, durable = request["args"]
        fut = pool.submit(store.write_parts, key, [memoryview(p) for p in parts], overwrite=overwrite,
                          type_name=type_name, meta=meta, durable=durable,
                          ready=filling.wait if filling else None)
        started.append((request, filling, fut))

    def readinto(view):
        return os.readv(rfd, [view])

    try:
        read_request(exact_reader_into(readinto), readinto, start)
        error = None
    except EOFError as exc:
        error = exc
    os.close(rfd)
    return store, started, error


def test_a_large_put_is_written_while_it_streams_in(tmp_path):
    big = os.urandom(STREAM_ABOVE + 12345)
    store, started, error = _serve_one(tmp_path, _put_frame("objects/ab/big", [b"head", big]))
    assert error is None and len(started) == 1
    _request, filling, fut = started[0]
    assert filling is not None  # started before its bytes were there
    fut.result(timeout=30)
    data, buffers, _ = store.read_parts("objects/ab/big")
    assert bytes(data) == b"head" and bytes(buffers[0]) == big


def test_a_small_put_is_read_whole_first(tmp_path):
    store, started, error = _serve_one(tmp_path, _put_frame("objects/ab/small", [b"x", b"y" * 1000]))
    assert error is None and started[0][1] is None
    started[0][2].result(timeout=30)
    assert bytes(store.read_parts("objects/ab/small")[1][0]) == b"y" * 1000


def test_a_put_cut_mid_stream_leaves_nothing(tmp_path):
    frame = _put_frame("objects/ab/cut", [b"head", os.urandom(STREAM_ABOVE * 2)])
    store, started, error = _serve_one(tmp_path, frame, cut_after=STREAM_ABOVE)
    assert isinstance(error, EOFError)
    with pytest.raises(EOFError, match="before all its bytes arrived"):
        started[0][2].result(timeout=30)
    assert not store.exists("objects/ab/cut")
    assert [n for n in os.listdir(tmp_path / "store" / "objects" / "ab") if n.endswith(".tmp")] == []
