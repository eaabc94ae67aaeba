"""ShareSwitch: a batch never straddles a share switch; an old share is released only after its
last batch ended; superseded requests are discarded unused."""

from __future__ import annotations

import threading
import time
from concurrent.futures import wait

import grpc
import pytest

from common.errors import CamelotError, FailedPrecondition
from services.green import ShareSwitch


class Share:
    """A stand-in share that knows how many batches use it and whether it was let go."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.active = 0
        self.batches = 0
        self.released = False
        self.discarded = False
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Share({self.name})"


class Recorder:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.swaps: list[tuple[Share, Share]] = []
        self.lock = threading.Lock()

    def on_swap(self, old: Share, new: Share) -> None:
        with self.lock:
            if old.active:
                self.errors.append(f"{old} released with {old.active} batches running")
            if old.released or old.discarded:
                self.errors.append(f"{old} released twice")
            old.released = True
            self.swaps.append((old, new))

    def on_discard(self, share: Share) -> None:
        with self.lock:
            if share.batches:
                self.errors.append(f"{share} discarded after it ran batches")
            share.discarded = True


def run_batches(switch: ShareSwitch[Share], stop: threading.Event, errors: list[str]) -> None:
    while not stop.is_set():
        share = switch.begin_batch()
        with share.lock:
            share.active += 1
            share.batches += 1
        if share.released or share.discarded:
            errors.append(f"batch began on {share}, already let go")
        time.sleep(0.0002)  # the batch's "GPU work"
        at_end = switch.current
        if at_end is not share:
            errors.append(f"batch began on {share} but the switch moved to {at_end} mid-batch")
        if share.released:
            errors.append(f"{share} released while its batch ran")
        with share.lock:
            share.active -= 1
        switch.end_batch()


@pytest.mark.parametrize("workers", [1, 3])
def test_no_batch_straddles_a_switch_under_concurrent_requests(workers):
    rec = Recorder()
    first = Share("s0")
    switch = ShareSwitch(first, on_swap=rec.on_swap, on_discard=rec.on_discard)
    stop = threading.Event()
    errors: list[str] = []
    requested: list[Share] = []
    futures = []
    req_lock = threading.Lock()

    def requester(k: int) -> None:
        for i in range(150):
            share = Share(f"r{k}-{i}")
            fut = switch.request(share)
            with req_lock:
                requested.append(share)
                futures.append((share, fut))
            time.sleep(0.0003 * ((i + k) % 3))

    batchers = [
        threading.Thread(target=run_batches, args=(switch, stop, errors)) for _ in range(workers)
    ]
    requesters = [threading.Thread(target=requester, args=(k,)) for k in range(3)]
    for t in batchers + requesters:
        t.start()
    for t in requesters:
        t.join(timeout=30)
    stop.set()
    for t in batchers:
        t.join(timeout=30)

    assert not errors + rec.errors
    assert switch.in_flight == 0
    # once idle, the last pending request (if any) was installed by the last end_batch
    assert switch.pending is None
    wait([f for _, f in futures], timeout=5)
    installed = [s for s, f in futures if f.exception() is None]
    cancelled = [s for s, f in futures if f.exception() is not None]
    assert all(f.done() for _, f in futures)
    for _, f in futures:
        if f.exception() is not None:
            assert isinstance(f.exception(), CamelotError)
            assert f.exception().code == grpc.StatusCode.CANCELLED
    # every request was either installed (then released when replaced) or discarded unused
    assert all(s.discarded and not s.batches for s in cancelled)
    assert all(not s.discarded for s in installed)
    assert sorted(id(new) for _, new in rec.swaps) == sorted(id(s) for s in installed)
    assert switch.current is (rec.swaps[-1][1] if rec.swaps else first)
    assert all(s.released for s in [first, *installed] if s is not switch.current)
    assert not switch.current.released
    assert switch.swaps == len(rec.swaps) >= 1
    assert sum(s.batches for s in [first, *requested]) > 0


def test_request_while_idle_switches_at_once():
    rec = Recorder()
    a, b = Share("a"), Share("b")
    switch = ShareSwitch(a, on_swap=rec.on_swap, on_discard=rec.on_discard)
    fut = switch.request(b)
    assert fut.done() and fut.result() is b
    assert switch.current is b and a.released
    assert switch.begin_batch() is b
    switch.end_batch()


def test_request_during_a_batch_waits_for_its_end_and_old_share_outlives_it():
    rec = Recorder()
    a, b, c = Share("a"), Share("b"), Share("c")
    switch = ShareSwitch(a, on_swap=rec.on_swap, on_discard=rec.on_discard)
    assert switch.begin_batch() is a
    fut_b = switch.request(b)
    assert not fut_b.done() and switch.current is a and not a.released
    fut_c = switch.request(c)  # supersedes b before b was ever used
    assert b.discarded and isinstance(fut_b.exception(), CamelotError)
    # a second overlapping batch still gets the share in force, not the pending one
    assert switch.begin_batch() is a
    switch.end_batch()
    assert not a.released and not fut_c.done()
    switch.end_batch()
    assert fut_c.result(timeout=1) is c
    assert a.released and switch.current is c and not c.released
    assert rec.swaps == [(a, c)]


def test_end_without_begin_is_refused():
    switch = ShareSwitch(Share("a"))
    with pytest.raises(FailedPrecondition):
        switch.end_batch()


def test_batch_context_manager_ends_on_error_and_requesting_current_is_a_no_op():
    a = Share("a")
    switch = ShareSwitch(a)
    with pytest.raises(RuntimeError), switch.batch() as share:
        assert share is a and switch.in_flight == 1
        raise RuntimeError("model failed")
    assert switch.in_flight == 0
    fut = switch.request(a)
    assert fut.result() is a and switch.swaps == 0


def test_failed_release_still_installs_new_share_and_reports_it():
    def on_swap(old: Share, new: Share) -> None:
        raise OSError("destroy failed")

    a, b = Share("a"), Share("b")
    switch = ShareSwitch(a, on_swap=on_swap)
    fut = switch.request(b)
    assert isinstance(fut.exception(), OSError)
    assert switch.current is b
    assert switch.begin_batch() is b
    switch.end_batch()
