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
maximized exactly on [0, 1]. Final soft matrices are rounded by a maximizing LAP each. With
``align.cost: activations`` the objective is sum_{a<b} sum_g <M_a C_ab, M_b> (a quadratic) instead.
Both objectives live in :mod:`cyclemerge.matching.objectives`.

Unlike the reference code, model ``align.reference`` is held at the identity by default (see
:func:`frank_wolfe`); ``align.anchor: false`` gives the fully symmetric iteration of the paper.

With ``align.polish: true`` each start's rounded solution is then improved by block-coordinate
LAP ascent on the same objective (:mod:`cyclemerge.matching.polish`): never below the rounding.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

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
from cyclemerge.matching.objectives import ActivationObjective, Mats, Targets, WeightObjective, vertex
from cyclemerge.matching.polish import PolishReport, polish_activations, polish_weights
from cyclemerge.permutation import PermSpec, Perms, StateDict

REFERENCE_URL = "https://arxiv.org/abs/2405.17897"
REFRESH_EVERY = 20  # iterations between exact recomputations of the incrementally updated state


def best_step(poly: np.ndarray) -> float:
    """argmax of the polynomial (constant coefficient first) on [0, 1]; 0 when no t gains."""
    p = np.polynomial.Polynomial(poly)
    # The maximizer is an endpoint or a real critical point; evaluating the real parts of complex
    # roots as well costs nothing and keeps nearly-double roots that rounding made complex.
    candidates = [0.0, 1.0] + [float(np.clip(r.real, 0.0, 1.0)) for r in p.deriv().roots()]
    values = p(np.array(candidates))
    best = int(np.argmax(values))
    if values[best] - values[0] <= 1e-15 * max(1.0, abs(values[0])):
        return 0.0
    return float(candidates[best])


def _step(mats: Mats, targets: Targets, t: float) -> None:
    """M <- (1 - t) M + t Q in place."""
    for g, m in mats.items():
        m.lerp_(vertex(targets[g], m), t)


def _lmo(grads: Mats, anchor: int | None) -> Targets:
    """Per (model, group) permutation maximizing <grad, Q> (the anchor stays put); LAPs run on CPU.

    The N x groups LAPs are independent and SciPy releases the GIL while solving, so they share a
    thread pool: LAPs are about half of C2M3's time on MLPs."""
    host = {g: grad.detach().to("cpu", torch.float64) for g, grad in grads.items()}
    jobs = [(g, i) for g, h in host.items() for i in range(h.shape[0]) if i != anchor]
    with ThreadPoolExecutor(max_workers=max(1, min(torch.get_num_threads(), len(jobs)))) as pool:
        solved = dict(zip(jobs, pool.map(lambda job: lap_maximize(host[job[0]][job[1]]), jobs)))
    out: Targets = {}
    for g, h in host.items():
        rows = [torch.arange(h.shape[1]) if i == anchor else solved[g, i] for i in range(h.shape[0])]
        out[g] = torch.stack(rows).to(grads[g].device)
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
    value = obj.reset(mats)
    history = [value]
    best, stalled = value, 0
    for it in range(1, max_iter + 1):
        targets = _lmo(obj.gradient(mats), anchor)
        poly = obj.line(mats, targets)
        t = best_step(poly)
        if t == 0.0:
            return mats, history, "stationary"
        obj.step(t)
        _step(mats, targets, t)
        value = obj.reset(mats) if it % REFRESH_EVERY == 0 else float(np.polynomial.Polynomial(poly)(t))
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

            def polish(perms: list[Perms]) -> tuple[list[Perms], PolishReport]:
                return polish_activations(corr, perms, tol=config.tol, max_sweeps=config.max_iter, anchor=anchor)
        else:
            obj = WeightObjective(state_dicts, spec, device, dtype, anchor)

            def final_objective(perms: list[Perms]) -> float:
                return objective(state_dicts, spec, perms)

            def polish(perms: list[Perms]) -> tuple[list[Perms], PolishReport]:
                return polish_weights(state_dicts, spec, perms, tol=config.tol, max_sweeps=config.max_iter,
                                      anchor=anchor)

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
            extra = {"relaxed_objective": history[-1], "stop_reason": reason, "init": init}
            if config.polish:
                # Each start is polished before the starts are compared, so selection sees polished solutions.
                perms, polished = polish(perms)
                extra.update(rounded_objective=polished.objective_before, polish=polished.summary())
            return Start(
                name=init,
                seed=seed if init == "sinkhorn" else None,
                perms=perms,
                objective=final_objective(perms),
                history=history,
                iterations=len(history) - 1,
                seconds=time.perf_counter() - t_start,
                extra=extra,
            )

        result = select_start(run_one, config=config, method="c2m3", score=score, t0=t0)
    result.report.extra.update(cost=config.cost, device=str(device), anchor=anchor)
    return result
