"""Each process's command line, as the local mesh starts it (services.commandlines), is read by
that process's own parser into the settings it was built from; an empty value is left to the
process (its variable, else its default)."""

from __future__ import annotations

import sys

from scheduler.service import settings as scheduler_settings
from services import commandlines
from services.agent import settings as agent_settings
from services.gateway import settings as gateway_settings
from services.stage import settings as stage_settings
from shmbroker import settings as broker_settings


def module_and_flags(argv: list[str], module: str) -> list[str]:
    assert argv[:3] == [sys.executable, "-m", module]
    return argv[3:]


def test_the_broker_reads_its_command_line():
    argv = commandlines.broker(5001, "/run/b.sock", "host", 64 << 20)
    s = broker_settings.parse(module_and_flags(argv, "shmbroker"), {})
    assert (s.port, s.socket_path, s.backend) == (5001, "/run/b.sock", "host")
    assert s.slab_bytes == 64 << 20
    # slab_bytes 0: the backend's default, as the process picks it
    default = commandlines.broker(5001, "/run/b.sock", "host")
    assert "--slab-bytes" not in default
    assert broker_settings.parse(module_and_flags(default, "shmbroker"), {}).slab_bytes == 0


def test_the_scheduler_reads_its_command_line_with_the_policy_options():
    argv = commandlines.scheduler(5002, "redis://h:1/0", "static", "full", {"file": "/p.json"})
    s = scheduler_settings.parse(module_and_flags(argv, "scheduler"), {})
    assert (s.port, s.redis_url, s.policy, s.size) == (5002, "redis://h:1/0", "static", "full")
    assert dict(s.policy_options) == {"file": "/p.json"}


def test_the_agent_reads_its_command_line():
    argv = commandlines.agent(5003, "unix:/b.sock", "h:2", "redis://h:1/0", "host", "none", "off",
                              "/run", "tiny")  # fmt: skip
    s = agent_settings.parse(module_and_flags(argv, "services.agent"), {})
    assert (s.node, s.port, s.broker_addr, s.scheduler_addr, s.redis_url) == (
        "local", 5003, "unix:/b.sock", "h:2", "redis://h:1/0")  # fmt: skip
    assert (s.backend, s.share_mode, s.mps, s.run_dir, s.size) == ("host", "none", "off", "/run",
                                                                    "tiny")  # fmt: skip


def test_the_gateway_reads_scheduler_or_fixed_routes():
    planned = commandlines.gateway(5004, "unix:/b.sock", "host", "tiny", "h:2", "redis://h:1/0")
    s = gateway_settings.parse(module_and_flags(planned, "services.gateway"), {})
    assert (s.port, s.broker, s.scheduler, s.redis_url) == (5004, "unix:/b.sock", "h:2",
                                                            "redis://h:1/0")  # fmt: skip
    assert s.static_routes == ()
    fixed = commandlines.gateway(5004, "unix:/b.sock", "host", "tiny", routes="p/s=p.s.0@unix:/r",
                                 pipelines_dir="/pipes")  # fmt: skip
    assert "--scheduler" not in fixed and "--redis" not in fixed
    s = gateway_settings.parse(module_and_flags(fixed, "services.gateway"), {})
    assert s.static_routes == (("p", "s", "p.s.0", "unix:/r"),)
    assert (s.scheduler, s.redis_url, s.pipelines_dir) == ("", "", "/pipes")


def test_a_stage_replica_reads_its_command_line():
    argv = commandlines.stage("p", "s", "p.s.0", "/r.sock", "unix:/b.sock", "host", "tiny",
                              "redis://h:1/0", "/pipes")  # fmt: skip
    s = stage_settings.parse(module_and_flags(argv, "services.stage"), {})
    assert (s.pipeline, s.stage, s.replica_id, s.unix_path, s.broker) == (
        "p", "s", "p.s.0", "/r.sock", "unix:/b.sock")  # fmt: skip
    assert (s.backend, s.size, s.redis_url, s.pipelines_dir) == ("host", "tiny", "redis://h:1/0",
                                                                 "/pipes")  # fmt: skip
