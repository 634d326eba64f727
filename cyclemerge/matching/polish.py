"""Polish: block-coordinate ascent on C2M3's objective from a permutation solution (after rounding).

Frank-Wolfe stops at a stationary point of the relaxed objective and its rounding can land on a
vertex below what MergeMany's coordinate ascent reaches. Polishing visits every (model, group)
block in turn and solves one LAP: the model's units of that group against the sum of the other
models in the universe, every other permutation held fixed. A step is kept only when the exact
objective rises by more than ``tol`` (relative, as for Frank-Wolfe and MergeMany), so the
objective never falls; sweeps stop after one in which no step was kept, or after ``max_sweeps``.
Each model keeps one permutation per group into the universe, so the result stays cycle-consistent.

Both objectives of :mod:`cyclemerge.matching.objectives` are polished:

- weights: F = sum_{a<b} <U_a, U_b>; moving model i changes F by <S - U_i, U_i' - U_i> with
  S = sum_j U_j, and the block's LAP cost is C[j, u] = <unfold_k(S - U_i)[j], unfold_k(V_i)[u]> summed
  over the tensors tied to the group (axis k; V_i = model i with its other tied axes mapped).
- activations: F = sum_g sum_{a<b} sum_j C_ab[p_a[j], p_b[j]], linear in each block, so the LAP
  cost is sum_{b != i} C_ib[:, p_b]^T (MergeMany's step, here started from Frank-Wolfe's solution).

The universe is only defined up to one relabelling applied to every model, so blocks of the
anchor model are visited too (such a step moves the anchor against all others at once), and the
universe is relabelled at the end so that the anchor's permutations are the identity again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from cyclemerge.matching.base import Correlations, lap_maximize
from cyclemerge.permutation import PermSpec, Perms, StateDict, compose, invert


@dataclass
class PolishReport:
    """What a polish did: objective before and after, sweeps run, steps kept, and why it stopped."""

    objective_before: float
    objective_after: float
    sweeps: int
    steps_kept: int
    stop_reason: str  # "converged" (a sweep kept no step) or "max_sweeps"

    def summary(self) -> dict:
        return asdict(self)


def _unfold(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _map(w: torch.Tensor, axes: tuple[str | None, ...], perms: Perms, skip: int | None = None) -> torch.Tensor:
    """``w`` with every tied axis (except ``skip``) gathered by its group's permutation."""
    for axis, g in enumerate(axes):
        if g is not None and axis != skip:
            w = w.index_select(axis, perms[g])
    return w


def reanchor(perms: list[Perms], anchor: int | None) -> list[Perms]:
    """Relabel the universe so that model ``anchor`` maps into it by the identity (F is unchanged)."""
    if anchor is None:
        return perms
    back = invert(perms[anchor])
    return [compose(p, back) for p in perms]


def polish_weights(
    state_dicts: list[StateDict],
    spec: PermSpec,
    perms: list[Perms],
    *,
    tol: float,
    max_sweeps: int,
    anchor: int | None = None,
) -> tuple[list[Perms], PolishReport]:
    """Polish ``perms`` on the weight objective; returns new permutations (the inputs are not changed)."""
    # Untied tensors (the classifier's bias) add a constant, kept so the values match ``metrics.objective``.
    keys = [k for k in spec if torch.is_floating_point(state_dicts[0][k])]
    dtype = torch.float64 if any(sd[k].dtype == torch.float64 for sd in state_dicts for k in keys) else torch.float32
    weights = [{k: sd[k].detach().to("cpu", dtype) for k in keys} for sd in state_dicts]
    perms = [{g: p.detach().cpu().clone() for g, p in ps.items()} for ps in perms]
    ties: dict[str, list[tuple[str, int]]] = {}
    for key in keys:
        for axis, g in enumerate(spec[key]):
            if g is not None:
                ties.setdefault(g, []).append((key, axis))
    universe = [{k: _map(w[k], spec[k], p) for k in keys} for w, p in zip(weights, perms)]
    # The sum of the universe copies in float64: gains are small differences of large inner products.
    total = {k: torch.stack([u[k].double() for u in universe]).sum(0) for k in keys}

    def value() -> float:
        out = 0.0
        for k in keys:
            stack = torch.stack([u[k].double() for u in universe])
            out += 0.5 * (total[k].square().sum() - stack.square().sum()).item()
        return out

    current = before = value()
    sweeps = kept = 0
    reason = "max_sweeps"
    while sweeps < max_sweeps:
        sweeps += 1
        moved = False
        for i in range(len(weights)):
            for g, tied in ties.items():
                others = {k: total[k] - universe[i][k].double() for k, _ in tied}
                n = perms[i][g].numel()
                cost = torch.zeros(n, n, dtype=torch.float64)
                for key, axis in tied:
                    view = _map(weights[i][key], spec[key], perms[i], skip=axis).double()
                    cost += _unfold(others[key], axis) @ _unfold(view, axis).T
                candidate = lap_maximize(cost)
                if torch.equal(candidate, perms[i][g]):
                    continue
                trial = {**perms[i], g: candidate}
                # dict.fromkeys, not a set: the gain is summed in a fixed order, so runs are reproducible.
                fresh = {k: _map(weights[i][k], spec[k], trial) for k in dict.fromkeys(key for key, _ in tied)}
                gain = sum(torch.sum(others[k] * (fresh[k].double() - universe[i][k].double())).item() for k in fresh)
                if gain > tol * max(1.0, abs(current)):
                    for k, u in fresh.items():
                        total[k] += u.double() - universe[i][k].double()
                        universe[i][k] = u
                    perms[i] = trial
                    current += gain
                    kept += 1
                    moved = True
        if not moved:
            reason = "converged"
            break
    return reanchor(perms, anchor), PolishReport(before, value(), sweeps, kept, reason)


def polish_activations(
    correlations: Correlations,
    perms: list[Perms],
    *,
    tol: float,
    max_sweeps: int,
    anchor: int | None = None,
) -> tuple[list[Perms], PolishReport]:
    """Polish ``perms`` on the activation objective (``correlations`` as from ``check_correlations``)."""
    perms = [{g: p.detach().cpu().clone() for g, p in ps.items()} for ps in perms]
    corr = {g: c.detach().to("cpu", torch.float64) for g, c in correlations.items()}
    n_models = len(perms)

    def block_cost(i: int, g: str) -> torch.Tensor:
        """cost[j, u]: correlation of model i's unit u with universe unit j of every other model."""
        return sum(corr[g][i, b][:, perms[b][g]].T for b in range(n_models) if b != i)

    def value() -> float:
        out = 0.0
        for g, c in corr.items():
            for a in range(n_models):
                for b in range(a + 1, n_models):
                    out += c[a, b][perms[a][g], perms[b][g]].sum().item()
        return out

    current = before = value()
    sweeps = kept = 0
    reason = "max_sweeps" if n_models > 1 else "converged"
    while sweeps < max_sweeps and n_models > 1:
        sweeps += 1
        moved = False
        for i in range(n_models):
            for g in corr:
                cost = block_cost(i, g)
                candidate = lap_maximize(cost)
                rows = torch.arange(cost.shape[0])
                gain = (cost[rows, candidate].sum() - cost[rows, perms[i][g]].sum()).item()
                if gain > tol * max(1.0, abs(current)):
                    perms[i] = {**perms[i], g: candidate}
                    current += gain
                    kept += 1
                    moved = True
        if not moved:
            reason = "converged"
            break
    return reanchor(perms, anchor), PolishReport(before, value(), sweeps, kept, reason)
