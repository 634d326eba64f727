"""Cheap screening of the input models before alignment: non-finite values and outlier tensor norms.

The first line of defence against broken or malicious checkpoints (gates are the second). A model
is flagged when

- any float tensor holds NaN or +-inf (such a model is always dropped: no merge or matching cost
  can use it), or
- for some float tensor, its L2 norm is more than ``ratio`` times the median of that tensor's norms
  over the models, or at most median / ``ratio``: a tensor scaled by 1e-3 is as broken as one
  scaled by 1e3, and both are invisible to accuracy-free checks otherwise.

The median needs a majority of honest models: with two finite models it is the mean of their norms
and cannot say which one is off (the small side would flag the honest model), so the norm test
needs at least three finite models and is skipped, with a note, otherwise. Tensors whose median
norm is 0 (all-zero buffers) are skipped, as are integer buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cyclemerge.averaging import average
from cyclemerge.config import OUTLIER_ACTIONS
from cyclemerge.matching.weight_matching import match_pair
from cyclemerge.permutation import PermSpec, Perms, StateDict, apply_perms


@dataclass(frozen=True)
class ScreenReport:
    """Which models failed the screen and why (model index -> reasons, one per offending tensor)."""

    num_models: int
    ratio: float | None
    reasons: dict[int, list[str]] = field(default_factory=dict)
    nonfinite: tuple[int, ...] = ()
    worst_ratio: dict[int, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def flagged(self) -> tuple[int, ...]:
        return tuple(sorted(self.reasons))

    @property
    def clean(self) -> tuple[int, ...]:
        return tuple(k for k in range(self.num_models) if k not in self.reasons)

    def partition(self, action: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(aligned, gated off, dropped) model indices for ``align.outlier_action``.

        ``drop``: only clean models go on. ``gate_off``: clean models are aligned; flagged models
        with finite values are mapped into the universe afterwards and enter gating switched off;
        non-finite models are dropped in both cases.
        """
        if action not in OUTLIER_ACTIONS:
            raise ValueError(f"align.outlier_action {action!r}: known {', '.join(OUTLIER_ACTIONS)}")
        if action == "drop":
            return self.clean, (), self.flagged
        off = tuple(k for k in self.flagged if k not in self.nonfinite)
        return self.clean, off, tuple(self.nonfinite)

    def describe(self, names: Sequence[str] | None = None, max_reasons: int = 3) -> str:
        """Human-readable summary: one line per flagged model with its first few reasons."""
        if not self.reasons:
            return "\n".join([f"pre-filter: all {self.num_models} models pass", *self.notes])
        lines = [f"pre-filter: {len(self.reasons)} of {self.num_models} models flagged", *self.notes]
        for k in self.flagged:
            name = names[k] if names is not None else f"model {k}"
            why = self.reasons[k]
            more = f" (+{len(why) - max_reasons} more)" if len(why) > max_reasons else ""
            lines.append(f"  {name}: " + "; ".join(why[:max_reasons]) + more)
        return "\n".join(lines)


def screen_models(state_dicts: Sequence[StateDict], outlier_norm_ratio: float | None) -> ScreenReport:
    """Flag models with non-finite values or outlier per-tensor norms (``None`` disables the norm test)."""
    n = len(state_dicts)
    if n == 0:
        raise ValueError("screen_models: no models given")
    if outlier_norm_ratio is not None and outlier_norm_ratio <= 1:
        raise ValueError(f"screen_models: outlier_norm_ratio must be > 1, got {outlier_norm_ratio}")
    keys = [k for k, t in state_dicts[0].items() if torch.is_floating_point(t)]
    reasons: dict[int, list[str]] = {}
    worst: dict[int, float] = {}

    nonfinite = []
    for i, sd in enumerate(state_dicts):
        bad = [k for k in keys if not bool(torch.isfinite(sd[k]).all())]
        if bad:
            nonfinite.append(i)
            reasons[i] = [f"{k}: non-finite values (NaN or inf); always dropped" for k in bad]

    finite = [i for i in range(n) if i not in nonfinite]
    notes = []
    if outlier_norm_ratio is not None and len(finite) < 3:
        notes.append(f"norm test skipped: {len(finite)} finite model(s), a median needs at least 3")
    elif outlier_norm_ratio is not None:
        for key in keys:
            norms = torch.stack([state_dicts[i][key].detach().to(torch.float64).norm() for i in finite]).cpu()
            median = float(norms.quantile(0.5))
            if median == 0:
                continue
            for i, norm in zip(finite, norms.tolist()):
                r = norm / median
                if r > outlier_norm_ratio or r <= 1 / outlier_norm_ratio:
                    reasons.setdefault(i, []).append(
                        f"{key}: norm {norm:.3g} is {r:.3g} x the median over models ({median:.3g}; limit x{outlier_norm_ratio:g} or /{outlier_norm_ratio:g})"
                    )
                    far = max(r, 1 / r) if r > 0 else float("inf")
                    worst[i] = max(worst.get(i, 0.0), far)
    return ScreenReport(num_models=n, ratio=outlier_norm_ratio, reasons=reasons, nonfinite=tuple(nonfinite), worst_ratio=worst,
                        notes=tuple(notes))


def map_into_universe(
    flagged: StateDict,
    universe_models: Sequence[StateDict],
    spec: PermSpec,
    *,
    seed: int = 0,
    max_iter: int = 100,
) -> tuple[StateDict, Perms]:
    """Map a flagged model into the universe the clean models were aligned to (``gate_off``).

    Weight matching (Git Re-Basin) against the average of the clean universe models. A model scaled
    by a constant keeps the same matching, since every LAP cost scales alike, so the flagged model
    lands where its units belong and its gates can close part by part. Returns the mapped state
    dict and its perms (in the ``perms[i][g]`` convention). Non-finite models cannot be matched.
    """
    if not universe_models:
        raise ValueError("map_into_universe: no clean universe models to match against")
    bad = [k for k, t in flagged.items() if torch.is_floating_point(t) and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"map_into_universe: the model has non-finite values in {bad[:3]}; drop it instead")
    reference = average(list(universe_models))
    perms = match_pair(reference, flagged, spec, seed=seed, max_iter=max_iter)
    return apply_perms(flagged, spec, perms), perms
