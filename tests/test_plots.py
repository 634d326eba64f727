import matplotlib.image as mpimg
import numpy as np
import pytest

from cyclemerge import plots
from cyclemerge.plots import (
    DPI,
    PAIR_SIZE,
    SINGLE_SIZE,
    heatmap_size,
    method_axis,
    plot_cycle_paths,
    plot_gate_heatmap,
    plot_interpolation,
    plot_method_bars,
    plot_objective,
    plot_training_curves,
)


def png_shape(path):
    """(height, width) in pixels, after checking the file is a real, non-blank PNG."""
    assert path.exists() and path.stat().st_size > 1000
    image = mpimg.imread(path)
    assert image.ndim == 3 and image[..., :3].std() > 0.01, "the image is blank"
    return image.shape[:2]


def px(size):
    return round(size[1] * DPI), round(size[0] * DPI)


def curve(acc, loss):
    lam = list(np.linspace(0, 1, len(acc)))
    return {"lambdas": lam, "acc": acc, "loss": loss, "barrier": max(loss) - loss[0]}


def assert_no_leftovers(folder):
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_interpolation_png(tmp_path):
    curves = {"naive": curve([0.9, 0.3, 0.9], [0.3, 2.0, 0.3]), "c2m3": curve([0.9, 0.8, 0.9], [0.3, 0.5, 0.3])}
    out = plot_interpolation(curves, tmp_path / "sub" / "interp.png")
    assert out == tmp_path / "sub" / "interp.png"
    assert png_shape(out) == px(PAIR_SIZE)
    assert_no_leftovers(out.parent)


def test_cycle_paths_accepts_experiment_results_and_single_points(tmp_path):
    results = {
        "c2m3": {"distance": 0.0, "fixed_fraction_mean": 1.0, "curve": curve([0.9, 0.9], [0.3, 0.3])},
        "pairwise": curve([0.9], [0.3]),
    }
    assert png_shape(plot_cycle_paths(results, tmp_path / "cycle.png")) == px(PAIR_SIZE)


def test_gate_heatmap_png_and_size(tmp_path):
    parts = [f"stages.{s}.{b}.conv{c}" for s in range(3) for b in range(3) for c in (1, 2)]
    weights = np.random.default_rng(0).dirichlet(np.ones(5), size=len(parts))
    out = plot_gate_heatmap(weights, parts, [f"seed {i}" for i in range(5)], tmp_path / "gates.png")
    size = heatmap_size(len(parts), 5, max(map(len, parts)))
    assert png_shape(out) == px(size)
    assert heatmap_size(40, 5)[1] > heatmap_size(10, 5)[1], "taller tables get taller figures"


def test_gate_heatmap_rejects_wrong_shape_and_draws_empty(tmp_path):
    with pytest.raises(ValueError, match="2 parts × 3 models"):
        plot_gate_heatmap(np.ones((2, 2)), ["a", "b"], ["m0", "m1", "m2"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
    png_shape(plot_gate_heatmap(np.zeros((0, 3)), [], ["m0", "m1", "m2"], tmp_path / "empty.png"))


def test_objective_png(tmp_path):
    out = plot_objective({"restart 0": [1.0, 2.0, 2.5, 2.6], "restart 1": [3.0]}, tmp_path / "obj.png")
    assert png_shape(out) == px(SINGLE_SIZE)


def committed_like_rows():
    """The default run's method table (metrics/evaluate.json at the time of writing), in fractions."""
    endpoints = [0.8971, 0.8971, 0.898, 0.8952, 0.8958]
    rows = [{"method": f"model {i}", "kind": "endpoint", "test_acc": a} for i, a in enumerate(endpoints)]
    rows.append({"method": "endpoint mean", "kind": "reference", "test_acc": sum(endpoints) / 5})
    for name, acc in [("ensemble (outputs)", 0.899), ("C2M3 uniform", 0.8831), ("C2M3 + gates + repair", 0.8935),
                      ("naive average", 0.10), ("naive average + repair", 0.3481), ("MergeMany", 0.8873),
                      ("pairwise to reference", 0.8821), ("skipped", None)]:
        rows.append({"method": name, "kind": "method", "test_acc": acc})
    return rows


def test_method_axis_resolves_the_band_and_sets_chance_level_methods_apart():
    layout = method_axis(committed_like_rows())
    assert layout.band == (0.8952, 0.898)
    assert layout.ensemble == 0.899 and layout.reference == pytest.approx(0.89664)
    assert [r["method"] for r in layout.far] == ["naive average", "naive average + repair"]
    assert "skipped" not in [r["method"] for r in layout.near]
    lo, hi = layout.xlim
    # Derived from the non-chance methods: 88.21 (pairwise) to 89.90 (ensemble), a little padding.
    assert 87.9 < lo < 88.21 and 89.9 < hi < 90.2


def test_method_axis_zooms_on_the_band_when_a_method_is_far_below():
    rows = [{"method": f"e{i}", "kind": "endpoint", "test_acc": a} for i, a in enumerate([0.881, 0.889])]
    rows += [{"method": "c2m3 + repair", "kind": "method", "test_acc": 0.8205},
             {"method": "c2m3 + gates", "kind": "method", "test_acc": 0.8920}]
    layout = method_axis(rows)
    assert layout.reference == pytest.approx(0.885)  # no reference row: the endpoints' mean
    # 5 x the band's width (0.8 points) below its lower edge, so 82.05 sits on the left edge.
    assert layout.xlim[0] == pytest.approx(88.1 - 4.0 - 0.08 * (89.2 - 84.1))
    assert [r["method"] for r in layout.near] == ["c2m3 + repair", "c2m3 + gates"] and not layout.far


def test_method_figure_png_with_and_without_the_far_panel(tmp_path):
    rows = committed_like_rows()
    h, w = png_shape(plot_method_bars(rows, tmp_path / "methods.png"))
    near_rows = 1 + 5  # the endpoints' row and the methods on the axis
    assert abs(h - max(3.2, 1.5 + 0.34 * near_rows) * DPI) <= 1 and w == round(11.5 * DPI)  # taller with more rows
    close = [r for r in rows if not str(r["method"]).startswith("naive")]
    assert png_shape(plot_method_bars(close, tmp_path / "close.png"))[1] == round(8.5 * DPI)
    only_far = [r for r in rows if r["kind"] != "endpoint" and str(r["method"]).startswith("naive")] + rows[:2]
    png_shape(plot_method_bars(only_far, tmp_path / "far.png", metric="test_acc"))
    no_endpoints = [r for r in rows if r["kind"] == "method"]
    png_shape(plot_method_bars(no_endpoints, tmp_path / "bare.png"))


def test_training_curves_accept_both_history_shapes(tmp_path):
    histories = {
        "seed 1": {"train_loss": [1.0, 0.5, 0.3], "test_acc": [0.6, 0.8, 0.85]},
        "seed 2": [{"epoch": 1, "train_loss": 1.1, "test_acc": 0.55}, {"epoch": 2, "train_loss": 0.6, "test_acc": 0.8}],
    }
    assert png_shape(plot_training_curves(histories, tmp_path / "train.png")) == px(PAIR_SIZE)


@pytest.mark.parametrize(
    "call",
    [
        lambda p: plot_interpolation({}, p),
        lambda p: plot_cycle_paths({}, p),
        lambda p: plot_objective({"empty": []}, p),
        lambda p: plot_method_bars([], p),
        lambda p: plot_training_curves({}, p),
    ],
)
def test_empty_inputs_still_give_a_figure(tmp_path, call):
    out = call(tmp_path / "empty.png")
    png_shape(out)


def test_failed_render_leaves_no_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots.Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_objective({"a": [1.0, 2.0]}, tmp_path / "obj.png")
    assert list(tmp_path.iterdir()) == []
