"""Where a process's host CPU goes (loadgen.hostprofile): py-spy's raw stacks read and summed,
the busiest processes of each kind chosen, and, where py-spy is installed, a real busy process
sampled from outside."""

from __future__ import annotations

import pytest

from common.errors import InvalidArgument
from loadgen import hostprofile
from loadgen.hostcost import ProcessTree
from loadgen.hostladder import Trials

RAW = """\
<module> (app.py);serve (app.py);copy_in (query.py) 6
<module> (app.py);serve (app.py);walk (tree.py);walk (tree.py) 3
<module> (app.py);serve (app.py) 1
 2
"""


def test_raw_stacks_are_summed_by_the_function_on_top_and_anywhere_in_the_stack():
    stacks = hostprofile.parse_raw(RAW)
    assert stacks[("<module> (app.py)", "serve (app.py)", "copy_in (query.py)")] == 6
    got = hostprofile.summarize(stacks)
    # a thread in C code it entered from C has no Python frame on its stack
    assert stacks[(hostprofile.NO_FRAME,)] == 2
    got = hostprofile.summarize(stacks)
    assert got["samples"] == 12
    assert got["self"] == [
        {"frame": "copy_in (query.py)", "frac": 0.5},
        {"frame": "walk (tree.py)", "frac": 0.25},
        {"frame": hostprofile.NO_FRAME, "frac": 0.1667},
        {"frame": "serve (app.py)", "frac": 0.0833},
    ]
    inclusive = {e["frame"]: e["frac"] for e in got["inclusive"]}
    # a recursive function counts once per sample
    assert inclusive["walk (tree.py)"] == 0.25 and inclusive["serve (app.py)"] == 0.8333
    assert hostprofile.summarize({}) == {"samples": 0, "self": [], "inclusive": []}
    table = hostprofile.table({"gateway@1": {**got, "raw": "x"}, "stage:p/s@2": {"error": "gone"}})
    assert "| gateway@1 | 12 | `copy_in (query.py)` 50%" in table
    assert "| stage:p/s@2 | - | not profiled: gone |" in table


def test_a_raw_line_without_a_count_is_refused_with_its_line_number():
    with pytest.raises(InvalidArgument, match="line 2"):
        hostprofile.parse_raw("a (x.py) 1\na (x.py);b (y.py)\n")
    with pytest.raises(InvalidArgument, match="line 1"):
        hostprofile.parse_raw("a (x.py) many\n")


def test_the_busiest_processes_of_each_kind_are_chosen():
    before = {1: ("gateway", 0), 2: ("gateway", 0), 3: ("gateway", 0), 4: ("stage:p/a", 0),
              5: ("stage:p/b", 0), 6: ("broker", 0), 7: ("gateway", 0)}  # fmt: skip
    after = {1: ("gateway", 10), 2: ("gateway", 50), 3: ("gateway", 30), 4: ("stage:p/a", 5),
             5: ("stage:p/b", 9), 6: ("broker", 99), 8: ("gateway", 99)}  # fmt: skip
    # 7 exited and 8 is new: neither was seen across the second; brokers are not profiled
    assert hostprofile.busiest(before, after, {"gateway": 2, "stage": 4}) == [
        (2, "gateway"),
        (3, "gateway"),
        (5, "stage:p/b"),
        (4, "stage:p/a"),
    ]


def test_the_rate_to_profile_at_must_be_one_the_ladder_runs():
    with pytest.raises(InvalidArgument, match="not one of the rates"):
        Trials((10.0, 20.0), profile_at=15.0)
    with pytest.raises(InvalidArgument, match="profile_s"):
        Trials((10.0,), profile_at=10.0, profile_s=0)
    assert Trials((10.0, 20.0), profile_at=20.0).profile_at == 20.0


async def test_a_tool_that_fails_is_reported_per_process_and_raises_nothing(tree_procs, tmp_path):
    root, _ = tree_procs
    got = await hostprofile.profile_busiest(
        ProcessTree({root: "gateway"}), 1, tmp_path, "t", exe="/bin/false"
    )
    assert got and all("exited 1" in p["error"] for p in got.values()), got


@pytest.mark.skipif(hostprofile.py_spy() is None, reason="py-spy is not installed")
@pytest.mark.timeout(120)
async def test_a_busy_process_is_sampled_from_outside_and_its_hot_function_named(
    tree_procs, tmp_path
):
    root, kids = tree_procs
    got = await hostprofile.profile_busiest(ProcessTree({root: "gateway"}), 1, tmp_path, "t")
    burner = next(name for name in got if name.startswith("gateway@"))
    assert int(burner.split("@")[1]) in kids
    p = got[burner]
    assert p["samples"] > 0, p
    assert p["self"][0]["frame"] == "burn_cpu (<string>)" and p["self"][0]["frac"] > 0.5, p
    assert (tmp_path / p["raw"]).read_text().strip()
    # the sleeping replica is chosen as its kind's busiest too; asleep, it has no samples
    assert any(name.startswith("stage:p/s@") for name in got), got
