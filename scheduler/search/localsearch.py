"""Local search over whole plans, from the plan the load search (`solver.Solver`) found.

A plan is held as a `State`: per stage (in `Solver.keys` order) its share units, max batch and
the GPU slot of each replica. `Polish` turns plans into states and back, lists the states one
move away that fit the GPUs, and scores many states at once with the vectorised predictor
(`perfmodel.vectorised`), contention included; why the load search's plan needs it, and how a
move is chosen, is said on `Polish`. `max-load` uses it, and `min-resource` through max-load's
search.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from scheduler.perfmodel.vectorised import Vectorised
from scheduler.policy import PlanSpec
from scheduler.search.planning import Choice, assemble, items_for, units_of
from scheduler.search.solver import Solver

POINTS = 24  # loads tried at once when finding how much one plan carries
CHUNK = 256  # neighbours predicted at once by the local search
LOOK = 0.05  # how far above the target the local search looks to rank its moves

Config = tuple[int, int, tuple[int, ...]]  # per stage: share units, max batch, slot per replica
State = tuple[Config, ...]  # per stage, in Solver.keys order


class Polish:
    """Hill-climbing on whole plans after the load search, scored by the vectorised predictor.

    The load search prices each stage's choice with contention factors one round behind, so
    it can settle on many small-batch replicas that keep a GPU busy and slow its co-runners,
    or crowd one GPU while another idles. Here every neighbour of the plan, for the stages of
    the binding pipeline and their co-runners (any share and batch for a stage, with its
    replicas, one more on any GPU, or one fewer; one replica moved; one share unit traded with
    another stage), is predicted whole at a load just above the best so far. A move is taken
    when it lowers the worst p99/QoS ratio there (or keeps it and lowers it 5% further up);
    among those, the one best further up (room for load, not only latency now). Once the ratio
    is <= 1 the plan's own highest load becomes the new best. `budget` caps the replica
    predictions spent, so decision time stays bounded on large worlds.
    """

    def __init__(self, solver: Solver, w: Mapping[str, float], budget: int) -> None:
        self.solver, self.budget, self.spent = solver, budget, 0
        world = solver.world
        self.vec = Vectorised(world, transport=solver.opts.transport)
        assert self.vec.keys == solver.keys
        grid = solver.grid
        self.weights = np.asarray([w[n] for n in self.vec.pipelines])
        self.qos = np.asarray([solver.qos[n] for n in self.vec.pipelines])
        self.profs = [solver.profiles[k] for k in solver.keys]
        self.n_gpu = len(solver.gpus)
        self.cap = [min(grid.units_per_gpu, units_of(s.gpu, grid)) for s in solver.gpus]
        self.mem = [s.gpu.memory_bytes for s in solver.gpus]
        self.batches = [
            tuple(b for b in solver.batches(k) if b <= p.max_batch) or (p.batches[0],)
            for k, p in zip(solver.keys, self.profs, strict=True)
        ]
        self.max_replicas = solver.opts.max_replicas
        self.wait_ms = solver.wait_ms
        # share in percent of `units` on each GPU, as the predictor reads a replica's share
        self.share = np.zeros((self.n_gpu, grid.units_per_gpu + 1))
        for i, s in enumerate(solver.gpus):
            for u in range(grid.units_per_gpu + 1):
                if grid.green and s.gpu.sms_per_group and s.gpu.sm_count:
                    self.share[i, u] = 100.0 * u * s.gpu.sms_per_group / s.gpu.sm_count
                else:
                    self.share[i, u] = grid.percent(u)
        self.pipe_stages = [
            [k for k in range(len(solver.keys)) if self.vec.pipe_of[k] == p]
            for p in range(len(self.vec.pipelines))
        ]

    # -- states ------------------------------------------------------------------------------

    def state_of(self, plan: PlanSpec) -> State:
        slot = {(s.node, s.gpu.index): i for i, s in enumerate(self.solver.gpus)}
        by_key = {f"{a.pipeline}/{a.stage}": a for a in plan.stages}
        out = []
        for k in self.solver.keys:
            reps = by_key[k].replicas
            r = reps[0]
            units = (
                len(r.sm_groups)
                if self.solver.grid.green
                else round(r.sm_percent / self.solver.grid.unit_percent)
            )
            out.append((units, r.max_batch, tuple(sorted(slot[(x.node, x.gpu)] for x in reps))))
        return tuple(out)

    def plan_of(self, state: State, rates: Mapping[str, float], reason: str) -> PlanSpec:
        solver = self.solver
        chosen = {
            k: Choice(k, u, b, len(g), 0.0) for k, (u, b, g) in zip(solver.keys, state, strict=True)
        }
        items = items_for(solver.world, chosen, solver.profiles)
        where = [g for _, _, gs in state for g in gs]  # items_for's order: pipeline, stage
        return assemble(
            solver.policy,
            solver.world,
            chosen,
            items,
            where,
            solver.grid,
            max_wait_us=solver.opts.max_wait_us,
            planned_qps=rates,
            clamped=solver.clamped,
            reason=reason,
        )

    # -- scoring -----------------------------------------------------------------------------

    def _rows(self, state: State) -> np.ndarray:
        """[stage, units, batch, slot] per replica."""
        return np.asarray([(k, u, b, g) for k, (u, b, gs) in enumerate(state) for g in gs])

    def scores(self, states: Sequence[State], loads: np.ndarray | Sequence[float]) -> np.ndarray:
        """Worst p99/QoS over pipelines per (state, load); > 1e3 where a replica is unstable.

        States are taken as edits of the first: its rows are tiled, and each other state
        replaces the rows of the stages where it differs.
        """
        base = states[0]
        base_rows = self._rows(base)
        n = len(states)
        changed = np.zeros((n, len(base)), dtype=bool)
        extra: list[tuple[int, int, int, int, int]] = []
        for i, s in enumerate(states):
            if i == 0 or s is base:
                continue
            for k, cfg in enumerate(s):
                if cfg != base[k]:
                    changed[i, k] = True
                    u, b, gs = cfg
                    extra.extend((i, k, u, b, g) for g in gs)
        keep = ~changed[:, base_rows[:, 0]]  # [state, base row]
        plan_idx = np.broadcast_to(np.arange(n)[:, None], keep.shape)[keep]
        rows = np.broadcast_to(base_rows[None], (n, *base_rows.shape))[keep]
        if extra:
            more = np.asarray(extra)
            plan_idx = np.concatenate([plan_idx, more[:, 0]])
            rows = np.concatenate([rows, more[:, 1:]])
        stage, units, batch, slot = rows.T
        self.spent += len(plan_idx)
        rates = np.asarray(loads, dtype=float)[:, None] * self.weights[None, :]
        p99, excess = self.vec.run(
            plan_idx, stage, self.share[slot, units], batch, self.wait_ms, slot, rates, n
        )
        ratio = (p99 / self.qos[None, :]).max(axis=1)
        return np.where(np.isfinite(ratio), ratio, 1e3 + excess)

    def max_load(self, state: State, lo: float, tol: float, hi: float = 0.0) -> float:
        """The highest load (>= lo, which must be feasible) the state meets, to `tol`: a grid
        of loads per call, each call narrowing to one step of the one before."""
        span = hi / lo if hi > lo else 4.0
        while True:
            loads = lo * span ** (np.arange(POINTS) / (POINTS - 1))
            ok = self.scores([state] * POINTS, loads) <= 1.0
            if ok.all():
                lo = float(loads[-1])
                continue
            last = int(np.argmin(ok)) - 1  # loads are ascending: the first infeasible - 1
            if last >= 0:
                lo = float(loads[last])
            span = span ** (1 / (POINTS - 1))
            if span - 1 <= tol:
                return lo

    # -- moves -------------------------------------------------------------------------------

    def neighbours(self, state: State, focus: set[int]) -> list[State]:
        """Plans one move away that fit the GPUs, for the stages in `focus`: another batch;
        any share with the same replicas, or with one replica more (on any GPU) or fewer; one
        replica moved; one share unit traded with any other stage."""
        units, mem = [0] * self.n_gpu, [0] * self.n_gpu
        for prof, (u, b, gs) in zip(self.profs, state, strict=True):
            for g in gs:
                units[g] += u
                mem[g] += prof.memory_bytes(b)
        out: list[State] = []
        seen = {state}

        def use(k: int, cfg: Config, sign: int, du: list[int], dm: list[int]) -> None:
            m = self.profs[k].memory_bytes(cfg[1])
            for g in cfg[2]:
                du[g] += sign * cfg[0]
                dm[g] += sign * m

        def put(k: int, cfg: Config, other: tuple[int, Config] | None = None) -> None:
            cfg = (cfg[0], cfg[1], tuple(sorted(cfg[2])))
            s = list(state)
            s[k] = cfg
            if other is not None:
                s[other[0]] = other[1]
            new = tuple(s)
            if new in seen:
                return
            seen.add(new)
            du, dm = list(units), list(mem)
            for j, c in ((k, cfg), other or (k, cfg))[: 1 if other is None else 2]:
                use(j, state[j], -1, du, dm)
                use(j, c, 1, du, dm)
            if all(x <= c for x, c in zip(du, self.cap, strict=True)) and all(
                x <= c for x, c in zip(dm, self.mem, strict=True)
            ):
                out.append(new)

        top = max(self.cap)
        for k in sorted(focus):
            u, b, gs = state[k]
            n = len(gs)
            for nb, nu in itertools.product(self.batches[k], range(1, top + 1)):
                put(k, (nu, nb, gs))
                if n < self.max_replicas:
                    for g in range(self.n_gpu):
                        put(k, (nu, nb, (*gs, g)))
                if n > 1:
                    for i in sorted(set(range(n))):
                        put(k, (nu, nb, gs[:i] + gs[i + 1 :]))
            for i in range(n):
                for g in range(self.n_gpu):
                    put(k, (u, b, (*gs[:i], *gs[i + 1 :], g)))
            for j in range(len(state)):
                uj, bj, gj = state[j]
                if j != k and uj > 1:
                    put(k, (u + 1, b, gs), (j, (uj - 1, bj, gj)))
                if j != k and u > 1:
                    put(k, (u - 1, b, gs), (j, (uj + 1, bj, gj)))
        return out

    def _focus(self, state: State, load: float) -> set[int]:
        """The stages of the binding pipeline(s) and their co-runners' stages."""
        stage, units, batch, slot = self._rows(state).T
        p99, _ = self.vec.run(
            np.zeros(len(stage), dtype=int),
            stage,
            self.share[slot, units],
            batch,
            self.wait_ms,
            slot,
            (load * self.weights)[None, :],
            1,
        )
        ratio = np.where(np.isfinite(p99[0]), p99[0] / self.qos, np.inf)
        worst = float(ratio.max())
        hot = {k for p, r in enumerate(ratio) if r >= worst * 0.98 for k in self.pipe_stages[p]}
        hot_gpus = {g for k in hot for g in state[k][2]}
        return hot | {k for k, (_, _, gs) in enumerate(state) if hot_gpus & set(gs)}

    def replicated(self, state: State) -> State | None:
        """The same stages data-parallel: one replica on every GPU, each stage's total share
        spread evenly (shrunk, largest first, until a GPU holds them), or None if none fits.
        Contention across pipelines then lands evenly, and no stage copies across GPUs."""
        n = min(self.max_replicas, self.n_gpu)
        if n < 2:
            return None
        want = [max(1, (u * len(gs)) // n) for u, _, gs in state]
        room = min(self.cap)
        while sum(want) > room:
            k = max(range(len(want)), key=lambda k: want[k])
            if want[k] == 1:
                return None
            want[k] -= 1
        slots = tuple(range(n))
        out = tuple((u, b, slots) for u, (_, b, _) in zip(want, state, strict=True))
        mem = [sum(p.memory_bytes(b) for p, (_, b, _) in zip(self.profs, out, strict=True))]
        return out if mem[0] <= min(self.mem) and out != state else None

    def carried(self, state: State, near: float, tol: float) -> float:
        """The most `state` carries, searched from well below `near` (0 if not even that)."""
        loads = near / 64 * 128 ** (np.arange(POINTS) / (POINTS - 1))
        ok = self.scores([state] * POINTS, loads) <= 1.0
        if not ok[0]:
            return 0.0
        last = int(np.argmin(ok)) - 1 if not ok.all() else POINTS - 1
        return self.max_load(state, float(loads[last]), tol)

    def affords(self, rows: int) -> bool:
        """Whether the budget left holds one round of moves of a plan of `rows` replicas."""
        return self.spent + 2 * rows * (CHUNK + 1) <= self.budget

    def run(self, state: State, load: float, tol: float) -> tuple[State, float]:
        """The best plan found from `state` (feasible at `load`) and the load it carries."""
        best, best_load = state, load
        cur, target = best, best_load * (1 + tol)
        score, score_hi = self.scores([cur, cur], [target, target * (1 + LOOK)])
        rows = sum(len(gs) for _, _, gs in cur)
        while self.affords(rows):
            nbrs = self.neighbours(cur, self._focus(cur, target))
            moved = False
            # first improving chunk: on a large world most moves are never looked at
            rows = sum(len(gs) for _, _, gs in cur)
            for c in range(0, len(nbrs), CHUNK):
                part = nbrs[c : c + CHUNK]
                if self.spent + 2 * rows * (len(part) + 1) > self.budget:
                    break
                # each at the target and further up: of the moves that help at the target, the
                # one that helps most further up (room for load, not only latency now)
                loads = np.repeat([target, target * (1 + LOOK)], len(part) + 1)
                got = self.scores([cur, *part] * 2, loads).reshape(2, -1)[:, 1:]
                # better at the target, or as good there and better further up: the pair
                # (target, further up) falls in lexicographic order, so no move undoes another
                better = (got[0] < score - 1e-9) | ((got[0] <= score) & (got[1] < score_hi - 1e-9))
                if better.any():
                    i = int(np.lexsort((got[0], np.where(better, got[1], np.inf)))[0])
                    cur, score, score_hi, moved = part[i], float(got[0, i]), float(got[1, i]), True
                    break
            if not moved:
                break
            if score <= 1.0:
                best, best_load = cur, self.max_load(cur, target, tol)
                target = best_load * (1 + tol)
                score, score_hi = self.scores([cur, cur], [target, target * (1 + LOOK)])
        return best, best_load
