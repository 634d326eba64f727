"""Accuracy, loss, output ensembles, interpolation barriers and the cycle-consistency experiment.

Everything returns plain floats, lists and dicts (JSON-ready). Accuracies are fractions in [0, 1],
losses are mean cross-entropy in nats, as in C2M3's evaluation (c2m3-reference.md §3.2).

One module, many state dicts: ``load_into`` copies a state dict into an existing module, so the
evaluate stage builds the architecture once and evaluates every endpoint, baseline and merged model
with it. Evaluation always runs in eval mode under ``torch.no_grad``, so BatchNorm running
statistics are read, never updated, and the state dicts passed in are never modified. The helpers
that load several state dicts put the module's own weights back when they finish, and snapshot any
input that aliases them (``model.state_dict()`` is a view of the live parameters), so evaluating
with the very module a state dict came from is safe.

Barriers along the linear path ``θ(λ) = (1 - λ) θ_A + λ θ_B``, on a uniform grid of λ in [0, 1]:

- ``barrier = max_λ [ L(λ) - ((1 - λ) L(0) + λ L(1)) ]``: the height of the loss above the chord
  between the endpoint losses (Frankle et al. 2020; Entezari et al. 2022).
- ``barrier_endpoint_mean = max_λ L(λ) - (L(0) + L(1)) / 2``: the C2M3 repo's ``compute_loss_barrier``.
- ``acc_barrier = max_λ [ (1 - λ) acc(0) + λ acc(1) - acc(λ) ]``: the same chord measure for accuracy.

The two loss barriers agree when the endpoint losses are equal; both are 0 for identical endpoints.

Cycle experiment and the direction of pairwise maps
---------------------------------------------------
A pairwise map ``m_{x<-y}`` (``cyclemerge.permutation.pairwise_map(perms[x], perms[y])``, or what
pairwise weight matching returns when it matches model ``y`` TO model ``x``) expresses model ``y`` in
model ``x``'s basis: ``apply_perms(sd_y, spec, m_{x<-y})`` is model ``y`` with its units reordered to
line up with ``x``'s. Here ``maps_ab = m_{a<-b}``, ``maps_bc = m_{b<-c}``, ``maps_ca = m_{c<-a}``.

Carrying A around the cycle means re-expressing A in C's basis (``m_{c<-a}``), then in B's
(``m_{b<-c}``), then back in A's (``m_{a<-b}``). Applying ``first`` then ``second`` is
``compose(first, second)``, so the cycle permutation is
``compose(compose(maps_ca, maps_bc), maps_ab)`` (as matrices ``M_ab M_bc M_ca``), and
``A' = apply_perms(sd_a, spec, cycle)``. For maps built from universe perms this is the identity
and ``A' == A`` bit for bit. Going round the other way (A in B's basis, then C's, then A's) gives the
inverse permutation: the same distance and fixed units, and the A…A' path mirrored in λ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from cyclemerge.averaging import average
from cyclemerge.permutation import Perms, PermSpec, StateDict, apply_perms, compose
from cyclemerge.spec.derived import DerivedSpec

Prepare = Callable[[StateDict], StateDict]


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _check_data(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"evaluate: {x.shape[0]} inputs but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("evaluate: no examples to evaluate on")
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")


def log_probs(
    model: nn.Module, x: torch.Tensor, *, batch_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Log-softmax of the model's outputs on every row of ``x``, as a float64 CPU tensor [N, classes]."""
    if x.shape[0] == 0:
        raise ValueError("evaluate: no examples to evaluate on")
    dev = _device_of(model, device)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                logits = model(x[start : start + batch_size].to(dev))
                chunks.append(F.log_softmax(logits.double(), dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def _scores(logp: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    y = y.to(logp.device).long()
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    acc = (logp.argmax(dim=1) == y).double().mean()
    return {"acc": float(acc), "loss": float(nll.mean())}


def accuracy_and_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of the model's logits (eval mode, no grad, batched)."""
    _check_data(x, y, batch_size)
    return _scores(log_probs(model, x, batch_size=batch_size, device=device), y)


def _ensemble_scores(per_model: Iterable[torch.Tensor], y: torch.Tensor) -> dict[str, float]:
    total, count = None, 0
    for logp in per_model:
        # log of the summed probabilities, kept in log space so tiny probabilities do not underflow
        total = logp if total is None else torch.logaddexp(total, logp)
        count += 1
    if total is None:
        raise ValueError("ensemble: need at least one model")
    return _scores(total - math.log(count), y)


def ensemble_accuracy_and_loss(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Output ensemble: predicts with the mean of the models' softmax probabilities.

    Its loss is the negative log of the mean probability of the true class, i.e. the cross-entropy of
    the averaged distribution (not the mean of the members' losses).
    """
    _check_data(x, y, batch_size)
    return _ensemble_scores((log_probs(m, x, batch_size=batch_size, device=device) for m in models), y)


def ensemble_of_state_dicts(
    model: nn.Module,
    state_dicts: Sequence[StateDict],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """``ensemble_accuracy_and_loss`` with one module loaded with each state dict in turn.

    The module's own weights are restored afterwards.
    """
    _check_data(x, y, batch_size)
    state_dicts = [unaliased(model, sd) for sd in state_dicts]

    def members() -> Iterable[torch.Tensor]:
        for sd in state_dicts:
            yield log_probs(load_into(model, sd), x, batch_size=batch_size, device=device)

    with restored(model):
        return _ensemble_scores(members(), y)


def load_into(model: nn.Module, state_dict: StateDict) -> nn.Module:
    """Copy ``state_dict`` into the module's own tensors and return the module.

    Strict: every parameter AND buffer (BatchNorm running statistics and counters, ChannelAffine
    scale/shift) is overwritten, so nothing of the previously loaded model survives. Values are
    copied, so later edits of ``state_dict`` do not reach the module and vice versa.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise KeyError(f"load_into: state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    bad = [
        f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(t.shape)}"
        for k, t in own.items()
        if state_dict[k].shape != t.shape
    ]
    if bad:
        raise ValueError(f"load_into: shape mismatch: {'; '.join(bad)}")
    model.load_state_dict(state_dict, strict=True)
    return model


def unaliased(model: nn.Module, state_dict: StateDict) -> StateDict:
    """``state_dict`` with a private copy of every tensor that IS one of the module's own tensors.

    ``model.state_dict()`` returns views of the live parameters; loading another state dict into
    the module would silently overwrite them. Functions that load several state dicts into one
    module take such snapshots first, so passing the evaluation module's own state is safe.
    """
    live = {t.data_ptr() for t in model.state_dict().values() if t.numel()}
    return {k: v.clone() if v.numel() and v.data_ptr() in live else v for k, v in state_dict.items()}


@contextmanager
def restored(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block that loads other weights into ``model``, then put its own state back."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        yield model
    finally:
        model.load_state_dict(saved)


def evaluate_state_dicts(
    model: nn.Module,
    state_dicts: Mapping[str, StateDict],
    splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    batch_size: int,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{name: {split: {"acc", "loss"}}}`` for every named state dict on every ``(x, y)`` split.

    The module's own weights are restored afterwards.
    """
    state_dicts = {name: unaliased(model, sd) for name, sd in state_dicts.items()}
    out: dict[str, dict[str, dict[str, float]]] = {}
    with restored(model):
        for name, sd in state_dicts.items():
            load_into(model, sd)
            out[name] = {
                split: accuracy_and_loss(model, x, y, batch_size=batch_size, device=device)
                for split, (x, y) in splits.items()
            }
    return out


def lambda_grid(steps: int) -> list[float]:
    """``steps`` uniformly spaced points in [0, 1], both ends included exactly."""
    if steps < 2:
        raise ValueError(f"interpolation: steps must be >= 2 (both endpoints), got {steps}")
    return [i / (steps - 1) for i in range(steps)]


def barriers(lambdas: Sequence[float], acc: Sequence[float], loss: Sequence[float]) -> dict[str, float]:
    """The three barrier measures of the module docstring, over an evaluated grid that spans [0, 1]."""
    if not lambdas or lambdas[0] != 0.0 or lambdas[-1] != 1.0:
        raise ValueError("barriers: the grid must start at λ=0 and end at λ=1")
    l0, l1, a0, a1 = loss[0], loss[-1], acc[0], acc[-1]
    return {
        "barrier": max(lv - ((1 - t) * l0 + t * l1) for t, lv in zip(lambdas, loss)),
        "barrier_endpoint_mean": max(loss) - 0.5 * (l0 + l1),
        "acc_barrier": max((1 - t) * a0 + t * a1 - av for t, av in zip(lambdas, acc)),
    }


def interpolation_curve(
    model: nn.Module,
    sd_a: StateDict,
    sd_b: StateDict,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    prepare: Prepare | None = None,
    device: torch.device | str | None = None,
) -> dict[str, list[float] | float]:
    """Accuracy and loss along ``(1 - λ) A + λ B`` on ``lambda_grid(steps)``, with the barriers.

    ``prepare(sd) -> sd`` (e.g. a BatchNorm statistics reset on training data) is applied to every
    interpolated state dict, the endpoints included, so that all points get the same treatment.
    Integer buffers (BatchNorm's counter) are taken from A. The module's own weights are restored
    afterwards.
    """
    _check_data(x, y, batch_size)
    sd_a, sd_b = unaliased(model, sd_a), unaliased(model, sd_b)
    lambdas = lambda_grid(steps)
    accs, losses = [], []
    with restored(model):
        for t in lambdas:
            sd = average([sd_a, sd_b], [1.0 - t, t])
            if prepare is not None:
                sd = prepare(sd)
            scores = accuracy_and_loss(load_into(model, sd), x, y, batch_size=batch_size, device=device)
            accs.append(scores["acc"])
            losses.append(scores["loss"])
    return {"lambdas": lambdas, "acc": accs, "loss": losses, **barriers(lambdas, accs, losses)}


def _float_items(sd_a: StateDict, sd_b: StateDict) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if set(sd_a) != set(sd_b):
        raise KeyError(f"state dicts have different keys: {sorted(set(sd_a) ^ set(sd_b))}")
    for key, a in sd_a.items():
        if torch.is_floating_point(a):
            yield a.detach().double().flatten().cpu(), sd_b[key].detach().double().flatten().cpu()


def relative_distance(sd_a: StateDict, sd_b: StateDict) -> float:
    """``||B - A|| / ||A||`` over all floating-point tensors of the state dicts, flattened together."""
    diff = norm = 0.0
    for a, b in _float_items(sd_a, sd_b):
        diff += float(((b - a) ** 2).sum())
        norm += float((a**2).sum())
    return math.sqrt(diff) / math.sqrt(norm) if norm > 0 else (0.0 if diff == 0 else math.inf)


def cosine_similarity(sd_a: StateDict, sd_b: StateDict) -> float:
    """Cosine of the angle between the two models flattened into one vector (float tensors only)."""
    dot = na = nb = 0.0
    for a, b in _float_items(sd_a, sd_b):
        dot += float(a @ b)
        na += float(a @ a)
        nb += float(b @ b)
    return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else 0.0


def mean_pairwise_cosine(state_dicts: Sequence[StateDict]) -> float:
    """Mean cosine similarity over all pairs (C2M3 reports it before and after mapping to the universe)."""
    pairs = [(i, j) for i in range(len(state_dicts)) for j in range(i + 1, len(state_dicts))]
    if not pairs:
        raise ValueError("mean_pairwise_cosine: need at least two state dicts")
    return sum(cosine_similarity(state_dicts[i], state_dicts[j]) for i, j in pairs) / len(pairs)


def cycle_permutation(maps_ab: Perms, maps_bc: Perms, maps_ca: Perms) -> Perms:
    """The permutation that carries A around the 3-cycle (see the module docstring for the direction)."""
    groups = set(maps_ab)
    if set(maps_bc) != groups or set(maps_ca) != groups:
        raise ValueError(
            f"cycle: the three maps must cover the same groups, got {sorted(maps_ab)}, {sorted(maps_bc)}, {sorted(maps_ca)}"
        )
    return compose(compose(maps_ca, maps_bc), maps_ab)


def fixed_fraction(perms: Perms) -> dict[str, float]:
    """Per group, the fraction of units the permutation sends to themselves (1.0 for the identity)."""
    return {g: float((p == torch.arange(p.numel(), device=p.device)).double().mean()) for g, p in perms.items()}


def cycle_experiment(
    model: nn.Module,
    sd_a: StateDict,
    spec: PermSpec | DerivedSpec,
    maps_ab: Perms,
    maps_bc: Perms,
    maps_ca: Perms,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    prepare: Prepare | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Error accumulation around A -> B -> C -> A (c2m3-reference.md §4, §5.6).

    Returns ``distance`` (``||A' - A|| / ||A||``), ``cosine`` (between A and A'), ``fixed_fraction``
    per group, ``fixed_fraction_mean`` (over all units of all groups), ``consistent`` (the cycle is
    the identity), ``path_min_acc``, ``path_max_loss`` and ``curve`` (``interpolation_curve`` of A…A').
    A' computes the same function as A whatever the maps, so the path's endpoints score the same;
    only the middle of the path reveals how far A' has drifted from A in weight space.
    """
    cycle = cycle_permutation(maps_ab, maps_bc, maps_ca)
    sd_a = unaliased(model, sd_a)
    # a DerivedSpec permutes block-structured tensors (cat, flatten) too, as cyclemerge.universe does
    sd_a_prime = spec.apply(sd_a, cycle) if isinstance(spec, DerivedSpec) else apply_perms(sd_a, spec, cycle)
    fixed = fixed_fraction(cycle)
    units = sum(p.numel() for p in cycle.values())
    fixed_units = sum(fixed[g] * cycle[g].numel() for g in cycle)
    curve = interpolation_curve(
        model, sd_a, sd_a_prime, x, y, steps=steps, batch_size=batch_size, prepare=prepare, device=device
    )
    return {
        "distance": relative_distance(sd_a, sd_a_prime),
        "cosine": cosine_similarity(sd_a, sd_a_prime),
        "fixed_fraction": fixed,
        "fixed_fraction_mean": fixed_units / units if units else 1.0,
        "consistent": all(v == 1.0 for v in fixed.values()),
        "path_min_acc": min(curve["acc"]),
        "path_max_loss": max(curve["loss"]),
        "curve": curve,
    }


ENDPOINT_MEAN = "endpoint mean"


def method_table(results: Mapping[str, Mapping[str, Mapping[str, float]]], *, endpoints: Sequence[str] = ()) -> list[dict]:
    """Rows for the comparison table, from ``{method: {split: {"acc", "loss"}}}`` (splits "test", "train",
    and "validation" when the data has that slice).

    Order: the endpoints (kind "endpoint"), then their mean (kind "reference", method
    ``ENDPOINT_MEAN``), then every other method in the order given (kind "method"). Each row has
    ``method, kind, test_acc, test_loss, train_acc, train_loss`` (and ``validation_acc,
    validation_loss`` when any method was scored on a validation split); a split that was not
    evaluated is None.
    """
    unknown = [e for e in endpoints if e not in results]
    if unknown:
        raise KeyError(f"method_table: endpoints {unknown} have no results (known: {sorted(results)})")
    splits = ("test", "train") + (("validation",) if any("validation" in s for s in results.values()) else ())
    columns = [f"{split}_{metric}" for split in splits for metric in ("acc", "loss")]

    def row(name: str, kind: str, scores: Mapping[str, Mapping[str, float]]) -> dict:
        out: dict = {"method": name, "kind": kind}
        for split in splits:
            for metric in ("acc", "loss"):
                value = scores.get(split, {}).get(metric)
                out[f"{split}_{metric}"] = None if value is None else float(value)
        return out

    rows = [row(name, "endpoint", results[name]) for name in endpoints]
    if rows:
        mean: dict = {"method": ENDPOINT_MEAN, "kind": "reference"}
        for col in columns:
            values = [r[col] for r in rows]
            mean[col] = None if any(v is None for v in values) else sum(values) / len(values)
        rows.append(mean)
    rows += [row(name, "method", scores) for name, scores in results.items() if name not in endpoints]
    return rows
