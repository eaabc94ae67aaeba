"""python -m loadgen.experiments peak-load|low-load|diurnal --target HOST:PORT [...]

    peak-load --mix M --policies max-load,even,exclusive   highest rate with p99 <= QoS per policy
    low-load  --mix M --rate R --policies min-resource,even SM share x time at a fixed rate
    diurnal   --mix M --policy min-resource --min-qps 5 --max-qps 50 --duration-s 600
    follow-load --mix M --modes mps,green   a mesh per sharing mode: its peak, then a day
                                            made from it under every policy (follow.py)

A policy is `name` or `name:key=value[:key=value]` (options, e.g. `exclusive:sharing=mps`);
--references lists policies measured beside the rest but not counted as baselines, and the two
references of loadgen.experiments.references: `plain` (exclusive with the wire transport) and
`limit` (the mix with no mesh: loadgen.limit, peak-load only).
Policies are switched through the scheduler's Admin API (--admin HOST:PORT, token from --token or
CAMELOT_ADMIN_TOKEN); --no-admin runs against whatever plan is in force, each "policy" then only a
label. Without --target the experiment runs against the mesh `camelot up` started (its run
directory's record), and without --admin against that mesh's scheduler with its token file.
Results go to <out-dir>/<name>.json and .md, with PNG plots beside them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import replace
from functools import partial
from pathlib import Path

from common import meshrecord
from common.backend import label as backend_label
from common.backend import resolve as resolve_backend
from common.errors import InvalidArgument
from common.results import module_command, run_main, write_result
from loadgen import limit, traces
from loadgen.experiments import follow
from loadgen.experiments.admin import AdminClient
from loadgen.experiments.harness import Harness
from loadgen.experiments.references import LIMIT
from loadgen.experiments.runs import (
    LimitMeasure,
    Outcome,
    Progress,
    diurnal,
    low_load,
    peak_load,
)
from loadgen.experiments.search import SearchConfig
from loadgen.inputs import parse_mix, uniform_mix
from loadgen.limit import LimitConfig

CAMELOT_DEFAULT = {
    "peak-load": "max-load",
    "low-load": "min-resource",
    "diurnal": "min-resource",
    "follow-load": "min-resource",
}


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", help="gateway host:port (default: the mesh's)")
    common.add_argument(
        "--admin", default="",
        help="scheduler Admin API host:port (default: the mesh's, with --target its gateway)",
    )  # fmt: skip
    common.add_argument("--token", default="", help="Admin bearer token (or CAMELOT_ADMIN_TOKEN)")
    common.add_argument("--no-admin", action="store_true", help="leave the plan as it is")
    common.add_argument("--mix", action="append", default=[], help="[label:]p1=w1,p2=w2 (repeat)")
    common.add_argument("--trial-s", type=float, default=10.0)
    common.add_argument("--warmup-s", type=float, default=1.0, help="per trial, not measured")
    common.add_argument("--gap-s", type=float, default=1.0, help="pause after each trial")
    common.add_argument("--settle-s", type=float, default=60.0, help="wait for a new plan")
    common.add_argument(
        "--prime-s", type=float, default=5.0,
        help="unmeasured load after each policy change, at the first trial's rate",
    )  # fmt: skip
    common.add_argument("--arrivals", choices=[a.value for a in traces.Arrivals], default="poisson")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--deadline-s", type=float, default=5.0, help="per request")
    common.add_argument("--qos-ms", type=float, default=None, help="override every pipeline's QoS")
    common.add_argument("--max-error-frac", type=float, default=0.01)
    common.add_argument("--transport", choices=["default", "ref", "wire"], default="default")
    common.add_argument(
        "--shm", default="",
        help="clients on the node: inputs by shared memory, borrowed from this broker (an "
        "address, or `mesh`: the served mesh's, from its record in CAMELOT_RUN_DIR) and sent as "
        "refs; `plain` still sends bytes (default: bytes in every request, as remote clients)",
    )  # fmt: skip
    common.add_argument(
        "--confirm-misses", type=int, default=0,
        help="run a missed trial again this many times, judged on all its requests together",
    )  # fmt: skip
    common.add_argument(
        "--min-queries", type=int, default=0,
        help="lengthen a trial until every pipeline expects this many measured queries",
    )  # fmt: skip
    common.add_argument(
        "--client-processes", type=int, default=1,
        help="send from this many processes (one falls behind at a few hundred qps)",
    )  # fmt: skip
    common.add_argument(
        "--max-lag-frac", type=float, default=0.1,
        help="a missed trial whose sends left later than this fraction of the tightest target "
        "(p99) was the load generator's: the search ends there, the peak a lower bound",
    )  # fmt: skip
    common.add_argument(
        "--connections", type=int, default=8,
        help="client connections (a gateway's workers share the port by connection)",
    )  # fmt: skip
    common.add_argument("--camelot-policy", default="", help="the policy compared to the rest")
    common.add_argument(
        "--references", type=_csv, default=[],
        help="policies measured beside the rest but not counted as baselines (name[:k=v])",
    )  # fmt: skip
    common.add_argument("--backend", choices=["auto", "host", "cuda"], default="auto")
    common.add_argument(
        "--limit-size", default="full",
        help="model size the `limit` reference builds (the mesh's stages' size)",
    )  # fmt: skip
    common.add_argument(
        "--limit-max-batch", type=int, default=64, help="largest batch `limit` may choose"
    )
    common.add_argument(
        "--limit-extra-trials",
        type=int,
        default=3,
        help="trials `limit` may take beyond --max-trials: its trials need no plan applied or "
        "primed, and its peak is every mix's denominator (on the H100 with 5 trials it stopped at "
        "1200 held, 2400 missed, before bisecting)",
    )
    common.add_argument(
        "--limit-from", action="append", default=[],
        help="a folder of pipeline configs for `limit` (repeat; default: bundled, torch)",
    )  # fmt: skip
    common.add_argument("--out-dir", default="docs/results")
    common.add_argument("--name", default="", help="result name (default: the experiment's)")
    common.add_argument("--sample-s", type=float, default=0.5, help="SM share sampling period")

    p = argparse.ArgumentParser(prog="python -m loadgen.experiments", description=__doc__)
    sub = p.add_subparsers(dest="experiment", required=True)
    peak = sub.add_parser("peak-load", parents=[common])
    peak.add_argument("--policies", type=_csv, default=None)
    peak.add_argument("--start-qps", type=float, default=10.0)
    peak.add_argument("--min-qps", type=float, default=0.5)
    peak.add_argument("--max-qps", type=float, default=100_000.0)
    peak.add_argument("--rel-tol", type=float, default=0.05)
    peak.add_argument("--max-trials", type=int, default=24)
    low = sub.add_parser("low-load", parents=[common])
    low.add_argument("--policies", type=_csv, default=None)
    low.add_argument("--rate", type=float, action="append", default=[], help="qps (repeat)")
    day = sub.add_parser("diurnal", parents=[common])
    day.add_argument("--policy", default="")
    day.add_argument("--min-qps", type=float, default=5.0)
    day.add_argument("--max-qps", type=float, default=50.0)
    day.add_argument("--duration-s", type=float, default=600.0)
    day.add_argument("--window-s", type=float, default=10.0)
    day.add_argument("--trace", default="", help="JSON [t_s, rate] file instead of the day curve")
    follow.add_arguments(sub.add_parser("follow-load", parents=[common]))
    return p


def default_policies(args: argparse.Namespace) -> list[str]:
    if args.no_admin:
        return ["current"]
    if args.experiment == "peak-load":
        return ["max-load", "even", "exclusive"]
    return ["min-resource", "even", "exclusive"]


def find_mesh(args: argparse.Namespace) -> None:
    """Fills in the gateway, and the scheduler and token when they belong to the same mesh, from
    the record of the mesh in the run directory (CAMELOT_RUN_DIR or the per-user default)."""
    if args.target and (args.admin or args.no_admin):
        return
    try:
        record = meshrecord.read(meshrecord.default_run_dir())
    except meshrecord.NoMesh:
        if not args.target:
            raise
        return
    if not args.target:
        args.target = record.gateway
    if args.target != record.gateway or args.admin or args.no_admin:
        return
    args.admin = record.scheduler
    if not args.token:
        try:
            args.token = Path(record.token_file).read_text().strip()
        except OSError as e:
            raise SystemExit(f"the mesh's token file {record.token_file}: {e.strerror}") from None


async def run(args: argparse.Namespace, argv: Sequence[str]) -> tuple[Path, Path]:
    """Runs the experiment `args` describe and writes its result; returns the JSON and MD paths."""
    args.token = args.token or os.environ.get("CAMELOT_ADMIN_TOKEN", "")
    out_dir = Path(args.out_dir)
    name = args.name or args.experiment
    if args.experiment == "follow-load":
        # it starts a mesh of its own for each sharing mode: none to find
        outcome = await follow.follow_load(args, partial(harness, args), out_dir, name)
    else:
        find_mesh(args)
        outcome = await against_mesh(args, out_dir, name, _so_far(args, argv, name))
    paths = _write(args, argv, name, outcome)
    for stale in _write_paths(out_dir, partial_name(name)):  # the run finished: no partial one
        stale.unlink(missing_ok=True)
    return paths


def partial_name(name: str) -> str:
    """Where an experiment's rows so far go after each policy (`<name>-partial`), so that a
    run cut short leaves them; removed once the whole result is written."""
    return f"{name}-partial"


def _so_far(args: argparse.Namespace, argv: Sequence[str], name: str) -> Progress:
    def write(outcome: Outcome) -> None:
        _write(args, argv, partial_name(name), outcome)

    return write


def _write_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    return out_dir / f"{name}.json", out_dir / f"{name}.md"


def _write(
    args: argparse.Namespace, argv: Sequence[str], name: str, outcome: Outcome
) -> tuple[Path, Path]:
    settings = {k: v for k, v in vars(args).items() if k != "token"}
    return write_result(
        name,
        outcome.rows,
        outcome.summary,
        backend_label(args.backend),
        Path(args.out_dir),
        command=module_command("loadgen.experiments", _redacted(argv)),
        plots=outcome.plots,
        extra={**outcome.extra, "settings": settings, "planning_env": planning_env()},
    )


# what the scheduler prices a plan with beside its profiles, where the mesh was started from the
# experiment's environment (deploy/device/gpu-e.sh, `camelot run`): kept with the result, since a
# plan's prices (and so a policy's choice) move with them
PLANNING_ENV = (
    "CAMELOT_GATEWAY_CPU_MS", "CAMELOT_GATEWAY_WORKERS", "CAMELOT_STAGE_HOST_MS",
    "CAMELOT_CUDA_GRAPHS", "CAMELOT_PROFILES",
)  # fmt: skip


def planning_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of PLANNING_ENV this process has (an experiment against a mesh started
    elsewhere records its own environment, which may not be the mesh's)."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in PLANNING_ENV if k in env}


def harness(args: argparse.Namespace, target: str, admin: AdminClient | None) -> Harness:
    """The trial machinery with the common flags, against the gateway `target`."""
    return Harness(
        target=target, admin=admin, trial_s=args.trial_s, warmup_s=args.warmup_s,
        gap_s=args.gap_s, arrivals=traces.Arrivals(args.arrivals), seed=args.seed,
        deadline_s=args.deadline_s, max_error_frac=args.max_error_frac,
        qos_override_ms=args.qos_ms, settle_s=args.settle_s, prime_s=args.prime_s,
        transport=args.transport, connections=args.connections,
        confirm_misses=args.confirm_misses, min_queries=args.min_queries,
        client_processes=args.client_processes, max_lag_frac=args.max_lag_frac,
        shm_broker=shm_broker(args.shm),
    )  # fmt: skip


def shm_broker(given: str, env: Mapping[str, str] | None = None) -> str:
    """`--shm`: "" (bytes), a broker address, or `mesh`: the served mesh's broker, from its
    record in the run directory (a mesh with no broker, or none served, is a clear error)."""
    if given != "mesh":
        return given
    try:
        record = meshrecord.read(meshrecord.default_run_dir(env), flag="--shm ADDRESS")
    except meshrecord.NoMesh as e:
        raise InvalidArgument(f"--shm mesh: no served mesh to take the broker of ({e})") from None
    if not record.broker:
        raise InvalidArgument("--shm mesh: the served mesh's record names no broker")
    return record.broker


async def against_mesh(
    args: argparse.Namespace, out_dir: Path, name: str, progress: Progress | None = None
) -> Outcome:
    """peak-load, low-load or diurnal against the mesh at `args.target`."""
    camelot = args.camelot_policy or CAMELOT_DEFAULT[args.experiment]
    async with AsyncExitStack() as stack:
        admin = None
        if not args.no_admin:
            if not args.admin:
                raise SystemExit("--admin HOST:PORT is required unless --no-admin")
            admin = await stack.enter_async_context(AdminClient(args.admin, args.token))
        h = harness(args, args.target, admin)
        await h.connect()
        mixes = [parse_mix(m) for m in args.mix] or [uniform_mix(sorted(h.pipelines))]
        outcome: Outcome
        if args.experiment == "peak-load":
            cfg = SearchConfig(
                args.start_qps, args.min_qps, args.max_qps, args.rel_tol, args.max_trials
            )
            policies = args.policies or default_policies(args)
            outcome = await peak_load(
                h, mixes, policies, cfg, camelot, out_dir, name, args.references,
                limit_measure(args, cfg), progress,
            )  # fmt: skip
        elif args.experiment == "low-load":
            if not args.rate:
                raise SystemExit("low-load needs --rate")
            policies = args.policies or default_policies(args)
            outcome = await low_load(
                h, mixes, args.rate, policies, camelot, args.sample_s, out_dir, name,
                args.references, progress,
            )  # fmt: skip
        else:
            policy = args.policy or ("current" if args.no_admin else camelot)
            if args.trace:
                trace = traces.load(args.trace)
            else:
                trace = traces.diurnal(args.min_qps, args.max_qps, args.duration_s)
            outcome = await diurnal(
                h, mixes[0], policy, trace, args.window_s, args.sample_s, out_dir, name
            )
    return outcome


def limit_measure(args: argparse.Namespace, search: SearchConfig) -> LimitMeasure | None:
    """The `limit` reference's measurement with the experiment's trial length and search (and
    `--limit-extra-trials` more trials), on the backend the experiment names; None unless
    `limit` is among the references."""
    if LIMIT not in args.references:
        return None
    if args.limit_extra_trials < 0:
        raise InvalidArgument(f"--limit-extra-trials must be >= 0, got {args.limit_extra_trials}")
    search = replace(search, max_trials=search.max_trials + args.limit_extra_trials)
    cfg = LimitConfig(
        backend=resolve_backend(args.backend), size=args.limit_size,
        max_batch=args.limit_max_batch, trial_s=args.trial_s, warmup_s=args.warmup_s,
        seed=args.seed, pipeline_dirs=tuple(args.limit_from),
    )  # fmt: skip
    return partial(limit.measure, cfg=cfg, search=search)


def _redacted(argv: Sequence[str]) -> list[str]:
    """The arguments without the bearer token, which must not land in a committed result."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--token":
            skip = True
        elif not a.startswith("--token="):
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
