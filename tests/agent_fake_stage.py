"""A small real Stage server with the replica CLI, for agent tests (the model is the seam).

Serves grpc.health (SERVING after FAKE_STAGE_WARMUP_S), Stage.Describe, Infer (sleeps
FAKE_STAGE_INFER_S, answers `replica_id@pid`), Drain (refuses new requests, waits for those in
flight) and Resize. On SIGTERM it drains and exits. Writes `<unix>.json` with its argv, pid and
CUDA_MPS_* environment so tests can check what the agent gave it. With FAKE_STAGE_OUT_OF_MEMORY
set its "model" does not fit the GPU: it stops at start on OutOfMemory with that text, as the
real stage does on a CUDA out-of-memory error (exit status OUT_OF_MEMORY_EXIT). A query whose
query_id is "poison" meets a fatal GPU fault: it is answered INTERNAL and the process exits
DEVICE_FAULT_EXIT, as the real stage does (common/devicefault.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import grpc

from common import lifecycle
from common.errors import DEVICE_FAULT_EXIT, OutOfMemory
from protos import stage_pb2, stage_pb2_grpc


class FakeStage(stage_pb2_grpc.StageServicer):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.groups = [int(g) for g in args.sm_groups.split(",") if g]
        self.draining = False
        self.in_flight = 0
        self.completed = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.infer_s = float(os.environ.get("FAKE_STAGE_INFER_S", "0.002"))

    async def Infer(self, request, context):
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        if request.query_id == "poison":
            asyncio.get_running_loop().call_later(0.05, os._exit, DEVICE_FAULT_EXIT)
            await context.abort(grpc.StatusCode.INTERNAL, "fatal GPU fault (fake)")
        self.in_flight += 1
        self.idle.clear()
        try:
            await asyncio.sleep(self.infer_s)
            self.completed += 1
            return stage_pb2.InferResponse(replica_id=f"{self.args.replica_id}@{os.getpid()}")
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def Describe(self, request, context):
        return stage_pb2.DescribeStageResponse(
            stage=self.args.stage,
            model="tests.agent_fake_stage",
            max_batch=self.args.max_batch,
            max_wait_us=self.args.max_wait_us,
            backend="host",
            sm_percent=self.args.sm_percent,
            sm_groups=self.groups,
            replica_id=self.args.replica_id,
            multiprocessors=-1,
        )

    async def Drain(self, request, context):
        self.draining = True
        await self.idle.wait()
        return stage_pb2.DrainResponse(completed=self.completed)

    async def Resize(self, request, context):
        self.groups = list(request.sm_groups)
        return stage_pb2.ResizeResponse(apply_us=1, multiprocessors=-1)

    async def drain(self) -> None:
        self.draining = True
        await self.idle.wait()


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    for flag in ("--pipeline", "--stage", "--size", "--replica-id", "--unix", "--broker",
                 "--redis", "--backend", "--sm-groups", "--node", "--host"):  # fmt: skip
        p.add_argument(flag, default="")
    for flag in ("--max-batch", "--max-wait-us", "--device", "--metrics-port", "--port"):
        p.add_argument(flag, type=int, default=0)
    p.add_argument("--sm-percent", type=float, default=100.0)
    return p.parse_args(argv)


def record_start(args: argparse.Namespace) -> None:
    with open(args.unix + ".json", "w") as f:
        json.dump(
            {
                "argv": sys.argv[1:],
                "pid": os.getpid(),
                "env": {k: v for k, v in os.environ.items() if k.startswith("CUDA_")},
            },
            f,
        )


async def serve(args: argparse.Namespace) -> None:
    no_room = os.environ.get("FAKE_STAGE_OUT_OF_MEMORY", "")
    if no_room:
        raise OutOfMemory(f"out of device memory in model load: {no_room}")
    stage = FakeStage(args)
    server = lifecycle.new_server()
    stage_pb2_grpc.add_StageServicer_to_server(stage, server)
    health = lifecycle.Health(server, ["camelot.v1.Stage"])
    lifecycle.bind(server, "127.0.0.1", 0, args.unix)

    async def warm_up() -> None:
        await asyncio.sleep(float(os.environ.get("FAKE_STAGE_WARMUP_S", "0.1")))

    await lifecycle.run_until_signalled(server, health, 2.0, warm_up=warm_up, on_stop=stage.drain)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    record_start(arguments)
    sys.exit(lifecycle.run_process("stage", serve(arguments)))
