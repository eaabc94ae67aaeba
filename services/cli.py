"""`camelot`: run the local mesh, query it, and look at it.

camelot run [--serve]    start redis, broker, replicas and gateway; send a burst; print a table
camelot up / down        the same mesh in the background / stop it
camelot status           pipelines served and their replicas
camelot query PIPELINE   send one query and print where its time went
camelot profile PIPELINE...  profile the stages on this node's GPU (services/profiler)

`status`, `query` and `down` find the mesh that `run --serve` or `up` started from the record it
writes in its run directory (--run-dir, else CAMELOT_RUN_DIR, else one per user and checkout, so
two clones never share one); --target (or CAMELOT_GATEWAY_ADDR) names a gateway instead. A user
error prints one line on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import grpc

from common import meshrecord
from common.errors import CamelotError
from common.settings import SettingsError
from services.meshclient import UsageError, cmd_query, cmd_status
from services.meshlife import DOWN_WAIT_S, UP_WAIT_S, cmd_down, cmd_run, cmd_up


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="camelot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run_dir = str(meshrecord.default_run_dir())
    run_dir_help = f"the mesh's run directory (CAMELOT_RUN_DIR; default {run_dir})"
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "up"):
        s = sub.add_parser(name)
        s.add_argument(
            "--backend",
            default=os.environ.get("CAMELOT_BACKEND", "auto"),
            choices=("auto", "host", "cuda"),
        )
        s.add_argument(
            "--size", default=os.environ.get("CAMELOT_SIZE", "tiny"), choices=("tiny", "full")
        )
        s.add_argument("--run-dir", default=run_dir, help=run_dir_help)
        s.add_argument("--queries", type=int, default=32)
        s.add_argument("--concurrency", type=int, default=4)
        s.add_argument("--pipeline", action="append", help="only these pipelines (repeatable)")
        s.add_argument(
            "--from", dest="from_dirs", action="append", default=[],
            help="serve the configs of these folders (repeatable; default: the bundled ones), "
            "e.g. --from services/pipelines --from services/pipelines/torch",
        )  # fmt: skip
        s.add_argument("--serve", action="store_true", help="keep the mesh up after the burst")
        s.add_argument("--policy", default=os.environ.get("CAMELOT_POLICY", "even"))
        if name == "up":
            s.add_argument("--wait-s", type=float, default=UP_WAIT_S, help="how long to wait")
    sub.add_parser("profile", help="profile stages on this GPU: camelot profile --help")
    d = sub.add_parser("down")
    d.add_argument("--run-dir", default=run_dir, help=run_dir_help)
    d.add_argument("--wait-s", type=float, default=DOWN_WAIT_S, help="how long to wait")
    for name in ("status", "query"):
        s = sub.add_parser(name)
        s.add_argument("--run-dir", default=run_dir, help=run_dir_help)
        s.add_argument(
            "--target",
            default=None,
            help="gateway host:port (CAMELOT_GATEWAY_ADDR; default: the mesh in --run-dir)",
        )
        if name == "status":
            s.add_argument(
                "--scheduler",
                default=None,
                help="scheduler host:port (CAMELOT_SCHEDULER_ADDR; default: the mesh's)",
            )
        if name == "query":
            s.add_argument("pipeline")
            s.add_argument(
                "--size", default=os.environ.get("CAMELOT_SIZE", "tiny"), choices=("tiny", "full")
            )
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--transport", default="ref", choices=("ref", "wire"))
            s.add_argument("--timeout", type=float, default=30.0)
    return p


def cmd_profile(argv: list[str]) -> int:
    """`camelot profile PIPELINE...`: the profiler (services/profiler), which parses its own
    flags; a pipeline is a bundled name or a config path (a bring-your-own-model YAML)."""
    from services.profiler.__main__ import main as profile

    profile(argv)
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # the profiler's flags are its own: `camelot profile --help` shows them
    args = None if argv[:1] == ["profile"] else _parser().parse_args(argv)
    try:
        if args is None:
            code = cmd_profile(argv[1:])
        elif args.cmd == "up":
            code = cmd_up(args)
        elif args.cmd == "down":
            code = cmd_down(args)
        else:
            handler = {"run": cmd_run, "query": cmd_query, "status": cmd_status}[args.cmd]
            code = asyncio.run(handler(args))
    except (UsageError, meshrecord.NoMesh, SettingsError) as e:
        print(f"camelot: {e}", file=sys.stderr)
        code = 1
    except CamelotError as e:
        print(f"camelot: {e.message}", file=sys.stderr)
        code = 1
    except grpc.aio.AioRpcError as e:
        print(f"camelot: {e.code().name}: {e.details()}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except asyncio.CancelledError:  # SIGTERM before the mesh served (services.meshlife)
        code = 128 + signal.SIGTERM
    except BrokenPipeError:
        code = _reader_gone()
    sys.exit(code)


def _reader_gone() -> int:
    """stdout's reader (`| head`) left: say nothing more, and let exit not flush into it."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    main()
