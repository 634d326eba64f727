"""Learning the gates: cross-entropy on calibration data + lam x expected L0, only log_alpha trained.

The sources stay frozen: they are stacked once into [N, ...] copies, the network runs on the merged
dict through ``torch.func.functional_call``, and the optimizer holds the single log_alpha matrix.
BatchNorm layers run on batch statistics without running buffers (the merged net's pre-norm
statistics match no endpoint, and REPAIR / BN reset re-estimates them afterwards anyway).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cyclemerge.averaging import average
from cyclemerge.config import GatesConfig
from cyclemerge.gates.distribution import (
    GatePlan,
    HardConcrete,
    combine,
    final_weights,
    fixed_tensors,
    gated_tensors,
    make_plan,
    merge_with_weights,
    model_layer_parts,
)
from cyclemerge.permutation import StateDict

Progress = Callable[[int, dict[str, float]], None]

ANNEAL_FRACTION = 0.3  # temperature annealing, when asked for, spans the last 30% of steps


@dataclass
class GateResult:
    """Outcome of gate learning (or of the uniform average when gates are disabled).

    ``log_alpha`` and ``weights`` map each gate part to an [N] vector, or [C, N] at ``channel``
    granularity; ``weights`` are the final static read-out (float64). ``history`` holds one value
    per optimisation step for ``loss``, ``ce`` and ``expected_l0``, skipped steps included (their
    loss is non-finite, unless only the gradient was). ``constant_keys`` are float keys equal in every model (identity shortcuts before
    REPAIR): their gates carry no information, which ``stat_point_weights`` takes into account.
    """

    plan: GatePlan
    log_alpha: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    merged: StateDict
    history: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "ce": [], "expected_l0": []})
    skipped_steps: int = 0
    seconds: float = 0.0
    learned: bool = True
    constant_keys: frozenset[str] = frozenset()
    concrete: HardConcrete = field(default_factory=HardConcrete)

    @property
    def granularity(self) -> str:
        return self.plan.granularity

    def key_weights(self, key: str) -> torch.Tensor:
        """Weights of the models for one float key: its part's gates, or the ungated rule's."""
        part = self.plan.key_part.get(key)
        return self.weights[part] if part is not None else self.plan.ungated_weights

    def as_dict(self) -> dict:
        """Plain tensors and lists, for ``torch.save`` and the stage's metrics."""
        return {
            "granularity": self.granularity,
            "parts": self.plan.parts,
            "log_alpha": {p: t.detach().cpu() for p, t in self.log_alpha.items()},
            "weights": {p: t.cpu() for p, t in self.weights.items()},
            "ungated_weights": self.plan.ungated_weights.cpu(),
            "history": self.history,
            "skipped_steps": self.skipped_steps,
            "seconds": self.seconds,
            "learned": self.learned,
        }


def split_rows(plan: GatePlan, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split the [R, N] matrix into part -> [N] (one row) or [C, N] (channel granularity)."""
    out = {}
    for name, rows in plan.rows.items():
        block = matrix[rows].detach().clone()
        out[name] = block if plan.granularity == "channel" else block[0]
    return out


def constant_keys(state_dicts: Sequence[StateDict]) -> frozenset[str]:
    """Float keys equal in every model: gates over them cannot matter to the merge."""
    first = state_dicts[0]
    return frozenset(
        k for k, t in first.items() if torch.is_floating_point(t) and all(torch.equal(t, sd[k]) for sd in state_dicts[1:])
    )


def initial_log_alpha(plan: GatePlan, config: GatesConfig, initial_off: Sequence[int] = ()) -> torch.Tensor:
    la = torch.full((plan.num_rows, plan.num_models), float(config.log_alpha_init))
    for k in initial_off:
        if not 0 <= k < plan.num_models:
            raise ValueError(f"learn_gates: initial_off index {k} out of range for {plan.num_models} models")
        la[:, k] = -config.init_off
    return la.clamp(-config.log_alpha_clamp, config.log_alpha_clamp)


def penalty_row_weights(plan: GatePlan, weighting: str) -> torch.Tensor:
    """Per-row factor so that sum(rows' expected #active x factor) is the (weighted) mean over parts."""
    total = sum(plan.param_counts.values())
    out = torch.zeros(plan.num_rows)
    for name, rows in plan.rows.items():
        share = plan.param_counts[name] / total if weighting == "params" else 1.0 / len(plan.rows)
        out[rows] = share / (rows.stop - rows.start)
    return out


@contextmanager
def batch_statistics(model: nn.Module):
    """Eval mode everywhere except BatchNorm, which normalises by the batch and tracks nothing.

    With ``track_running_stats`` off a BatchNorm in train mode passes no running buffers to
    ``F.batch_norm`` and skips its ``num_batches_tracked`` increment, so neither the merged dict
    nor any source tensor is written during gate learning.
    """
    modes = {m: m.training for m in model.modules()}
    norms = {m: m.track_running_stats for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    model.eval()
    for m in norms:
        m.train()
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m, tracked in norms.items():
            m.track_running_stats = tracked
        for m, mode in modes.items():
            m.training = mode


def temperature_at(step: int, config: GatesConfig) -> float:
    """beta at ``step``: constant, or linear from beta to beta_final over the last 30% of steps."""
    if config.beta_final is None:
        return config.beta
    start = int(round((1 - ANNEAL_FRACTION) * config.steps))
    if step < start:
        return config.beta
    frac = (step - start + 1) / max(config.steps - start, 1)
    return config.beta + frac * (config.beta_final - config.beta)


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless epochs of shuffled index batches (the whole set each step when it is smaller)."""
    while True:
        order = torch.randperm(n, generator=generator)
        if batch_size >= n:
            yield order
            continue
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def learn_gates(
    model: nn.Module,
    state_dicts: Sequence[StateDict],
    x: torch.Tensor,
    y: torch.Tensor,
    config: GatesConfig,
    *,
    parts: dict[str, list[str]] | None = None,
    initial_off: Sequence[int] = (),
    progress: Progress | None = None,
) -> GateResult:
    """Learn hard-concrete gates over aligned, frozen ``state_dicts`` on calibration tensors ``x, y``.

    ``model`` is only a template for the forward pass; its own tensors and the sources are never
    written. ``parts`` overrides ``model.layer_parts()``. Models in ``initial_off`` start with
    log_alpha = -init_off and are left out of the ungated ``average``. ``progress(step, metrics)``
    is called after every step. With ``config.enabled`` false this is ``uniform_result``.
    """
    if not config.enabled:
        return uniform_result(model, state_dicts, config, parts=parts, initial_off=initial_off)
    started = time.perf_counter()
    state_dicts = list(state_dicts)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"learn_gates: need matching, non-empty x and y, got {tuple(x.shape)} and {tuple(y.shape)}")
    spec = model.perm_spec() if hasattr(model, "perm_spec") else None
    plan = make_plan(state_dicts, model_layer_parts(model, parts), config, spec=spec, initial_off=tuple(initial_off))
    device = next(iter(state_dicts[0].values())).device
    hc = HardConcrete.from_config(config)

    stacked = {k: torch.stack([sd[k].detach() for sd in state_dicts]) for k in plan.key_part}
    fixed = {k: t.detach() for k, t in fixed_tensors(plan, state_dicts).items()}
    log_alpha = initial_log_alpha(plan, config, initial_off).to(device).requires_grad_(True)
    row_weight = penalty_row_weights(plan, config.penalty_weighting).to(device)
    optimizer = torch.optim.Adam([log_alpha], lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _batches(x.shape[0], config.batch_size, generator)
    history: dict[str, list[float]] = {"loss": [], "ce": [], "expected_l0": []}
    skipped = 0

    with batch_statistics(model):
        for step in range(config.steps):
            beta = temperature_at(step, config)
            idx = next(batches)
            xb, yb = x[idx.to(x.device)].to(device), y[idx.to(y.device)].to(device)
            optimizer.zero_grad(set_to_none=True)
            ce = torch.zeros((), device=device)
            for _ in range(config.mc_samples):
                z = hc.sample(log_alpha, generator, beta)
                w = combine(z, log_alpha, normalize=config.normalize, fallback=config.all_off_fallback)
                logits = functional_call(model, {**fixed, **gated_tensors(plan, stacked, w)}, (xb,))
                ce = ce + F.cross_entropy(logits.float(), yb) / config.mc_samples
            expected_l0 = (hc.prob_nonzero(log_alpha, beta).sum(-1) * row_weight).sum()
            loss = ce + config.lam * expected_l0
            metrics = {"loss": loss.item(), "ce": ce.item(), "expected_l0": expected_l0.item()}
            for name, value in metrics.items():
                history[name].append(value)
            if not torch.isfinite(loss):
                skipped += 1
            else:
                loss.backward()
                if not bool(torch.isfinite(log_alpha.grad).all()):
                    skipped += 1
                else:
                    if config.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_([log_alpha], config.grad_clip)
                    optimizer.step()
                    with torch.no_grad():
                        log_alpha.clamp_(-config.log_alpha_clamp, config.log_alpha_clamp)
            if progress is not None:
                progress(step, metrics)

    weights = final_weights(log_alpha, config)
    return GateResult(
        plan=plan,
        log_alpha=split_rows(plan, log_alpha),
        weights=split_rows(plan, weights),
        merged=merge_with_weights(plan, state_dicts, weights),
        history=history,
        skipped_steps=skipped,
        seconds=time.perf_counter() - started,
        learned=True,
        constant_keys=constant_keys(state_dicts),
        concrete=hc,
    )


def uniform_result(
    model: nn.Module,
    state_dicts: Sequence[StateDict],
    config: GatesConfig,
    *,
    parts: dict[str, list[str]] | None = None,
    initial_off: Sequence[int] = (),
) -> GateResult:
    """The uniform average (over the models not in ``initial_off``) in GateResult form.

    Every part, gated or not, gets the same uniform weights; ``log_alpha`` holds the initial
    values, so downstream code (REPAIR, reports) needs no special case for disabled gates.
    """
    started = time.perf_counter()
    state_dicts = list(state_dicts)
    spec = model.perm_spec() if hasattr(model, "perm_spec") else None
    flat = config.model_copy(update={"ungated_rule": "average"})
    plan = make_plan(state_dicts, model_layer_parts(model, parts), flat, spec=spec, initial_off=tuple(initial_off))
    weights = plan.ungated_weights.expand(plan.num_rows, -1).clone()
    on = [i for i in range(plan.num_models) if plan.ungated_weights[i] > 0]
    merged = average([state_dicts[i] for i in on])
    merged.update({k: state_dicts[0][k].clone() for k in plan.int_keys})
    return GateResult(
        plan=plan,
        log_alpha=split_rows(plan, initial_log_alpha(plan, config, initial_off)),
        weights=split_rows(plan, weights),
        merged=merged,
        seconds=time.perf_counter() - started,
        learned=False,
        constant_keys=constant_keys(state_dicts),
        concrete=HardConcrete.from_config(config),
    )
