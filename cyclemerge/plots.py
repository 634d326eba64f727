"""The pipeline's figures, as PNG files readable without the code.

Figures are built with ``matplotlib.figure.Figure`` directly, never through ``pyplot``: rendering
to PNG then always goes through the Agg canvas whatever backend a notebook has selected, and no
global pyplot state is shared between the threads Prefect runs tasks in.

Inputs are the plain dicts of ``cyclemerge.evaluate``; accuracies are fractions and are drawn in
percent. Every function writes atomically (temp file in the target folder + ``os.replace``),
returns the path, and draws a labelled "no data" figure instead of failing on empty input.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MultipleLocator
from matplotlib.transforms import blended_transform_factory

DPI = 120
PAIR_SIZE = (11.0, 4.5)  # two panels side by side: accuracy and loss
SINGLE_SIZE = (8.0, 4.5)

# Fixed colours for the methods the pipeline knows, so one method looks the same in every figure.
_KNOWN_COLOURS = {
    "c2m3": "tab:blue",
    "merge_many": "tab:orange",
    "pairwise": "tab:green",
    "naive": "tab:red",
    "ensemble": "tab:purple",
    "gates": "tab:cyan",
    "repair": "tab:olive",
}
_OTHER_COLOURS = ["tab:brown", "tab:pink", "tab:gray", "navy", "darkgreen", "maroon", "teal", "goldenrod"]
_ENDPOINT_COLOUR = "0.65"


def _known_colour(name: str) -> str | None:
    return next((c for key, c in _KNOWN_COLOURS.items() if key in name.lower()), None)


def _colours(names: Sequence[str]) -> dict[str, str]:
    """Known methods keep their colour across figures; other names (seeds, restarts, a second
    variant of one method such as "c2m3+gates" after "c2m3") take distinct spare colours."""
    if not any(_known_colour(n) for n in names):
        return {n: f"C{i % 10}" for i, n in enumerate(names)}
    spare = iter(_OTHER_COLOURS * (1 + len(names) // len(_OTHER_COLOURS)))
    out: dict[str, str] = {}
    for n in names:
        known = _known_colour(n)
        out[n] = known if known and known not in out.values() else next(spare)
    return out


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=DPI)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a figure is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no data: {what}", ha="center", va="center", fontsize=12, color="0.4", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _new(size: tuple[float, float], ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _pct(values: Sequence[float]) -> list[float]:
    return [100.0 * v for v in values]


def _marker(n: int) -> dict:
    return {"marker": "o", "markersize": 4 if n <= 40 else 0}


def _curve_panels(
    curves: Mapping[str, Mapping], labels: Mapping[str, str], path, *, title: str, xlabel: str, split: str
) -> Path:
    fig, (ax_acc, ax_loss) = _new(PAIR_SIZE, 2)
    fig.suptitle(title, fontsize=12)
    colours = _colours(list(curves))
    drawn = False
    for name, curve in curves.items():
        lam = list(curve.get("lambdas", []))
        if not lam:
            continue
        drawn = True
        style = {"color": colours[name], "label": labels[name], "linewidth": 1.8, **_marker(len(lam))}
        ax_acc.plot(lam, _pct(curve["acc"]), **style)
        ax_loss.plot(lam, curve["loss"], **style)
    for ax, ylabel in ((ax_acc, f"{split} accuracy (%)"), (ax_loss, f"{split} cross-entropy loss (nats)")):
        if not drawn:
            _no_data(ax, "no curves")
            continue
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.02, 1.02)
        ax.grid(True, alpha=0.35)
    if drawn:
        ax_acc.set_title("accuracy (higher is better)", fontsize=10)
        ax_loss.set_title("loss (lower is better)", fontsize=10)
        # One legend below both panels: inside, it would cover the middle of the path, the part that matters.
        handles, names = ax_acc.get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 2), fontsize=9)
    return _save(fig, path)


def plot_interpolation(
    curves: Mapping[str, Mapping], path, *, title: str = "Linear interpolation between two models", split: str = "test"
) -> Path:
    """Accuracy and loss along (1 - λ) A + λ B, one line per ``interpolation_curve`` result."""
    labels = {
        name: f"{name} (loss barrier {c['barrier']:.3f} nats)" if "barrier" in c else name for name, c in curves.items()
    }
    return _curve_panels(
        curves, labels, path, title=title, xlabel="λ in (1 − λ)·A + λ·B   (0 = model A, 1 = model B)", split=split
    )


def plot_cycle_paths(
    results: Mapping[str, Mapping],
    path,
    *,
    title: str = "Cycle A → B → C → A: linear path from A to A′ = A mapped around the cycle by the pairwise maps",
    split: str = "test",
) -> Path:
    """Accuracy and loss along A…A′ per method; values are ``cycle_experiment`` results or bare curves."""
    curves, labels = {}, {}
    for name, res in results.items():
        curves[name] = res.get("curve", res)
        if "distance" in res:
            fixed = 100 * res["fixed_fraction_mean"]
            labels[name] = f"{name} (‖A′−A‖/‖A‖ = {res['distance']:.3f}, {fixed:.0f}% units fixed)"
        else:
            labels[name] = name
    xlabel = "λ in (1 − λ)·A + λ·A′   (A′ = A carried around the cycle)"
    return _curve_panels(curves, labels, path, title=title, xlabel=xlabel, split=split)


def heatmap_size(n_parts: int, n_models: int, longest_name: int = 12) -> tuple[float, float]:
    """Figure size (inches) that keeps one annotated cell legible; grows with the table."""
    width = max(5.0, 1.8 + 0.075 * longest_name + 0.85 * n_models)
    height = max(3.0, 1.4 + 0.3 * n_parts)
    return min(width, 40.0), min(height, 60.0)


def plot_gate_heatmap(
    weights,
    part_names: Sequence[str],
    model_names: Sequence[str],
    path,
    *,
    title: str = "Final gate weights per layer part and seed model",
    value_label: str = "gate weight (share of the part)",
) -> Path:
    """Heatmap of a [parts × models] table of gate weights with every value written in its cell."""
    data = np.asarray(weights, dtype=float)
    if data.size != len(part_names) * len(model_names):
        raise ValueError(
            f"gate heatmap: {data.shape} values for {len(part_names)} parts × {len(model_names)} models"
        )
    data = data.reshape(len(part_names), len(model_names))
    longest = max((len(p) for p in part_names), default=12)
    fig, (ax,) = _new(heatmap_size(len(part_names), len(model_names), longest))
    ax.set_title(title, fontsize=11)
    if data.size == 0:
        _no_data(ax, "no gated parts")
        return _save(fig, path)
    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    vmin, vmax = (0.0, max(1.0, hi)) if lo >= 0 else (lo, hi if hi > lo else lo + 1.0)
    image = ax.imshow(data, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(model_names)), labels=list(model_names), fontsize=9)
    ax.set_yticks(range(len(part_names)), labels=list(part_names), fontsize=8)
    ax.set_xlabel("seed model")
    ax.set_ylabel("layer part (input at top → output at bottom)")
    if data.size <= 2000:
        fontsize = 8 if len(model_names) <= 12 else 6
        mid = (vmin + vmax) / 2
        for (i, j), v in np.ndenumerate(data):
            text = "nan" if not math.isfinite(v) else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color="white" if v < mid else "black")
    bar = fig.colorbar(image, ax=ax, shrink=0.9)
    bar.set_label(value_label)
    return _save(fig, path)


def plot_objective(
    histories: Mapping[str, Sequence[float]],
    path,
    *,
    title: str = "Alignment objective per Frank-Wolfe iteration",
    ylabel: str = "objective (sum of pairwise weight inner products, higher is better)",
    xlabel: str = "iteration (0 = initialization)",
) -> Path:
    """One line per history (e.g. per restart or per method), final value in the legend."""
    fig, (ax,) = _new(SINGLE_SIZE)
    ax.set_title(title, fontsize=11)
    colours = _colours(list(histories))
    drawn = False
    for name, values in histories.items():
        values = [float(v) for v in values]
        if not values:
            continue
        drawn = True
        label = f"{name} (final {values[-1]:.4g})"
        ax.plot(range(len(values)), values, color=colours[name], linewidth=1.8, label=label, **_marker(len(values)))
    if not drawn:
        _no_data(ax, "no objective history")
        return _save(fig, path)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(True, alpha=0.35)
    ax.legend(fontsize=8, loc="best")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def _split_label(metric: str) -> str:
    return metric.rsplit("_", 1)[0].replace("_", " ")


def _zoom_ticks(ax: Axes, span: float) -> None:
    """Ticks that resolve tenths of a point on a narrow axis (major 0.2-1, minor 0.1)."""
    major = 0.2 if span <= 2.5 else 0.5 if span <= 6 else 1.0 if span <= 12 else None
    if major is not None:
        ax.xaxis.set_major_locator(MultipleLocator(major))
        ax.xaxis.set_minor_locator(MultipleLocator(0.1 if major < 1 else 0.5))


@dataclass
class MethodAxis:
    """What :func:`plot_method_bars` draws: the band, reference lines, the rows on the axis and apart."""

    band: tuple[float, float] | None  # worst and best endpoint (fractions)
    reference: float | None  # the endpoints' mean
    ensemble: float | None
    endpoints: list[Mapping]
    near: list[Mapping]  # methods on the axis, in the given order
    far: list[Mapping]  # methods listed apart (near chance)
    xlim: tuple[float, float]  # in percent; rows below xlim[0] sit on the left edge
    floor: float  # methods under this fraction are "far"


def method_axis(rows: Sequence[Mapping], *, metric: str = "test_acc", chance_ratio: float = 0.5,
                zoom_points: float = 2.0) -> MethodAxis:
    """Split the rows and choose the axis of :func:`plot_method_bars` (see there)."""
    from cyclemerge.report import endpoint_band

    valued = [r for r in rows if r.get(metric) is not None]
    endpoints = [r for r in valued if r.get("kind") == "endpoint"]
    methods = [r for r in valued if r.get("kind") == "method"]
    band = endpoint_band(valued, metric)
    reference = next((r[metric] for r in valued if r.get("kind") == "reference"), None)
    if reference is None and endpoints:
        reference = sum(r[metric] for r in endpoints) / len(endpoints)
    floor = chance_ratio * band[0] if band else -math.inf
    near = [r for r in methods if r[metric] >= floor]
    far = [r for r in methods if r[metric] < floor]
    ensemble = next((r[metric] for r in near if "ensemble" in str(r["method"]).lower()), None)
    points = [100 * r[metric] for r in near + endpoints] or [0.0, 100.0]
    lo, hi = min(points), max(points)
    if band:
        lo = max(lo, 100 * band[0] - max(zoom_points, 5 * 100 * (band[1] - band[0])))
    pad = 0.08 * max(hi - lo, 0.5)
    return MethodAxis(band, reference, ensemble, endpoints, near, far, (lo - pad, hi + pad), floor)


def plot_method_bars(
    rows: Sequence[Mapping],
    path,
    *,
    title: str | None = None,
    metric: str = "test_acc",
    chance_ratio: float = 0.5,
    zoom_points: float = 2.0,
) -> Path:
    """Accuracy of every method against the endpoints' band, on an axis that resolves tenths of a point.

    ``rows`` are ``evaluate.method_table`` rows. The endpoints' min-max band is shaded; their mean
    (the "reference" row, else the mean of the endpoint rows) and the output ensemble (a row whose
    name contains "ensemble", drawn as a purple diamond) are vertical lines; the endpoints are grey
    ticks on one row and every method is a dot coloured by where it lies: above, inside or below
    the band. Values and their difference to the endpoint mean are written in a column right of
    the axis.

    The axis spans the methods near the band, reaching at most ``max(zoom_points, 5 x the band's
    width)`` points below its lower edge; a method lower than that sits on the left edge as an
    open triangle (its value still in the column). Methods under ``chance_ratio`` x the worst
    endpoint (naive averaging near chance) are listed apart in a panel on the right.
    """
    from cyclemerge.report import band_position

    split = _split_label(metric)
    title = title or f"{split.capitalize()} accuracy against the endpoints' band"
    layout = method_axis(rows, metric=metric, chance_ratio=chance_ratio, zoom_points=zoom_points)
    band, reference, ensemble = layout.band, layout.reference, layout.ensemble
    endpoints, near, far, floor = layout.endpoints, layout.near, layout.far, layout.floor

    n_rows = len(near) + (1 if endpoints else 0)
    fig = Figure(figsize=(11.5 if far else 8.5, max(3.2, 1.5 + 0.34 * n_rows)), dpi=DPI, layout="constrained")
    ax, side = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3.0, 1.25]}) if far else (fig.subplots(1, 1), None)
    fig.suptitle(title, fontsize=12)
    if side is not None:
        side.set_axis_off()
        lines = [f"Far below the endpoints\n(< {100 * floor:.1f}%, not on the axis):", ""]
        lines += [f"{r['method']}: {100 * r[metric]:.2f}%" for r in far]
        side.text(0.12, 1.0, "\n".join(lines), va="top", ha="left", fontsize=9, transform=side.transAxes,
                  bbox={"facecolor": "0.96", "edgecolor": "0.7", "pad": 6})
    if not endpoints and not near:
        _no_data(ax, f"no rows with {metric}" if not far else "every method is far below the endpoints")
        return _save(fig, path)

    left, right = layout.xlim
    ax.set_xlim(left, right)
    _zoom_ticks(ax, right - left)

    handles = []
    if band:
        ax.axvspan(100 * band[0], 100 * band[1], color="0.85", zorder=0)
        handles.append(Patch(color="0.85", label=f"endpoints' band {100 * band[0]:.2f}–{100 * band[1]:.2f}%"))
    if reference is not None:
        ax.axvline(100 * reference, color="black", linestyle="--", linewidth=1.1, zorder=1)
        handles.append(Line2D([], [], color="black", linestyle="--", label=f"endpoint mean {100 * reference:.2f}%"))
    if ensemble is not None:
        ax.axvline(100 * ensemble, color=_KNOWN_COLOURS["ensemble"], linestyle=":", linewidth=1.4, zorder=1)
        handles.append(Line2D([], [], color=_KNOWN_COLOURS["ensemble"], linestyle=":",
                              label=f"ensemble (outputs) {100 * ensemble:.2f}%"))

    labels = ([f"endpoints ({len(endpoints)})"] if endpoints else []) + [str(r["method"]) for r in near]
    ys = list(range(len(labels)))[::-1]  # first row at the top
    # Values in a column just right of the axis: beside the dots they would cross the reference lines.
    column = blended_transform_factory(ax.transAxes, ax.transData)
    place_colour = {"above": "tab:green", "inside": "tab:blue", "below": "tab:red"}
    row_y = iter(ys)
    if endpoints:
        y = next(row_y)
        xs = [100 * r[metric] for r in endpoints]
        ax.scatter(xs, [y] * len(xs), marker="|", s=260, linewidths=2.2, color=_ENDPOINT_COLOUR, zorder=3)
        ax.text(1.02, y, f"{min(xs):.2f}–{max(xs):.2f}", va="center", fontsize=8, color="0.3", transform=column)
    clipped = False
    for r, y in zip(near, row_y):
        v = 100 * r[metric]
        is_ensemble = "ensemble" in str(r["method"]).lower()
        where = band_position(r[metric], band) if band else "inside"
        colour = _KNOWN_COLOURS["ensemble"] if is_ensemble else place_colour[where]
        if v < left:
            clipped = True
            ax.plot([left], [y], "<", markersize=9, markerfacecolor="white", markeredgecolor=colour,
                    markeredgewidth=1.6, zorder=4, clip_on=False)
        else:
            ax.plot([v], [y], "D" if is_ensemble else "o", markersize=7, color=colour, markeredgecolor="black",
                    markeredgewidth=0.6, zorder=4)
        text = f"{v:.2f}" + (f" ({v - 100 * reference:+.2f})" if reference is not None else "")
        ax.text(1.02, y, text, va="center", fontsize=8, transform=column)
    ax.set_yticks(ys, labels=labels, fontsize=9)
    ax.set_ylim(-0.7, len(labels) - 0.3)
    ax.set_xlabel(f"{split} accuracy (%)" + ("; in brackets: points vs the endpoint mean" if reference is not None else ""))
    ax.grid(True, axis="x", which="major", alpha=0.45)
    ax.grid(True, axis="x", which="minor", alpha=0.15)
    ax.set_axisbelow(True)
    if band:
        handles += [Line2D([], [], marker="o", linestyle="", color=c, markeredgecolor="black", markeredgewidth=0.6,
                           label=f"{where} the band") for where, c in place_colour.items()]
    if clipped:
        handles.append(Line2D([], [], marker="<", linestyle="", markerfacecolor="white", markeredgecolor="0.3",
                              markeredgewidth=1.6, label="below the axis (value in the column)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), fontsize=8)
    return _save(fig, path)


def _as_series(history) -> dict[str, list[float]]:
    """Accept ``{"train_loss": [...], ...}`` or a list of per-epoch dicts ``[{"epoch": 1, "train_loss": ...}]``."""
    if isinstance(history, Mapping):
        return {k: [float(v) for v in vs] for k, vs in history.items()}
    series: dict[str, list[float]] = {}
    for record in history:
        for k, v in record.items():
            series.setdefault(k, []).append(float(v))
    return series


def _linestyle(key: str) -> str:
    """Line style by split, so train and test read the same way in both panels."""
    key = key.lower()
    return "-" if "train" in key else "--" if "test" in key else ":" if "val" in key else "-."


def _split_name(key: str) -> str:
    return key.replace("_loss", "").replace("loss", "").replace("_acc", "").replace("acc", "").strip("_ ") or "train"


def plot_training_curves(histories: Mapping[str, object], path, *, title: str = "Training of the seed models") -> Path:
    """Per-model loss (left) and accuracy (right) per epoch.

    Each history is a dict of per-epoch lists or a list of per-epoch dicts; keys containing "loss"
    go to the left panel, keys containing "acc" (fractions) to the right; an "epoch" key, when
    present, gives the x values (else 1, 2, ...). Colour = model, line style = split (solid train,
    dashed test, dotted validation); one legend for each.
    """
    fig, (ax_loss, ax_acc) = _new(PAIR_SIZE, 2)
    fig.suptitle(title, fontsize=12)
    colours = _colours(list(histories))
    styles: dict[str, str] = {}
    models_drawn: list[str] = []
    drawn = {"loss": False, "acc": False}
    for name, history in histories.items():
        series = _as_series(history)
        epochs = series.pop("epoch", None)
        for key, values in series.items():
            kind = "loss" if "loss" in key else "acc" if "acc" in key else None
            if kind is None or not values:
                continue
            xs = epochs[: len(values)] if epochs else list(range(1, len(values) + 1))
            ax = ax_loss if kind == "loss" else ax_acc
            ys = values if kind == "loss" else _pct(values)
            ax.plot(xs, ys, color=colours[name], linestyle=_linestyle(key), linewidth=1.6, **_marker(len(values)))
            styles.setdefault(_split_name(key), _linestyle(key))
            if name not in models_drawn:
                models_drawn.append(name)
            drawn[kind] = True
    for ax, kind, ylabel in ((ax_loss, "loss", "cross-entropy loss (nats)"), (ax_acc, "acc", "accuracy (%)")):
        if not drawn[kind]:
            _no_data(ax, f"no {kind} history")
            continue
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.35)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if models_drawn:
        model_handles = [Line2D([], [], color=colours[n], linewidth=2, label=n) for n in models_drawn]
        split_handles = [Line2D([], [], color="black", linestyle=ls, linewidth=1.6, label=sp) for sp, ls in styles.items()]
        fig.legend(handles=model_handles + split_handles, loc="outside lower center",
                   ncol=min(8, len(model_handles) + len(split_handles)), fontsize=9)
    return _save(fig, path)
