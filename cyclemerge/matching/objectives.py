"""The two objectives C2M3's Frank-Wolfe maximizes, as running state over the iterates.

Soft matrices follow our index convention: ``M[j, u]`` is how much universe unit ``j`` takes from
the model's unit ``u`` (a permutation ``p`` is ``M[j, p[j]] = 1``), and a universe copy applies ``M``
along each tied axis (``U = M_rows W M_cols^T`` for a matrix); the paper's P_i is our M^T.

Each objective offers ``reset(mats) -> F`` (exact state and value), ``gradient(mats) -> dF/dM``,
``line(mats, targets)`` (coefficients of F along the segment to the LAP vertices, constant
first) and ``step(t)`` (move the state by t along that segment; F there is the polynomial at t).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from cyclemerge.matching.base import Correlations
from cyclemerge.permutation import PermSpec, StateDict

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
    return out.movedim(1, axis + 1).contiguous()


def _gather(x: torch.Tensor, q: torch.Tensor, axis: int) -> torch.Tensor:
    """Apply per-model permutations ``q`` [N, n] along ``axis``: the vertex case of :func:`_apply`."""
    shape = [q.shape[0]] + [1] * (x.dim() - 1)
    shape[axis + 1] = q.shape[1]
    return torch.gather(x, axis + 1, q.view(shape).expand(x.shape))


def _pair_sums(coeffs: list[torch.Tensor]) -> np.ndarray:
    """P[m, n] = sum over models i != j of <coeffs[m][i], coeffs[n][j]> / 2.

    Summing the off-diagonal entries of the model-by-model Gram matrix avoids the cancellation of
    (||S||^2 - sum_i ||U_i||^2) / 2, so the working precision of the state is kept.
    """
    flat = [c.reshape(c.shape[0], -1) for c in coeffs]
    out = np.zeros((len(flat), len(flat)))
    for m, n in itertools.combinations_with_replacement(range(len(flat)), 2):
        gram = (flat[m] @ flat[n].T).double()
        out[m, n] = out[n, m] = 0.5 * (gram.sum() - gram.diagonal().sum()).item()
    return out


class _Tied:
    """One tensor with permuted axes: the weights of all models and its current universe copies.

    ``views[k]`` is the tensor with every tied axis except the k-th mapped; the gradient of the
    k-th axis' group is unfold_k(S - U) @ unfold_k(views[k])^T.
    """

    def __init__(self, key: str, w: torch.Tensor, axes: list[tuple[int, str]]) -> None:
        self.key, self.w, self.axes = key, w, axes
        self.u = w
        self.views: list[torch.Tensor] = [w] * len(axes)
        self.pending: tuple[torch.Tensor, ...] = ()


class WeightObjective:
    """F over the stacked weights of N models, kept as running universe copies.

    A step moves every matrix towards a vertex: M <- M + t (Q - M). Applying a vertex is a gather,
    so after :meth:`reset` the universe copies, the views and the line-search coefficients are all
    updated without matrix products; an iteration's only products are the gradient's.
    """

    def __init__(
        self,
        state_dicts: list[StateDict],
        spec: PermSpec,
        device: torch.device,
        dtype: torch.dtype,
        anchor: int | None = None,
    ) -> None:
        self.tensors: list[_Tied] = []
        self.constant = 0.0
        # The anchor's gradient is never used: skip its products (a slice, so no copies, when it is first or last).
        n_models = len(state_dicts)
        if anchor is None:
            self.free: slice | torch.Tensor = slice(None)
        elif anchor in (0, n_models - 1):
            self.free = slice(1, None) if anchor == 0 else slice(0, n_models - 1)
        else:
            self.free = torch.tensor([i for i in range(n_models) if i != anchor], device=device)
        for key, axes in spec.items():
            if not torch.is_floating_point(state_dicts[0][key]):
                continue
            stack = torch.stack([sd[key].detach() for sd in state_dicts]).to(device, dtype)
            tied = [(k, g) for k, g in enumerate(axes) if g is not None]
            if not tied:
                self.constant += float(_pair_sums([stack])[0, 0])
            elif len(tied) > 2:
                raise ValueError(f"C2M3: {key} has {len(tied)} permuted axes; at most 2 (rows and columns) are supported")
            else:
                self.tensors.append(_Tied(key, stack, tied))

    def reset(self, mats: Mats) -> float:
        """Recompute the universe copies from the matrices (at the start, and now and then against
        drift); returns F."""
        value = self.constant
        for t in self.tensors:
            if len(t.axes) == 1:
                (k, g), = t.axes
                t.u = _apply(mats[g], t.w, k)
            else:
                (k0, g0), (k1, g1) = t.axes
                x0, x1 = _apply(mats[g1], t.w, k1), _apply(mats[g0], t.w, k0)
                t.views, t.u = [x0, x1], _apply(mats[g0], x0, k0)
            value += float(_pair_sums([t.u])[0, 0])
        return value

    def gradient(self, mats: Mats) -> Mats:
        """dF/dM for every group at the current iterate (zero rows for the anchor)."""
        grads = {g: torch.zeros_like(m) for g, m in mats.items()}
        free = self.free
        for t in self.tensors:
            resid = t.u.sum(0, keepdim=True) - t.u[free]
            for (k, g), v in zip(t.axes, t.views):
                grads[g][free] += torch.bmm(_unfold(resid, k), _unfold(v[free], k).transpose(1, 2))
        return grads

    def line(self, mats: Mats, targets: Targets) -> np.ndarray:
        """Coefficients (constant first) of F(M + t (Q - M)); D = Q - M, vertices applied by gathers.

        U(t) = U + t (D0 W M1^T + M0 W D1^T) + t^2 D0 W D1^T, where D0 W = Q0 W - M0 W and
        D0 W M1^T = (Q0 applied to W M1^T) - U.
        """
        poly = np.zeros(5)
        poly[0] = self.constant
        for t in self.tensors:
            if len(t.axes) == 1:
                (k, g), = t.axes
                c1 = _gather(t.w, targets[g], k) - t.u
                coeffs, t.pending = [t.u, c1], (c1,)
            else:
                (k0, g0), (k1, g1) = t.axes
                x0, x1 = t.views
                q_w = _gather(t.w, targets[g0], k0)  # Q0 W
                w_q = _gather(t.w, targets[g1], k1)  # W Q1^T
                z = _gather(x0, targets[g0], k0) - t.u  # D0 W M1^T
                c1 = z + _gather(x1, targets[g1], k1) - t.u
                c2 = _gather(q_w - x1, targets[g1], k1) - z
                coeffs, t.pending = [t.u, c1, c2], (c1, c2, w_q, q_w)
            pairs = _pair_sums(coeffs)
            for m, n in itertools.product(range(len(coeffs)), repeat=2):
                poly[m + n] += pairs[m, n]
        return poly

    def step(self, t_step: float) -> None:
        """Move the universe copies and views to M + t (Q - M) for the targets of the last :meth:`line`."""
        for t in self.tensors:
            if len(t.axes) == 1:
                t.u = t.u + t_step * t.pending[0]
            else:
                c1, c2, w_q, q_w = t.pending
                t.u = t.u + t_step * c1 + t_step**2 * c2
                x0, x1 = t.views
                t.views = [torch.lerp(x0, w_q, t_step), torch.lerp(x1, q_w, t_step)]
            t.pending = ()


class ActivationObjective:
    """F = sum_g sum_{a<b} <M_a C_ab, M_b>: total correlation of the units each universe unit joins.

    dF/dM_a = sum_{b != a} M_b C_ba is linear in M, so it is updated by gathers after :meth:`reset`,
    and F(t) has degree 2.
    """

    def __init__(self, correlations: Correlations, device: torch.device, dtype: torch.dtype) -> None:
        self.corr = {}
        for g, c in correlations.items():
            off = c.clone()
            off[torch.arange(c.shape[0]), torch.arange(c.shape[0])] = 0  # a model is not paired with itself
            self.corr[g] = off.to(device, dtype)
        self.grads: Mats = {}
        self.pending: Mats = {}

    def reset(self, mats: Mats) -> float:
        self.grads = {g: torch.einsum("bij,bajk->aik", mats[g], c) for g, c in self.corr.items()}
        return sum(0.5 * (self.grads[g].double() * mats[g].double()).sum().item() for g in self.grads)

    def gradient(self, mats: Mats) -> Mats:
        return dict(self.grads)

    def line(self, mats: Mats, targets: Targets) -> np.ndarray:
        poly = np.zeros(5)
        for g, c in self.corr.items():
            grad, d = self.grads[g], vertex(targets[g], mats[g]) - mats[g]
            rows = torch.arange(c.shape[0], device=c.device)[:, None]
            # Row u of Q_b C_ba is row q_b[u] of C_ba; h_a = sum_b D_b C_ba is the gradient's change.
            h = c[rows, :, targets[g]].sum(0).transpose(0, 1) - grad
            self.pending[g] = h
            grad64, d64 = grad.double(), d.double()
            poly[0] += 0.5 * (grad64 * mats[g].double()).sum().item()
            poly[1] += (grad64 * d64).sum().item()
            poly[2] += 0.5 * (h.double() * d64).sum().item()
        return poly

    def step(self, t_step: float) -> None:
        for g, h in self.pending.items():
            self.grads[g] = self.grads[g] + t_step * h
        self.pending = {}


def vertex(q: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Permutation matrices [N, n, n] of index vectors [N, n]."""
    out = torch.zeros_like(like)
    return out.scatter_(2, q.unsqueeze(2), 1.0)
