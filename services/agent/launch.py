"""What a replica's process is started with: its command line, its environment and its log.

The command line is the settings' template (`replicas.render_command`) filled with the
replica's fields; the environment carries its GPU share: an MPS percentage, or a pipe
directory where no daemon answers, so that a time-sliced replica makes a context of its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from common.backend import Backend
from protos import plan_pb2
from services.agent import diff
from services.agent.diff import ShareMode
from services.agent.mps import MpsDaemon
from services.agent.replicas import Instance, Launch, mps_percentage, render_command, safe_name
from services.agent.settings import AgentSettings, python


class Launches:
    """Builds each replica instance's `Launch` on this node."""

    def __init__(
        self,
        settings: AgentSettings,
        backend: Backend,
        mode: ShareMode,
        mps: MpsDaemon,
        base_env: Mapping[str, str],
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.mode = mode
        self.mps = mps
        self.base_env = dict(base_env)
        self._log_dir = os.path.join(settings.run_dir, "logs")
        # a pipe directory where no MPS daemon answers: time-sliced replicas make their own
        # context there (the driver falls back to a plain context when it finds no daemon)
        self._no_mps_dir = os.path.join(settings.run_dir, "no-mps")
        # fail at start, not at the first apply, on a template with an unknown field
        render_command(settings.replica_command, self.fields(_probe_target(), "", 0))

    def fields(self, target: plan_pb2.Endpoint, unix_path: str, slot: int) -> dict[str, object]:
        """The `{name}` fields a replica command template may use."""
        plan = target.replica
        base = self.settings.replica_metrics_base
        return {
            "python": python(),
            "pipeline": target.pipeline,
            "stage": target.stage,
            "size": self.settings.size,
            "replica_id": plan.replica_id,
            "unix": unix_path,
            "broker": self.settings.broker_addr,
            "redis": self.settings.redis_url,
            "backend": self.backend.value,
            "max_batch": plan.max_batch,
            "max_wait_us": plan.max_wait_us,
            "sm_percent": f"{diff.sm_percent(plan, self.mode):g}",
            "sm_groups": ",".join(str(g) for g in plan.sm_groups)
            if diff.effective_mode(plan, self.mode) == diff.GREEN
            else "",
            "device": max(plan.gpu, 0),
            "metrics_port": base + slot if base > 0 else 0,
            "node": self.settings.node,
        }

    def launch(self, inst: Instance) -> Launch:
        fields = self.fields(inst.target, inst.unix_path, inst.slot)
        env = dict(self.base_env)
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        env.update(self.mps.env())
        # never set a percentage outside MPS mode: with a green split it fails (error 915)
        env.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)
        mode = diff.effective_mode(inst.target.replica, self.mode)
        if mode == diff.TIME_SLICED:
            # outside MPS, its own context: the GPU takes it in turns with every other context
            # (CUDA IPC between it and MPS clients works both ways, probed on the H100)
            os.makedirs(self._no_mps_dir, exist_ok=True)
            env["CUDA_MPS_PIPE_DIRECTORY"] = self._no_mps_dir
        elif mode == diff.MPS:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = mps_percentage(
                inst.target.replica.sm_percent
            )
        return Launch(
            argv=render_command(self.settings.replica_command, fields),
            env=env,
            log_path=os.path.join(self._log_dir, safe_name(inst.instance_id) + ".log"),
        )


def _probe_target() -> plan_pb2.Endpoint:
    return plan_pb2.Endpoint(replica=plan_pb2.ReplicaPlan(replica_id="probe"))
