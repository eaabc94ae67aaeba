"""common.broadcast.Broadcast: the newest value to every watcher, equal values once, close ends all.

Also the agent's RouteBoard, which is one: every publish there is a new revision.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from common.broadcast import Broadcast
from protos import plan_pb2
from services.agent.routes import RouteBoard


async def settle() -> None:
    """Lets every task that a publish woke run until it waits again."""
    for _ in range(5):
        await asyncio.sleep(0)


async def follow(b: Broadcast[str], seen: list[str]) -> None:
    async for value in b.watch():
        seen.append(value)


async def test_watchers_get_the_current_value_then_each_change_in_order() -> None:
    b = Broadcast("")
    b.publish("a")
    seen: list[list[str]] = [[], []]
    tasks = [asyncio.create_task(follow(b, s)) for s in seen]
    await settle()
    assert seen == [["a"], ["a"]]
    for value in ("b", "c"):
        b.publish(value)
        await settle()
    assert seen == [["a", "b", "c"], ["a", "b", "c"]]
    assert b.version == 3 and b.value == "c"
    b.close()
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks)


async def test_a_watcher_waits_for_the_first_publish() -> None:
    b = Broadcast("initial")
    seen: list[str] = []
    task = asyncio.create_task(follow(b, seen))
    await settle()
    assert seen == [] and b.version == 0
    b.publish("initial")  # the first publish counts even when it equals the initial value
    await settle()
    assert seen == ["initial"] and b.version == 1
    b.close()
    async with asyncio.timeout(5):
        await task


async def test_an_equal_value_publishes_nothing_new() -> None:
    b = Broadcast(plan_pb2.Routes())
    assert b.publish(plan_pb2.Routes(epoch=1))
    assert not b.publish(plan_pb2.Routes(epoch=1))  # equal, though another object
    assert b.version == 1
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await b.wait_after(1)
    assert b.publish(plan_pb2.Routes(epoch=2))
    assert b.version == 2
    async with asyncio.timeout(5):
        assert await b.wait_after(1)


async def test_close_ends_every_watcher_now_and_later() -> None:
    b = Broadcast(0)
    b.publish(1)
    seen: list[list[int]] = [[], []]

    async def follow_ints(out: list[int]) -> None:
        async for value in b.watch():
            out.append(value)

    tasks = [asyncio.create_task(follow_ints(s)) for s in seen]
    await settle()
    b.close()
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks)
    assert seen == [[1], [1]] and b.closed
    # closed wins over a version not yet seen, and a watcher that comes later ends at once
    b.publish(2)
    async with asyncio.timeout(5):
        assert not await b.wait_after(0)
        assert [v async for v in b.watch()] == []


async def test_a_slow_watcher_gets_the_newest_value_not_each_one() -> None:
    b = Broadcast(0)
    b.publish(1)
    async with asyncio.timeout(5), contextlib.aclosing(b.watch()) as watch:
        assert await anext(watch) == 1
        for value in (2, 3, 4):
            b.publish(value)
        assert await anext(watch) == 4
        nxt = asyncio.ensure_future(anext(watch))
        await settle()
        assert not nxt.done()  # nothing new to see
        b.publish(5)
        assert await nxt == 5


async def test_route_board_makes_a_revision_of_every_publish() -> None:
    board = RouteBoard()
    ep = plan_pb2.Endpoint(address="127.0.0.1:1")
    assert board.routes() == plan_pb2.Routes()
    changed = asyncio.create_task(board.changed())
    await settle()
    board.publish(3, [ep])
    async with asyncio.timeout(5):
        await changed
        assert await board.wait_after(0) == plan_pb2.Routes(epoch=3, revision=1, endpoints=[ep])
    # the same endpoints again: still a new revision, which wakes the agent's heartbeat
    changed = asyncio.create_task(board.changed())
    await settle()
    board.publish(3, [ep])
    async with asyncio.timeout(5):
        await changed
    assert (board.epoch, board.revision) == (3, 2)
    assert board.routes() == plan_pb2.Routes(epoch=3, revision=2, endpoints=[ep])
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await board.wait_after(2)
