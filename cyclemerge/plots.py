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
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

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


def plot_method_bars(
    rows: Sequence[Mapping],
    path,
    *,
    title: str = "Test accuracy of every method",
    metric: str = "test_acc",
) -> Path:
    """Bars of ``metric`` (an accuracy column of ``evaluate.method_table``) per row.

    Endpoints are grey; the "reference" row (the endpoints' mean) is drawn as a dashed line, or the
    mean of the endpoint bars when no reference row is given.
    """
    bars = [r for r in rows if r.get("kind") != "reference" and r.get(metric) is not None]
    reference = next((r[metric] for r in rows if r.get("kind") == "reference" and r.get(metric) is not None), None)
    endpoint_values = [r[metric] for r in bars if r.get("kind") == "endpoint"]
    if reference is None and endpoint_values:
        reference = sum(endpoint_values) / len(endpoint_values)
    fig, (ax,) = _new((max(6.0, 1.5 + 0.8 * len(bars)), 4.8))
    ax.set_title(title, fontsize=11)
    if not bars:
        _no_data(ax, f"no rows with {metric}")
        return _save(fig, path)
    names = [str(r["method"]) for r in bars]
    values = _pct([r[metric] for r in bars])
    colours = _colours(names)
    colour = [_ENDPOINT_COLOUR if r.get("kind") == "endpoint" else colours[n] for r, n in zip(bars, names)]
    positions = range(len(bars))
    ax.bar(positions, values, color=colour, edgecolor="black", linewidth=0.6)
    for x, v in zip(positions, values):
        # white box: the reference line often runs right through the endpoints' labels
        ax.text(x, v + 0.8, f"{v:.1f}", ha="center", va="bottom", fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.8, "alpha": 0.85})
    if reference is not None:
        label = f"endpoint mean ({100 * reference:.1f}%)"
        ax.axhline(100 * reference, color="black", linestyle="--", linewidth=1.2, label=label)
        fig.legend(loc="outside lower center", fontsize=9)  # inside, it would hide a bar
    tilt = len(names) > 4
    ax.set_xticks(list(positions), labels=names, rotation=30 if tilt else 0, ha="right" if tilt else "center", fontsize=9)
    split = metric.split("_")[0]
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.set_xlabel("model / merging method")
    ax.set_ylim(0, min(108.0, max(values) + 10.0))
    ax.grid(True, axis="y", alpha=0.35)
    ax.set_axisbelow(True)
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
