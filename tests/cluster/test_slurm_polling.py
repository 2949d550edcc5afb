"""Issue 14's Done-means for polling, on the real Slurm test cluster as the unprivileged
client: 1,000 pending refs in `wait()` for 10 s (held jobs, `--hold`, cancelled after)
cost the store no more opens per second than 10 refs do. The opens are counted in this
process, on the provider's store (its public `fs`). Before the polling rewrite: 2,814
reads/s with 1,010 refs against 30/s with 10; after: 0 and 0."""

from __future__ import annotations

import time

import pytest

from hpc_serverless import distribute_task, wait

from ..unit.test_batch_polling import count_store_reads

pytestmark = pytest.mark.cluster

WAIT_S = 10.0


@distribute_task(target={"directives": ["--hold"]})
def held(i):
    return i


def _opens_per_second(provider, refs) -> tuple[float, int]:
    """Store opens (and stats) per second while wait() sits on `refs` for WAIT_S; and
    how many scheduler status commands ran meanwhile."""
    provider.backend.flush()
    counting = count_store_reads(provider.store)
    before = dict(provider.transport.counts)
    try:
        t0 = time.monotonic()
        done, pending = wait(refs, timeout=WAIT_S)
        elapsed = time.monotonic() - t0
    finally:
        provider.store.fs = counting.inner
    after = dict(provider.transport.counts)
    polls = sum(after.get(c, 0) - before.get(c, 0) for c in ("sacct", "squeue"))
    assert done == [] and len(pending) == len(refs), "a held job finished"
    return (counting.opens + counting.stats) / elapsed, polls


def test_wait_on_1000_held_jobs_reads_the_store_no_more_than_on_10(on_slurm):
    refs: list = []
    try:
        refs = [held(i) for i in range(10)]
        few_rate, few_polls = _opens_per_second(on_slurm, refs)
        refs += [held(i) for i in range(1000)]
        many_rate, many_polls = _opens_per_second(on_slurm, refs)
        print(f"store reads per second in wait(): 10 refs {few_rate:.1f} ({few_polls} polls), "
              f"1,010 refs {many_rate:.1f} ({many_polls} polls)")
        assert many_polls >= 1 and few_polls >= 1  # the engine asked the scheduler meanwhile
        assert "held" in refs[-1].info()["reason"].lower()  # pending because held (JobHeldUser)
        assert many_rate <= few_rate + 2, (few_rate, many_rate)
    finally:
        arrays = sorted({r._job_id.split("_", 1)[0] for r in refs if r._job_id})
        if arrays:
            on_slurm.scheduler.cancel(arrays)
