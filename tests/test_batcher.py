"""The dynamic batcher: batch closing rules, deadlines, queue limits, draining."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from common.clock import mono_us
from common.errors import DeadlineExceeded, LeaseEnded, ResourceExhausted, Unavailable
from services.stage.batcher import Batcher, Item


class Recorder:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s

    async def __call__(self, items: list[Item]) -> None:
        self.batches.append([i.payload for i in items])
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        for i in items:
            i.future.set_result(i.payload * 10)


async def test_batches_close_at_max_batch():
    rec = Recorder(delay_s=0.05)
    b = Batcher(rec, max_batch=4, max_wait_us=1_000_000, max_queue=100)
    b.start()
    results = await asyncio.gather(*(b.submit(i) for i in range(8)))
    assert results == [i * 10 for i in range(8)]
    assert all(len(batch) <= 4 for batch in rec.batches)
    assert sorted(x for batch in rec.batches for x in batch) == list(range(8))
    await b.stop()


async def test_lone_request_waits_at_most_max_wait():
    rec = Recorder()
    b = Batcher(rec, max_batch=32, max_wait_us=20_000, max_queue=100)
    b.start()
    assert await asyncio.wait_for(b.submit(7), timeout=5) == 70
    assert rec.batches == [[7]]
    await b.stop()


async def test_lone_request_with_no_company_in_sight_runs_at_once():
    rec = Recorder()
    b = Batcher(rec, max_batch=32, max_wait_us=5_000_000, max_queue=100)
    b.start()
    # no arrivals seen before: waiting 5 s for company would be waiting for nobody
    assert await asyncio.wait_for(b.submit(7), timeout=1) == 70
    await b.stop()


async def test_under_load_a_batch_waits_for_company():
    rec = Recorder()
    b = Batcher(rec, max_batch=32, max_wait_us=500_000, max_queue=100)
    b.start()
    # a burst: arrivals far more often than one per max_wait
    await asyncio.gather(*(b.submit(i) for i in range(16)))
    first = asyncio.create_task(b.submit(100))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(b.submit(101))
    assert await asyncio.wait_for(asyncio.gather(first, second), timeout=5) == [1000, 1010]
    assert rec.batches[-1] == [100, 101]
    await b.stop()


async def test_requests_arriving_during_a_batch_form_the_next_one():
    rec = Recorder(delay_s=0.1)
    b = Batcher(rec, max_batch=16, max_wait_us=0, max_queue=100)
    b.start()
    first = asyncio.create_task(b.submit(0))
    await asyncio.sleep(0.02)
    rest = [asyncio.create_task(b.submit(i)) for i in range(1, 6)]
    await asyncio.gather(first, *rest)
    assert rec.batches[0] == [0]
    assert rec.batches[1] == [1, 2, 3, 4, 5]
    await b.stop()


async def test_expired_deadline_fails_only_that_request():
    rec = Recorder(delay_s=0.1)
    b = Batcher(rec, max_batch=1, max_wait_us=0, max_queue=100)
    b.start()
    blocker = asyncio.create_task(b.submit(1))
    await asyncio.sleep(0.01)
    late = asyncio.create_task(b.submit(2, deadline_us=mono_us() + 10_000))
    fine = asyncio.create_task(b.submit(3))
    with pytest.raises(DeadlineExceeded) as e:
        await late
    assert e.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert await blocker == 10 and await fine == 30
    await b.stop()


async def test_full_queue_is_resource_exhausted_with_retry_hint():
    rec = Recorder(delay_s=0.2)
    b = Batcher(rec, max_batch=1, max_wait_us=0, max_queue=2)
    b.start()
    tasks = [asyncio.create_task(b.submit(0))]
    await asyncio.sleep(0.02)  # 0 runs
    tasks += [asyncio.create_task(b.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0.02)  # 1 and 2 wait: the queue is full
    with pytest.raises(ResourceExhausted) as e:
        await b.submit(99)
    assert e.value.retry_after_ms is not None
    await asyncio.gather(*tasks)
    await b.stop()


async def test_drain_finishes_queued_then_refuses():
    rec = Recorder(delay_s=0.02)
    b = Batcher(rec, max_batch=2, max_wait_us=0, max_queue=100)
    b.start()
    tasks = [asyncio.create_task(b.submit(i)) for i in range(6)]
    await asyncio.sleep(0)
    done = await b.drain()
    assert done == 6
    assert [t.result() for t in tasks] == [i * 10 for i in range(6)]
    with pytest.raises(Unavailable):
        await b.submit(1)
    await b.stop()


async def test_a_failing_batch_fails_its_requests_and_the_loop_goes_on():
    calls = 0

    async def flaky(items: list[Item]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        for i in items:
            i.future.set_result(i.payload)

    b = Batcher(flaky, max_batch=1, max_wait_us=0, max_queue=10)
    b.start()
    with pytest.raises(RuntimeError):
        await b.submit(1)
    assert await b.submit(2) == 2
    await b.stop()


async def test_a_batch_failing_with_a_status_fails_with_it_and_logs_no_traceback(caplog):
    async def ended(items: list[Item]) -> None:
        raise LeaseEnded("lease x has ended (done)")

    b = Batcher(ended, max_batch=1, max_wait_us=0, max_queue=10)
    b.start()
    with pytest.raises(LeaseEnded):
        await b.submit(1)
    await b.stop()
    failed = [r for r in caplog.records if "batch of 1 failed" in r.getMessage()]
    assert failed and all(r.exc_info is None for r in failed)
    assert "FAILED_PRECONDITION" in failed[0].getMessage()
