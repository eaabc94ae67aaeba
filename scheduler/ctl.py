"""`camelotctl`: the operator's command line for the scheduler's Admin API.

    camelotctl set-policy NAME [--option K=V ...] [--wait]
    camelotctl set-qos PIPELINE MS [--wait]
    camelotctl get-plan
    camelotctl status [--window-s S]
    camelotctl drain (--node NODE | --replica ID) [--wait]

--target (or CAMELOT_SCHEDULER_ADDR, else the scheduler of the mesh `camelot run --serve` / `camelot
up` started, from the record in --run-dir); the token from --token-file, CAMELOT_ADMIN_TOKEN_FILE,
CAMELOT_ADMIN_TOKEN, else that mesh's token file; mutual TLS with CAMELOT_TLS_CERT, CAMELOT_TLS_KEY
and CAMELOT_TLS_CA, as the scheduler has them. set-policy, set-qos and drain with --wait follow
the new plan until it is in force (a progress line on stderr; exit 1 if it is not within
--wait-timeout-s). A failed call prints one line (its status code and message) on stderr and
exits 1; a usage error exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import grpc

from common import meshrecord
from common.lifecycle import TlsFiles, channel
from common.settings import SettingsError, options_of
from protos import admin_pb2, admin_pb2_grpc, plan_pb2
from scheduler.ctlwait import NotInForce, wait_in_force

DEADLINE_S = 30.0
WAIT_TIMEOUT_S = 300.0
_MODES = {
    plan_pb2.SHARE_MODE_NONE: "none",
    plan_pb2.SHARE_MODE_MPS: "mps",
    plan_pb2.SHARE_MODE_GREEN: "green",
    plan_pb2.SHARE_MODE_TIME_SLICED: "time-sliced",
}


def format_plan(plan: plan_pb2.Plan) -> str:
    lines = [
        f"epoch {plan.epoch}  policy {plan.policy or '-'}  reason: {plan.reason or '-'}",
    ]
    if plan.planned_qps:
        load = ", ".join(f"{k} {v:.1f}" for k, v in sorted(plan.planned_qps.items()))
        lines.append(f"planned load (qps): {load}")
    if plan.clamped:
        lines.append(f"clamped (target not met): {', '.join(plan.clamped)}")
    rows = [("PIPELINE", "STAGE", "REPLICA", "NODE", "GPU", "SM%", "GROUPS", "BATCH", "MODE")]
    for st in plan.stages:
        for r in st.replicas:
            rows.append(
                (
                    st.pipeline,
                    st.stage,
                    r.replica_id,
                    r.node,
                    str(r.gpu) if r.gpu >= 0 else "host",
                    f"{r.sm_percent:.1f}" if r.gpu >= 0 else "-",  # no SM shares on the host
                    ",".join(map(str, r.sm_groups)) or "-",
                    str(r.max_batch),
                    _MODES.get(r.mode, "-"),
                )
            )
    lines.append(_table(rows))
    return "\n".join(lines)


def format_status(resp: admin_pb2.StatusResponse) -> str:
    applied = resp.applied_epoch
    head = (
        f"policy {resp.policy}  epoch {resp.plan.epoch} planned, {applied} applied"
        f"{'' if applied >= resp.plan.epoch else ' (being applied)'}  window {resp.window_s:g} s"
        f"  reports {resp.reports_total}  nodes {', '.join(resp.nodes) or '-'}"
    )
    rows = [
        ("PIPELINE", "STAGE", "COUNT", "P50ms", "P95ms", "P99ms", "QOSms", "VERDICT", "ARRIVAL/s",
         "SERVICE/s", "ERR", "REPL", "SM%", "HOSTms"),
    ]  # fmt: skip
    on_gpu = _gpu_rows(resp.plan)
    for s in resp.stats:
        ok = (
            "-"
            if not s.qos_p99_ms or not s.count
            else ("met" if s.p99_ms <= s.qos_p99_ms else "MISSED")
        )
        rows.append(
            (
                s.pipeline,
                s.stage or "*",
                str(s.count),
                f"{s.p50_ms:.2f}",
                f"{s.p95_ms:.2f}",
                f"{s.p99_ms:.2f}",
                f"{s.qos_p99_ms:g}" if s.qos_p99_ms else "",
                ok,
                f"{s.arrival_qps:.1f}",
                f"{s.service_qps:.1f}",
                str(s.errors),
                str(s.replicas),
                f"{s.sm_percent:.1f}" if (s.pipeline, s.stage) in on_gpu else "-",
                _host_cell(s),
            )
        )
    table = head + "\n" + _table(rows) + "\n" + STATUS_LEGEND
    # what the predictive policies plan with, and whether it was measured on the nodes' GPU
    profiles = [f"profiles: {resp.profiles}"] if resp.profiles else []
    return "\n\n".join([table, *profiles, format_loop(resp), format_replicas(resp)])


def _host_cell(s: admin_pb2.WindowStats) -> str:
    if not s.stage:
        return "-"
    return f"{s.host_ms:.2f}" if s.host_count else f"({s.host_ms:.2f})"


# what the windowed columns count: a reader compares them with a client's figures
STATUS_LEGEND = (
    "COUNT, ERR: every query the gateway reported in the window, from every client (probes too);\n"
    "  ERR: those answered with an error, whoever sent them.\n"
    "ARRIVAL/s, SERVICE/s: arrivals and completions per second averaged over the window, not a\n"
    "  client's rate. SM%: the replicas' summed GPU share ('-' on the host: no SM shares).\n"
    "HOSTms: the host's part of a batch the policies add to the stage's profile: the median\n"
    "  compute - GPU time the stage measured; in parentheses where it measured none\n"
    "  (CAMELOT_STAGE_HOST_MS)."
)


def _gpu_rows(plan: plan_pb2.Plan) -> set[tuple[str, str]]:
    """The status rows (pipeline, stage; stage "" for the whole pipeline) that have a replica on
    a GPU: only they hold SM shares."""
    rows = set()
    for st in plan.stages:
        if any(r.gpu >= 0 for r in st.replicas):
            rows |= {(st.pipeline, st.stage), (st.pipeline, "")}
    return rows


def _event(e: admin_pb2.LoopEvent) -> str:
    if not e.unix_s:
        return "never"
    when = time.strftime("%H:%M:%S", time.localtime(e.unix_s))
    out = f"{when} epoch {e.epoch}: {e.reason}"
    return f"{out} [{e.detail}]" if e.detail else out


def format_loop(resp: admin_pb2.StatusResponse) -> str:
    """Per pipeline: the load the plan was sized for against the measured one, and the loop's
    last trigger, re-plan and failed re-plan."""
    rows = [("PIPELINE", "PLANNED/s", "MEASURED/s")]
    lines = []
    for x in resp.loop:
        rows.append((x.pipeline, f"{x.planned_qps:.1f}", f"{x.measured_qps:.1f}"))
        lines.append(f"{x.pipeline}:")
        lines.append(f"  last trigger  {_event(x.last_trigger)}")
        lines.append(f"  last re-plan  {_event(x.last_replan)}")
        lines.append(f"  last failed   {_event(x.last_failed)}")
    return "control loop\n" + _table(rows) + ("\n" + "\n".join(lines) if lines else "")


_PHASES = {
    admin_pb2.REPLICA_PHASE_PLANNED: "planned",
    admin_pb2.REPLICA_PHASE_STARTING: "starting",
    admin_pb2.REPLICA_PHASE_SERVING: "serving",
    admin_pb2.REPLICA_PHASE_DRAINING: "draining",
    admin_pb2.REPLICA_PHASE_FAILED: "FAILED",
    admin_pb2.REPLICA_PHASE_STOPPED: "stopped",
}


def format_replicas(resp: admin_pb2.StatusResponse) -> str:
    rows = [("REPLICA", "PIPELINE", "STAGE", "NODE", "GPU", "SHARE", "STATE", "WHY")]
    for r in resp.replicas:
        share = "-" if r.gpu < 0 else f"{r.sm_percent:g}%"  # no SM shares on the host backend
        state = _PHASES.get(r.phase, "?") + ("" if r.planned else " (old epoch)")
        gpu = str(r.gpu) if r.gpu >= 0 else "host"
        rows.append((r.replica_id, r.pipeline, r.stage, r.node, gpu, share, state, r.detail))
    return "replicas\n" + _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="camelotctl", description="Operate the Camelot scheduler.")
    p.add_argument("--target", help="scheduler host:port (default: the mesh in --run-dir)")
    p.add_argument("--token-file", help="file holding the admin token (default: the mesh's)")
    p.add_argument(
        "--run-dir",
        help=f"the mesh's run directory (CAMELOT_RUN_DIR; default {meshrecord.default_run_dir()})",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("set-policy", help="choose the active policy (re-plans at once)")
    sp.add_argument("name")
    sp.add_argument("--option", action="append", default=[], metavar="K=V")
    sq = sub.add_parser("set-qos", help="set a pipeline's p99 target in milliseconds")
    sq.add_argument("pipeline")
    sq.add_argument("ms", type=float)
    sub.add_parser("get-plan", help="print the plan in force")
    st = sub.add_parser("status", help="windowed latency and load per pipeline and stage")
    st.add_argument("--window-s", type=float, default=0.0)
    dr = sub.add_parser("drain", help="drain a node or one replica")
    g = dr.add_mutually_exclusive_group(required=True)
    g.add_argument("--node")
    g.add_argument("--replica")
    # each of these re-plans; the agents then need a while to apply the new plan
    for s in (sp, sq, dr):
        s.add_argument("--wait", action="store_true", help="return once the plan is in force")
        s.add_argument("--wait-timeout-s", type=float, default=WAIT_TIMEOUT_S)
    return p


async def _call(
    a: argparse.Namespace, token: str, out: TextIO, tls: TlsFiles | None = None
) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    async with channel(a.target, tls) as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        if a.command == "set-policy":
            options = options_of(a.option)
            req = admin_pb2.SetPolicyRequest(policy=a.name, options=options)
            plan = await stub.SetPolicy(req, metadata=metadata, timeout=DEADLINE_S)
            out.write(format_plan(plan))
            if a.wait:
                out.flush()
                await wait_in_force(ch, metadata, plan, a.wait_timeout_s, sys.stderr)
        elif a.command == "set-qos":
            req_q = admin_pb2.SetQosRequest(pipeline=a.pipeline, qos_p99_ms=a.ms)
            plan = await stub.SetQos(req_q, metadata=metadata, timeout=DEADLINE_S)
            out.write(format_plan(plan))
            if a.wait:
                out.flush()
                await wait_in_force(ch, metadata, plan, a.wait_timeout_s, sys.stderr)
        elif a.command == "get-plan":
            plan = await stub.GetPlan(
                admin_pb2.GetPlanRequest(), metadata=metadata, timeout=DEADLINE_S
            )
            out.write(format_plan(plan))
        elif a.command == "status":
            req_s = admin_pb2.StatusRequest(window_s=a.window_s)
            out.write(
                format_status(await stub.Status(req_s, metadata=metadata, timeout=DEADLINE_S))
            )
        elif a.command == "drain":
            req_d = admin_pb2.DrainTargetRequest(node=a.node or "", replica_id=a.replica or "")
            plan = await stub.Drain(req_d, metadata=metadata, timeout=DEADLINE_S)
            out.write(format_plan(plan))
            if a.wait:
                out.flush()
                await wait_in_force(ch, metadata, plan, a.wait_timeout_s, sys.stderr)
        out.write("\n")


def _token(a: argparse.Namespace, run_dir: Path | None) -> str:
    """The admin token: a file named by the flag or the variable, the literal variable, else the
    token file of the mesh whose scheduler is the target; a file that cannot be read is named as
    it was given."""
    env = os.environ
    if a.token_file or env.get("CAMELOT_ADMIN_TOKEN_FILE"):
        path, where = meshrecord.resolve(
            ("--token-file", a.token_file), "CAMELOT_ADMIN_TOKEN_FILE", "token_file", run_dir
        )
    elif env.get("CAMELOT_ADMIN_TOKEN"):
        return env["CAMELOT_ADMIN_TOKEN"]
    else:
        try:
            record = meshrecord.read(run_dir or meshrecord.default_run_dir())
        except meshrecord.NoMesh:
            return ""  # the scheduler then says UNAUTHENTICATED
        if record.scheduler != a.target:
            return ""
        path, where = record.token_file, "the mesh record"
    try:
        with open(path, encoding="utf-8") as f:
            value = f.readline().strip()
    except OSError as e:
        raise SettingsError(
            f"the token file {path!r} (from {where}) cannot be read: {e.strerror}"
        ) from None
    if not value:
        raise SettingsError(f"the token file {path!r} (from {where}) is empty")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    run_dir = Path(a.run_dir) if a.run_dir else None
    where = "--target"
    try:
        a.target, where = meshrecord.resolve(
            ("--target", a.target), "CAMELOT_SCHEDULER_ADDR", "scheduler", run_dir
        )
        token = _token(a, run_dir)
        asyncio.run(_call(a, token, sys.stdout, TlsFiles.from_env()))
    except (SettingsError, meshrecord.NoMesh) as e:
        print(f"camelotctl: {e}", file=sys.stderr)
        return 2
    except NotInForce as e:
        print(f"camelotctl: {e}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            print(
                f"camelotctl: cannot reach the scheduler at {a.target} (from {where}): "
                f"{e.code().name}",
                file=sys.stderr,
            )
        else:
            print(f"camelotctl: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout's reader (`| head`) left: say nothing more, and let exit not flush into it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
