"""Latency of one dynamically batching replica under Poisson arrivals.

A replica dispatches when its queue holds `max_batch` requests or the oldest has waited
`wait`: `max_wait` when λ·max_wait makes company likely, else 0 (the batcher's rule,
`contract.batching`). So its mean batch `b` settles where either the wait fills it (`1 + λ·wait`)
or the queue that built up during the previous batch does (`λ·S(b)`), capped at `max_batch`. A
request's p99 is then

    max(fill: the first request waits for the batch to form, at most max_wait;
        residual: a batch is in service when it arrives, with probability ρ = λ·S(b)/b)
  + queueing beyond one batch: Kingman's G/G/1 wait for batches at the capacity utilisation
    ρ_B = λ·S(B)/B, batch inter-arrivals Erlang-B (SCV 1/B), service nearly deterministic, and
    its p99 from the exponential tail P(W > t) ≈ ρ·exp(-ρ t / E[W])
  + service S(b).

It is conservative (the residual and the queueing terms overlap near saturation), which is the
right side to err on for a p99 target; the online bias factor corrects the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from contract.batching import effective_wait, effective_wait_array

# above this capacity utilisation a replica is treated as unstable (tail not predictable)
RHO_MAX = 0.92
SERVICE_SCV = 0.05  # squared coefficient of variation of batch service time
TAIL_Q = 0.01
BATCH_TOL = 1e-6  # the batch fixed point is reached within this many items
NEWTON_STEPS = 20
SLOPE_H = 1e-3  # backward difference for the slope of S(b)

Svc = Callable[[float], float]  # batch size -> batch service time, ms


@dataclass(frozen=True)
class Estimate:
    batch: float  # mean batch the replica runs at this rate
    fill_ms: float
    residual_ms: float
    queue_p99_ms: float
    service_ms: float
    busy: float  # fraction of time the replica computes (λ·S(b)/b, <= 1)
    utilization: float  # λ over the replica's capacity at its largest batch
    p99_ms: float

    @property
    def stable(self) -> bool:
        return self.utilization <= RHO_MAX


def mean_batch(rate_per_ms: float, max_batch: int, max_wait_ms: float, service: Svc) -> float:
    """The least fixed point b = min(B, max(1 + λ·wait, λ·S(b))), by Newton steps from below.

    g(b) = λ·S(b) - b; from a point where g > 0 a Newton step on the local slope moves right
    and, where S is convex, never past the root. Where the local slope is λ·S' >= 1 (S is not
    convex everywhere: a stage replaying CUDA graphs costs a step up at each power of two) the
    step is the plain fixed-point one, b <- λ·S(b), which also moves right and never past the
    least root, S being non-decreasing; with no root it climbs to B.
    """
    if rate_per_ms <= 0:
        return 1.0
    bmax = float(max_batch)
    b = min(bmax, 1.0 + rate_per_ms * effective_wait(rate_per_ms, max_wait_ms))
    for _ in range(NEWTON_STEPS):
        s = service(b)
        g = rate_per_ms * s - b
        if g <= BATCH_TOL:
            break
        slope = (s - service(b - SLOPE_H)) / SLOPE_H
        if rate_per_ms * slope >= 1.0:
            b = min(bmax, rate_per_ms * s)
        else:
            b = min(bmax, b + g / (1.0 - rate_per_ms * slope))
        if b >= bmax:
            break
    return b


def kingman_p99_ms(rho: float, ca2: float, cs2: float, service_ms: float) -> float:
    if rho <= TAIL_Q:
        return 0.0
    if rho >= 1.0:
        return math.inf
    mean_wait = rho / (1.0 - rho) * (ca2 + cs2) / 2.0 * service_ms
    return mean_wait / rho * math.log(rho / TAIL_Q)


def replica(rate_qps: float, max_batch: int, max_wait_ms: float, service: Svc) -> Estimate:
    """One replica at `rate_qps` whose batch of b items takes `service(b)` ms."""
    lam = rate_qps / 1000.0
    s_max = service(float(max_batch))
    util = lam * s_max / max_batch
    if lam <= 0:
        s1 = service(1.0)
        return Estimate(1.0, 0.0, 0.0, 0.0, s1, 0.0, 0.0, s1)
    b = mean_batch(lam, max_batch, max_wait_ms, service)
    s = service(b)
    busy = min(1.0, lam * s / b)
    residual = busy * s
    # a request waits for its batch to fill *while* the batch before it runs: the larger counts
    fill = max(0.0, min(effective_wait(lam, max_wait_ms), (b - 1.0) / lam) - residual)
    queue = kingman_p99_ms(util, 1.0 / max_batch, SERVICE_SCV, s_max)
    return Estimate(b, fill, residual, queue, s, busy, util, fill + residual + queue + s)


def replica_many(
    rate_qps: np.ndarray,
    max_batch: np.ndarray,
    max_wait_ms: float | np.ndarray,
    service: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """`replica` elementwise over arrays: returns (p99_ms, utilization)."""
    p99, util, _ = replica_arrays(rate_qps, max_batch, max_wait_ms, service)
    return p99, util


def replica_arrays(
    rate_qps: np.ndarray,
    max_batch: np.ndarray,
    max_wait_ms: float | np.ndarray,
    service: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`replica` elementwise over arrays: (p99_ms, utilization, busy); p99 is inf at util >= 1."""
    lam = np.asarray(rate_qps, dtype=float) / 1000.0
    bmax = np.asarray(max_batch, dtype=float)
    idle = lam <= 0
    s_max = service(bmax)
    util = np.where(idle, 0.0, lam * s_max / bmax)
    wait = effective_wait_array(lam, max_wait_ms)
    b = np.minimum(bmax, 1.0 + np.maximum(lam, 0.0) * wait)
    done = idle
    for _ in range(NEWTON_STEPS):
        s = service(b)
        g = lam * s - b
        done = done | (g <= BATCH_TOL) | (b >= bmax)
        if bool(done.all()):
            break
        slope = (s - service(b - SLOPE_H)) / SLOPE_H
        steep = lam * slope >= 1.0
        step = np.where(steep, lam * s, b + g / np.where(steep, 1.0, 1.0 - lam * slope))
        b = np.where(done, b, np.minimum(bmax, step))
    s = service(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        busy = np.minimum(1.0, lam * s / b)
        fill = np.maximum(0.0, np.minimum(wait, (b - 1.0) / lam) - busy * s)
    rho = np.clip(util, 0.0, 0.999999)
    ca2 = 1.0 / bmax
    mean_wait = rho / (1.0 - rho) * (ca2 + SERVICE_SCV) / 2.0 * s_max
    tail = np.log(np.maximum(rho, TAIL_Q) / TAIL_Q)
    queue = np.where(rho > TAIL_Q, mean_wait / np.maximum(rho, TAIL_Q) * tail, 0.0)
    p99 = np.where(idle, s, fill + busy * s + queue + s)
    busy = np.where(idle, 0.0, busy)
    return np.where(util < 1.0, p99, np.inf), util, busy
