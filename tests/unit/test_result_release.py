"""Task results leave memory when their last TaskRef is garbage-collected, and not before
(issue 14): the liveness count itself (core/live_refs.py) and the local provider's pool,
a real pool of worker processes on this machine. Pilot mode: tests/cluster/test_pilot_memory.py."""

from __future__ import annotations

import copy
import gc
import pickle
import threading
import time

import pytest

from hpc_serverless import distribute_task, get
from hpc_serverless.core.live_refs import LiveRefs
from hpc_serverless.core.refs import TaskRef
from hpc_serverless.providers.local import shared_pool


@distribute_task
def make(n, tag=0):
    return bytes([tag % 256]) * n


@distribute_task
def nap_then(seconds, value):
    time.sleep(seconds)
    return value


@distribute_task
def length_plus(blob, k):
    return len(blob) + k


def _settle(pool, within=60.0):
    """Wait until the pool runs and queues nothing (the tasks here have no ref to wait on)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with pool._lock:
            busy = any(w.task is not None for w in pool._workers) or pool._ready
        if not busy:
            return
        time.sleep(0.05)
    raise AssertionError(f"the pool was still busy after {within} s: {pool.stats()}")


def _tracked(pool):
    """Tasks the pool holds, after one round trip through the dispatcher (which drops what
    was released), counted once that round trip's own task has gone too (else it is
    counted or not, by a race: CI saw 35 -> 36)."""
    gc.collect()
    probe = make(1)
    probe_id = probe.task_id
    get(probe)
    del probe
    gc.collect()
    deadline = time.monotonic() + 10
    while probe_id in pool._tasks and time.monotonic() < deadline:
        pool._wake()
        time.sleep(0.02)
    return pool.stats()["tracked"]


# -- the count -----------------------------------------------------------------------------
def test_a_task_is_gone_only_when_every_copy_of_its_ref_is():
    live = LiveRefs()
    a = TaskRef("t1", "k")
    live.watch(a)
    b = pickle.loads(pickle.dumps(a))
    c = copy.copy(a)
    live.watch(b)
    live.watch(c)
    del a, b
    gc.collect()
    assert live.collect() == []           # c still lives
    assert [r.task_id for r in live.refs("t1")] == ["t1"]
    del c
    gc.collect()
    assert live.collect() == ["t1"]
    assert live.collect() == [] and len(live) == 0
    live.probe("t1")                      # asked again later: still gone
    assert live.collect() == ["t1"]


def test_a_probe_of_a_live_task_reports_nothing():
    live = LiveRefs()
    keep = TaskRef("t2", "k")
    live.watch(keep)
    live.probe("t2")
    assert live.collect() == []
    assert live.refs("t2") == [keep]


# -- the local pool ----------------------------------------------------------------------
def test_a_copy_of_a_ref_keeps_the_result_after_the_original_is_gone():
    ref = make(1000, 7)
    assert get(ref) == b"\x07" * 1000
    twin = pickle.loads(pickle.dumps(ref))     # a new object, same task id
    del ref
    gc.collect()
    assert get(twin) == b"\x07" * 1000
    assert get(twin) == b"\x07" * 1000         # repeatable while a ref lives


def test_an_upstream_ref_dropped_while_its_dependent_waits_keeps_the_value():
    up = nap_then(0.5, b"x" * 5000)
    down = length_plus(up, 1)
    del up
    gc.collect()
    assert get(down, timeout=60) == 5001
    assert get(down, timeout=60) == 5001


def test_results_whose_refs_went_before_they_finished_leave_the_pool():
    """Fire and forget: 300 results of 100 kB whose refs are dropped at once (while the
    tasks are queued or running) must not stay in the pool."""
    pool = shared_pool()
    before = _tracked(pool)
    ids = [make(100_000, i).task_id for i in range(300)]  # each TaskRef is dropped at once
    gc.collect()
    _settle(pool)
    after = _tracked(pool)
    assert after <= before, f"{after - before} dropped tasks still held by the pool ({before} -> {after})"
    # (counted by task id too: other tests' tasks leaving meanwhile cannot hide ours)
    held = [i for i in ids if i in pool._tasks]
    assert not held, f"{len(held)} dropped tasks still held by the pool"


def test_results_leave_the_pool_when_their_refs_go_and_not_before():
    # (counted by task id: other tests' tasks may leave the pool meanwhile)
    pool = shared_pool()
    refs = [make(100_000, i) for i in range(50)]
    ids = [r.task_id for r in refs]
    values = get(refs, timeout=60)
    assert all(v == bytes([i]) * 100_000 for i, v in enumerate(values))
    assert get(refs[3]) == b"\x03" * 100_000   # repeatable
    _tracked(pool)
    assert all(i in pool._tasks for i in ids)
    keep = refs[10]
    del refs, values
    _tracked(pool)
    assert [i for i in ids if i in pool._tasks] == [keep.task_id]
    assert get(keep) == b"\x0a" * 100_000


@pytest.fixture(autouse=True)
def _no_leftover_tasks():
    yield
    _settle(shared_pool())


def test_waking_the_pool_never_blocks_even_when_its_loop_is_busy():
    """The pool's thread wakes itself too (a ref dropped while it holds its lock): a wake
    must not block on a full socket buffer, or the thread waits on itself while holding the
    lock every submit needs (seen: a full-suite run hung in submit)."""
    from hpc_serverless.engines.local_pool import LocalPool

    pool = LocalPool(1, 100)  # never started: nothing drains its wake socket
    done = threading.Event()

    def flood():
        for _ in range(200_000):  # far more bytes than a socket buffer holds
            pool._wake()
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(30), "waking the pool blocked"
