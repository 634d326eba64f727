"""Hard-concrete (L0) gates over N aligned, frozen models: the distribution, the parts, the merge.

The hard concrete of Louizos, Welling & Kingma (2018) is a stretched, clipped binary concrete: a
gate z in [0, 1] with real point masses at 0 and 1, reparameterised by a location ``log_alpha``, so
that a gate can be learned by gradient descent and still switch a model off *exactly* (the only way
a model with 1e3-scale weights can be kept out of a merge).

Every (part, model) pair owns a gate. A *part* is a set of float state-dict keys sharing one gate
vector over the N models; parts come from the model's ``layer_parts()`` at the configured
granularity. All gates live in one ``[R, N]`` log_alpha matrix: a part owns one row, or C rows at
``channel`` granularity (row c gates output channel c of every tensor of the layer). The merged
tensor of a part is ``sum_k w_k T_k`` with ``w = z / sum(z)`` (``normalize``) or ``w = z``.
"""

from __future__ import annotations

import fnmatch
import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from cyclemerge.averaging import average
from cyclemerge.config import GatesConfig
from cyclemerge.permutation import PermSpec, StateDict

EPS = 1e-6


@dataclass(frozen=True)
class HardConcrete:
    """The hard-concrete distribution; constants default to the paper's (beta 2/3, stretch (-0.1, 1.1))."""

    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1

    @classmethod
    def from_config(cls, config: GatesConfig) -> "HardConcrete":
        return cls(config.beta, config.gamma, config.zeta)

    def sample(self, log_alpha: torch.Tensor, generator: torch.Generator | None = None, beta: float | None = None) -> torch.Tensor:
        """One reparameterised draw per gate; differentiable in log_alpha almost everywhere."""
        b = self.beta if beta is None else beta
        # noise is drawn on the CPU so a seed gives the same gates whatever the device
        u = torch.rand(log_alpha.shape, generator=generator, dtype=torch.float64).clamp(EPS, 1 - EPS)
        noise = (torch.log(u) - torch.log1p(-u)).to(log_alpha.device, log_alpha.dtype)
        s = torch.sigmoid((noise + log_alpha) / b)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def prob_nonzero(self, log_alpha: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        """P(z != 0): the expected-L0 contribution of each gate."""
        b = self.beta if beta is None else beta
        return torch.sigmoid(log_alpha - b * math.log(-self.gamma / self.zeta))

    def prob_one(self, log_alpha: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        b = self.beta if beta is None else beta
        return torch.sigmoid(log_alpha - b * math.log((1 - self.gamma) / (self.zeta - 1)))

    def deterministic(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """Test-time gate: the stretched sigmoid clipped to [0, 1]. It is not E[z]."""
        return (torch.sigmoid(log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)


@dataclass(frozen=True)
class GatePlan:
    """Which keys share which gates, and what the ungated keys become.

    ``layer_parts`` is the model's own partition (the coordinate system REPAIR reads); ``parts``
    maps each gate part to the float keys it gates; ``rows`` gives its rows of the log_alpha
    matrix; ``out_axis`` the output-channel axis of each gated key at ``channel`` granularity.
    Float keys outside every gate part follow ``ungated_weights`` (the ungated rule); integer
    buffers are copied from the first model.
    """

    granularity: str
    num_models: int
    layer_parts: dict[str, list[str]]
    parts: dict[str, list[str]]
    rows: dict[str, slice]
    out_axis: dict[str, int]
    key_part: dict[str, str]
    ungated: list[str]
    int_keys: list[str]
    ungated_weights: torch.Tensor
    param_counts: dict[str, int]

    @property
    def num_rows(self) -> int:
        return max((r.stop for r in self.rows.values()), default=0)


def _check_state_dicts(state_dicts: list[StateDict], layer_parts: dict[str, list[str]]) -> None:
    if len(state_dicts) < 1:
        raise ValueError("gates: need at least one state dict")
    first = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], 1):
        if sd.keys() != first.keys():
            raise ValueError(f"gates: state dict {i} has other keys than state dict 0: {sorted(set(sd) ^ set(first))}")
        bad = [k for k in first if sd[k].shape != first[k].shape]
        if bad:
            raise ValueError(f"gates: state dict {i} differs in shape from state dict 0 at {bad}")
    listed = Counter(k for keys in layer_parts.values() for k in keys)
    dupes = sorted(k for k, c in listed.items() if c > 1)
    missing = sorted(set(first) - set(listed))
    unknown = sorted(set(listed) - set(first))
    if dupes or missing or unknown:
        raise ValueError(f"gates: layer parts must cover every key exactly once; duplicated {dupes}, missing {missing}, unknown {unknown}")


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _output_axes(keys: list[str], sd: StateDict, spec: PermSpec | None) -> dict[str, int]:
    """Output-channel axis of every key with axes: where the part's output group sits in its spec.

    The output group is the one carried by the part's 1-D tensors (bias, norm affine); a key
    without that group (the classifier's output is never permuted) uses axis 0, PyTorch's
    out-first convention.
    """
    group = None
    if spec is not None:
        one_d = [spec[k][0] for k in keys if sd[k].dim() == 1 and spec.get(k)]
        with_axes = [spec[k][0] for k in keys if sd[k].dim() >= 1 and spec.get(k)]
        group = (one_d or with_axes or [None])[0]
    axes = {}
    for k in keys:
        if sd[k].dim() == 0:
            continue
        key_axes = spec.get(k, ()) if spec is not None else ()
        axes[k] = key_axes.index(group) if group is not None and group in key_axes else 0
    return axes


def rule_weights(rule: str, num_models: int, off: tuple[int, ...] = ()) -> torch.Tensor:
    """Weights of the ungated rule: ``average`` over the models entering switched on, or ``model:<k>``."""
    w = torch.zeros(num_models, dtype=torch.float64)
    if rule == "average":
        on = [k for k in range(num_models) if k not in off]
        if not on:
            raise ValueError(f"gates: every model is switched off ({list(off)}); nothing to average")
        w[on] = 1.0 / len(on)
        return w
    k = int(rule.split(":", 1)[1])
    if not 0 <= k < num_models:
        raise ValueError(f"gates.ungated_rule {rule!r}: model index out of range for {num_models} models")
    if k in off:
        raise ValueError(f"gates.ungated_rule {rule!r}: model {k} enters gating switched off")
    w[k] = 1.0
    return w


def make_plan(
    state_dicts: list[StateDict],
    layer_parts: dict[str, list[str]],
    config: GatesConfig,
    *,
    spec: PermSpec | None = None,
    initial_off: tuple[int, ...] = (),
) -> GatePlan:
    """Split the gated layers into gate parts at ``config.granularity``.

    ``gated_parts`` globs are matched against layer names (and, at ``tensor`` granularity, also
    against key names). At ``model`` granularity the gated layers share one gate per model.
    """
    _check_state_dicts(state_dicts, layer_parts)
    sd = state_dicts[0]
    is_float = {k: torch.is_floating_point(v) for k, v in sd.items()}
    pats = config.gated_parts
    parts: dict[str, list[str]] = {}
    for layer, keys in layer_parts.items():
        floats = [k for k in keys if is_float[k]]
        if config.granularity == "tensor":
            parts.update({k: [k] for k in floats if _matches(layer, pats) or _matches(k, pats)})
        elif _matches(layer, pats) and floats:
            if config.granularity == "model":
                parts.setdefault("model", []).extend(floats)
            else:
                parts[layer] = floats
    if not parts:
        raise ValueError(f"gates.gated_parts {pats} matches no layer; layers are {list(layer_parts)}")

    out_axis: dict[str, int] = {}
    rows: dict[str, slice] = {}
    start = 0
    for name, keys in parts.items():
        height = 1
        if config.granularity == "channel":
            axes = _output_axes(keys, sd, spec)
            sizes = {sd[k].shape[a] for k, a in axes.items()}
            if len(sizes) != 1:
                raise ValueError(f"gates: part {name!r} has no single output-channel count: {sizes}")
            out_axis.update(axes)
            height = sizes.pop()
        rows[name] = slice(start, start + height)
        start += height

    key_part = {k: name for name, keys in parts.items() for k in keys}
    return GatePlan(
        granularity=config.granularity,
        num_models=len(state_dicts),
        layer_parts={n: list(ks) for n, ks in layer_parts.items()},
        parts=parts,
        rows=rows,
        out_axis=out_axis,
        key_part=key_part,
        ungated=[k for k in sd if is_float[k] and k not in key_part],
        int_keys=[k for k in sd if not is_float[k]],
        ungated_weights=rule_weights(config.ungated_rule, len(state_dicts), tuple(initial_off)),
        param_counts={n: sum(sd[k].numel() for k in keys) for n, keys in parts.items()},
    )


def combine(z: torch.Tensor, log_alpha: torch.Tensor, *, normalize: bool, fallback: str) -> torch.Tensor:
    """Row-wise merge weights from gates ``z`` [R, N]; a row of zeros takes the configured fallback."""
    if not normalize:
        return z
    total = z.sum(-1, keepdim=True)
    if fallback == "uniform":
        backup = torch.full_like(z, 1.0 / z.shape[-1])
    elif fallback == "argmax":
        backup = torch.nn.functional.one_hot(log_alpha.detach().argmax(-1), z.shape[-1]).to(z.dtype)
    else:
        raise ValueError(f"gates.all_off_fallback {fallback!r}: known uniform, argmax")
    return torch.where(total > 0, z / total.clamp_min(1e-12), backup)


def final_weights(log_alpha: torch.Tensor, config: GatesConfig) -> torch.Tensor:
    """Static read-out weights [R, N] (float64); every row keeps at least one model.

    ``deterministic``: the test-time gates, normalised when ``normalize``; ``threshold``: uniform
    over the models whose test-time gate is open; ``argmax``: the single largest log_alpha.
    A row whose gates are all closed falls back to the largest log_alpha (ties share uniformly),
    never to a uniform average, which could readmit a model the gates shut.
    """
    la = log_alpha.detach().to(torch.float64)
    zhat = HardConcrete.from_config(config).deterministic(la)
    top = (la == la.max(-1, keepdim=True).values).to(torch.float64)
    backup = top / top.sum(-1, keepdim=True)
    mode = config.final_gates
    if mode == "argmax":
        return torch.nn.functional.one_hot(la.argmax(-1), la.shape[-1]).to(torch.float64)
    if mode == "threshold":
        w = (zhat > 0).to(torch.float64)
    elif mode == "deterministic":
        w = zhat
    else:
        raise ValueError(f"gates.final_gates {mode!r}: known deterministic, threshold, argmax")
    total = w.sum(-1, keepdim=True)
    if config.normalize or mode == "threshold":
        w = w / total.clamp_min(1e-300)
    return torch.where(total > 0, w, backup)


def key_weight(plan: GatePlan, key: str, weights: torch.Tensor, ndim: int) -> torch.Tensor:
    """Weights of one gated key shaped [N, 1.., C at its output axis, ..1] to broadcast on [N, *shape]."""
    block = weights[plan.rows[plan.key_part[key]]]
    n = block.shape[-1]
    if key in plan.out_axis:
        shape = [n] + [1] * ndim
        shape[1 + plan.out_axis[key]] = block.shape[0]
        return block.transpose(0, 1).reshape(shape)
    # one row, or a scalar of a channel part: the part's mean weight
    return block.mean(0).reshape([n] + [1] * ndim)


def gated_tensors(plan: GatePlan, stacked: dict[str, torch.Tensor], weights: torch.Tensor) -> StateDict:
    """Differentiable merge of the gated keys from pre-stacked [N, ...] sources (training path).

    A contraction over the model axis (tensordot / einsum) rather than broadcast-multiply-and-sum,
    so no [N, ...] temporary is built per step.
    """
    out: StateDict = {}
    for key, t in stacked.items():
        block = weights[plan.rows[plan.key_part[key]]].to(t.dtype)
        axis = plan.out_axis.get(key)
        if axis is None:
            out[key] = torch.tensordot(block.mean(0), t, dims=1)
        else:
            out[key] = torch.einsum("cn,nc...->c...", block, t.movedim(1 + axis, 1)).movedim(0, axis)
    return out


def fixed_tensors(plan: GatePlan, state_dicts: list[StateDict]) -> StateDict:
    """The keys no gate touches: ungated floats by the ungated rule, integer buffers from model 0."""
    w = plan.ungated_weights
    fixed: StateDict = {k: state_dicts[0][k].clone() for k in plan.int_keys}
    if not plan.ungated:
        return fixed
    on = [i for i in range(plan.num_models) if w[i] > 0]
    subset = [{k: state_dicts[i][k] for k in plan.ungated} for i in on]
    if len(on) == 1:
        fixed.update({k: t.clone() for k, t in subset[0].items()})
    else:
        fixed.update(average(subset, w[on].tolist()))
    return fixed


def merge_with_weights(plan: GatePlan, state_dicts: list[StateDict], weights: torch.Tensor) -> StateDict:
    """The static merged state dict, accumulated in float64 like ``merge.average``.

    A model with weight exactly 0 contributes nothing, not even 0 x inf, so a switched-off model
    with non-finite values cannot leak into the merge.
    """
    fixed = fixed_tensors(plan, state_dicts)
    merged: StateDict = {}
    for key, first in state_dicts[0].items():
        if key not in plan.key_part:
            merged[key] = fixed[key]
            continue
        w = key_weight(plan, key, weights.to(torch.float64), first.dim())
        acc = torch.zeros_like(first, dtype=torch.float64)
        for i, sd in enumerate(state_dicts):
            wi = w[i].to(first.device)
            if bool((wi != 0).any()):
                acc += torch.where(wi != 0, wi * sd[key].to(torch.float64), 0.0)
        merged[key] = acc.to(first.dtype)
    return merged


def model_layer_parts(model: nn.Module, parts: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    if parts is not None:
        return parts
    if not hasattr(model, "layer_parts"):
        raise TypeError(f"{type(model).__name__} has no layer_parts(); pass parts= explicitly")
    return model.layer_parts()
