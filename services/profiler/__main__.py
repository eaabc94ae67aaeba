"""`python -m services.profiler img-to-text speech-to-text --out profiles.json [--redis URL]`.

Runs on a node with a GPU and the MPS daemon up (shares need MPS). See profile.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument
from services.profiler.profile import (
    CoRunners,
    Settings,
    StageResult,
    document,
    profile_stage,
    redis_items,
)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in _floats(text))


def device_name() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception as e:  # NVML is the only source of the name; say why it is missing
        raise InvalidArgument(f"cannot read the GPU name from NVML: {e}") from e


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.profiler", description=__doc__)
    parser.add_argument("pipelines", nargs="+", help="pipeline names or config paths")
    parser.add_argument("--size", default="full")
    parser.add_argument("--stages", default="", help="only these stages (comma-separated)")
    parser.add_argument("--shares", type=_floats, default=Settings.shares)
    parser.add_argument("--batches", type=_ints, default=Settings.batches)
    parser.add_argument("--pressure-shares", type=_floats, default=Settings.pressure_shares)
    parser.add_argument("--contention-share", type=float, default=Settings.contention_share)
    parser.add_argument("--repeats", type=int, default=Settings.repeats)
    parser.add_argument(
        "--cuda-graphs",
        choices=("on", "off"),
        default="on",
        help="profile graph-safe models as CUDA graphs, as stages run them by default",
    )
    parser.add_argument("--out", default="profiles.json")
    parser.add_argument("--redis", default="", help="also store each profile in this Redis")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("services.profiler")

    from contract.pipeline_config import load_pipeline

    settings = Settings(
        tuple(args.pipelines),
        size=args.size,
        shares=args.shares,
        batches=args.batches,
        pressure_shares=args.pressure_shares,
        contention_share=args.contention_share,
        repeats=args.repeats,
        cuda_graphs=args.cuda_graphs == "on",
    )
    only = {s for s in args.stages.split(",") if s}
    results: list[StageResult] = []
    # every config is read (and a bad one refused) before the GPU is asked anything
    pipes = [(name, load_pipeline(name, settings.size)) for name in settings.pipelines]
    device, today = device_name(), dt.date.today().isoformat()

    def write() -> dict[str, Any]:
        # after every stage (whole files only), so a run that is stopped keeps what it finished
        doc = document(results, device, today)
        part = Path(f"{args.out}.part")
        part.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(part, args.out)
        return doc

    # one set of co-runners for the run: their bandwidths are the device's, not a stage's
    with CoRunners(settings) as corunners:
        for name, pipe in pipes:
            for stage in pipe.stages:
                if only and stage.name not in only:
                    continue
                results.append(
                    profile_stage(
                        settings,
                        pipe.name,
                        stage.name,
                        stage.max_batch,
                        log.info,
                        config=name,
                        corunners=corunners,
                    )
                )
                write()
    doc = write()
    log.info("wrote %d profiles to %s", len(results), args.out)
    if args.redis:
        import redis

        client = redis.Redis.from_url(args.redis)
        client.mset(dict(redis_items(doc)))  # type: ignore[arg-type]
        log.info("stored %d profiles in %s", len(results), args.redis)


if __name__ == "__main__":
    main()
