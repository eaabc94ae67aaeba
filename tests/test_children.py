"""The parent's side of the child-process pipe protocol (`loadgen.children`), with real
spawned children."""

from __future__ import annotations

import multiprocessing as mp
import os
from multiprocessing.connection import Connection

import pytest

from loadgen.children import ChildFailed, ChildReported, expect, reap


def _child(conn: Connection, behaviour: str) -> None:
    if behaviour == "ok":
        conn.send(("ready", 42))
    elif behaviour == "error":
        conn.send(("error", "ValueError: no inputs"))
    elif behaviour == "wrong":
        conn.send(("records", []))
    elif behaviour == "die":
        os._exit(3)  # a native crash: no word, no clean exit
    conn.recv()  # wait for the parent


def start(behaviour: str):
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(theirs, behaviour), daemon=True)
    proc.start()
    return mine, theirs, proc


@pytest.mark.parametrize(
    ("behaviour", "error", "match"),
    [("error", ChildReported, "ValueError: no inputs"),
     ("wrong", ChildFailed, "expected 'ready', got 'records'"),
     ("die", ChildFailed, "exited with 3")],
)  # fmt: skip
def test_what_the_parent_hears(behaviour, error, match):
    mine, theirs, proc = start(behaviour)
    try:
        with pytest.raises(error, match=match):
            expect(mine, "ready", 30.0, proc)
    finally:
        mine.send(None)
        reap([proc], 5.0)


def test_the_message_body_comes_back_and_a_silent_child_times_out():
    mine, theirs, proc = start("ok")
    try:
        assert expect(mine, "ready", 30.0, proc) == 42
        with pytest.raises(ChildFailed, match="no 'records' within"):
            expect(mine, "records", 0.5, proc)
    finally:
        reap([proc], 0.1)  # still waiting for the parent: killed
    assert not proc.is_alive()
