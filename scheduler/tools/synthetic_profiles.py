"""A synthetic-but-plausible H100 profile set, from a small roofline model (until measured).

Batch latency on n SMs (MPS maps a percentage to an even SM count rounded down: 50% -> 66,
25% -> 32, 10% -> 12 on a 132-SM H100):

    t(b, n) = launch + b * mem * max(1, n_bw / n) + b * compute * 132 / min(n, b * sms_per_item)

`mem` is per-item time at full memory bandwidth, which a kernel only reaches with n_bw SMs or
more; `compute` is per-item time on all 132 SMs; a batch cannot spread over more SMs than its
items can fill. `launch`, `mem`, `compute` and `n_bw` are fitted (grid search, log error) to the
ResNet-50 fp16 batch-32 MPS measurements; the reference stages are then ResNet multiples,
named and batch-capped as in services/pipelines/*.yaml.
Sensitivity follows the memory-bound fraction of the stage's time; pressure is its achieved
bandwidth over the device peak. Run `python -m scheduler.tools.synthetic_profiles` to regenerate.
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass

from scheduler.perfmodel.profiles import StageProfile
from scheduler.perfmodel.profilestore import DEFAULT_PROFILES, save

SM_COUNT = 132
DEVICE = "NVIDIA H100 80GB HBM3 (synthetic)"
# measured: ResNet-50 fp16 batch 32 under MPS, img/s at each percentage
RESNET_IMG_S = {100: 6065.0, 50: 4350.0, 30: 3398.0, 15: 1864.0}
SHARES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIB = 1 << 20


def mps_sms(percent: float) -> int:
    return max(2, min(SM_COUNT, 2 * math.floor(percent / 100 * SM_COUNT / 2)))


@dataclass(frozen=True)
class Device:
    launch_ms: float
    mem_ms: float  # per ResNet image at full bandwidth
    compute_ms: float  # per ResNet image on all SMs
    n_bw: int


@dataclass(frozen=True)
class Stage:
    pipeline: str
    stage: str
    compute: float  # x ResNet-50 per item
    mem: float  # x ResNet-50 per item
    sms_per_item: float  # how many SMs one item can keep busy
    launch_ms: float
    batches: tuple[int, ...]
    weights_mib: int
    act_mib: float
    out_kib: int


STAGES = (
    Stage("img-to-text", "preprocess", 0.03, 0.25, 4, 0.15, (1, 2, 4, 8, 16, 32), 0, 2.5, 600),
    Stage("img-to-text", "encode", 1.6, 1.2, 6, 0.6, (1, 2, 4, 8, 16, 32), 330, 24, 1536),
    Stage("img-to-text", "decode", 1.1, 2.4, 3, 1.0, (1, 2, 4, 8, 16, 32), 480, 12, 4),
    Stage("text-to-img", "encode", 0.35, 0.5, 4, 0.4, (1, 2, 4, 8, 16, 32), 240, 4, 154),
    Stage("text-to-img", "generate", 9.0, 4.0, 16, 1.5, (1, 2, 4, 8, 16), 1700, 160, 192),
    Stage("text-to-img", "upscale", 3.0, 3.5, 10, 0.8, (1, 2, 4, 8, 16), 260, 96, 768),
    Stage("speech-to-text", "features", 0.04, 0.3, 4, 0.15, (1, 2, 4, 8, 16, 32), 0, 3, 320),
    Stage("speech-to-text", "acoustic", 1.2, 1.0, 6, 0.5, (1, 2, 4, 8, 16, 32), 600, 20, 256),
    Stage("speech-to-text", "decode", 0.08, 0.4, 2, 0.3, (1, 2, 4, 8, 16, 32), 10, 1, 2),
    Stage("video-analytics", "detect", 2.2, 1.8, 8, 0.7, (1, 2, 4, 8, 16, 32), 250, 40, 1200),
    Stage("video-analytics", "crop", 0.02, 0.35, 3, 0.12, (1, 2, 4, 8, 16, 32), 0, 6, 600),
    Stage("video-analytics", "classify", 0.5, 0.45, 4, 0.3, (1, 2, 4, 8, 16), 100, 8, 4),
)


def batch_ms(dev: Device, st: Stage, batch: int, n: int) -> float:
    mem = batch * dev.mem_ms * st.mem * max(1.0, dev.n_bw / n)
    busy = min(n, max(2.0, batch * st.sms_per_item))
    return st.launch_ms + mem + batch * dev.compute_ms * st.compute * SM_COUNT / busy


def fit() -> tuple[Device, float]:
    """The device constants that best reproduce the ResNet measurements (max log error)."""
    resnet = Stage("ref", "resnet50", 1.0, 1.0, 64, 0.0, (32,), 0, 0, 0)
    measured = {mps_sms(p): 32_000.0 / x for p, x in RESNET_IMG_S.items()}
    best: tuple[float, Device] | None = None
    grid_ms = [i * 0.004 for i in range(1, 60)]
    for launch, mem, comp, n_bw in itertools.product(
        (0.2, 0.4, 0.6), grid_ms, grid_ms, range(20, 133, 4)
    ):
        dev = Device(launch, mem, comp, n_bw)
        err = max(abs(math.log(batch_ms(dev, resnet, 32, n) / t)) for n, t in measured.items())
        if best is None or err < best[0]:
            best = (err, dev)
    assert best is not None
    return best[1], best[0]


def profile(dev: Device, st: Stage) -> StageProfile:
    table = tuple(tuple(batch_ms(dev, st, b, mps_sms(s)) for b in st.batches) for s in SHARES)
    b = st.batches[-1]
    full = batch_ms(dev, st, b, SM_COUNT)
    mem_frac = b * dev.mem_ms * st.mem / full
    # a memory-bound stage slows beside bandwidth pressure; compute-bound ones barely do
    slowdown = tuple(1.0 + 0.9 * mem_frac * p + 0.25 * mem_frac * p * p + 0.03 * p for p in LEVELS)
    return StageProfile(
        pipeline=st.pipeline,
        stage=st.stage,
        shares=tuple(float(s) for s in SHARES),
        batches=st.batches,
        latency_ms=table,
        weights_bytes=st.weights_mib * MIB,
        activation_bytes_per_item=int(st.act_mib * MIB),
        output_bytes_per_item=st.out_kib * 1024,
        pressure_levels=LEVELS,
        slowdown=slowdown,
        pressure=round(min(1.0, mem_frac), 4),
        device=DEVICE,
        synthetic=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(DEFAULT_PROFILES))
    parser.add_argument("--date", default="2026-01-01", help="date stamped in the file")
    args = parser.parse_args(argv)
    dev, err = fit()
    note = (
        "SYNTHETIC: roofline model fitted to ResNet-50 fp16 b32 MPS throughput on an H100 "
        f"(launch={dev.launch_ms} ms, mem={dev.mem_ms:.3f} ms/img, compute={dev.compute_ms:.3f} "
        f"ms/img, n_bw={dev.n_bw} SMs; max fit error {math.expm1(err):.1%}). Replace with "
        "`python -m services.profiler` output measured on the GPU."
    )
    profiles = [profile(dev, st) for st in STAGES]
    save(args.out, profiles, device=DEVICE, date=args.date, synthetic=True, note=note)
    print(f"wrote {len(profiles)} synthetic profiles to {args.out}: {note}")


if __name__ == "__main__":
    main()
