"""Progress on stderr (captured here): a bar that redraws in place on a terminal and writes a line
per quarter into a file, steps as lines, and a bar of seconds that moves with the clock."""

from __future__ import annotations

import asyncio
import io

from common.progress import Progress, step, ticking


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_into_a_file_a_line_per_quarter_and_the_end() -> None:
    out = io.StringIO()
    with Progress("burst text-to-img", 32, "queries", out) as bar:
        for _ in range(32):
            bar.advance()
    lines = out.getvalue().splitlines()
    assert [line.split("] ")[1].split(" queries")[0] for line in lines] == [
        "0/32", "8/32", "16/32", "24/32", "32/32",
    ]  # fmt: skip
    assert lines[0].startswith("burst text-to-img [........................]")
    assert lines[-1].startswith("burst text-to-img [########################] 32/32 queries")
    assert "\r" not in out.getvalue()


def test_on_a_terminal_it_redraws_one_line() -> None:
    out = Terminal()
    bar = Progress("trial", 4, "", out)
    for _ in range(4):
        bar.advance()
    bar.close("done")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("done\x1b[K\n")
    assert text.startswith("\rtrial [")
    assert "4/4" in text.split("\r")[-1]


def test_close_says_why_and_only_once() -> None:
    out = io.StringIO()
    try:
        with Progress("soak", 10, "s", out) as bar:
            bar.update(3)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[-1].endswith("interrupted") and "3/10 s" in lines[-1]
    assert sum("interrupted" in line for line in lines) == 1


def test_step_is_a_line() -> None:
    out = io.StringIO()
    step("camelot: broker starting (pid 1)", out)
    assert out.getvalue() == "camelot: broker starting (pid 1)\n"


async def test_ticking_moves_with_the_clock_while_the_body_runs() -> None:
    out = io.StringIO()
    async with ticking("openloop", 0.6, out) as bar:
        while bar.done < 0.3:  # noqa: ASYNC110 (the ticker, not the body, moves it)
            await asyncio.sleep(0.05)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("openloop [....") and lines[-1].startswith("openloop [")
    assert len(lines) >= 3  # the start, at least the second quarter, the end
