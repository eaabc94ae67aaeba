"""A minimal gRPC stage for measuring and testing one hop: `python -m shmbroker.hop`.

It serves one unary method, `/camelot.v1.Hop/Touch`, taking a `Tensor` (by ref or by value)
and answering a one-element `Tensor`. By ref it views the broker buffer (no copy); by value it
copies the bytes onto its device (host→device on cuda, a host copy on the host backend), which
is what a naive microservice pays. The tensor's name says how much to read: "touch" reduces a
few elements (the hop cost alone), "checksum" sums every byte (a content check for tests).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import grpc
import numpy as np

from common import backend as backends
from common import logs
from common.dtypes import array_from_wire, wire_from_array
from common.errors import InvalidArgument, grpc_errors
from common.lifecycle import Health, bind, new_server, run_until_signalled
from protos import tensor_pb2
from shmbroker.client import BrokerClient

log = logging.getLogger(__name__)

SERVICE = "camelot.v1.Hop"
METHOD = f"/{SERVICE}/Touch"
TOUCH_ELEMENTS = 64


def checksum(xp: Any, array: Any) -> int:
    """Sum of every byte of a C-contiguous array, on its own device."""
    flat = array.reshape(-1).view(xp.uint8)
    return int(flat.sum(dtype=xp.uint64))


def touch(xp: Any, array: Any) -> float:
    """Reads a few elements on the array's device and brings one number back (synchronises)."""
    head = array.reshape(-1)[:TOUCH_ELEMENTS]
    return float(head.astype(xp.float32).sum())


class HopServicer:
    def __init__(self, broker: BrokerClient, backend: backends.Backend) -> None:
        self.broker = broker
        self.xp = backends.xp_for(backend)

    @grpc_errors
    async def Touch(  # noqa: N802 (gRPC method name)
        self, request: tensor_pb2.Tensor, context: grpc.aio.ServicerContext
    ) -> tensor_pb2.Tensor:
        body = request.WhichOneof("body")
        if body == "ref":
            array = await self.broker.view(request.ref)
            # a host slab gives NumPy, a device slab CuPy (even on a cuda broker)
            xp = np if isinstance(array, np.ndarray) else backends.xp_for(backends.Backend.CUDA)
        elif body == "wire":
            host = array_from_wire(request.wire)
            xp = self.xp
            # a device copy on cuda; on the host backend an explicit copy out of the message
            array = xp.array(host, copy=True)
        else:
            raise InvalidArgument("tensor has neither ref nor wire body")
        if request.name == "checksum":
            result = np.asarray(checksum(xp, array), dtype=np.int64)
        elif request.name == "touch":
            result = np.asarray(touch(xp, array), dtype=np.float32)
        else:
            raise InvalidArgument(f"unknown hop mode {request.name!r} (touch or checksum)")
        return tensor_pb2.Tensor(name=request.name, wire=wire_from_array(result))


def hop_method(
    channel: grpc.aio.Channel,
) -> grpc.aio.UnaryUnaryMultiCallable[tensor_pb2.Tensor, tensor_pb2.Tensor]:
    """The caller's side of Touch on a channel to a hop process."""
    return channel.unary_unary(
        METHOD,
        request_serializer=tensor_pb2.Tensor.SerializeToString,
        response_deserializer=tensor_pb2.Tensor.FromString,
    )


def result_of(response: tensor_pb2.Tensor) -> float:
    return float(array_from_wire(response.wire).item())


async def serve(broker_target: str, host: str, port: int, backend_name: str) -> None:
    backend = backends.resolve(backend_name)
    broker = await BrokerClient.connect(broker_target)
    servicer = HopServicer(broker, backend)
    server = new_server()
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.Touch,
        request_deserializer=tensor_pb2.Tensor.FromString,
        response_serializer=tensor_pb2.Tensor.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Touch": handler}),)
    )
    health = Health(server, [SERVICE])
    bound = bind(server, host, port)

    async def warm_up() -> None:
        broker.open_all()  # every slab opened once, before the first request
        log.info("hop serving on %s:%d, backend %s", host, bound, backend.value)

    try:
        await run_until_signalled(server, health, 1.0, warm_up=warm_up)
    finally:
        await broker.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shmbroker.hop", description=__doc__)
    p.add_argument("--broker", required=True, help="broker target, e.g. unix:/tmp/b.sock")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend", default="auto", choices=("auto", "host", "cuda"))
    args = p.parse_args(argv)
    logs.setup("hop", "local", level="WARNING")
    asyncio.run(serve(args.broker, args.host, args.port, args.backend))


if __name__ == "__main__":
    main()
