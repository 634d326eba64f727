"""C2M3: cycle-consistent matching of N models by Frank-Wolfe over the Birkhoff polytope.

Every model ``i`` and group ``g`` gets a doubly stochastic matrix ``M[g][i]`` (n x n) in our index
convention: ``M[j, u]`` is how much universe unit ``j`` takes from the model's unit ``u``, so a
permutation ``p`` is ``M[j, p[j]] = 1`` and the universe copy of a tensor applies ``M`` along each
tied axis (``U = M_rows W M_cols^T`` for a matrix). This is the transpose of the paper's P_i.

Objective (all models and groups jointly): F = sum_{a<b} <U_a, U_b> summed over tensors, i.e.
(||S||^2 - sum_i ||U_i||^2) / 2 with S = sum_i U_i, so dF/dU_i = S - U_i and each tied axis k of a
tensor adds unfold_k(S - U_i) @ unfold_k(V_i)^T to its group's gradient, V_i being the tensor with
every other tied axis mapped. That is O(N) per tensor instead of the O(N^2) pair terms.

One iteration: gradient -> per (model, group) LAP (the linear minimization oracle) -> one global
step t along the segment to the LAP vertices. Each universe copy is a polynomial of degree <= 2 in
t (one factor per tied axis), so F(t) is a quartic whose coefficients are computed exactly and
maximized exactly on [0, 1]. Final soft matrices are rounded by a maximizing LAP each.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch

from cyclemerge.config import AlignConfig
from cyclemerge.matching.base import (
    Correlations,
    MatchResult,
    ProgressFn,
    ScoreFn,
    Start,
    check_correlations,
    check_models,
    lap_maximize,
    resolve_device,
    select_start,
    work_dtype,
)
from cyclemerge.matching.metrics import activation_objective, objective
from cyclemerge.permutation import PermSpec, Perms, StateDict

REFERENCE_URL = "https://arxiv.org/abs/2405.17897"
Mats = dict[str, torch.Tensor]  # group -> [N, n, n] soft matrices
Targets = dict[str, torch.Tensor]  # group -> [N, n] LAP vertices as index vectors


def _unfold(x: torch.Tensor, axis: int) -> torch.Tensor:
    """[N, *shape] -> [N, shape[axis], rest] (a view when the tensor is a stack of matrices)."""
    moved = x.movedim(axis + 1, 1)
    return moved if moved.dim() == 3 else moved.reshape(moved.shape[0], moved.shape[1], -1)


def _apply(m: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Map every model's ``axis`` by its matrix: out[i, .., j, ..] = sum_u m[i, j, u] x[i, .., u, ..]."""
    moved = x.movedim(axis + 1, 1)
    out = torch.bmm(m, _unfold(x, axis)).view(moved.shape)
    return out.movedim(1, axis + 1)


def _gather(x: torch.Tensor, q: torch.Tensor, axis: int) -> torch.Tensor:
    """Apply per-model permutations ``q`` [N, n] along ``axis`` (the vertex case of :func:`_apply`)."""
    moved = x.movedim(axis + 1, 1)
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return moved[rows, q].movedim(1, axis + 1)


def _pair_sum(c_m: torch.Tensor, c_n: torch.Tensor) -> float:
    """sum_{a<b} of the symmetrized pair products <c_m[a], c_n[b]>, as (<S_m, S_n> - sum_i <c_m[i], c_n[i]>) / 2."""
    fm, fn = c_m.reshape(c_m.shape[0], -1), c_n.reshape(c_n.shape[0], -1)
    return 0.5 * (torch.dot(fm.sum(0), fn.sum(0)) - (fm * fn).sum()).item()


class WeightObjective:
    """F over the stacked weights of N models; tensors with no tied axis only add a constant."""

    def __init__(self, state_dicts: list[StateDict], spec: PermSpec, device: torch.device, dtype: torch.dtype) -> None:
        self.tensors: list[tuple[str, torch.Tensor, list[tuple[int, str]]]] = []
        self.constant = 0.0
        for key, axes in spec.items():
            if not torch.is_floating_point(state_dicts[0][key]):
                continue
            stack = torch.stack([sd[key].detach() for sd in state_dicts]).to(device, dtype)
            tied = [(k, g) for k, g in enumerate(axes) if g is not None]
            if not tied:
                self.constant += _pair_sum(stack.double(), stack.double())
            elif len(tied) > 2:
                raise ValueError(f"C2M3: {key} has {len(tied)} permuted axes; at most 2 (rows and columns) are supported")
            else:
                self.tensors.append((key, stack, tied))
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def evaluate(self, mats: Mats) -> tuple[float, Mats]:
        """F at ``mats`` and its gradient for every group; caches what :meth:`line` needs."""
        value = self.constant
        grads = {g: torch.zeros_like(m) for g, m in mats.items()}
        for key, w, tied in self.tensors:
            if len(tied) == 1:
                (k, g), = tied
                u = _apply(mats[g], w, k)
                views, x1 = [w], None
            else:
                (k0, g0), (k1, g1) = tied
                x0 = _apply(mats[g1], w, k1)  # every tied axis but k0 mapped
                x1 = _apply(mats[g0], w, k0)  # every tied axis but k1 mapped
                u = _apply(mats[g0], x0, k0)
                views = [x0, x1]
            value += _pair_sum(u, u)
            resid = u.sum(0, keepdim=True) - u
            for (k, g), v in zip(tied, views):
                grads[g] += torch.bmm(_unfold(resid, k), _unfold(v, k).transpose(1, 2))
            self._cache[key] = (u, x1)
        return value, grads

    def line(self, mats: Mats, targets: Targets) -> np.ndarray:
        """Coefficients (constant first) of F((1 - t) M + t Q) for the M of the last :meth:`evaluate`.

        With D = Q - M, a vertex applied to a tensor is a gather, so only one product per matrix
        tensor is new: U(t) = U + t (D0 W M1 + M0 W D1) + t^2 D0 W D1.
        """
        poly = np.zeros(5)
        poly[0] = self.constant
        for key, w, tied in self.tensors:
            u, x1 = self._cache[key]
            if len(tied) == 1:
                (k, g), = tied
                coeffs = [u, _gather(w, targets[g], k) - u]
            else:
                (k0, g0), (k1, g1) = tied
                y = _gather(w, targets[g0], k0) - x1  # D0 W
                z = _apply(mats[g1], y, k1)  # D0 W M1
                coeffs = [u, z + _gather(x1, targets[g1], k1) - u, _gather(y, targets[g1], k1) - z]
            for m, n in itertools.product(range(len(coeffs)), repeat=2):
                poly[m + n] += _pair_sum(coeffs[m], coeffs[n])
        return poly


class ActivationObjective:
    """F = sum_g sum_{a<b} <M_a C_ab, M_b>: total correlation of the units each universe unit joins.

    dF/dM_a = sum_{b != a} M_b C_ba, and F is quadratic, so F(t) has degree 2.
    """

    def __init__(self, correlations: Correlations, device: torch.device, dtype: torch.dtype) -> None:
        self.corr = {}
        for g, c in correlations.items():
            off = c.clone()
            off[torch.arange(c.shape[0]), torch.arange(c.shape[0])] = 0  # a model is not paired with itself
            self.corr[g] = off.to(device, dtype)
        self._grads: Mats = {}

    def evaluate(self, mats: Mats) -> tuple[float, Mats]:
        grads = {g: torch.einsum("bij,bajk->aik", mats[g], c) for g, c in self.corr.items()}
        self._grads = grads
        value = sum(0.5 * (grads[g] * mats[g]).sum().item() for g in grads)
        return value, grads

    def line(self, mats: Mats, targets: Targets) -> np.ndarray:
        poly = np.zeros(5)
        for g, c in self.corr.items():
            n_models, n = targets[g].shape
            grad, d = self._grads[g], -mats[g].clone()
            rows = torch.arange(n_models, device=d.device)[:, None]
            d[rows, torch.arange(n, device=d.device)[None, :], targets[g]] += 1
            # sum_b Q_b C_ba: row u of Q_b C_ba is row q_b[u] of C_ba.
            q_c = c[rows, :, targets[g]]  # [b, u, a, k] = C[b, a][q_b[u], k]
            h = q_c.sum(0).transpose(0, 1) - grad
            poly[0] += 0.5 * (grad * mats[g]).sum().item()
            poly[1] += (grad * d).sum().item()
            poly[2] += 0.5 * (h * d).sum().item()
        return poly


def best_step(poly: np.ndarray) -> float:
    """argmax of the polynomial (constant coefficient first) on [0, 1]; 0 when no t gains."""
    p = np.polynomial.Polynomial(poly)
    candidates = [0.0, 1.0] + [r.real for r in p.deriv().roots() if abs(r.imag) < 1e-12 and 0.0 < r.real < 1.0]
    values = p(np.array(candidates))
    best = int(np.argmax(values))
    if values[best] - values[0] <= 1e-15 * max(1.0, abs(values[0])):
        return 0.0
    return float(candidates[best])


def _step(mats: Mats, targets: Targets, t: float) -> None:
    """M <- (1 - t) M + t Q in place."""
    for g, m in mats.items():
        n_models, n = targets[g].shape
        m.mul_(1.0 - t)
        rows = torch.arange(n_models, device=m.device)[:, None]
        m[rows, torch.arange(n, device=m.device)[None, :], targets[g]] += t


def _lmo(grads: Mats, anchor: int | None) -> Targets:
    """Per (model, group) permutation maximizing <grad, Q> (the anchor stays put); LAPs run on CPU."""
    out: Targets = {}
    for g, grad in grads.items():
        host = grad.detach().to("cpu", torch.float64)
        rows = [torch.arange(host.shape[1]) if i == anchor else lap_maximize(host[i]) for i in range(host.shape[0])]
        out[g] = torch.stack(rows).to(grad.device)
    return out


def initial_mats(
    sizes: dict[str, int],
    n_models: int,
    init: str,
    *,
    seed: int,
    anchor: int | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Mats:
    """identity, barycenter (all 1/n) or Sinkhorn-normalized 1/n + U(0, 0.01/n) noise (seeded, on CPU);
    the anchor model, if any, starts (and stays) at the identity."""
    gen = torch.Generator().manual_seed(seed)
    mats: Mats = {}
    for g, n in sizes.items():
        if init == "identity":
            m = torch.eye(n, dtype=torch.float64).expand(n_models, n, n).clone()
        elif init == "barycenter":
            m = torch.full((n_models, n, n), 1.0 / n, dtype=torch.float64)
        elif init == "sinkhorn":
            m = 1.0 / n + torch.rand(n_models, n, n, generator=gen, dtype=torch.float64) * (0.01 / n)
            for _ in range(1000):
                m = m / m.sum(2, keepdim=True)
                m = m / m.sum(1, keepdim=True)
                if (m.sum(2) - 1).abs().max() < 1e-12:
                    break
        else:
            raise ValueError(f"unknown C2M3 init {init!r}; known: identity, barycenter, sinkhorn")
        if anchor is not None:
            m[anchor] = torch.eye(n, dtype=torch.float64)
        mats[g] = m.to(device, dtype)
    return mats


def frank_wolfe(
    obj: WeightObjective | ActivationObjective,
    mats: Mats,
    *,
    max_iter: int,
    patience: int,
    tol: float,
    anchor: int | None = None,
    progress: ProgressFn | None = None,
    step_offset: int = 0,
) -> tuple[Mats, list[float], str]:
    """Maximize ``obj`` from ``mats`` (updated in place). Returns (mats, objective per iterate, stop reason).

    The ``anchor`` model's matrices never move: F is invariant under relabelling the universe (the
    same permutation applied to every model), and without fixing that freedom every model chases
    the others' moving bases; with N = 2 the symmetric iteration oscillates and rounds to a poor
    vertex. Anchoring loses no vertex solution and is what C2M3's two-model Frank-Wolfe does.

    Stops when a step gains less than ``tol`` relative to the best value ``patience`` times in a row
    (relative, because the raw objective grows with N^2 and the weight norms), when the exact line
    search finds no ascent (the iterate is stationary, so further iterations would repeat it), or
    after ``max_iter`` steps.
    """
    value, grads = obj.evaluate(mats)
    history = [value]
    best, stalled = value, 0
    for it in range(1, max_iter + 1):
        targets = _lmo(grads, anchor)
        t = best_step(obj.line(mats, targets))
        if t == 0.0:
            return mats, history, "stationary"
        _step(mats, targets, t)
        value, grads = obj.evaluate(mats)
        history.append(value)
        if progress is not None:
            progress(step_offset + it, value)
        if value - best < tol * max(1.0, abs(best)):
            stalled += 1
            if stalled >= patience:
                return mats, history, "patience"
        else:
            stalled, best = 0, value
    return mats, history, "max_iter"


def round_mats(mats: Mats) -> list[Perms]:
    """Nearest permutation of every soft matrix (maximizing LAP), as per-model index vectors."""
    n_models = next(iter(mats.values())).shape[0]
    host = {g: m.detach().to("cpu", torch.float64) for g, m in mats.items()}
    return [{g: lap_maximize(m[i]) for g, m in host.items()} for i in range(n_models)]


def start_plan(config: AlignConfig) -> list[tuple[str, int]]:
    """(init, seed) per start: config.init alone, or identity, barycenter, then Sinkhorn with seed, seed+1, ..."""
    if config.restarts == 1:
        return [(config.init, config.seed)]
    plan = [("identity", config.seed), ("barycenter", config.seed)]
    plan += [("sinkhorn", config.seed + k) for k in range(config.restarts - 2)]
    return plan[: config.restarts]


def match(
    *,
    state_dicts: list[StateDict],
    spec: PermSpec,
    config: AlignConfig,
    correlations: Correlations | None = None,
    progress: ProgressFn | None = None,
    score: ScoreFn | None = None,
) -> MatchResult:
    """Map all N models into one universe with jointly optimized, cycle-consistent permutations."""
    t0 = time.perf_counter()
    sizes = check_models(state_dicts, spec)
    device, dtype = resolve_device(config.device), work_dtype(state_dicts)
    n_models = len(state_dicts)
    if config.reference >= n_models:
        raise ValueError(f"align.reference is {config.reference} but there are only {n_models} models (0-based index)")
    anchor = config.reference if config.anchor else None
    with torch.no_grad():
        if config.cost == "activations":
            corr = check_correlations(correlations, sizes, n_models)
            obj: WeightObjective | ActivationObjective = ActivationObjective(corr, device, dtype)

            def final_objective(perms: list[Perms]) -> float:
                return activation_objective(corr, perms)
        else:
            obj = WeightObjective(state_dicts, spec, device, dtype)

            def final_objective(perms: list[Perms]) -> float:
                return objective(state_dicts, spec, perms)

        plan = start_plan(config)

        def run_one(k: int) -> Start:
            t_start = time.perf_counter()
            init, seed = plan[k]
            mats = initial_mats(sizes, n_models, init, seed=seed, anchor=anchor, device=device, dtype=dtype)
            mats, history, reason = frank_wolfe(
                obj, mats, max_iter=config.max_iter, patience=config.patience, tol=config.tol,
                anchor=anchor, progress=progress, step_offset=k * config.max_iter,
            )
            perms = round_mats(mats)
            return Start(
                name=init,
                seed=seed if init == "sinkhorn" else None,
                perms=perms,
                objective=final_objective(perms),
                history=history,
                iterations=len(history) - 1,
                seconds=time.perf_counter() - t_start,
                extra={"relaxed_objective": history[-1], "stop_reason": reason, "init": init},
            )

        result = select_start(run_one, config=config, method="c2m3", score=score, t0=t0)
    result.report.extra.update(cost=config.cost, device=str(device), anchor=anchor)
    return result
