"""The agent's pure logic: checking assignments, diffing them, commands, backoff, settings."""

from __future__ import annotations

import pytest

from common.errors import FailedPrecondition, InvalidArgument
from protos import agent_pb2, plan_pb2
from services.agent import diff, settings
from services.agent.diff import Action, NodeShape
from services.agent.inventory import sm_count_by_name
from services.agent.replicas import mps_percentage, render_command, socket_path
from services.agent.supervisor import RestartPolicy

MPS = plan_pb2.SHARE_MODE_MPS
GREEN = plan_pb2.SHARE_MODE_GREEN
SLICED = plan_pb2.SHARE_MODE_TIME_SLICED
HOST = NodeShape(node="n1", mode=MPS, host=True)
GPUS = NodeShape(node="n1", mode=MPS, gpus={0: 15, 1: 15})
GREEN_GPUS = NodeShape(node="n1", mode=GREEN, gpus={0: 15})


def ep(rid: str, gpu: int = -1, pct: float = 50, batch: int = 4, groups=(), mode=0, **kw):
    pipeline, stage, _ = rid.split(".")
    plan = plan_pb2.ReplicaPlan(
        replica_id=rid, gpu=gpu, sm_percent=pct, sm_groups=list(groups), max_batch=batch,
        max_wait_us=kw.get("wait", 1000), mode=mode, node=kw.get("node", ""),
    )  # fmt: skip
    return plan_pb2.Endpoint(pipeline=pipeline, stage=kw.get("stage", stage), replica=plan)


def assignment(*eps, epoch=1, node="n1"):
    return agent_pb2.Assignment(epoch=epoch, node=node, replicas=list(eps))


def actions(running, *eps, mode=MPS):
    return {c.replica_id: c.action for c in diff.diff(running, assignment(*eps), mode)}


def test_diff_by_replica_id():
    running = {"p.a.0": ep("p.a.0"), "p.b.0": ep("p.b.0"), "p.c.0": ep("p.c.0")}
    got = actions(running, ep("p.a.0"), ep("p.b.0", pct=30), ep("p.d.0"))
    assert got == {
        "p.a.0": Action.KEEP,
        "p.b.0": Action.REPLACE,
        "p.c.0": Action.STOP,
        "p.d.0": Action.START,
    }


@pytest.mark.parametrize(
    "changed",
    [
        {"pct": 30},
        {"batch": 8},
        {"wait": 50},
        {"gpu": 1},
        {"stage": "other"},
    ],
)
def test_process_settings_need_a_new_process(changed):
    old = {"p.a.0": ep("p.a.0", gpu=0)}
    assert actions(old, ep("p.a.0", **{"gpu": 0, **changed})) == {"p.a.0": Action.REPLACE}


def test_groups_resize_in_green_mode_and_do_not_matter_in_mps_mode():
    green = {"p.a.0": ep("p.a.0", groups=(0, 1))}
    assert actions(green, ep("p.a.0", groups=(0, 1, 2)), mode=GREEN) == {"p.a.0": Action.RESIZE}
    # in green mode the MPS percentage is not used, so a change of it alone is no change
    assert actions(green, ep("p.a.0", groups=(0, 1), pct=10), mode=GREEN) == {"p.a.0": Action.KEEP}
    assert actions(green, ep("p.a.0", groups=(1, 0)), mode=GREEN) == {"p.a.0": Action.KEEP}
    assert actions(green, ep("p.a.0", groups=(5,)), mode=MPS) == {"p.a.0": Action.KEEP}
    # a batch change in green mode still needs a new process
    assert actions(green, ep("p.a.0", groups=(0, 1), batch=9), mode=GREEN) == {
        "p.a.0": Action.REPLACE
    }


def test_valid_assignments_pass():
    diff.validate(assignment(ep("p.a.0"), ep("p.b.0", pct=100)), HOST, 0)
    diff.validate(assignment(ep("p.a.0", gpu=0, pct=60), ep("p.b.0", gpu=0, pct=60)), GPUS, 0)
    diff.validate(
        assignment(ep("p.a.0", gpu=0, groups=(0, 1)), ep("p.b.0", gpu=0, groups=(2,))),
        GREEN_GPUS,
        0,
    )
    # the same epoch again is allowed (idempotent re-apply)
    diff.validate(assignment(ep("p.a.0"), epoch=3), HOST, 3)


def test_older_epoch_is_a_failed_precondition():
    with pytest.raises(FailedPrecondition):
        diff.validate(assignment(ep("p.a.0"), epoch=2), HOST, 3)


@pytest.mark.parametrize(
    ("shape", "eps", "node"),
    [
        (GPUS, [ep("p.a.0", gpu=2)], "n1"),  # unknown GPU
        (HOST, [ep("p.a.0", gpu=0)], "n1"),  # no GPUs on the host backend
        (GPUS, [ep("p.a.0", gpu=0, pct=0)], "n1"),
        (GPUS, [ep("p.a.0", gpu=0, pct=100.5)], "n1"),
        (HOST, [ep("p.a.0"), ep("p.a.0")], "n1"),  # duplicate id
        (HOST, [ep("p.a.0")], "n2"),  # another node's assignment
        (HOST, [ep("p.a.0", node="n2")], "n1"),
        (HOST, [ep("p.a.0", batch=-1)], "n1"),
        (HOST, [ep("p.a.0", wait=-1)], "n1"),
        (GREEN_GPUS, [ep("p.a.0", gpu=0, groups=(0, 1)), ep("p.b.0", gpu=0, groups=(1,))], "n1"),
        (GREEN_GPUS, [ep("p.a.0", gpu=0, groups=())], "n1"),
        (GREEN_GPUS, [ep("p.a.0", gpu=0, groups=(15,))], "n1"),  # the split has 0..14
        (GREEN_GPUS, [ep("p.a.0", gpu=0, groups=(-1,))], "n1"),
        (GREEN_GPUS, [ep("p.a.0", gpu=0, mode=MPS)], "n1"),  # never mix (error 915)
        (GPUS, [ep("p.a.0", gpu=0, groups=(0,), mode=GREEN)], "n1"),
        (HOST, [ep("p.a.0", mode=SLICED)], "n1"),  # taking turns needs a GPU
    ],
)
def test_assignments_that_do_not_fit_are_invalid(shape, eps, node):
    with pytest.raises(InvalidArgument):
        diff.validate(assignment(*eps, node=node), shape, 0)


def test_time_sliced_runs_beside_mps_clients_and_green_ones_and_changing_it_is_a_new_process():
    for shape in (GPUS, GREEN_GPUS):
        other = ep("p.b.0", gpu=0, groups=(0,)) if shape is GREEN_GPUS else ep("p.b.0", gpu=0)
        diff.validate(assignment(ep("p.a.0", gpu=0, pct=100, mode=SLICED), other), shape, 0)
    running = {"p.a.0": ep("p.a.0", gpu=0, pct=100, mode=plan_pb2.SHARE_MODE_NONE)}
    assert actions(running, ep("p.a.0", gpu=0, pct=100, mode=SLICED)) == {"p.a.0": Action.REPLACE}
    assert diff.sm_percent(ep("p.a.0", gpu=0, pct=100, mode=SLICED).replica, MPS) == 100


def test_groups_may_repeat_across_gpus():
    shape = NodeShape(node="n1", mode=GREEN, gpus={0: 15, 1: 15})
    diff.validate(
        assignment(ep("p.a.0", gpu=0, groups=(0, 1)), ep("p.b.0", gpu=1, groups=(0, 1))), shape, 0
    )


def test_default_command_renders_every_field():
    fields = {name: f"<{name}>" for name in (
        "python", "pipeline", "stage", "size", "replica_id", "unix", "broker", "redis", "backend",
        "max_batch", "max_wait_us", "sm_percent", "sm_groups", "device", "metrics_port", "node",
    )}  # fmt: skip
    argv = render_command(settings.DEFAULT_REPLICA_COMMAND, fields)
    assert argv[:3] == ["<python>", "-m", "services.stage"]
    assert argv[argv.index("--sm-percent") + 1] == "<sm_percent>"
    with pytest.raises(KeyError):
        render_command(("{nope}",), fields)


def test_socket_paths_stay_short(tmp_path):
    short = socket_path("/tmp/c/replicas", "p.a.0.1")
    assert short == "/tmp/c/replicas/p.a.0.1.sock"
    long = socket_path("/tmp/" + "d" * 60, "pipeline." + "s" * 50 + ".0.1")
    assert len(long) <= 100 and long.endswith(".sock")
    with pytest.raises(ValueError):
        socket_path("/" + "x" * 120, "p.a.0.1")


def test_mps_percentage_is_whole_and_in_range():
    assert [mps_percentage(p) for p in (50, 37.6, 0.2, 100)] == ["50", "38", "1", "100"]


def test_restart_backoff_grows_to_a_cap():
    policy = RestartPolicy(backoff_s=0.5, backoff_cap_s=3.0)
    assert [policy.delay_s(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_sm_count_table_prefers_the_longest_name():
    assert sm_count_by_name("NVIDIA H100 80GB HBM3") == 132
    assert sm_count_by_name("NVIDIA H100 PCIe") == 114
    assert sm_count_by_name("NVIDIA L40S") == 142
    assert sm_count_by_name("Mystery GPU") == 0


def test_settings_from_environment_and_flags():
    env = {
        "CAMELOT_NODE": "gpu7",
        "CAMELOT_AGENT_PORT": "6000",
        "CAMELOT_SHARE_MODE": "green",
        "CAMELOT_MPS": "external",
        "CAMELOT_REPLICA_COMMAND": "python -m x --id {replica_id}",
    }
    s = settings.parse(["--scheduler", "sched:50051"], env)
    assert (s.node, s.port, s.share_mode, s.mps) == ("gpu7", 6000, "green", "external")
    assert s.scheduler_addr == "sched:50051"
    assert s.replica_command == ("python", "-m", "x", "--id", "{replica_id}")
    assert settings.parse([], {}).replica_command == settings.DEFAULT_REPLICA_COMMAND


def test_bad_settings_name_the_variable():
    with pytest.raises(ValueError, match="CAMELOT_SHARE_MODE"):
        settings.parse([], {"CAMELOT_SHARE_MODE": "time-slice"})
    with pytest.raises(ValueError, match="CAMELOT_AGENT_PORT"):
        settings.parse([], {"CAMELOT_AGENT_PORT": "high"})
    with pytest.raises(SystemExit):
        settings.parse(["--heartbeat-s", "0"], {})
