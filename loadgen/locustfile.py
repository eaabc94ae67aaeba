"""Locust users for the gateway: gRPC Submit calls over a weighted mix of pipelines.

    locust -f loadgen/locustfile.py --headless -u 20 -r 5 -t 30s [--host 127.0.0.1:50052]

Without --host (or CAMELOT_GATEWAY_ADDR) the users target the mesh that `camelot run --serve` /
`camelot up` started, found from the record in its run directory (CAMELOT_RUN_DIR, else the
per-user default). Before any user starts, the gateway must answer ListPipelines: a headless run
with no mesh, or a gateway that does not answer, stops at once with one line and exit code 2.

Each user opens one channel, asks ListPipelines for the input specs, makes a few seeded inputs
per pipeline, then submits queries with pipelines drawn by weight. Every call is reported to
Locust as a request of type `grpc` named after the pipeline (ListPipelines under its own name),
failures carrying the Camelot error class of their status code.

Environment (read once, here at the top):
    CAMELOT_MIX        "img-to-text=2,video-analytics=1" (default: every served pipeline, equal)
    CAMELOT_SEED       base seed for inputs and pipeline draws (default 0; user n adds n)
    CAMELOT_DEADLINE_S per-request gRPC deadline (default 10)
    CAMELOT_WAIT_S     each user waits uniformly in [0, this] between calls (default 0)
    CAMELOT_TRANSPORT  default | ref | wire (default: default)
    CAMELOT_GATEWAY_ADDR  the gateway when --host is not given (default: the mesh's record)
    CAMELOT_RUN_DIR    the mesh's run directory (default: one per user and checkout)
    CAMELOT_TLS_CERT, CAMELOT_TLS_KEY, CAMELOT_TLS_CA  mutual TLS to a gateway that requires it

Locust monkey-patches the standard library with gevent when imported; gRPC must then be told
to cooperate (`init_gevent`) before any channel exists, or each call would block the process.
"""

from __future__ import annotations

import itertools
import logging
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, between, constant, events, task
from locust.env import Environment
from locust.exception import StopUser

from common import meshrecord
from common.errors import CamelotError, from_rpc_error
from common.lifecycle import CHANNEL_OPTIONS, OWN_CONNECTION, TlsFiles
from common.settings import SettingsError, env_float, env_int, env_str, require_positive
from loadgen.inputs import Mix, make_inputs, parse_mix, uniform_mix
from loadgen.openloop import TRANSPORTS
from protos import gateway_pb2, gateway_pb2_grpc

grpc_gevent.init_gevent()

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocustSettings:
    mix: Mix | None
    seed: int
    deadline_s: float
    wait_s: float
    transport: str
    gateway: str = ""
    run_dir: Path | None = None
    tls: TlsFiles | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LocustSettings:
        raw_mix = env_str("MIX", "", env)
        transport = env_str("TRANSPORT", "default", env)
        if transport not in TRANSPORTS:
            raise SettingsError(f"CAMELOT_TRANSPORT={transport!r} is not one of {list(TRANSPORTS)}")
        try:
            mix = parse_mix(raw_mix) if raw_mix else None
        except CamelotError as e:
            raise SettingsError(f"CAMELOT_MIX={raw_mix!r}: {e}") from None
        deadline_s = env_float("DEADLINE_S", 10.0, env)
        require_positive("CAMELOT_DEADLINE_S", deadline_s)
        wait_s = env_float("WAIT_S", 0.0, env)
        if wait_s < 0:
            raise SettingsError(f"CAMELOT_WAIT_S={wait_s!r} must be >= 0")
        return cls(
            mix,
            env_int("SEED", 0, env),
            deadline_s,
            wait_s,
            transport,
            env_str("GATEWAY_ADDR", "", env),
            meshrecord.default_run_dir(env),
            TlsFiles.from_env(env),
        )


try:
    SETTINGS = LocustSettings.from_env()
except SettingsError as e:  # a bad CAMELOT_* value: one line, before Locust starts anything
    sys.stderr.write(f"loadgen: {e}\n")
    raise SystemExit(2) from None
_user_numbers = itertools.count()


PREFLIGHT_DEADLINE_S = 5.0


def _refuse(message: str, headless: bool) -> None:
    """Stops a headless run at once; the web UI only warns (its user may start the mesh or type
    another host before pressing start)."""
    if not headless:
        log.warning("%s", message)
        return
    sys.stderr.write(f"loadgen: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def _find_gateway(environment: Environment, **_kw: Any) -> None:
    """Fills in the mesh's gateway when no --host was given, and checks that it answers, so that
    a run with nothing to load stops at once rather than failing every user for its duration."""
    options = environment.parsed_options
    headless = bool(getattr(options, "headless", False))
    if not environment.host:
        try:
            environment.host, where = meshrecord.resolve(
                ("--host", None),
                "CAMELOT_GATEWAY_ADDR",
                "gateway",
                SETTINGS.run_dir,
                {"CAMELOT_GATEWAY_ADDR": SETTINGS.gateway} if SETTINGS.gateway else {},
            )
        except meshrecord.NoMesh as e:
            _refuse(str(e), headless)
            return
        log.info("targeting the gateway at %s (from %s)", environment.host, where)
    target = _target(environment.host)
    channel = _channel(target, SETTINGS.tls, CHANNEL_OPTIONS)
    try:
        reply = gateway_pb2_grpc.GatewayStub(channel).ListPipelines(
            gateway_pb2.ListPipelinesRequest(), timeout=PREFLIGHT_DEADLINE_S
        )
    except grpc.RpcError as e:
        code = e.code().name if isinstance(e, grpc.Call) else "UNAVAILABLE"
        _refuse(f"the gateway at {target} does not answer ListPipelines: {code}", headless)
        return
    finally:
        channel.close()
    if SETTINGS.mix is not None:
        try:
            SETTINGS.mix.check_served([p.name for p in reply.pipelines])
        except CamelotError as e:  # once here, rather than once per user
            _refuse(f"CAMELOT_MIX: {e.message}", headless)


events.init.add_listener(_find_gateway)  # type: ignore[no-untyped-call]


def _channel(target: str, tls: TlsFiles | None, options: list[tuple[str, int]]) -> grpc.Channel:
    if tls is not None and not target.startswith("unix:"):
        return grpc.secure_channel(target, tls.channel_credentials(), options=options)
    return grpc.insecure_channel(target, options=options)


def _target(host: str | None) -> str:
    if not host:
        raise StopUser("no gateway given: pass --host HOST:PORT")
    for prefix in ("grpc://", "http://", "https://"):
        if host.startswith(prefix):
            return host[len(prefix) :].rstrip("/")
    return host


class GatewayUser(User):
    """One client of the gateway: a channel, seeded inputs, and weighted Submit calls."""

    wait_time = between(0.0, SETTINGS.wait_s) if SETTINGS.wait_s > 0 else constant(0.0)
    settings = SETTINGS

    def on_start(self) -> None:
        number = next(_user_numbers)
        # each user its own connection, as separate clients would have
        self.channel = _channel(
            _target(self.host), self.settings.tls, [*CHANNEL_OPTIONS, OWN_CONNECTION]
        )
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        reply = self._call(
            "ListPipelines", self.stub.ListPipelines, gateway_pb2.ListPipelinesRequest()
        )
        if reply is None:
            raise StopUser("ListPipelines failed")
        served = {p.name: p for p in reply.pipelines}
        mix = self.settings.mix or uniform_mix(sorted(served))
        try:
            mix.check_served(list(served))
        except Exception as e:
            # A configuration error: stop the whole run rather than record nothing quietly.
            log.error("%s", e)
            self.environment.process_exit_code = 2
            if self.environment.runner is not None:
                gevent.spawn(self.environment.runner.quit)
            raise StopUser(str(e)) from e
        seed = self.settings.seed + number
        self.inputs = make_inputs({p: served[p].input for p in mix.pipelines}, seed)
        self.names = mix.pipelines
        self.weights = [w for _, w in mix.weights]
        self.rng = random.Random(seed)
        self.transport = TRANSPORTS[self.settings.transport]
        self.sent = 0

    def on_stop(self) -> None:
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()

    @task
    def submit(self) -> None:
        name = self.rng.choices(self.names, self.weights)[0]
        variants = self.inputs[name]
        self.sent += 1
        request = gateway_pb2.SubmitRequest(
            pipeline=name, input=variants[self.sent % len(variants)], transport=self.transport
        )
        self._call(name, self.stub.Submit, request)

    def _call(self, name: str, method: Any, request: Any) -> Any:
        """Calls `method`, reports it to Locust, and returns the reply (None on failure)."""
        start = time.perf_counter()
        reply: Any = None
        exception: Exception | None = None
        try:
            reply = method(request, timeout=self.settings.deadline_s)
        except grpc.RpcError as e:
            exception = from_rpc_error(e)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        length = 0
        if reply is not None:
            output = getattr(reply, "output", None)
            length = len(output.data) if output is not None else reply.ByteSize()
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=elapsed_ms,
            response_length=length,
            response=reply,
            context={},
            exception=exception,
        )
        return reply
