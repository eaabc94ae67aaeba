"""Per-stage choices and their cheapest combination per pipeline, as Pareto sets.

A stage's choice (`planning.Choice`) is (share units per replica, max batch, replica count).
`Candidates` lays out every (units, batch) of several stages once; for given rates and
contention factors `Candidates.frontiers` returns each stage's Pareto set of choices over
(total units, predicted p99), computed with the vectorised twin of the queueing model.
`merge` combines a pipeline's stage sets into its Pareto set of whole-pipeline choices (an exact
multiple-choice knapsack by merging Pareto sets), and `cheapest` picks from it the least total
units whose summed p99s fit the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.perfmodel import queueing
from scheduler.perfmodel.profiles import StageProfile
from scheduler.search.planning import Choice, Grid


class Candidates:
    """Every (share units, batch) of several stages, with their latency tables laid out once.

    `frontiers` then works out, for given rates and contention factors, each stage's Pareto
    set of (units, replicas, batch) choices in one vectorised pass over all stages.
    """

    def __init__(
        self,
        profs: Sequence[StageProfile],
        grid: Grid,
        batches: Sequence[Sequence[int]],
        wait_ms: float,
        max_replicas: int,
        extra: int = 2,
    ) -> None:
        self.profs, self.wait_ms, self.max_replicas, self.extra = (
            profs,
            wait_ms,
            max_replicas,
            extra,
        )
        nbmax = max(len(p.batches) for p in profs)
        units = np.arange(1, grid.units_per_gpu + 1)
        share = np.asarray([grid.percent(int(u)) for u in units])
        parts: list[list[np.ndarray]] = [[] for _ in range(8)]
        for i, prof in enumerate(profs):
            usable = [b for b in batches[i] if b <= prof.max_batch] or [prof.batches[0]]
            shares = np.asarray(prof.shares)
            table = np.asarray(prof._table)
            pad = nbmax - len(prof.batches)
            pbs = np.concatenate([prof.batches, prof.batches[-1] + 1.0 + np.arange(pad)])
            ptab = np.concatenate([table, np.repeat(table[:, -1:], pad, axis=1)], axis=1)
            # per share unit: the measured shares around it and the log-linear weight
            j = np.clip(
                np.searchsorted(shares, share, side="right") - 1, 0, max(len(shares) - 2, 0)
            )
            j1 = np.minimum(j + 1, len(shares) - 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.where(j1 != j, np.log(share / shares[j]) / np.log(shares[j1] / shares[j]), 0)
            t = np.clip(t, 0.0, 1.0)
            scale = np.log(np.maximum(shares[0] / share, 1.0))
            nb = len(usable)
            for part, value in zip(
                parts,
                (
                    np.full(len(units) * nb, i),
                    np.repeat(units, nb),
                    np.tile(np.asarray(usable, dtype=float), len(units)),
                    np.repeat(ptab[j], nb, axis=0),
                    np.repeat(ptab[j1], nb, axis=0),
                    np.repeat(pbs[None, :], len(units) * nb, axis=0),
                    np.repeat(t, nb),
                    np.repeat(scale, nb),
                ),
                strict=True,
            ):
                part.append(value)
        (self.sid, self.u, self.b, self.lo, self.hi, self.grid, self.t, self.scale) = (
            np.concatenate(p) for p in parts
        )
        self.bias = np.asarray([p.bias for p in profs])
        self.host = np.asarray([p.host_ms for p in profs])  # StageProfile.host_ms
        self.solo = self._latency(np.arange(len(self.u)), self.b)

    def _latency(self, rows: np.ndarray, batch: np.ndarray) -> np.ndarray:
        g = self.grid[rows]
        k = np.maximum((g <= batch[:, None]).sum(axis=1) - 1, 0)
        k = np.minimum(k, g.shape[1] - 2) if g.shape[1] > 1 else k
        if g.shape[1] == 1:
            lo, hi = self.lo[rows, 0], self.hi[rows, 0]
        else:
            g0, g1 = g[np.arange(len(rows)), k], g[np.arange(len(rows)), k + 1]
            w = np.minimum(np.maximum((batch - g0) / (g1 - g0), 0.0), 1.0)
            lo = self.lo[rows, k] * (1 - w) + self.lo[rows, k + 1] * w
            hi = self.hi[rows, k] * (1 - w) + self.hi[rows, k + 1] * w
        t = self.t[rows]
        out = np.exp((1 - t) * np.log(lo) + t * np.log(hi) + self.scale[rows])
        return out + self.host[self.sid[rows]]  # type: ignore[no-any-return]

    def frontiers(self, rates: Sequence[float], factors: Sequence[float]) -> list[list[Choice]]:
        """Per stage, Pareto choices (fewer units, lower p99) that carry its rate stably."""
        fac = np.asarray(factors, dtype=float)[self.sid]
        rate = np.maximum(np.asarray(rates, dtype=float), 1e-6)[self.sid]
        cap = 1000.0 * self.b / (self.solo * fac)
        n_min = np.maximum(1, np.ceil(rate / (cap * queueing.RHO_MAX) - 1e-9)).astype(int)
        idx = np.tile(np.arange(len(self.u)), self.extra + 1)
        n = (n_min[None, :] + np.arange(self.extra + 1)[:, None]).ravel()
        keep = n <= self.max_replicas
        rows, n = idx[keep], n[keep]
        out: list[list[Choice]] = [[] for _ in self.profs]
        if len(rows) == 0:
            return out
        f = fac[rows]
        p99, util = queueing.replica_many(
            rate[rows] / n, self.b[rows], self.wait_ms, lambda x: self._latency(rows, x) * f
        )
        sid = self.sid[rows]
        p99 = p99 * self.bias[sid]
        ok = (util <= queueing.RHO_MAX) & np.isfinite(p99)
        rows, n, p99, sid = rows[ok], n[ok], p99[ok], sid[ok]
        cost = self.u[rows] * n
        order = np.lexsort((n, p99, cost, sid))
        rows, n, p99, sid, cost = rows[order], n[order], p99[order], sid[order], cost[order]
        # running minimum of p99 within each stage: later stages get smaller offsets
        big = (float(p99.max()) + 1.0) if len(p99) else 1.0
        shifted = p99 + (len(self.profs) - sid) * big
        runmin = np.minimum.accumulate(shifted)
        first = np.ones(len(sid), dtype=bool)
        first[1:] = sid[1:] != sid[:-1]
        pareto = first.copy()
        pareto[1:] |= shifted[1:] < runmin[:-1] - 1e-9
        for i in np.flatnonzero(pareto):
            s = int(sid[i])
            out[s].append(
                Choice(
                    self.profs[s].key,
                    int(self.u[rows[i]]),
                    int(self.b[rows[i]]),
                    int(n[i]),
                    float(p99[i]),
                )
            )
        return out


@dataclass(frozen=True)
class Merged:
    """A pipeline's Pareto set of whole-pipeline choices: cost ascending, p99 descending."""

    fronts: Sequence[Sequence[Choice]]
    cost: np.ndarray
    lat: np.ndarray
    picks: list[np.ndarray]  # per stage, the chosen index for each combination
    back: list[np.ndarray]  # per stage, the parent combination in the previous stage's set

    def choose(self, k: int) -> list[Choice]:
        chosen: list[Choice] = []
        for s in range(len(self.fronts) - 1, -1, -1):
            chosen.append(self.fronts[s][int(self.picks[s][k])])
            k = int(self.back[s][k])
        return chosen[::-1]

    def cheapest_within(self, budget_ms: float) -> int | None:
        """Index of the cheapest combination with p99 <= budget (lat is descending)."""
        k = int(np.searchsorted(-self.lat, -budget_ms, side="left"))
        return k if k < len(self.lat) else None


def merge(fronts: Sequence[Sequence[Choice]], budget_ms: float) -> Merged | None:
    """Exact multiple-choice knapsack: every Pareto (units, summed p99 <= budget) combination."""
    cost = np.zeros(1)
    lat = np.zeros(1)
    picks: list[np.ndarray] = []
    back: list[np.ndarray] = []
    for front in fronts:
        if not front:
            return None
        fc = np.array([c.cost for c in front], dtype=float)
        fl = np.array([c.p99_ms for c in front])
        c2 = (cost[:, None] + fc[None, :]).ravel()
        l2 = (lat[:, None] + fl[None, :]).ravel()
        parent = np.repeat(np.arange(len(cost)), len(front))
        idx = np.tile(np.arange(len(front)), len(cost))
        ok = l2 <= budget_ms
        if not ok.any():
            return None
        c2, l2, parent, idx = c2[ok], l2[ok], parent[ok], idx[ok]
        order = np.lexsort((l2, c2))
        c2, l2, parent, idx = c2[order], l2[order], parent[order], idx[order]
        runmin = np.minimum.accumulate(l2)
        pareto = np.ones(len(l2), dtype=bool)
        pareto[1:] = l2[1:] < runmin[:-1] - 1e-9
        cost, lat = c2[pareto], l2[pareto]
        picks.append(idx[pareto])
        back.append(parent[pareto])
    return Merged(fronts, cost, lat, picks, back)


def cheapest(fronts: Sequence[Sequence[Choice]], budget_ms: float) -> list[Choice] | None:
    """One choice per stage, least total units with summed p99 <= budget (exact)."""
    m = merge(fronts, budget_ms)
    return None if m is None else m.choose(0)
