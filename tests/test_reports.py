"""ReportWriter and ReportReader against a real redis-server, including a Redis restart."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from common import metrics
from common.clock import wall_us
from common.reports import STREAM, ReportWriter
from protos import report_pb2
from scheduler.service.reader import ReportReader
from scheduler.service.windows import Windows


def rep(i: int = 0, pipeline: str = "p") -> report_pb2.LatencyReport:
    return report_pb2.LatencyReport(
        kind=report_pb2.REPORT_KIND_QUERY,
        pipeline=pipeline,
        query_id=f"q{i}",
        end_unix_us=wall_us(),
        total_us=1000 + i % 500,
    )


async def batches(url: str, stream: str = STREAM) -> list[report_pb2.ReportBatch]:
    r = aioredis.Redis.from_url(url)
    try:
        out = []
        for _id, fields in await r.xrange(stream):
            b = report_pb2.ReportBatch()
            b.ParseFromString(fields[b"b"])
            out.append(b)
        return out
    finally:
        await r.aclose()


async def wait_for(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_flood_is_batched_at_most_once_per_interval(redis_server) -> None:
    writer = ReportWriter(redis_server.url, "gateway@n1", flush_interval_s=0.05)
    started = time.monotonic()
    await writer.start()
    added = 0
    # a flood for 1 s, bounded below the writer's buffer: a flush that a loaded machine delays
    # must not turn this test of batching into one of overflow (tested below)
    while time.monotonic() - started < 1.0:
        for _ in range(200 if added < 40_000 else 0):
            writer.add(rep(added))
            added += 1
        await asyncio.sleep(0)
    await writer.aclose()
    elapsed = time.monotonic() - started
    r = aioredis.Redis.from_url(redis_server.url)
    xlen = await r.xlen(STREAM)
    await r.aclose()
    assert 1 < xlen <= elapsed / 0.05 + 1
    got = await batches(redis_server.url)
    assert sum(len(b.reports) for b in got) == added
    assert all(b.source == "gateway@n1" and b.dropped == 0 for b in got)
    assert writer.dropped_total == 0 and writer.sent_total == added


async def test_overflow_is_dropped_and_announced(redis_server) -> None:
    writer = ReportWriter(redis_server.url, "s@n", max_buffer=10)
    for i in range(25):
        writer.add(rep(i))  # not started: all buffered, the overflow dropped
    assert writer.buffered == 10 and writer.dropped_total == 15
    await writer.start()
    await writer.aclose()
    (batch,) = await batches(redis_server.url)
    assert len(batch.reports) == 10 and batch.dropped == 15


async def test_redis_restart_writer_and_reader_survive(redis_server) -> None:
    dropped_metric = metrics.REPORTS_DROPPED.labels(service="gw")
    before = dropped_metric._value.get()
    windows = Windows()
    reader = ReportReader(redis_server.url, windows, block_ms=50)
    writer = ReportWriter(redis_server.url, "gw@n1", flush_interval_s=0.02)
    await reader.start()
    await writer.start()
    stop = asyncio.Event()

    async def produce() -> None:
        i = 0
        while not stop.is_set():
            writer.add(rep(i))
            i += 1
            await asyncio.sleep(0.002)

    producer = asyncio.create_task(produce())
    try:
        await wait_for(lambda: reader.reports_total > 20)
        redis_server.kill()
        await wait_for(lambda: writer.dropped_total > 0)
        await asyncio.sleep(0.3)
        assert not producer.done()  # adding never blocked or raised
        read_before = reader.reports_total
        redis_server.start()
        await wait_for(lambda: reader.dropped_total > 0, timeout_s=20)
        await wait_for(lambda: reader.reports_total > read_before + 20, timeout_s=20)
    finally:
        stop.set()
        await producer
        await writer.aclose()
        await reader.aclose()
    assert dropped_metric._value.get() - before == writer.dropped_total
    # the first batch after the outage announced the drops, and the reader counted them (read from
    # the reader, not the stream: the reader trims what it has acknowledged)
    assert 0 < reader.dropped_total <= writer.dropped_total
    assert windows.snapshot(60)[("p", "")].count == reader.reports_total


async def test_the_scheduler_trims_what_it_has_read(redis_server) -> None:
    writer = ReportWriter(redis_server.url, "t@n", flush_interval_s=0.01)
    async with writer:
        for i in range(400):
            writer.add(rep(i))
            if i % 20 == 0:
                await asyncio.sleep(0.02)
    r = aioredis.from_url(redis_server.url)
    before = await r.xlen(STREAM)
    reader = ReportReader(redis_server.url, Windows(), block_ms=50, count=8)
    await reader.ensure_group()
    while await reader.read_once():
        pass
    after = await r.xlen(STREAM)
    await r.aclose()
    await reader.aclose()
    assert before > 10 and after < before // 2  # trimming is approximate (whole nodes)
