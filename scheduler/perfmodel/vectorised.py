"""The predictor over many plans at once, in NumPy, for searches: the same model as
`scheduler.perfmodel.predictor.predict`, one row per replica (tests hold the two to agree)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.errors import FailedPrecondition, InvalidArgument
from scheduler.perfmodel import queueing
from scheduler.perfmodel.predictor import HopCosts, share_percent
from scheduler.perfmodel.profiles import as_profiles, pow2_padded
from scheduler.policy import PlanSpec, PolicyInput

# below this many replica rows, finding the alike ones costs more than it saves
DEDUP_ROWS = 2048


def _busy(util: np.ndarray, busy: np.ndarray) -> np.ndarray:
    """The fraction of time each replica keeps its GPU busy at the batches that form; one that
    cannot keep up (utilisation past `RHO_MAX`) never idles."""
    return np.where(util <= queueing.RHO_MAX, np.minimum(1.0, busy), 1.0)


class _Service:
    """Batch -> solo latency for a row of replicas: tables at their shares, laid out once.

    Where a batch falls in a row's own batch grid is read from `pos`: its slot in the union of
    all grids (one searchsorted for every row), mapped to the row's segment.
    """

    def __init__(
        self,
        lo: np.ndarray,
        hi: np.ndarray,
        grid: np.ndarray,
        t: np.ndarray,
        scale: np.ndarray,
        union: np.ndarray,
        pos: np.ndarray,
        bucketed: np.ndarray,
        host: np.ndarray,
    ) -> None:
        self.lo, self.hi, self.grid, self.t, self.scale = lo, hi, grid, t, scale
        self.union, self.pos, self.bucketed = union, pos, bucketed
        self.host = host  # per row: StageProfile.host_ms, added to every latency
        self.any_bucketed = bool(bucketed.any())
        self.rows = np.arange(len(t))

    def take(self, idx: np.ndarray) -> _Service:
        return _Service(
            self.lo[idx],
            self.hi[idx],
            self.grid[idx],
            self.t[idx],
            self.scale[idx],
            self.union,
            self.pos[idx],
            self.bucketed[idx],
            self.host[idx],
        )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.any_bucketed:
            batch = np.where(self.bucketed, pow2_padded(np.asarray(batch, dtype=float)), batch)
        if self.grid.shape[1] == 1:
            lo, hi = self.lo[:, 0], self.hi[:, 0]
        else:
            rows = self.rows
            k = self.pos[rows, np.searchsorted(self.union, batch, side="right")]
            g0, g1 = self.grid[rows, k], self.grid[rows, k + 1]
            w = np.minimum(np.maximum((batch - g0) / (g1 - g0), 0.0), 1.0)
            lo = self.lo[rows, k] * (1 - w) + self.lo[rows, k + 1] * w
            hi = self.hi[rows, k] * (1 - w) + self.hi[rows, k + 1] * w
        out = np.exp((1 - self.t) * np.log(lo) + self.t * np.log(hi) + self.scale)
        return out + self.host  # type: ignore[no-any-return]


def _groups(*cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows alike in every column: (group of each row, first row of each group)."""
    order = np.lexsort(cols[::-1])
    new = np.zeros(len(order), dtype=bool)
    new[:1] = True
    for c in cols:
        sc = c[order]
        new[1:] |= sc[1:] != sc[:-1]
    group = np.empty(len(order), dtype=int)
    group[order] = np.cumsum(new) - 1
    return group, order[new]


class Vectorised:
    """`predict` over many plans at once, in NumPy: the same model, for searches.

    A batch of plans is given flat, one row per replica: plan index, stage index (into
    `keys`, every stage of every pipeline in order), SM share in percent, max batch, max wait
    and slot index (into `slots`, every GPU of every node in order). `run` returns every
    pipeline's p99 per plan, with unstable stages and over-busy time-sliced GPUs as inf.
    Results agree with `predict` to rounding (tests hold them to it); a search uses this to
    rank plans and `predict` to verify the one it returns.
    """

    def __init__(
        self,
        world: PolicyInput,
        *,
        transport: str = "ref",
        hops: HopCosts | None = None,
        rounds: int = 3,
    ) -> None:
        if transport not in ("ref", "wire"):
            raise InvalidArgument(f"transport must be ref or wire, got {transport!r}")
        profiles = as_profiles(world.profiles)
        self.pipelines = [p.name for p in world.pipelines]
        self.keys: list[str] = []
        pipe_of, nxt = [], []
        for pi, p in enumerate(world.pipelines):
            for si, st in enumerate(p.stages):
                key = f"{p.name}/{st.name}"
                if key not in profiles:
                    raise FailedPrecondition(f"no profile for stage {key}")
                self.keys.append(key)
                pipe_of.append(pi)
                nxt.append(len(self.keys) if si + 1 < len(p.stages) else len(self.keys) - 1)
        self.slots = [(n.name, g) for n in world.nodes for g in n.gpus]
        node_names = sorted({n for n, _ in self.slots})
        self.node_of = np.asarray([node_names.index(n) for n, _ in self.slots], dtype=int)
        self.n_nodes = len(node_names)
        self.pipe_of = np.asarray(pipe_of, dtype=int)
        self.next_stage = np.asarray(nxt, dtype=int)
        self.rounds, self.wire = rounds, transport == "wire"
        self.hops = hops or HopCosts.for_world(world)
        self.query_ms = [self.hops.query_cost_ms(p.input_bytes) for p in world.pipelines]
        profs = [profiles[k] for k in self.keys]
        self.profs = profs
        ns = max(len(p.shares) for p in profs)
        nb = max(len(p.batches) for p in profs)
        nl = max(len(p.pressure_levels) for p in profs)
        self.n_shares = np.asarray([len(p.shares) for p in profs])
        self.shares = np.full((len(profs), ns), np.inf)
        self.grid = np.zeros((len(profs), nb))
        self.table = np.zeros((len(profs), ns, nb))
        self.levels = np.zeros((len(profs), nl))
        self.slow = np.zeros((len(profs), nl))
        for i, pr in enumerate(profs):
            self.shares[i, : len(pr.shares)] = pr.shares
            pad = nb - len(pr.batches)
            self.grid[i] = np.concatenate([pr.batches, pr.batches[-1] + 1.0 + np.arange(pad)])
            tab = np.asarray(pr._table)
            self.table[i, : len(pr.shares)] = np.concatenate(
                [tab, np.repeat(tab[:, -1:], pad, axis=1)], axis=1
            )
            # pressure levels padded along the last segment's line (the scalar extrapolation)
            lv, sd = list(pr.pressure_levels), list(pr.slowdown)
            slope = (sd[-1] - sd[-2]) / (lv[-1] - lv[-2]) if len(lv) > 1 else 0.0
            for _ in range(nl - len(lv)):
                lv.append(lv[-1] + 1.0)
                sd.append(sd[-1] + slope)
            self.levels[i], self.slow[i] = lv, sd
        self.pressure = np.asarray([p.exerted_pressure for p in profs])
        self.bucketed = np.asarray([p.batch_buckets == "pow2" for p in profs])
        self.bias = np.asarray([p.bias for p in profs])
        self.host = np.asarray([p.host_ms for p in profs])
        self.out_bytes = np.asarray([p.output_bytes_per_item for p in profs], dtype=float)
        self.one_level = np.asarray([len(p.pressure_levels) == 1 for p in profs])
        self.same_levels = bool((self.levels == self.levels[:1]).all())
        # pos[stage, i]: the segment of the stage's batch grid holding a batch whose slot in
        # the union of all grids is i (searchsorted right: i = how many union points are <= b)
        self.union = np.unique(self.grid)
        below = np.concatenate([[-np.inf], self.union])  # the largest union point <= b
        last = max(nb - 2, 0)
        self.pos = np.clip((self.grid[:, None, :] <= below[None, :, None]).sum(axis=2) - 1, 0, last)

    def _service(self, stage: np.ndarray, share: np.ndarray) -> _Service:
        """Solo latency tables of replicas of `stage` at `share` (as StageProfile.service_at)."""
        shares = self.shares[stage]
        log_scale = np.log(np.maximum(shares[:, 0] / share, 1.0))
        top = self.n_shares[stage] - 1
        j = np.clip((shares <= share[:, None]).sum(axis=1) - 1, 0, np.maximum(top - 1, 0))
        j1 = np.minimum(j + 1, top)
        rows = np.arange(len(j))
        s0, s1 = shares[rows, j], shares[rows, j1]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(j1 > j, np.log(share / s0) / np.log(s1 / s0), 0.0)
        t = np.minimum(np.maximum(t, 0.0), 1.0)
        return _Service(
            self.table[stage, j],
            self.table[stage, j1],
            self.grid[stage],
            t,
            log_scale,
            self.union,
            self.pos[stage],
            self.bucketed[stage],
            self.host[stage],
        )

    def _slowdown(self, stage: np.ndarray, pressure: np.ndarray) -> np.ndarray:
        lv, sd = self.levels[stage], self.slow[stage]
        last = lv.shape[1] - 1
        if last == 0:
            return sd[:, 0]  # type: ignore[no-any-return]
        rows = np.arange(len(stage))
        if self.same_levels:
            j = np.searchsorted(self.levels[0], pressure, side="right") - 1
            j = np.clip(j, 0, last - 1)
        else:
            j = np.clip((lv <= pressure[:, None]).sum(axis=1) - 1, 0, last - 1)
        l0, l1 = lv[rows, j], lv[rows, j + 1]
        t = (pressure - l0) / (l1 - l0)
        out = (1 - t) * sd[rows, j] + t * sd[rows, j + 1]
        out = np.where(pressure <= lv[:, 0], sd[:, 0], out)
        return np.where(self.one_level[stage], sd[:, 0], out)  # type: ignore[no-any-return]

    def run(
        self,
        plan: np.ndarray,
        stage: np.ndarray,
        share: np.ndarray,
        batch: np.ndarray,
        wait_ms: np.ndarray | float,
        slot: np.ndarray,
        rates: np.ndarray,
        n_plans: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(p99 [plan, pipeline] in ms, inf where unstable; max utilisation / RHO_MAX per plan).

        `rates[plan, pipeline]` in queries/s; every stage of every plan needs a replica.
        """
        n_st, n_sl = len(self.keys), len(self.slots)
        plan, stage, slot = (np.asarray(a, dtype=int) for a in (plan, stage, slot))
        share = np.asarray(share, dtype=float)
        bmax = np.asarray(batch, dtype=float)
        sgid = plan * n_st + stage
        ggid = plan * n_sl + slot
        nrep = np.bincount(sgid, minlength=n_plans * n_st)
        if not nrep.all():
            raise InvalidArgument("every stage of every plan needs a replica")
        stage_rate = np.asarray(rates, dtype=float)[plan, self.pipe_of[stage]]
        wait = np.broadcast_to(np.asarray(wait_ms, dtype=float), stage.shape)
        # replicas alike in (stage, share, batch, wait) share their latency tables, and alike
        # also in rate and slowdown (most of them, across neighbouring plans) their queueing
        cfg, first = _groups(stage.astype(float), share, bmax, wait)
        svc = self._service(stage[first], share[first])
        c_bmax, c_wait = bmax[first], wait[first]
        lat_b = svc(c_bmax)[cfg]
        at_full = self._service(stage[first], np.full(len(first), 100.0))(c_bmax)[cfg]
        drawn = np.minimum(1.0, (1000.0 * bmax / lat_b) / (1000.0 * bmax / at_full))
        cfg_f = cfg.astype(float)
        full = svc.take(cfg) if len(stage) < DEDUP_ROWS else svc

        def queue(
            rate: np.ndarray, factor: np.ndarray
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            if len(rate) < DEDUP_ROWS:
                f = factor
                return queueing.replica_arrays(rate, bmax, wait, lambda b: full(b) * f)
            inv, one = _groups(cfg_f, rate, factor)
            c, f = cfg[one], factor[one]
            sub = svc.take(c)
            out = queueing.replica_arrays(rate[one], c_bmax[c], c_wait[c], lambda b: sub(b) * f)
            return out[0][inv], out[1][inv], out[2][inv]

        n_g = n_plans * n_sl
        sliced = (np.bincount(ggid, share, minlength=n_g) > 100.0 + 1e-6)[ggid]
        rate = stage_rate / nrep[sgid]
        factor = np.ones(len(stage))
        many = nrep[sgid] > 1
        for _ in range(self.rounds):
            _, util, busy = queue(rate, factor)
            busy = _busy(util, busy)
            pressure = np.where(sliced, 0.0, self.pressure[stage] * busy * drawn)
            total_busy = np.bincount(ggid, busy / factor, minlength=n_g)[ggid]
            total_p = np.bincount(ggid, pressure, minlength=n_g)[ggid]
            factor = np.where(
                sliced,
                1.0 + total_busy - busy / factor,
                self._slowdown(stage, total_p - pressure),
            )
            cap = 1000.0 * bmax / (lat_b * factor)
            share_of = cap / np.bincount(sgid, cap, minlength=n_plans * n_st)[sgid]
            rate = np.where(many, stage_rate * share_of, rate)
        p99, util, busy = queue(rate, factor)
        p99 = np.where(util <= queueing.RHO_MAX, p99 * self.bias[stage], np.inf)
        # a time-sliced GPU is judged at the batches that form, as in `predictor.predict`
        busy = _busy(util, busy)
        over = np.bincount(ggid, np.where(sliced, busy / factor, 0.0), minlength=n_g)
        flat_p99 = np.full(n_plans * n_st, -np.inf)
        np.maximum.at(flat_p99, sgid, p99)
        stage_p99 = flat_p99.reshape(n_plans, n_st)
        # hops: the fraction of adjacent replica pairs on one GPU, and whether on one node
        count = np.bincount(sgid * n_sl + slot, minlength=n_plans * n_st * n_sl).reshape(
            n_plans, n_st, n_sl
        )
        n = nrep.reshape(n_plans, n_st).astype(float)
        pairs = n * n[:, self.next_stage]
        same_gpu = (count * count[:, self.next_stage]).sum(axis=2) / pairs
        if self.wire:
            hop = (
                self.hops.wire_ms
                + self.out_bytes * (2 / self.hops.host_bytes_s + 1 / self.hops.node_bytes_s) * 1e3
                + np.zeros_like(same_gpu)
            )
        else:
            if self.n_nodes > 1:
                per_node = np.zeros((n_plans, n_st, self.n_nodes))
                for k in range(self.n_nodes):
                    per_node[:, :, k] = count[:, :, self.node_of == k].sum(axis=2)
                same_node = (per_node * per_node[:, self.next_stage]).sum(axis=2) >= pairs
            else:
                same_node = np.ones_like(same_gpu, dtype=bool)
            speed = np.where(same_node, self.hops.peer_bytes_s, self.hops.node_bytes_s)
            hop = self.hops.ref_ms + (1.0 - same_gpu) * (self.out_bytes / speed * 1e3)
        total = stage_p99 + hop
        out = np.zeros((n_plans, len(self.pipelines)))
        for pi in range(len(self.pipelines)):
            out[:, pi] = total[:, self.pipe_of == pi].sum(axis=1) + self.query_ms[pi]
        if self.hops.gateway_cpu_ms > 0:
            out += self.hops.gateway_ms(rates.sum(axis=1))[:, None]
        busy_gpu = (over > queueing.RHO_MAX).reshape(n_plans, n_sl).any(axis=1)
        out[busy_gpu] = np.inf
        excess = np.zeros(n_plans)
        np.maximum.at(excess, plan, util / queueing.RHO_MAX)
        return out, excess

    def flatten(
        self, plans: list[PlanSpec]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """PlanSpecs as `run`'s rows: plan, stage, share, batch, wait_ms, slot."""
        index = {k: i for i, k in enumerate(self.keys)}
        slot_of = {(node, g.index): i for i, (node, g) in enumerate(self.slots)}
        rows: list[tuple[int, int, float, int, float, int]] = []
        for pi, plan in enumerate(plans):
            for a in plan.stages:
                k = index.get(f"{a.pipeline}/{a.stage}")
                if k is None:
                    raise FailedPrecondition(f"no profile for stage {a.pipeline}/{a.stage}")
                for r in a.replicas:
                    s = slot_of.get((r.node, r.gpu))
                    if s is None:
                        raise InvalidArgument(f"{r.replica_id}: no GPU {r.node}:{r.gpu}")
                    share = share_percent(r, self.slots[s][1])
                    rows.append((pi, k, share, r.max_batch, r.max_wait_us / 1e3, s))
        cols = list(zip(*rows, strict=True))
        p, st, sh, b, w, sl = (np.asarray(c) for c in cols)
        return p, st, sh.astype(float), b.astype(float), w.astype(float), sl

    def p99(self, plans: list[PlanSpec], rates: Mapping[str, float]) -> np.ndarray:
        """Every pipeline's p99 [plan, pipeline] for whole PlanSpecs at one set of rates."""
        r = np.asarray([[float(rates.get(n, 0.0)) for n in self.pipelines]] * len(plans))
        out, _ = self.run(*self.flatten(plans), r, len(plans))
        return out
