"""Bring your own model: any `torch.nn.Module` as a stage, named by the factory that builds it.

    - name: classify
      model: services.torchmodels.byom:module
      inputs: {image: decode.image}
      options:
        factory: examples.byom.classifier:build     # module:function -> torch.nn.Module
        kwargs: {classes: 10}                       # passed to the factory
        inputs:  [{name: image, dtype: uint8, shape: [3, 64, 64]}]
        outputs: [{name: label, dtype: int32, shape: [1]}]
        weights: /models/classifier.pt              # optional: a state_dict (torch.save)
        graphs: true                                 # optional: may it replay as CUDA graphs

The module's `forward` takes one batch tensor per declared input, in order (float inputs in the
compute dtype: fp16 on CUDA, fp32 on the host; other dtypes as declared), and returns one tensor,
a tuple of them in declared output order, or a dict keyed by output name. Outputs are cast to the
declared dtypes. When the stage is built, one forward pass on zeros checks every output's shape
against its spec, so a wrong spec fails at load with INVALID_ARGUMENT naming the output, not
mid-query. Rows must be independent (no cross-row reductions): batches are padded to a bucket.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from common.errors import InvalidArgument
from services.stage.plugin import ModelContext, TensorSpec, load_factory
from services.torchmodels.core import TorchStage, spec

DTYPES = ("float16", "float32", "int32", "int64", "uint8", "bool")


def parse_specs(raw: Any, what: str) -> list[TensorSpec]:
    """`[{name, dtype, shape}, ...]` from a YAML option; INVALID_ARGUMENT naming the entry."""
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument(f"option {what} must be a non-empty list of {{name, dtype, shape}}")
    out: list[TensorSpec] = []
    for i, entry in enumerate(raw):
        where = f"option {what}[{i}]"
        if not isinstance(entry, Mapping) or set(entry) != {"name", "dtype", "shape"}:
            raise InvalidArgument(f"{where} must have exactly name, dtype and shape: {entry!r}")
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"{where}.name must be a non-empty string")
        if dtype not in DTYPES:
            raise InvalidArgument(f"{where}.dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or any(
            isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape
        ):
            raise InvalidArgument(f"{where}.shape must be a list of positive integers: {shape!r}")
        if name in {s.name for s in out}:
            raise InvalidArgument(f"{where}.name {name!r} is declared twice")
        out.append(spec(name, dtype, shape))
    return out


class ModuleStage(TorchStage):
    def __init__(
        self,
        ctx: ModelContext,
        factory: str,
        kwargs: Mapping[str, Any],
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        weights: str | None,
        graphs: bool,
    ) -> None:
        super().__init__(ctx, f"byom:{factory}")
        build = load_factory(factory)
        self.seeded()
        try:
            net = build(**dict(kwargs))
        except TypeError as e:
            raise InvalidArgument(f"cannot call {factory} with kwargs {sorted(kwargs)}: {e}") from e
        if not isinstance(net, self.torch.nn.Module):
            raise InvalidArgument(f"{factory} returned {type(net).__name__}, not a torch.nn.Module")
        self.net = self.place(net, weights)
        self.inputs, self.outputs = inputs, outputs
        self.run = self.graphed("module", self._run, inputs) if graphs else self._run
        self.check()

    def _run(self, *xs: Any) -> Any:
        return tuple(self.arrange(self.net(*xs)))

    def arrange(self, got: Any) -> list[Any]:
        """The module's result as a list in declared output order."""
        torch = self.torch
        names = [s.name for s in self.outputs]
        if isinstance(got, torch.Tensor):
            got = [got]
        elif isinstance(got, Mapping):
            missing = [n for n in names if n not in got]
            if missing:
                raise InvalidArgument(f"{self.name}: the module's result has no {missing}")
            got = [got[n] for n in names]
        elif isinstance(got, Sequence):
            got = list(got)
        else:
            raise InvalidArgument(f"{self.name}: the module returned {type(got).__name__}")
        if len(got) != len(names) or not all(isinstance(t, torch.Tensor) for t in got):
            raise InvalidArgument(
                f"{self.name}: the module returned {len(got)} value(s), the spec declares "
                f"{len(names)} tensor output(s) {names}"
            )
        return list(got)

    def check(self) -> None:
        """One forward pass on zeros (batch 2): every output's per-item shape and dtype kind
        against its spec."""
        with self.torch.inference_mode():
            try:
                got = self._run(*self.zeros(2))
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                shapes = ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in self.inputs)
                raise InvalidArgument(f"{self.name}: forward fails on inputs {shapes}: {e}") from e
        for s, t in zip(self.outputs, got, strict=True):
            shape = tuple(t.shape[1:])
            if t.dim() == 0 or t.shape[0] != 2 or shape != s.shape:
                raise InvalidArgument(
                    f"{self.name}: output {s.name!r} is {list(t.shape)} for a batch of 2, the "
                    f"spec declares {list(s.shape)} per item"
                )
            kind = (
                "f" if t.dtype.is_floating_point else ("b" if t.dtype == self.torch.bool else "i")
            )
            if (kind == "f") != (s.dtype.kind == "f"):
                raise InvalidArgument(
                    f"{self.name}: output {s.name!r} is {t.dtype}, the spec declares {s.dtype}"
                )

    def forward(self, *xs: Any) -> Sequence[Any]:
        out = self.run(*xs)
        return [out] if isinstance(out, self.torch.Tensor) else list(out)


def module(
    ctx: ModelContext,
    factory: str,
    inputs: Any,
    outputs: Any,
    kwargs: Mapping[str, Any] | None = None,
    weights: str | None = None,
    graphs: bool = True,
) -> ModuleStage:
    """The stage serving `factory(**kwargs)`; see the module docstring."""
    if not isinstance(factory, str):
        raise InvalidArgument(f"option factory={factory!r} must be 'module:function'")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise InvalidArgument(f"option kwargs={kwargs!r} must be a mapping")
    if not isinstance(graphs, bool):
        raise InvalidArgument(f"option graphs={graphs!r} must be true or false")
    return ModuleStage(
        ctx,
        factory,
        kwargs or {},
        parse_specs(inputs, "inputs"),
        parse_specs(outputs, "outputs"),
        weights,
        graphs,
    )
