"""Per-channel activation statistics at a model's stat points, streamed over calibration tensors.

A *stat point* is a module path whose output channels (axis 1) belong to one permutation group
(``model.stat_points()``). Statistics are accumulated batch by batch in float64 with Chan's pairwise
merge of (count, mean, M2), so a channel whose mean is large next to its spread keeps its variance,
and memory is one batch of activations, never the whole calibration set. Conv maps contribute every
spatial position of every image as a sample; Linear outputs one sample per image.

Models are measured in eval mode (BatchNorm uses its running statistics), under ``no_grad``; the
training flag of every module is restored afterwards. ``run_hooked`` is the one loop every
measurement goes through: one forward per batch, hooks on any set of points at once, cut short after
the last point, so measuring many points costs one pass over the data, not one pass per point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from cyclemerge.permutation import Perms


@dataclass(frozen=True)
class Stats:
    """Per-channel statistics of one stat point: float64 ``mean`` and population ``var`` of shape [C]."""

    mean: torch.Tensor
    var: torch.Tensor
    count: int

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


class Moments:
    """Running (count, mean, M2) per channel; merging per-batch moments avoids the E[x²]-E[x]² cancellation."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, a: torch.Tensor) -> None:
        """``a``: float64 [C, S], S samples of C channels."""
        n = a.shape[1]
        if n == 0:
            return
        mean = a.mean(dim=1)
        self.merge(n, mean, (a - mean[:, None]).square().sum(dim=1))

    def add_batch(self, out: torch.Tensor) -> None:
        """``out``: one batch of activations [B, C, ...] as the layer returned them (see ``batch_moments``)."""
        self.merge(*batch_moments(out))

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan's update with the moments of ``n`` more samples per channel (float64 [C] ``mean`` and ``m2``)."""
        if n == 0:
            return
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def stats(self) -> Stats:
        if self.mean is None:
            raise RuntimeError("no samples were accumulated")
        return Stats(self.mean.cpu(), (self.m2 / self.count).cpu(), self.count)


class _Stop(Exception):
    """Raised by a hook once the last wanted point has run, so the rest of the forward is skipped."""


# Rows of a batch taken at a time by the per-batch reductions: a slice this size stays in the core's
# cache across the few elementwise ops done on it, where whole-batch ops (tens of MB) run at memory
# speed and allocate a fresh full-size temporary each (5x slower, measured on a 2-core Xeon).
CHUNK_BYTES = 1 << 20


def row_chunks(out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``out`` split along the batch axis into views of about ``CHUNK_BYTES`` each."""
    row = max(out[0].numel() * out.element_size(), 1) if len(out) else 1
    return out.split(max(1, CHUNK_BYTES // row))


def batch_moments(out: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(samples per channel, mean, M2) of one batch [B, C, ...], the moments as float64 [C].

    Reduced in the activations' own dtype, chunk by chunk, with no transposed copy: a hook that runs
    at every stat point of every batch must cost a few cached elementwise passes, not the float64
    [C, S] copy of ``_channels`` (as much as the conv before it). Sums are taken around the first
    chunk's mean, so E[x²]-E[x]² cancels nothing but the small distance between that shift and the
    batch mean; float32 sums cost a relative error of order 1e-7, that of the activations themselves.
    """
    if out.dim() < 2:
        raise ValueError(f"stat point output must have a channel axis (got shape {tuple(out.shape)})")
    dims = (0, *range(2, out.dim()))
    chunks = row_chunks(out)
    shift = chunks[0].mean(dim=dims, keepdim=True)
    total = torch.zeros(out.shape[1], dtype=torch.float64, device=out.device)
    squares = torch.zeros_like(total)
    for chunk in chunks:
        d = chunk - shift
        total += d.sum(dim=dims)
        squares += d.square_().sum(dim=dims)
    n = out.numel() // max(out.shape[1], 1)
    offset = total / max(n, 1)
    m2 = (squares - offset * total).clamp_min(0)
    return n, shift.flatten().to(torch.float64) + offset, m2


def _channels(out: torch.Tensor) -> torch.Tensor:
    """[B, C, ...] -> float64 [C, B·...]: every position of every example is one sample of its channel."""
    if out.dim() < 2:
        raise ValueError(f"stat point output must have a channel axis (got shape {tuple(out.shape)})")
    return out.detach().transpose(0, 1).reshape(out.shape[1], -1).to(torch.float64)


def model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def batches(x: torch.Tensor, batch_size: int, device: torch.device) -> Iterable[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) == 0:
        raise ValueError("no calibration samples: x is empty")
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size].to(device)


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode for the duration, then every module's own training flag back."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.train(mode)


OutputHook = Callable[[torch.Tensor], torch.Tensor | None]


def _aliases(out: torch.Tensor, args: tuple) -> bool:
    ptr = out.untyped_storage().data_ptr()
    return any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr for a in args)
InputHook = Callable[[torch.Tensor], None]
Sink = Callable[[str, torch.Tensor], None]


def run_hooked(
    model: nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int,
    outputs: Mapping[str, OutputHook],
    inputs: Mapping[str, InputHook] | None = None,
    stop_early: bool = False,
    writes: bool = False,
) -> int:
    """Run ``model`` over ``x`` in eval mode, under ``no_grad``, calling ``outputs[path](out)`` with the
    output of every listed module and ``inputs[path](inp)`` with its first input, batch by batch.

    An output hook may return a tensor, which then replaces the module's output for the rest of that
    forward. With ``writes`` the output hooks may also write into the tensor they are given: an
    output that shares memory with one of the module's inputs (``nn.Identity`` passes its input
    through) is copied first, so the write cannot reach a tensor the model still reads. With
    ``stop_early`` the forward is cut right after the last path of ``outputs`` has run, which must
    then be the last of them in forward order; a point that has not run by then is an error.
    Returns the number of forward calls made (one per batch).
    """
    inputs = inputs or {}
    handles = []
    seen: set[str] = set()
    last = list(outputs)[-1] if stop_early and outputs else None

    def on_output(path: str, fn: OutputHook):
        def hook(_module, args, out):
            seen.add(path)
            if writes and _aliases(out, args):
                out = out.clone()
            replaced = fn(out)
            if path == last:
                raise _Stop
            return replaced

        return hook

    def on_input(path: str, fn: InputHook):
        def hook(_module, args):
            seen.add(f"{path}:in")
            fn(args[0])

        return hook

    calls = 0
    try:
        for path, fn in inputs.items():
            handles.append(model.get_submodule(path).register_forward_pre_hook(on_input(path, fn)))
        for path, fn in outputs.items():
            handles.append(model.get_submodule(path).register_forward_hook(on_output(path, fn)))
        wanted = set(outputs) | {f"{p}:in" for p in inputs}
        with torch.no_grad(), evaluating(model):
            for xb in batches(x, batch_size, model_device(model)):
                seen.clear()
                calls += 1
                try:
                    model(xb)
                except _Stop:
                    pass
                missing = wanted - seen
                if missing:
                    raise RuntimeError(
                        f"stat points {sorted(missing)} did not run"
                        + (f" before {last!r}: stat points must be listed in forward order" if last else "")
                    )
    finally:
        for h in handles:
            h.remove()
    return calls


def stream(
    model: nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int,
    outputs: Sequence[str],
    sink: Sink,
    inputs: Sequence[str] = (),
    stop_early: bool = False,
) -> None:
    """``run_hooked`` handing ``sink(name, [C, S] float64)`` the output of every path in ``outputs``
    (name = path) and the first input of every path in ``inputs`` (name = ``path + ":in"``)."""

    def to_sink(name: str):
        def fn(a: torch.Tensor) -> None:
            sink(name, _channels(a))

        return fn

    run_hooked(
        model,
        x,
        batch_size=batch_size,
        outputs={p: to_sink(p) for p in outputs},
        inputs={p: to_sink(f"{p}:in") for p in inputs},
        stop_early=stop_early,
    )


def _paths(model: nn.Module, points: Iterable[str] | None) -> list[str]:
    paths = list(model.stat_points() if points is None else points)
    if not paths:
        raise ValueError("no stat points to measure")
    return paths


def channel_stats(
    model: nn.Module, x: torch.Tensor, *, batch_size: int, points: Iterable[str] | None = None
) -> dict[str, Stats]:
    """Per-channel mean and variance of every stat point's output over ``x`` (all of ``model.stat_points()``
    by default; ``points`` may be any iterable of module paths in forward order, e.g. a sub-dict of
    stat points). The forward stops after the last point, so the classifier is not run."""
    paths = _paths(model, points)
    moments = {p: Moments() for p in paths}
    stream(model, x, batch_size=batch_size, outputs=paths, sink=lambda name, a: moments[name].add(a), stop_early=True)
    return {p: moments[p].stats() for p in paths}


def permute_stats(stats: Mapping[str, Stats], perms: Perms, points: Mapping[str, str]) -> dict[str, Stats]:
    """Statistics of the permuted model: each point's channels gathered by its group's index vector
    (same convention as ``apply_perms``: new channel j is old channel ``perms[group][j]``)."""
    out: dict[str, Stats] = {}
    for path, s in stats.items():
        if path not in points:
            raise KeyError(f"permute_stats: {path!r} is not a stat point; known: {', '.join(points)}")
        p = perms.get(points[path])
        out[path] = s if p is None else Stats(s.mean[p.cpu()], s.var[p.cpu()], s.count)
    return out


def stats_to_tensors(stats: Mapping[str, Stats]) -> dict[str, torch.Tensor]:
    """Flat tensor dict (``{path}.mean``, ``{path}.var``, ``{path}.count``) for plain, weights-only saving."""
    flat: dict[str, torch.Tensor] = {}
    for path, s in stats.items():
        flat[f"{path}.mean"] = s.mean
        flat[f"{path}.var"] = s.var
        flat[f"{path}.count"] = torch.tensor(s.count, dtype=torch.int64)
    return flat


def stats_from_tensors(flat: Mapping[str, torch.Tensor]) -> dict[str, Stats]:
    paths = list(dict.fromkeys(key.rsplit(".", 1)[0] for key in flat))
    return {p: Stats(flat[f"{p}.mean"], flat[f"{p}.var"], int(flat[f"{p}.count"])) for p in paths}


def correlation_points(stat_points: Mapping[str, str]) -> dict[str, str]:
    """The points whose activations stand for each group in cross-correlations.

    A group with residual sums (modules named ``residual``) is a residual stream: it is represented by
    all its sums, pooled as extra samples of the same units, because the stream is what every block
    reads. The norms and shortcuts writing into it are left out: they are its summands, not the
    stream. Any other group is represented by all its points (one per group in our models: the
    pre-ReLU output of the layer whose rows the group permutes).
    """
    by_group: dict[str, list[str]] = {}
    for path, group in stat_points.items():
        by_group.setdefault(group, []).append(path)
    chosen: dict[str, str] = {}
    for group, paths in by_group.items():
        sums = [p for p in paths if p.rsplit(".", 1)[-1] == "residual"]
        for p in sums or paths:
            chosen[p] = group
    return {p: g for p, g in stat_points.items() if p in chosen}


class _CrossMoments:
    """Shifted sums Σ(a-K) and Σ(a-K)(a-K)ᵀ over the stacked units of N models (float64).

    The shift K (the first batch's mean) keeps the covariance free of the E[ab]-E[a]E[b] cancellation.
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.prod: torch.Tensor | None = None

    def add(self, a: torch.Tensor) -> None:
        if self.shift is None:
            self.shift = a.mean(dim=1)
            self.sum = torch.zeros_like(self.shift)
            self.prod = torch.zeros(a.shape[0], a.shape[0], dtype=a.dtype, device=a.device)
        c = a - self.shift[:, None]
        self.sum += c.sum(dim=1)
        self.prod += c @ c.T
        self.count += a.shape[1]

    def correlation(self) -> torch.Tensor:
        mean = self.sum / self.count
        cov = self.prod / self.count - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt()
        denom = torch.outer(std, std)
        # A constant unit correlates with nothing: 0 instead of 0/0.
        return torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov)).clamp(-1, 1)


def cross_correlations(
    models: Sequence[nn.Module], x: torch.Tensor, *, batch_size: int, points: Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Pearson correlations between the units of every pair of models, per permutation group.

    Returns ``{group: C}`` with ``C[a, b, i, j]`` the correlation between unit ``i`` of model ``a`` and
    unit ``j`` of model ``b`` on the same inputs (float32; ``C[a, a]`` is each model's own correlation
    matrix). ``points`` maps module path -> group; by default ``correlation_points(stat_points())``;
    several points of one group are pooled as extra samples.

    Cost per group of n units: (N·n)² float64 accumulators, i.e. 8·N²·n² bytes (N=5, n=512: 52 MB),
    and (N·n)²·S multiply-adds per batch of S samples; per batch all N models' activations at the
    chosen points are held at once (float32), so lower ``batch_size`` if that is too much.
    """
    if not models:
        raise ValueError("cross_correlations: no models")
    points = dict(correlation_points(models[0].stat_points()) if points is None else points)
    paths = list(points)
    groups = list(dict.fromkeys(points.values()))
    acc = {g: _CrossMoments() for g in groups}
    with torch.no_grad():
        device = model_device(models[0])
        for xb in batches(x, batch_size, device):
            per_model: list[dict[str, list[torch.Tensor]]] = []
            for m in models:
                held: dict[str, list[torch.Tensor]] = {g: [] for g in groups}

                def sink(path: str, a: torch.Tensor, held=held) -> None:
                    held[points[path]].append(a.to(torch.float32))

                stream(m, xb, batch_size=len(xb), outputs=paths, sink=sink, stop_early=True)
                per_model.append(held)
            for g in groups:
                # Units of all models stacked: rows [k·n, (k+1)·n) are model k's; samples pooled over points.
                stacked = torch.cat([torch.cat(h[g], dim=1) for h in per_model], dim=0)
                acc[g].add(stacked.to(torch.float64))
    n_models = len(models)
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        corr = acc[g].correlation()
        n = corr.shape[0] // n_models
        out[g] = corr.reshape(n_models, n, n_models, n).permute(0, 2, 1, 3).to(torch.float32).cpu().contiguous()
    return out
