"""The two references an experiment measures beside the policies, named in `--references`:

- `plain`: what operators run without Camelot: every stage a service on a whole time-shared
  GPU, tensors sent as bytes between stages. The mesh under the `exclusive` policy with the
  `wire` transport; its trials use `wire` whatever `--transport` says.
- `limit`: the physical limit of the mix on the GPU, with no mesh at all: each pipeline's stages
  back to back in one process, the best batch the QoS allows (`loadgen.limit`). A peak-load
  reference only: it has no SM share to account, so low-load refuses it.

Any other reference is a policy spec (`name[:key=value...]`) measured like the policies but not
counted as a baseline (e.g. `exclusive:sharing=mps`).
"""

from __future__ import annotations

from dataclasses import dataclass

PLAIN = "plain"
LIMIT = "limit"


@dataclass(frozen=True)
class MeshSetup:
    """What the mesh runs for a policy or mesh reference: the policy spec, and the transport
    its trials use (None: the experiment's own)."""

    policy: str
    transport: str | None = None


_MESH_REFERENCES = {PLAIN: MeshSetup("exclusive", "wire")}


def mesh_setup(name: str) -> MeshSetup:
    """The policy and transport behind `name` (a mesh reference, or a policy spec as it is)."""
    return _MESH_REFERENCES.get(name, MeshSetup(name))
