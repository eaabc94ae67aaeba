"""PNG figures for the experiment results: latency against load, SM share over time, latency CDFs.

Matplotlib runs headless (Agg); every function writes one file and closes its figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _finish(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def latency_vs_load(
    series: Mapping[str, Sequence[tuple[float, float | None]]],
    path: str | Path,
    *,
    qos_ms: float | None = None,
    title: str = "p99 latency against offered load",
) -> Path:
    """One line per label (policy) of `(offered_qps, p99_ms)` points, with the QoS target."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.items():
        pts = sorted((r, p) for r, p in points if p is not None)
        if pts:
            ax.plot([r for r, _ in pts], [p for _, p in pts], marker="o", label=label)
    if qos_ms is not None:
        ax.axhline(qos_ms, color="grey", linestyle="--", label=f"QoS {qos_ms:g} ms")
    ax.set_xlabel("offered load (queries/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    return _finish(fig, path)


def sm_over_time(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    title: str = "total SM share over time",
) -> Path:
    """One step line per label of `(t_s, sm_percent)` samples."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.items():
        if points:
            ax.step([t for t, _ in points], [s for _, s in points], where="post", label=label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("SM share (% of one GPU, summed)")
    ax.set_title(title)
    ax.legend()
    return _finish(fig, path)


def latency_cdf(
    samples_ms: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    qos_ms: float | None = None,
    title: str = "latency CDF",
) -> Path:
    """Empirical CDF per label, on a log latency axis."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, values in samples_ms.items():
        if len(values):
            xs = np.sort(np.asarray(values, dtype=np.float64))
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    if qos_ms is not None:
        ax.axvline(qos_ms, color="grey", linestyle="--", label=f"QoS {qos_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency from intended send (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.legend()
    return _finish(fig, path)


def timeline(
    t_s: Sequence[float],
    offered_qps: Sequence[float],
    p99_ms: Sequence[float | None],
    sm_percent: Sequence[float | None],
    path: str | Path,
    *,
    qos_ms: float | None = None,
    title: str = "diurnal load",
) -> Path:
    """Three stacked panels sharing time: offered load, p99 against QoS, total SM share."""
    fig, axes = plt.subplots(3, 1, figsize=(6.4, 7.2), sharex=True)
    axes[0].plot(t_s, offered_qps, color="tab:blue")
    axes[0].set_ylabel("offered (queries/s)")
    axes[1].plot(t_s, [np.nan if p is None else p for p in p99_ms], color="tab:red", marker=".")
    if qos_ms is not None:
        axes[1].axhline(qos_ms, color="grey", linestyle="--")
    axes[1].set_ylabel("p99 (ms)")
    axes[2].step(t_s, [np.nan if s is None else s for s in sm_percent], where="post")
    axes[2].set_ylabel("SM share (%)")
    axes[2].set_xlabel("time (s)")
    axes[0].set_title(title)
    return _finish(fig, path)


def policies_over_time(
    trace: Sequence[tuple[float, float]],
    offered: Mapping[str, Sequence[tuple[float, float]]],
    over_qos: Mapping[str, Sequence[tuple[float, float | None]]],
    sm_percent: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    title: str = "load, p99 against QoS and SM share",
) -> Path:
    """Three stacked panels sharing time, one line per label (policy) on each: the trace's rate
    with each policy's offered load, the worst pipeline's p99 over its target (1 = at the QoS),
    and the plan's total SM share (steps, as sampled)."""
    fig, axes = plt.subplots(3, 1, figsize=(7.2, 8.0), sharex=True)
    if trace:
        axes[0].step([t for t, _ in trace], [r for _, r in trace], where="post", color="black",
                     linewidth=2, alpha=0.4, label="trace")  # fmt: skip
    for label, load in offered.items():
        axes[0].plot([t for t, _ in load], [q for _, q in load], marker=".", label=label)
    axes[0].set_ylabel("load (queries/s)")
    axes[0].legend(fontsize="small")
    for label, ratios in over_qos.items():
        ys = [np.nan if v is None else v for _, v in ratios]
        axes[1].plot([t for t, _ in ratios], ys, marker=".", label=label)
    axes[1].axhline(1.0, color="grey", linestyle="--", label="QoS")
    axes[1].set_ylabel("worst p99 / QoS")
    axes[1].set_yscale("log")
    for label, shares in sm_percent.items():
        if shares:
            axes[2].step([t for t, _ in shares], [s for _, s in shares], where="post", label=label)
    axes[2].set_ylabel("SM share (% of one GPU)")
    axes[2].set_xlabel("time in the day (s)")
    axes[0].set_title(title)
    return _finish(fig, path)
