"""The scheduler's Admin API as the experiments use it: set a policy, wait for its plan.

Every call carries `authorization: Bearer <token>` and a deadline; failures come back as the
Camelot error class of their status (UNAUTHENTICATED for a wrong token).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TypeVar

import grpc

from common.clock import mono_us
from common.errors import DeadlineExceeded, InvalidArgument, from_rpc_error
from common.lifecycle import channel as open_channel
from protos import admin_pb2, admin_pb2_grpc, plan_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")


def parse_policy(spec: str) -> tuple[str, dict[str, str]]:
    """`name` or `name:key=value[:key=value]` -> (name, options); the whole text is its label."""
    name, *pairs = spec.split(":")
    options: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise InvalidArgument(f"policy {spec!r}: options are key=value, got {pair!r}")
        options[key.strip()] = value.strip()
    if not name.strip():
        raise InvalidArgument(f"policy {spec!r} has no name")
    return name.strip(), options


class AdminClient:
    """`async with AdminClient(target, token) as admin: await admin.set_policy("max-load")`."""

    def __init__(self, target: str, token: str, timeout_s: float = 10.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {token}"),)
        self._channel: grpc.aio.Channel | None = None
        self._stub: admin_pb2_grpc.AdminStub | None = None

    async def __aenter__(self) -> AdminClient:
        self._channel = open_channel(self.target)
        self._stub = admin_pb2_grpc.AdminStub(self._channel)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None

    @property
    def stub(self) -> admin_pb2_grpc.AdminStub:
        if self._stub is None:
            raise RuntimeError("AdminClient used outside `async with`")
        return self._stub

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e

    async def set_policy(
        self, policy: str, options: Mapping[str, str] | None = None
    ) -> plan_pb2.Plan:
        """Chooses the policy; the answer is the plan it made (its epoch is the one to wait for)."""
        request = admin_pb2.SetPolicyRequest(policy=policy, options=dict(options or {}))
        return await self._call(
            lambda: self.stub.SetPolicy(request, metadata=self.metadata, timeout=self.timeout_s)
        )

    async def get_plan(self) -> plan_pb2.Plan:
        request = admin_pb2.GetPlanRequest()
        return await self._call(
            lambda: self.stub.GetPlan(request, metadata=self.metadata, timeout=self.timeout_s)
        )

    async def status(self, window_s: float = 0.0) -> admin_pb2.StatusResponse:
        request = admin_pb2.StatusRequest(window_s=window_s)
        return await self._call(
            lambda: self.stub.Status(request, metadata=self.metadata, timeout=self.timeout_s)
        )

    async def wait_applied(self, epoch: int, timeout_s: float = 60.0, poll_s: float = 0.2) -> bool:
        """Polls Status until every agent runs `epoch` (new replicas warm, old ones drained);
        False if that did not happen within `timeout_s`."""
        end = mono_us() + int(timeout_s * 1e6)
        while True:
            if (await self.status()).applied_epoch >= epoch:
                return True
            if mono_us() >= end:
                return False
            await asyncio.sleep(poll_s)

    async def wait_for_epoch(
        self, epoch: int, timeout_s: float = 60.0, poll_s: float = 0.2
    ) -> plan_pb2.Plan:
        """Polls GetPlan until the plan in force has at least `epoch`; DEADLINE_EXCEEDED if not."""
        end = mono_us() + int(timeout_s * 1e6)
        while True:
            plan = await self.get_plan()
            if plan.epoch >= epoch:
                return plan
            if mono_us() >= end:
                raise DeadlineExceeded(
                    f"plan epoch {plan.epoch} did not reach {epoch} within {timeout_s:g} s"
                )
            await asyncio.sleep(poll_s)
